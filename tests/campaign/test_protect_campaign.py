"""Weight protections replayed on the very faults of an unprotected campaign."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flipsafe.campaign import ResultsStore
from flipsafe.campaign.runner import make_plan, run_campaign
from flipsafe.errors import ConfigError

FAULT_COLUMNS = ("fault_id", "layer", "field", "site", "param", "index", "bits",
                 "fault_model", "format", "image_id", "golden_top1", "golden_loss")


def _rows(plan, folder):
    run_campaign(plan, folder, show_progress=False)
    store = ResultsStore(folder)
    store.open()
    return store.read()


def _plan(ckpt, **kw):
    kw = {"site": "weights", "layers": "last", "seed": 3, "part_size": 4096, **kw}
    return make_plan(ckpt, **kw)


def test_ecc_corrects_every_single_bit_fault_of_the_last_layer_on_the_same_rows(
        mlp_checkpoint, tmp_path):
    bare = _rows(_plan(mlp_checkpoint, n="all"), tmp_path / "bare")
    ecc = _rows(_plan(mlp_checkpoint, n="all", protect="ecc"), tmp_path / "ecc")
    for name in FAULT_COLUMNS:
        assert bare.column(name).equals(ecc.column(name)), name
    assert bare.column("sdc").to_numpy().sum() > 0  # the faults do harm unprotected
    assert not bare.column("detected").to_numpy().any()
    assert not bare.column("corrected").to_numpy().any()
    # The whole single-bit fault space: each fault flips one stored bit, so SECDED fixes all.
    assert ecc.column("corrected").to_numpy().all()
    assert not ecc.column("detected").to_numpy().any()
    assert not ecc.column("sdc").to_numpy().any() and not ecc.column("due").to_numpy().any()
    assert ecc.column("faulty_top1").equals(ecc.column("golden_top1"))
    np.testing.assert_array_equal(ecc.column("delta_loss").to_numpy(), 0.0)


def test_double_bit_faults_are_detected_by_ecc_and_missed_by_parity(mlp_checkpoint,
                                                                     tmp_path):
    bare = _rows(_plan(mlp_checkpoint, n=300, fault="burst2"), tmp_path / "bare")
    ecc = _rows(_plan(mlp_checkpoint, n=300, fault="burst2", protect="ecc"), tmp_path / "e")
    par = _rows(_plan(mlp_checkpoint, n=300, fault="burst2", protect="parity"), tmp_path / "p")
    for name in FAULT_COLUMNS:
        assert bare.column(name).equals(ecc.column(name)), name
        assert bare.column(name).equals(par.column(name)), name
    assert ecc.column("detected").to_numpy().all()
    assert not ecc.column("corrected").to_numpy().any()
    assert not ecc.column("sdc").to_numpy().any()
    # Two flips keep a word's parity: parity sees nothing, its SDCs are the bare ones.
    assert not par.column("detected").to_numpy().any()
    assert par.column("sdc").equals(bare.column("sdc"))


def test_parity_detects_single_bit_faults_without_correcting(mlp_checkpoint, tmp_path):
    par = _rows(_plan(mlp_checkpoint, n=200, protect="parity"), tmp_path / "p")
    assert par.column("detected").to_numpy().all()
    assert not par.column("corrected").to_numpy().any()
    assert not par.column("sdc").to_numpy().any()


def test_protect_is_recorded_and_fingerprinted_only_when_given(mlp_checkpoint):
    bare, ecc = _plan(mlp_checkpoint, n=10), _plan(mlp_checkpoint, n=10, protect="ecc")
    assert "protect" not in bare.fingerprinted()
    assert ecc.fingerprinted()["protect"] == "ecc"
    assert bare.fingerprint() != ecc.fingerprint()
    assert ecc.fault_plan == bare.fault_plan
    assert type(ecc).from_json(ecc.to_json()) == ecc


def test_bad_protections_are_refused(mlp_checkpoint):
    with pytest.raises(ConfigError, match="unknown protection .tmr9."):
        _plan(mlp_checkpoint, n=10, protect="tmr9")
    with pytest.raises(ConfigError, match="stored weights"):
        make_plan(mlp_checkpoint, n=10, site="activations", protect="ecc")


def test_cli_refuses_ecc_on_an_activation_campaign_in_one_line(mlp_checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "flipsafe", "campaign", str(mlp_checkpoint),
                        "--out", str(tmp_path / "r"), "--n", "5", "--protect", "ecc"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "ecc" in r.stderr


def test_parts_written_before_the_protection_columns_read_as_false(mlp_checkpoint, tmp_path):
    from flipsafe.campaign.store import content_checksum

    folder = tmp_path / "old"
    rows = _rows(_plan(mlp_checkpoint, n=40), folder)
    # Rewrite the part as an older flipsafe wrote it: no detected/corrected columns.
    path = next((folder / "parts").glob("part-*.parquet"))
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    old = table.drop_columns(["detected", "corrected"]).replace_schema_metadata(None)
    meta[b"flipsafe.checksum"] = content_checksum(old).encode()
    pq.write_table(old.replace_schema_metadata(meta), path)
    store = ResultsStore(folder)
    store.open()
    again = store.read()
    assert not store.damaged
    assert again.num_rows == rows.num_rows
    assert not again.column("detected").to_numpy().any()
    assert again.column("sdc").equals(rows.column("sdc"))
    assert again.schema.names == rows.schema.names
    assert again.column("corrected").type == pa.bool_()


def test_summary_pairs_a_protected_campaign_with_the_unprotected_one(mlp_checkpoint,
                                                                      tmp_path):
    from flipsafe.report import load_results, summary_table
    from flipsafe.report.tables import protection_table

    for name, protect in (("bare", None), ("ecc", "ecc"), ("parity", "parity")):
        _rows(_plan(mlp_checkpoint, n=400, protect=protect), tmp_path / name)
    bare, ecc, par = (load_results(tmp_path / n) for n in ("bare", "ecc", "parity"))
    assert protection_table(bare) is None
    k = int(np.sum(bare.table["sdc"].to_numpy()))
    assert k > 0
    table = protection_table(bare, [ecc, par])
    head = table.header
    row = dict(zip(head, table.rows[1]))
    assert row["protection"] == "ecc" and row["SDC"] == "0%"
    assert row["corrected"] == "400" and row["detected"] == "0"
    # ECC removes all k SDCs: the paired table is (both 0, only ecc 0, only bare k, ...),
    # 0.5 added to each cell: factor bare / ecc = (k + 1) / 1; McNemar p = 2 * 0.5**k.
    assert row["SDC factor"] == (f"{k + 1:.2f}x" if k + 1 < 10 else f"{k + 1:.1f}x") + \
        " (0.5 added)"
    assert float(row["McNemar p"]) == pytest.approx(2 * 0.5 ** k, rel=1e-2)
    assert row["memory"] == "+12.5%"
    prow = dict(zip(head, table.rows[2]))
    assert prow["detected"] == "400" and prow["corrected"] == "0"
    assert prow["memory"] == "+1.56%"
    from flipsafe.report import summary_json

    js = summary_json(bare, [ecc])["protections"]
    assert [p["protection"] for p in js] == [None, "ecc"]
    assert js[0]["paired_factor"] is None and js[1]["paired_factor"]["corrected"]
    # Stratified: allocation rounds each field's share to whole faults, so the weights
    # differ from the row shares by under 1/400 (tests/metrics checks the formula by hand).
    assert js[1]["paired_factor"]["ratio"] == pytest.approx(k + 1, rel=1 / 400)
    assert js[1]["memory_overhead"] == 0.125 and js[1]["corrected"] == 400
    assert "protections" not in summary_json(bare)
    text = summary_table(bare, [ecc])
    assert "Protections" in text and "protection ecc" not in text.splitlines()[0]
    assert "protection ecc" in summary_table(ecc, [bare]).splitlines()[0]


def test_ecc_on_triple_flips_matches_a_hamming_decoder_written_out(mlp_checkpoint, tmp_path):
    """Three flips in one fp32 element: odd parity, so the decoder acts on the syndrome s
    (XOR of the codeword positions of the flipped data bits): s beyond 71 is detected, a
    power of two "repairs" a check bit and leaves the fault as injected, any other s flips
    data bit s once more; in this element that changes what the model reads (its outcome
    is recomputed), in the other element of the word it does not (kept as injected)."""
    import torch

    from flipsafe.campaign.runner import prepare
    from flipsafe.faults import FaultSet

    plan = _plan(mlp_checkpoint, n=400, fault="bitflip3")
    bare = _rows(plan, tmp_path / "bare")
    ecc = _rows(_plan(mlp_checkpoint, n=400, fault="bitflip3", protect="ecc"), tmp_path / "e")
    for name in FAULT_COLUMNS:
        assert bare.column(name).equals(ecc.column(name)), name
    data_pos = [p for p in range(1, 72) if p & (p - 1)]
    detected = ecc.column("detected").to_pylist()
    assert not any(ecc.column("corrected").to_pylist())
    rerun = []
    for i, (index, bits) in enumerate(zip(ecc.column("index").to_pylist(),
                                          ecc.column("bits").to_pylist())):
        lane = index % 2  # two fp32 codes per word
        s = 0
        for b in bits:
            s ^= data_pos[32 * lane + b]
        if s > 71:
            assert detected[i]
            assert not ecc.column("sdc")[i].as_py()
            continue
        assert not detected[i]
        d = data_pos.index(s) if s & (s - 1) else None
        if d is not None and d // 32 == lane:
            rerun.append((i, sum(1 << b for b in bits) | 1 << (d % 32)))
        else:  # a check bit, or a data bit of the other element: the injected fault stands
            for name in ("sdc", "faulty_top1", "due"):
                assert ecc.column(name)[i].as_py() == bare.column(name)[i].as_py(), name
    assert rerun and len(rerun) < ecc.num_rows
    prep = prepare(plan)
    rows = [i for i, _ in rerun]
    layer = ecc.column("layer")[0].as_py()
    names = [info.name for info in prep.layers]
    faults = FaultSet(names, layer=names.index(layer),
                      index=torch.tensor([ecc.column("index")[i].as_py() for i in rows]),
                      mask=torch.tensor([m for _, m in rerun]), op=0,
                      image=torch.tensor([ecc.column("image_id")[i].as_py() for i in rows]),
                      param="weight")
    want = prep.engine.run(faults, prep.images, prep.labels)
    assert [ecc.column("faulty_top1")[i].as_py() for i in rows] == want.faulty_top1.tolist()
    assert [ecc.column("sdc")[i].as_py() for i in rows] == want.sdc.tolist()


def test_python_campaign_takes_a_protection(mlp_checkpoint, tmp_path):
    from flipsafe import Campaign, FaultPlan

    faults = FaultPlan(site="weights", layers="last", n=30, seed=3)
    run = Campaign(str(mlp_checkpoint), plan=faults, out=tmp_path / "e", protect="ecc")
    assert run.plan.protect == "ecc" and run.plan.fault_plan == faults
    table = run.run().summary()
    assert "Protections" in table
    with pytest.raises(ConfigError, match="stored weights"):
        Campaign(str(mlp_checkpoint), plan=FaultPlan(n=5), out=tmp_path / "a", protect="ecc")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flipsafe", *map(str, args)], check=False,
                          capture_output=True, text=True)


def test_combined_protections_replay_the_unprotected_rows(mlp_checkpoint, tmp_path):
    plan = {"site": "activations", "layers": "all", "n": 60}
    bare = _rows(_plan(mlp_checkpoint, **plan), tmp_path / "bare")
    spec = "ranger,abft:layers=last,dup"
    prot_plan = _plan(mlp_checkpoint, protect=" DUP, ranger , abft:layers=last", **plan)
    assert prot_plan.protect == "abft:layers=last,dup,ranger"  # canonical, as stored
    assert prot_plan.fingerprint() == _plan(mlp_checkpoint, protect=spec, **plan).fingerprint()
    prot = _rows(prot_plan, tmp_path / "prot")
    for name in FAULT_COLUMNS:
        assert bare.column(name).equals(prot.column(name)), name
    # dup copies every Conv/Linear ('all'): every fault is flagged, none is an SDC.
    assert prot.column("detected").to_numpy().all()
    assert not prot.column("sdc").to_numpy().any()
    # Weights: ecc with abft and ranger; corrected overrides what a detector saw.
    wplan = {"site": "weights", "layers": "all", "n": 60, "fault": "burst2"}
    wbare = _rows(_plan(mlp_checkpoint, **wplan), tmp_path / "wbare")
    wprot = _rows(_plan(mlp_checkpoint, protect="ecc,ranger,abft", **wplan), tmp_path / "w")
    for name in FAULT_COLUMNS:
        assert wbare.column(name).equals(wprot.column(name)), name
    det, cor = wprot.column("detected").to_numpy(), wprot.column("corrected").to_numpy()
    assert det.all() and not cor.any()  # double flips in one word: ecc detects them all
    assert not wprot.column("sdc").to_numpy().any()


def test_cli_runs_protections_and_refuses_bad_selections_in_one_line(mlp_checkpoint,
                                                                      tmp_path):
    r = _cli("campaign", mlp_checkpoint, "--out", tmp_path / "r", "--n", "5", "--quiet",
             "--protect", "ranger:per=channel,tmr:layers=last")
    assert r.returncode == 0, r.stderr
    assert "ranger" in r.stdout
    for spec, words in (("abft:layers=nomatch", "abft:layers=nomatch"),
                        ("dup:budget=10%", "map="),
                        ("dup:budget=150%", "budget"),
                        (f"tmr:budget=5%:map={tmp_path / 'none'}", "not a campaign"),
                        # the run above is an activation campaign of this model: a map
                        (f"dup:budget=0.01%:map={tmp_path / 'r'}", "chooses no channel")):
        r = _cli("campaign", mlp_checkpoint, "--out", tmp_path / "x", "--n", "5", "--quiet",
                 "--protect", spec)
        assert r.returncode == 2, (spec, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and words in r.stderr, (spec, r.stderr)


def test_campaign_help_lists_the_protections():
    from flipsafe.protect.registry import registered

    r = _cli("campaign", "--help")
    text = " ".join(r.stdout.split())
    for name, kind in registered().items():
        assert name in text and " ".join(kind.does.split())[:30] in text, name


def test_campaign_help_names_each_dataset_kind_once():
    text = " ".join(_cli("campaign", "--help").stdout.split())
    assert text.count("tensors:<file.safetensors>") == 1
