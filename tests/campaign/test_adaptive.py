"""Adaptive campaigns end to end, as a user runs them: `flipsafe campaign MODEL --margin M`
sizes a pilot and a second stage, estimates from stage 2 alone, says what precision it
reached, resumes to the same result, and refuses bad flags with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flipsafe.campaign import ResultsStore, runner
from flipsafe.campaign.adaptive import PILOT_MIN
from flipsafe.campaign.plan import plan_strata
from flipsafe.campaign.runner import make_plan
from flipsafe.cli import main
from flipsafe.metrics.stats import effective_rate

MARGIN = "0.04"


def _campaign(model, out, *flags):
    margin = [] if "--n" in flags else ["--margin", MARGIN]
    return main(["campaign", str(model), "--out", str(out), *margin, "--quiet",
                 "--part-size", "300", *flags])


def _summary(capsys, out) -> dict:
    capsys.readouterr()
    assert main(["summary", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _rows(out):
    store = ResultsStore(out)
    store.open()
    return store, store.read()


@pytest.fixture(scope="module")
def finished(mlp_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive") / "run"
    assert _campaign(mlp_checkpoint, out) == 0
    return out


def test_a_margin_campaign_is_adaptive_and_estimates_from_stage_two(finished, capsys):
    store, rows = _rows(finished)
    plan = store.plan
    assert plan.sampling == "adaptive" and "sampling" in plan.fingerprinted()
    pilot_rows = store.stages[0]
    assert len(store.stages) == 2 and pilot_rows == sum(s.n for s in store.pilot)
    assert all(s.n >= PILOT_MIN for s in store.pilot)
    data = _summary(capsys, finished)
    model = data["models"][0]
    assert model["rows"] == rows.num_rows == sum(store.stages)  # every injection spent
    assert data["interval_method"].startswith("stratified estimate")
    assert data["precision"]["pilot"] == pilot_rows
    # Each layer's rate and interval are effective_rate over stage 2's strata, by hand.
    fault_id = rows["fault_id"].to_numpy()
    stage2 = fault_id >= pilot_rows
    layer = rows["layer"].to_numpy(zero_copy_only=False)
    field = rows["field"].to_numpy(zero_copy_only=False)
    sdc = rows["sdc"].to_numpy()
    for entry in model["layers"]:
        strata = [s for s in store.strata if s.layer == entry["layer"]]
        k, n = [], []
        for s in strata:
            mine = stage2 & (layer == s.layer) & (field == s.field)
            k.append(int(sdc[mine].sum()))
            n.append(int(mine.sum()))
        assert n == [s.n for s in strata]
        want = effective_rate(k, n, [s.size for s in strata], plan.confidence)
        got = entry["sdc"]
        assert got["rate"] == pytest.approx(want.rate, abs=1e-12)
        assert (got["low"], got["high"]) == pytest.approx((want.low, want.high), abs=1e-12)
        half = data["precision"]["half_width"][entry["layer"]]
        assert half >= (want.high - want.low) / 2 - 1e-12
    # Neyman allocation is not proportional: the pooled rate would be another number.
    pooled = sdc[stage2].mean()
    assert data["models"][0]["overall"]["sdc"]["rate"] != pytest.approx(pooled, rel=1e-3)


def test_the_text_summary_says_what_precision_was_reached(finished, capsys):
    capsys.readouterr()
    assert main(["summary", str(finished)]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if " precision: " in x)
    assert f"+-{float(MARGIN) * 100:.2f}% at 99% asked" in line and "pilot" in line


def test_a_resumed_adaptive_campaign_equals_the_uninterrupted_one(finished, mlp_checkpoint,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    whole = _summary(capsys, finished)
    _, want = _rows(finished)
    out = tmp_path / "killed"

    # Killed after the pilot, before stage 2 was recorded ...
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_second_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run_campaign(make_plan(mlp_checkpoint, margin=float(MARGIN), sampling="adaptive",
                                      part_size=300), out, show_progress=False)
    monkeypatch.undo()
    store, pilot = _rows(out)
    assert len(store.stages) == 1 and pilot.num_rows == store.stages[0]
    # ... then resumed, then a pilot part and a stage-2 part lost and resumed again.
    assert _campaign(mlp_checkpoint, out) == 0
    store, _ = _rows(out)
    store.part_path(0).unlink()
    store.part_path(store.n_parts - 1).unlink()
    assert _campaign(mlp_checkpoint, out) == 0
    _, got = _rows(out)
    assert got.num_rows == want.num_rows
    for name in ("fault_id", "layer", "field", "index", "image_id", "sdc", "due"):
        assert got[name].to_pylist() == want[name].to_pylist(), name
    again = _summary(capsys, out)
    assert again["models"][0]["layers"] == whole["models"][0]["layers"]
    assert again["precision"] == whole["precision"]


def test_a_budget_caps_the_campaign_and_names_the_layers_that_missed(mlp_checkpoint,
                                                                       tmp_path, capsys):
    out = tmp_path / "capped"
    pilot = 3 * 200 + 40  # about the pilot of three layers; the cap leaves stage 2 little
    assert _campaign(mlp_checkpoint, out, "--margin", "0.005", "--budget", str(pilot + 300)) == 0
    _, rows = _rows(out)
    assert rows.num_rows <= pilot + 300
    data = _summary(capsys, out)
    assert data["precision"]["missed"], data["precision"]
    capsys.readouterr()
    main(["summary", str(out)])
    assert "missed by: " in capsys.readouterr().out


@pytest.mark.parametrize("flags, needle", [
    (["--budget", "0"], "--budget must be a whole number"),
    (["--budget", "50"], "cannot pay for the adaptive pilot"),
    (["--sampling", "adaptive", "--n", "all"], "cannot take --n all"),
    (["--sampling", "adaptive", "--n", "100"], "cannot take --n 100"),
    (["--sampling", "fixed", "--budget", "5000"], "--budget caps an adaptive campaign"),
    (["--sampling", "sometimes"], "sampling must be one of"),
    (["--n", "100", "--margin", "0.01"], "--n and --margin are alternatives"),
    (["--sampling", "adaptive", "--protect", "ranger"], "lose their pairing"),
])
def test_bad_adaptive_flags_are_one_line_and_exit_2(mlp_checkpoint, tmp_path, capsys, flags,
                                                    needle):
    out = tmp_path / "bad"
    capsys.readouterr()
    assert _campaign(mlp_checkpoint, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_protected_margin_campaign_stays_fixed_so_it_pairs_with_the_unprotected(
        mlp_checkpoint, tmp_path):
    out = tmp_path / "protected"
    assert _campaign(mlp_checkpoint, out, "--protect", "ranger", "--margin", "0.2") == 0
    store, _ = _rows(out)
    assert store.plan.sampling == "fixed" and len(store.stages) == 1


def test_fixed_sampling_keeps_the_plans_fingerprint_and_fault_list(mlp_checkpoint):
    fixed = make_plan(mlp_checkpoint, margin=0.05, sampling="fixed")
    assert "sampling" not in fixed.fingerprinted() and "budget" not in fixed.fingerprinted()
    assert make_plan(mlp_checkpoint, margin=0.05).sampling == "fixed"  # the Python default
    prep = runner.prepare(fixed)
    assert [s.n for s in prep.strata] == [s.n for s in plan_strata(fixed, {
        (s.layer, s.field): s.size for s in prep.strata})]
    adaptive_prep = runner.prepare(make_plan(mlp_checkpoint, margin=0.05, sampling="adaptive"))
    # The pilot is the first stage of the same strata, drawn with the plan's own seed.
    assert [(s.layer, s.field, s.size) for s in adaptive_prep.strata] == [
        (s.layer, s.field, s.size) for s in prep.strata]
    assert sum(s.n for s in adaptive_prep.strata) < sum(s.n for s in prep.strata)
    assert np.all([s.n <= s.size for s in adaptive_prep.strata])


def test_plan_shows_fixed_and_adaptive_cost_side_by_side(mlp_checkpoint, capsys):
    capsys.readouterr()
    assert main(["plan", str(mlp_checkpoint), "--margin", MARGIN, "--sampling", "fixed"]) == 0
    fixed_total = next(x for x in capsys.readouterr().out.splitlines() if "total" in x)
    fixed_n = int(fixed_total.split("│")[-2].strip().replace(",", ""))
    assert main(["plan", str(mlp_checkpoint), "--margin", MARGIN]) == 0
    text = capsys.readouterr().out
    assert "fixed vs adaptive" in text and "anywhere" in text
    totals = [x for x in text.splitlines() if x.startswith("│ total")]
    side = [int(c.strip().replace(",", "")) for c in totals[-1].split("│")[2:-1]]
    fixed, pilot, *stage2 = side
    assert fixed == fixed_n and pilot < fixed
    assert stage2 == sorted(stage2)  # a higher rate needs more faults


def test_summary_counts_the_faults_decided_without_a_forward_pass(finished, capsys):
    store, rows = _rows(finished)
    decided = rows["decided"].to_numpy()
    stage2 = rows["fault_id"].to_numpy() >= store.stages[0]
    assert decided.any() and not decided.all()
    assert not rows["sdc"].to_numpy()[decided].any()
    data = _summary(capsys, finished)
    assert data["models"][0]["decided_without_running"] == int(decided[stage2].sum())
    capsys.readouterr()
    main(["summary", str(finished)])
    share = f"{100 * decided[stage2].mean():.2f}% of {int(stage2.sum()):,} injections decided"
    assert share in capsys.readouterr().out


def test_fit_of_an_adaptive_campaign_counts_stage_two_only(finished):
    from flipsafe.safety import FitAssumptions, estimate_fit

    store, rows = _rows(finished)
    [e] = estimate_fit([finished], FitAssumptions(raw_fit_per_mbit=20.49))
    got = {(s.layer, s.field): (s.n, s.sdc) for s in e.strata}
    stage2 = rows.filter(rows["fault_id"].to_numpy() >= store.stages[0])
    sdc = stage2["sdc"].to_numpy()
    layer = stage2["layer"].to_numpy(zero_copy_only=False)
    field = stage2["field"].to_numpy(zero_copy_only=False)
    for s in store.strata:
        mine = (layer == s.layer) & (field == s.field)
        assert got[(s.layer, s.field)] == (s.n, int(sdc[mine].sum()))


def test_comparisons_of_adaptive_campaigns_use_the_stratified_rates(finished):
    from flipsafe.report import load_results
    from flipsafe.report.tables import comparison

    r = load_results(finished)
    for key, g in r.by_layer.groups.items():
        m = r.matched.groups[(r.match_name(key[0]),)]
        assert (m.sdc.rate, m.sdc.low, m.sdc.high) == (g.sdc.rate, g.sdc.low, g.sdc.high)
    comp = comparison(r, r)
    assert comp.overall_a.sdc.method == "effective"
    assert comp.overall_a.sdc.rate == pytest.approx(r.by_layer.overall.sdc.rate, abs=1e-15)


@pytest.mark.parametrize("budget", [None, 1000, 1500, 5000])
def test_a_budget_caps_stage_two_exactly_and_keeps_every_stratum(budget):
    from flipsafe.campaign import adaptive
    from flipsafe.campaign.plan import Stratum

    strata = [Stratum(layer, field, size, 0) for layer in ("a", "b")
              for field, size in (("sign", 10_000), ("exponent", 80_000), ("mantissa", 230_000))]
    pilot = adaptive.pilot(strata)
    counts = {(s.layer, s.field): (s.n, {"sdc": s.n // 4 if s.field == "exponent" else 0,
                                         "due": 0}) for s in pilot}
    free = adaptive.second_stage(pilot, counts, 0.01, 0.99)
    stage2 = adaptive.second_stage(pilot, counts, 0.01, 0.99, budget)
    spent = sum(s.n for s in pilot) + sum(s.n for s in stage2)
    if budget is None or budget >= sum(s.n for s in pilot) + sum(s.n for s in free):
        assert stage2 == free
    else:
        assert spent <= budget and all(s.n >= 1 for s in stage2)
        assert spent >= budget - len(stage2)  # the budget is used, up to rounding
