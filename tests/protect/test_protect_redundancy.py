"""dup and tmr against brute force, channel selection under a FLOP budget by hand, and the
per-channel vulnerability map they take it from."""

import json
import math

import numpy as np
import pytest
import torch
from protect_models import FAULT_COLUMNS, data, rows, tiny

from flipsafe.campaign.store import read_model_info
from flipsafe.errors import ConfigError
from flipsafe.metrics.vulnerability import channel_map
from flipsafe.protect.redundancy import Candidate, channel_mask, choose_channels, verdicts


def test_tmr_on_a_layer_leaves_no_sdc_from_its_output_faults(tmp_path):
    model = tiny()
    xy = data(model)
    bare = rows(model, xy, tmp_path / "bare", n=80)
    tmr = rows(model, xy, tmp_path / "tmr", protect="tmr:layers=3", n=80)
    for c in FAULT_COLUMNS:
        assert bare.column(c).to_pylist() == tmr.column(c).to_pylist(), c
    last = np.array(tmr.column("layer").to_pylist()) == "3"
    corrected, sdc = tmr.column("corrected").to_numpy(), tmr.column("sdc").to_numpy()
    assert bare.column("sdc").to_numpy()[last].any()  # they did harm unprotected
    assert corrected[last].all() and not sdc[last].any()  # every bit flip changes its value
    assert (tmr.column("faulty_top1").to_numpy()[last]
            == tmr.column("golden_top1").to_numpy()[last]).all()
    # The other layer's faults are as unprotected.
    assert not corrected[~last].any()
    assert np.array_equal(sdc[~last], bare.column("sdc").to_numpy()[~last])


def test_dup_detects_every_changed_output_it_duplicates_and_nothing_else(tmp_path):
    model = tiny()
    xy = data(model)
    dup = rows(model, xy, tmp_path / "dup", protect="dup:layers=0", n=80)
    first = np.array(dup.column("layer").to_pylist()) == "0"
    detected = dup.column("detected").to_numpy()
    assert detected[first].all() and not detected[~first].any()
    assert not dup.column("sdc").to_numpy()[first].any()


def test_verdicts_by_hand():
    golden = torch.zeros(4, 2, 3)
    faulty = golden.clone()
    faulty[0, 0, 1] = 1.0  # in a protected channel
    faulty[1, 1, 2] = float("nan")  # outside it
    faulty[2, 0, 0] = -0.0  # a sign flip of zero changes the bits
    mask = channel_mask((2, 3), conv=True, channels=[0])
    d, c = verdicts(golden, faulty, mask, corrects=False)
    assert d.tolist() == [True, False, True, False] and not c.any()
    d, c = verdicts(golden, faulty, mask, corrects=True)
    assert c.tolist() == [True, False, True, False] and not d.any()
    # Last-dim channels for Linear outputs (also over tokens).
    assert channel_mask((2, 3), conv=False, channels=[2]).tolist() == [[False, False, True]] * 2


def _wilson_low(k, n, z=2.5758293035489004):
    """The Wilson score interval's lower bound of k/n at 99 % (z = Phi^-1(0.995)), by hand."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half)


def _cand(layer, channel, k, n, flops):
    return Candidate(layer, channel, k / n, flops, _wilson_low(k, n))


def test_channels_are_chosen_by_the_lower_bound_of_their_rate_within_the_budget():
    # Lower bounds by hand: 40/100 -> 0.284, 30/100 -> 0.197, 5/10 -> 0.184, 1/1 -> 0.131:
    # the channel with one fault and one SDC (rate 1.0) comes last, not first.
    cands = [_cand("a", 0, 5, 10, 60), _cand("a", 1, 40, 100, 30), _cand("b", 0, 30, 100, 30),
             _cand("b", 1, 0, 50, 1), _cand("b", 2, 1, 1, 50)]
    assert [round(c.low, 3) for c in cands] == [0.184, 0.284, 0.197, 0.0, 0.131]
    # 60: 40/100 (30) and 30/100 (30) fit; ranking by rate would have taken 1/1 (50) alone.
    assert choose_channels(cands, 60) == {"a": [1], "b": [0]}
    assert choose_channels(cands, 100) == {"a": [1], "b": [0]}  # 5/10 (60) no longer fits 40
    assert choose_channels(cands, 120) == {"a": [0, 1], "b": [0]}
    # A channel without SDCs is never worth copying.
    assert choose_channels(cands, 1000) == {"a": [0, 1], "b": [0, 2]}
    assert choose_channels(cands, 10) == {}
    for budget in range(0, 200, 7):
        chosen = choose_channels(cands, budget)
        cost = {(c.layer, c.channel): c.flops for c in cands}
        assert sum(cost[(k, ch)] for k, v in chosen.items() for ch in v) <= budget


def test_channel_ties_go_to_the_higher_rate_then_the_cheaper():
    # Equal lower bounds: the higher rate first.
    assert choose_channels([Candidate("d", 0, 0.5, 10, 0.2), Candidate("d", 1, 0.6, 10, 0.2)],
                           10) == {"d": [1]}
    # Equal bounds and rates: the cheaper first.
    assert choose_channels([_cand("c", 0, 40, 100, 30), _cand("c", 1, 40, 100, 20)],
                           30) == {"c": [1]}


def test_channel_map_ranks_channels_by_the_lower_bound_of_their_rate():
    import pyarrow as pa

    # A Linear layer with 3 features: channel 0 has 1 fault and 1 SDC, channel 1 40 SDCs in
    # 100 faults, channel 2 5 in 10 (lower bounds 0.131, 0.284, 0.184 by hand).
    counts = {0: (1, 1), 1: (40, 100), 2: (5, 10)}
    index, sdc = [], []
    for ch, (k, n) in counts.items():
        index += [ch + 3 * i for i in range(n)]  # feature ch of output element 3i + ch
        sdc += [True] * k + [False] * (n - k)
    table = pa.table({"layer": ["fc"] * len(index), "index": index, "sdc": sdc})
    cmap = channel_map(table, {"fc": {"kind": "linear", "output_shape": [3]}}, 0.99).to_pylist()
    assert [r["channel"] for r in cmap] == [1, 2, 0]
    for r in cmap:
        k, n = counts[r["channel"]]
        assert (r["sdc"], r["n"]) == (k, n)
        assert r["low"] == pytest.approx(_wilson_low(k, n), rel=1e-9)


def test_channel_map_counts_sdcs_per_output_channel(tmp_path):
    model = tiny()
    xy = data(model)
    table = rows(model, xy, tmp_path / "bare", n=300)
    layers = read_model_info(tmp_path / "bare")["layers"]
    assert layers == {"0": {"kind": "conv", "output_shape": [3, 5, 5]},
                      "3": {"kind": "linear", "output_shape": [4]}}
    cmap = channel_map(table, layers).to_pylist()
    names = np.array(table.column("layer").to_pylist())
    index = table.column("index").to_numpy()
    sdc = table.column("sdc").to_numpy()
    for r in cmap:
        rows_ = names == r["layer"]
        ch = index // 25 if r["layer"] == "0" else index % 4
        mine = rows_ & (ch == r["channel"])
        assert r["n"] == mine.sum() and r["sdc"] == sdc[mine].sum()
        assert r["rate"] == pytest.approx(r["sdc"] / r["n"])
        assert r["low"] <= r["rate"] <= r["high"]
    assert sum(r["n"] for r in cmap) == table.num_rows
    ranks = [(r["low"], r["rate"]) for r in cmap if r["layer"] == "0"]
    assert ranks == sorted(ranks, reverse=True)


def test_dup_under_a_budget_copies_the_most_vulnerable_channels(tmp_path, capsys):
    model = tiny()
    xy = data(model)
    rows(model, xy, tmp_path / "map", n=300, seed=9)
    spec = f"dup:budget=30%:map={tmp_path / 'map'}"
    dup = rows(model, xy, tmp_path / "dup", protect=spec, n=120)
    info = read_model_info(tmp_path / "dup")["protect"]
    chosen = info["layers"]["dup"]
    assert chosen and not any("warning" in n for n in info["notes"])
    # Budget: conv channel = 2*18*25 = 900 FLOPs, linear feature = 2*75 = 150; the model's
    # Conv/Linear FLOPs are 3*900 + 4*150 = 3300, so 30 % is 990.
    cmap = channel_map(_read_rows(tmp_path / "map"), read_model_info(tmp_path / "map")["layers"])
    want = choose_channels([Candidate(r["layer"], r["channel"], r["rate"],
                                      900 if r["layer"] == "0" else 150, r["low"])
                            for r in cmap.to_pylist()], 990)
    assert sorted(want) == chosen
    names = np.array(dup.column("layer").to_pylist())
    index = dup.column("index").to_numpy()
    channel = np.where(names == "0", index // 25, index % 4)
    copied = np.array([int(c) in want.get(n, []) for n, c in zip(names, channel)])
    assert np.array_equal(dup.column("detected").to_numpy(), copied)
    # The same plan and seed as the map: selection and evaluation on the same faults.
    rows(model, xy, tmp_path / "same", protect=spec, n=300, seed=9)
    notes = read_model_info(tmp_path / "same")["protect"]["notes"]
    assert any("same faults" in n for n in notes)
    assert "same faults" in capsys.readouterr().err


def _read_rows(folder):
    from flipsafe.campaign import ResultsStore

    store = ResultsStore(folder)
    store.open()
    return store.read()


def test_a_budget_needs_a_map(tmp_path):
    model = tiny()
    with pytest.raises(ConfigError, match="map="):
        rows(model, data(model), tmp_path / "x", protect="tmr:budget=10%", n=5)


def test_summary_channels_prints_the_map_top_channels(tmp_path):
    import json
    import subprocess
    import sys

    model = tiny()
    table = rows(model, data(model), tmp_path / "bare", n=200)
    cmap = channel_map(table, read_model_info(tmp_path / "bare")["layers"]).to_pylist()
    top2 = [r for r in cmap if r["layer"] == "0"][:2] + [r for r in cmap if r["layer"] == "3"][:2]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flipsafe", "summary",
                               str(tmp_path / "bare"), *args],
                              check=False, capture_output=True, text=True)
    r = cli("--channels", "2", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["channels"]
    assert [(g["layer"], g["channel"], g["sdc"], g["n"]) for g in got] == \
        [(w["layer"], w["channel"], w["sdc"], w["n"]) for w in top2]
    r = cli("--channels", "2")
    assert r.returncode == 0 and "ranked by the lower end of their" in r.stdout
    assert f"[{top2[0]['low']:.2%}, {top2[0]['high']:.2%}]" in r.stdout
    r = cli("--channels", "0")
    assert r.returncode == 2 and "at least 1" in r.stderr


def test_a_resume_refuses_a_map_that_now_selects_other_channels(tmp_path):
    from flipsafe.errors import CampaignError

    model = tiny()
    xy = data(model)
    rows(model, xy, tmp_path / "map", n=300, seed=9)
    spec = f"tmr:budget=30%:map={tmp_path / 'map'}"
    rows(model, xy, tmp_path / "tmr", protect=spec, n=60)
    rows(model, xy, tmp_path / "tmr", protect=spec, n=60)  # the same map: resumes
    info_path = tmp_path / "tmr" / "model.json"
    info = json.loads(info_path.read_text())
    chosen = info["protect"]["channels"]["tmr"]
    layer = next(iter(chosen))
    chosen[layer] = chosen[layer][:-1] + [999]  # as if the map had chosen otherwise
    info_path.write_text(json.dumps(info))
    with pytest.raises(CampaignError, match="other channels"):
        rows(model, xy, tmp_path / "tmr", protect=spec, n=60)


def test_a_budget_that_chooses_no_channel_is_refused_with_the_cheapest_cost(tmp_path):
    model = tiny()
    xy = data(model)
    table = rows(model, xy, tmp_path / "map", n=300, seed=9)
    cmap = channel_map(table, read_model_info(tmp_path / "map")["layers"]).to_pylist()
    # Copying one conv channel costs 2*18*25 = 900 FLOPs, one linear feature 2*75 = 150;
    # 0.01 % of the model's 3300 Conv/Linear FLOPs is 0.33 FLOPs: nothing fits.
    cheapest = min(900 if r["layer"] == "0" else 150 for r in cmap if r["sdc"])
    with pytest.raises(ConfigError, match=f"chooses no channel.*cheapest channel with an SDC "
                                          f"costs {cheapest:,} FLOPs") as err:
        rows(model, xy, tmp_path / "dup", protect=f"dup:budget=0.01%:map={tmp_path / 'map'}",
             n=20)
    assert "\n" not in str(err.value)


def test_a_map_without_sdcs_in_the_copyable_layers_is_refused(tmp_path):
    model = tiny()
    xy = data(model)
    # The map faulted only the conv layer (0); tmr may copy only the Linear layer (3).
    table = rows(model, xy, tmp_path / "map", n=60, seed=9, layers="0")
    assert set(table.column("layer").to_pylist()) == {"0"}
    with pytest.raises(ConfigError, match="chooses no channel: the map has no SDC in the "
                                          "layers tmr may copy"):
        rows(model, xy, tmp_path / "tmr",
             protect=f"tmr:layers=3:budget=50%:map={tmp_path / 'map'}", n=20)


@pytest.mark.parametrize("name", ["dup", "tmr", "abft"])
def test_a_protection_of_layers_without_faults_is_refused_and_a_partial_one_noted(tmp_path,
                                                                                  name):
    model = tiny()
    xy = data(model)
    # The campaign injects into the Linear layer (3) only; the conv layer (0) gets none.
    with pytest.raises(ConfigError, match=f"{name} would change nothing: it guards 0, but the "
                                          "campaign injects faults only into 3") as err:
        rows(model, xy, tmp_path / "x", protect=f"{name}:layers=0", n=5, layers="3")
    assert "\n" not in str(err.value)
    rows(model, xy, tmp_path / "y", protect=name, n=5, layers="3")
    notes = read_model_info(tmp_path / "y")["protect"]["notes"]
    assert any(n.startswith(f"{name}: 0 receive(s) no faults") for n in notes), notes
    # ranger and clip act downstream of the layers they guard: no refusal.
    rows(model, xy, tmp_path / "z", protect="ranger:layers=0", n=5, layers="3")


def test_dup_of_a_relu_on_a_conv_linear_campaign_is_refused(tmp_path):
    model = tiny()
    with pytest.raises(ConfigError, match="it guards 1, but the campaign injects faults only "
                                          "into 0, 3"):
        rows(model, data(model), tmp_path / "x", protect="dup:layers=ReLU", n=5)


def test_a_map_of_another_model_is_refused(tmp_path):
    other = tiny(seed=1)
    model = tiny()
    xy = data(model)
    rows(other, data(other), tmp_path / "map", n=300, seed=9)
    with pytest.raises(ConfigError, match="made on another model") as err:
        rows(model, xy, tmp_path / "dup", protect=f"dup:budget=30%:map={tmp_path / 'map'}",
             n=20)
    assert "\n" not in str(err.value)
