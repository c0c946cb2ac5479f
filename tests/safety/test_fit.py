"""FIT, SPFM and ASIL verdicts checked against hand calculations on tiny campaigns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fit_rows import Cell, wilson, write_folder

from flipsafe.cli import main
from flipsafe.errors import ConfigError
from flipsafe.metrics.stats import wilson_interval
from flipsafe.safety import (
    FAILS,
    MEETS,
    NOT_SHOWN,
    FitAssumptions,
    Interval,
    estimate_fit,
    injections_needed,
    judge,
    parse_raw_rate,
    residual_upper,
)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-15)

# Two layers of weights: l1 with an exponent and a mantissa stratum, l2 with an exponent one.
W_CELLS = [
    Cell("l1", "exponent", 1000, 8, 100, sdc=10, due=5),
    Cell("l1", "mantissa", 1000, 23, 100, sdc=0),
    Cell("l2", "exponent", 500, 8, 50, sdc=5),
]
LAMBDA = 20e-6  # 20 FIT/Mbit in FIT per bit
C = 0.99  # the plan's confidence
C3 = 1 - (1 - C) / 3  # Bonferroni over the three strata


@pytest.fixture()
def weights(tmp_path):
    return write_folder(tmp_path / "w", W_CELLS)


def test_every_figure_by_hand(weights):
    [e] = estimate_fit([weights], raw_fit_per_mbit=20)
    # bits at risk: 1000 x 8, 1000 x 23, 500 x 8; raw FIT = bits x 20e-6
    assert [s.bits for s in e.strata] == [8000, 23000, 4000]
    assert [s.raw_fit for s in e.strata] == [approx(0.16), approx(0.46), approx(0.08)]
    assert e.stratum_confidence == approx(C3)
    for s, cell in zip(e.strata, W_CELLS):
        assert (s.n, s.sdc, s.due) == (cell.n, cell.sdc, cell.due)
        low, high = wilson(cell.sdc, cell.n, C3)
        assert (s.p_sdc.value, s.p_sdc.low, s.p_sdc.high) == (
            approx(cell.sdc / cell.n), approx(low), approx(high))
        assert s.fit("sdc").high == approx(s.raw_fit * high)
    # SDC FIT = 0.16 x 10/100 + 0.46 x 0 + 0.08 x 5/50; DUE FIT = 0.16 x 5/100
    assert e.total.raw_fit == approx(0.70)
    assert e.total.sdc.value == approx(0.024)
    assert e.total.due.value == approx(0.008)
    assert [(g.layer, g.raw_fit, g.sdc.value, g.due.value) for g in e.by_layer] == [
        ("l1", approx(0.62), approx(0.016), approx(0.008)), ("l2", approx(0.08), approx(0.008), 0)]
    assert [(g.site, g.raw_fit) for g in e.by_site] == [("weights", approx(0.70))]
    # residual = SDC, detected = DUE, corrected = 0; SPFM = 1 - residual / raw
    assert e.residual == e.total.sdc
    assert e.detected == e.total.due
    assert e.corrected == Interval(0, 0, 0)
    assert e.spfm.value == approx(1 - 0.024 / 0.70)


def test_intervals_are_sums_of_bonferroni_wilson_bounds(weights):
    [e] = estimate_fit([weights], raw_fit_per_mbit=20)
    raws = [8000 * LAMBDA, 23000 * LAMBDA, 4000 * LAMBDA]
    bounds = [wilson(c.sdc, c.n, C3) for c in W_CELLS]
    low = sum(r * b[0] for r, b in zip(raws, bounds))
    high = sum(r * b[1] for r, b in zip(raws, bounds))
    assert (e.total.sdc.low, e.total.sdc.high) == (approx(low), approx(high))
    assert e.by_layer[1].sdc.high == approx(raws[2] * bounds[2][1])
    assert e.spfm.low == approx(1 - high / 0.70)
    assert e.spfm.high == approx(1 - low / 0.70)
    due = [wilson(c.due, c.n, C3) for c in W_CELLS]
    assert e.total.due.high == approx(sum(r * b[1] for r, b in zip(raws, due)))
    # an explicit confidence replaces the plan's
    [e95] = estimate_fit([weights], raw_fit_per_mbit=20, confidence=0.95)
    assert e95.stratum_confidence == approx(1 - 0.05 / 3)
    assert e95.total.sdc.high == approx(sum(
        r * wilson(c.sdc, c.n, 1 - 0.05 / 3)[1] for r, c in zip(raws, W_CELLS)))


def test_sites_rates_and_residency(tmp_path, weights):
    acts = write_folder(tmp_path / "a", [Cell("l1", "exponent", 200, 8, 100, sdc=20)],
                        site="activations")
    meta = write_folder(tmp_path / "m", [Cell("l1", "scale", 16, 8, 20, sdc=2)],
                        site="metadata")
    [e] = estimate_fit([weights, acts, meta], raw_fit_per_mbit="20/Mbit",
                       raw_fit_per_mbit_datapath="600/MB", residency=0.5)
    by = {(s.site, s.layer, s.field): s for s in e.strata}
    a, m = by[("activations", "l1", "exponent")], by[("metadata", "l1", "scale")]
    # 600 FIT/MB = 600 / 8 FIT/Mbit; activations: 200 x 8 bits x 0.5 residency
    assert a.bits == 800 and a.raw_fit == approx(800 * 75e-6)
    assert a.fit("sdc").value == approx(800 * 75e-6 * 0.2)
    # metadata is stored with the activations: memory rate, same residency
    assert m.bits == 64 and m.raw_fit == approx(64 * LAMBDA)
    assert by[("weights", "l1", "exponent")].bits == 8000  # weights: no residency
    assert e.stratum_confidence == approx(1 - (1 - C) / 5)
    assert [g.site for g in e.by_site] == ["weights", "activations", "metadata"]
    assert e.total.raw_fit == approx(0.70 + 0.06 + 64 * LAMBDA)
    assert e.total.sdc.value == approx(0.024 + 0.012 + 64 * LAMBDA * 0.1)
    # no datapath rate: activations take the memory rate
    [e2] = estimate_fit([acts], raw_fit_per_mbit=20)
    assert e2.total.raw_fit == approx(1600 * LAMBDA)


def test_n_all_still_samples_the_image_so_its_strata_keep_intervals(tmp_path):
    # `--n all` lists every (element, bit) once, each on one random image: an estimate, not
    # a census, so its FIT carries a Wilson interval like any sampled stratum.
    folder = write_folder(tmp_path / "x", [Cell("l", "sign", 4, 1, 4, sdc=1),
                                           Cell("l", "exponent", 4, 8, 32, sdc=8)], n="all")
    [e] = estimate_fit([folder], raw_fit_per_mbit=20)
    assert not any(s.exhaustive for s in e.strata)
    value = 4 * LAMBDA * 0.25 + 32 * LAMBDA * 0.25
    assert e.total.sdc.value == approx(value)
    assert e.total.sdc.low < value < e.total.sdc.high


def test_due_undetected_adds_to_the_residual(weights):
    [e] = estimate_fit([weights], raw_fit_per_mbit=20, due_detected=False)
    assert e.residual.value == approx(0.024 + 0.008)
    assert e.residual.high == approx(sum(r * wilson(c.sdc + c.due, c.n, C3)[1] for r, c in zip(
        [8000 * LAMBDA, 23000 * LAMBDA, 4000 * LAMBDA], W_CELLS)))
    assert e.detected == Interval(0, 0, 0)
    assert e.spfm.value == approx(1 - 0.032 / 0.70)


# -- verdicts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("residual", "spfm", "expected"), [
    (Interval(5, 1, 9.999), Interval(0.995, 0.99, 0.999), MEETS),  # SPFM low == target meets
    (Interval(5, 1, 10.0), Interval(0.995, 0.991, 0.999), NOT_SHOWN),  # upper == target: not < 10
    (Interval(12, 10.0, 20), Interval(0.995, 0.991, 0.999), FAILS),  # lower end reaches 10
    (Interval(12, 9.99, 20), Interval(0.995, 0.991, 0.999), NOT_SHOWN),
    (Interval(5, 1, 9), Interval(0.985, 0.98, 0.9899), FAILS),  # SPFM upper end below 99 %
    (Interval(5, 1, 9), Interval(0.995, 0.9899, 0.999), NOT_SHOWN),  # SPFM lower end below
])
def test_judge_boundaries(residual, spfm, expected):
    assert judge(residual, spfm, 10.0, 0.99) == expected


def _one_stratum(tmp_path, k, raw_fit, n=1000, name="s"):
    """One mantissa stratum of 1000 x 23 bits with k SDCs in n, at a rate giving raw_fit."""
    folder = write_folder(tmp_path / name, [Cell("l", "mantissa", 1000, 23, n, sdc=k)])
    [e] = estimate_fit([folder], raw_fit_per_mbit=raw_fit / 23000 * 1e6)
    assert e.total.raw_fit == approx(raw_fit)
    return e


def _verdicts(e):
    return {v.asil: v.verdict for v in e.verdicts}


def test_verdicts_end_to_end(tmp_path):
    high = wilson(0, 1000, C)[1]  # 0 of 1000: z^2 / (n + z^2), SPFM low = 1 - high ~ 99.34 %
    assert 1 - high >= 0.99 and 1000 * high < 10 < 2000 * high < 100
    assert _verdicts(_one_stratum(tmp_path, 0, 1000.0, name="a")) == {
        "ASIL-D": MEETS, "ASIL-C": MEETS, "ASIL-B": MEETS}
    assert _verdicts(_one_stratum(tmp_path, 0, 2000.0, name="b")) == {
        "ASIL-D": NOT_SHOWN, "ASIL-C": MEETS, "ASIL-B": MEETS}
    # half the faults give an SDC: even the SPFM's upper end (1 - 0.459) misses 90 %
    assert 1 - wilson(500, 1000, C)[0] < 0.90
    assert _verdicts(_one_stratum(tmp_path, 500, 1.0, name="c")) == {
        "ASIL-D": FAILS, "ASIL-C": FAILS, "ASIL-B": FAILS}
    # 10 of 1000 at 100,000 raw FIT: the residual's lower end is above 100 FIT
    assert 1e5 * wilson(10, 1000, C)[0] >= 100
    assert _verdicts(_one_stratum(tmp_path, 10, 1e5, name="d")) == {
        "ASIL-D": FAILS, "ASIL-C": FAILS, "ASIL-B": FAILS}


def test_injections_needed_matches_a_direct_wilson_search(tmp_path):
    # 5 of 1000 at 1000 raw FIT: point 5 FIT and SPFM 99.5 %, upper 14.6 FIT and SPFM 98.5 %
    e = _one_stratum(tmp_path, 5, 1000.0)
    d = next(v for v in e.verdicts if v.asil == "ASIL-D")
    assert d.verdict == NOT_SHOWN
    # direct: the smallest n whose Wilson upper end at today's rate, times 1000 raw FIT,
    # is below 10 FIT and keeps SPFM = 1 - upper at 99 % or more
    n = np.arange(1000, 200_000)
    upper = wilson(0.005 * n, n.astype(float), C)[1]
    ok = (1000 * upper < 10) & (1 - upper >= 0.99)
    first = int(n[np.argmax(ok)])
    assert ok.any() and not ok[: first - 1000].any()
    assert d.needed.per_stratum == [first] and d.needed.total == first
    assert d.needed.more == first - 1000
    assert 1000 * wilson_interval(0.005 * first, first, C)[1] < 10
    assert not 1000 * wilson_interval(0.005 * (first - 1), first - 1, C)[1] < 10


def test_injections_needed_scales_every_stratum(weights):
    [e] = estimate_fit([weights], raw_fit_per_mbit=20 * 100)  # raw 70 FIT
    b = next(v for v in e.verdicts if v.asil == "ASIL-B")
    assert b.verdict == NOT_SHOWN and b.needed.total is not None
    ns = b.needed.per_stratum
    r = ns[0]  # l1's strata had the most injections (100): they get r, l2 (50) r / 2
    assert ns == [r, r, math.ceil(r * 50 / 100)]
    raws = [s.raw_fit for s in e.strata]

    def upper(counts):
        return sum(raw * wilson(c.sdc / c.n * m, m, C3)[1]
                   for raw, c, m in zip(raws, W_CELLS, counts))

    def shown(counts):
        return upper(counts) < 100 and 1 - upper(counts) / 70 >= 0.90

    assert shown(ns)
    assert not shown([r - 1, r - 1, math.ceil((r - 1) * 50 / 100)])
    assert residual_upper(e.strata, ns, C3) == approx(upper(ns))
    # the SPFM point estimate 1 - 0.024 / 0.70 = 96.6 % misses ASIL-C's 97 %: no n shows it
    c = next(v for v in e.verdicts if v.asil == "ASIL-C")
    assert c.verdict == NOT_SHOWN and c.needed.total is None
    assert injections_needed(e.strata, C3, 100.0, 0.97).total is None


# -- input checks --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "fit_per_mbit"), [
    ("20.49", 20.49), (20.49, 20.49), ("20.49/Mbit", 20.49), ("20.49 FIT/Mbit", 20.49),
    ("600/MB", 75.0), ("1/bit", 1e6), ("8/kB", 1000.0), ("2/Gbit", 0.002),
])
def test_parse_raw_rate(text, fit_per_mbit):
    assert parse_raw_rate(text) == approx(fit_per_mbit)


@pytest.mark.parametrize("bad", ["0", "-3", "nan", "inf", "abc", "20/Mb", "20/furlong", True])
def test_parse_raw_rate_refuses(bad):
    with pytest.raises(ConfigError):
        parse_raw_rate(bad)


def _fit_cli(capsys, *argv):
    code = main(["fit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags", [
    [],  # no raw rate
    ["--raw-fit-per-mbit", "0"],
    ["--raw-fit-per-mbit", "-1"],
    ["--raw-fit-per-mbit", "20/Mb"],
    ["--raw-fit-per-mbit", "20", "--raw-fit-per-mbit-datapath", "0"],
    ["--raw-fit-per-mbit", "20", "--residency", "0"],
    ["--raw-fit-per-mbit", "20", "--residency", "1.5"],
    ["--raw-fit-per-mbit", "20", "--residency", "half"],
])
def test_cli_bad_assumptions_one_line_exit_2(capsys, weights, flags):
    code, out, err = _fit_cli(capsys, weights, *flags)
    assert code == 2 and out == ""
    assert err.startswith("flipsafe: error: ") and err.count("\n") == 1


def test_cli_bad_folders_one_line_exit_2(capsys, tmp_path, weights):
    cells = [Cell("l3", "exponent", 10, 8, 10, sdc=1)]
    bf16 = write_folder(tmp_path / "bf16", cells, site="activations", fmt="bf16")
    old = write_folder(tmp_path / "old", cells, record_strata=False)
    dup = write_folder(tmp_path / "dup", [W_CELLS[2]])
    gap = write_folder(tmp_path / "gap", cells, unwritten=(Cell("l3", "sign", 10, 1, 2, 0),))
    for folders, words in [([weights, bf16], "--allow-mixed-formats"),
                           ([old], "rerun the same `flipsafe campaign`"),
                           ([weights, dup], "counted twice"),
                           ([gap], "has no results"),
                           ([tmp_path / "nowhere"], "not a campaign results folder")]:
        code, out, err = _fit_cli(capsys, *folders, "--raw-fit-per-mbit", 20)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert words in err
    # saying so combines the formats
    code, out, _ = _fit_cli(capsys, weights, bf16, "--raw-fit-per-mbit", 20,
                            "--allow-mixed-formats")
    assert code == 0 and "bf16, fp32" in out


def test_cli_json_has_the_hand_figures(capsys, weights):
    code, out, _ = _fit_cli(capsys, weights, "--raw-fit-per-mbit", "20", "--json")
    assert code == 0
    doc = json.loads(out)
    [m] = doc["models"]
    assert m["total"]["raw_fit"] == approx(0.70)
    assert m["total"]["sdc"]["value"] == approx(0.024)
    assert m["total"]["due"]["value"] == approx(0.008)
    assert m["spfm"]["value"] == approx(1 - 0.024 / 0.70)
    assert m["stratum_confidence"] == approx(C3)
    assert m["assumptions"]["raw_fit_per_mbit"] == 20 and m["assumptions"]["residency"] == 1
    assert [s["bits"] for s in m["strata"]] == [8000, 23000, 4000]
    assert m["strata"][0]["fit_sdc"]["high"] == approx(0.16 * wilson(10, 100, C3)[1])
    [e] = estimate_fit([weights], raw_fit_per_mbit=20)
    assert [(v["asil"], v["verdict"]) for v in m["verdicts"]] == [
        (v.asil, v.verdict) for v in e.verdicts]
    assert "Bonferroni" in doc["interval_method"]


def test_cli_text_states_assumptions_and_table(capsys, weights):
    code, out, _ = _fit_cli(capsys, weights, "--raw-fit-per-mbit", "20", "--residency", "0.5")
    assert code == 0
    assert "20 FIT/Mbit" in out and "Residency of activations and metadata: 0.5" in out
    assert "Bonferroni" in out and "Not modelled:" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:5] == ["35,000", "0.7", "250", "0.024"]
    for asil in ("ASIL-D", "ASIL-C", "ASIL-B"):
        assert asil in out


def test_models_are_estimated_separately(tmp_path, weights):
    other = write_folder(tmp_path / "o", [Cell("l1", "exponent", 10, 8, 10, sdc=1)],
                         model_sha="b" * 64)
    es = estimate_fit([weights, other], FitAssumptions(20))
    assert [e.model_sha for e in es] == ["a" * 64, "b" * 64]
    assert es[1].total.raw_fit == approx(80 * LAMBDA)
    with pytest.raises(ConfigError):
        FitAssumptions(None)


def test_report_section_puts_assumptions_before_the_table(tmp_path, weights):
    from flipsafe.report import write_report

    out = write_report([weights], tmp_path / "r.md", fmt="md", fit=FitAssumptions(20))
    text = out.read_text()
    assert "## Safety estimate" in text
    section = text[text.index("## Safety estimate"):text.index("## Model card")]
    assert section.index("Raw fault rate") < section.index("FIT of") < section.index("ASIL-D")
    assert "Not modelled" in section
    plain = write_report([weights], tmp_path / "plain.md", fmt="md")
    assert "Safety estimate" not in plain.read_text()
