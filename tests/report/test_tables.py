"""The summary table `flipsafe summary` prints, checked against hand-computed statistics."""

import math
import re
import shutil

import pytest
from report_helpers import Z99, katz, stratified, text_cells
from report_rows import BASELINE_LAYERS, COSINE_LAYERS, N_PER_LAYER, make_rows, strata_of

from flipsafe.report import (
    TextTable,
    fmt_factor,
    fmt_interval,
    fmt_rate,
    fmt_value,
    headline,
    load_results,
    summary_table,
    summary_tables,
)
from flipsafe.report.tables import fmt_factor_interval


def counts(layers, seed, layer=None):
    rows = make_rows(layers, N_PER_LAYER, seed).to_pydict()
    keep = [layer is None or lay == layer for lay in rows["layer"]]
    return sum(s for s, k in zip(rows["sdc"], keep) if k), sum(keep)


def strata_counts(layers, seed, keep=None, outcome="sdc"):
    """(k, n, size) per (layer, field) stratum of make_rows' rows, for layers in keep."""
    table = make_rows(layers, N_PER_LAYER, seed)
    rows = table.to_pydict()
    out = []
    for s in strata_of(table):
        if keep is not None and s.layer not in keep:
            continue
        hits = [o for o, lay, f in zip(rows[outcome], rows["layer"], rows["field"])
                if (lay, f) == (s.layer, s.field)]
        if hits:
            out.append((sum(hits), len(hits), s.size))
    return out


def stratified_katz(a, b, z=Z99):
    """Ratio of two stratified rates with the delta-method log interval, by hand."""
    pa_, _, _, va = stratified(a)
    pb, _, _, vb = stratified(b)
    ratio = pa_ / pb
    se = math.sqrt(va / pa_ ** 2 + vb / pb ** 2)
    return ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se)


@pytest.fixture(scope="module")
def models(campaigns):
    return load_results(campaigns["baseline"]), load_results(campaigns["cosine"])


@pytest.mark.parametrize("value, text", [
    (0.0123, "1.23%"), (0.0043, "0.430%"), (0.000125, "0.0125%"), (0.0, "0%"), (1.0, "100.00%"),
    (float("nan"), "n/a"),
])
def test_fmt_rate(value, text):
    assert fmt_rate(value) == text


@pytest.mark.parametrize("value, text", [
    (0.0909, "0.0909x"), (2.314, "2.31x"), (14.43, "14.4x"), (250.4, "250x"),
    (123456.0, "123456x"), (4.706e35, "4.71e+35x"), (float("inf"), "inf"), (float("nan"), "n/a"),
])
def test_fmt_factor(value, text):
    assert fmt_factor(value) == text


def test_fmt_value_keeps_huge_losses_readable():
    assert (fmt_value(1.234e35), fmt_value(0.5), fmt_value(0.0), fmt_value(float("inf"))) == (
        "1.23e+35", "0.5", "0", "inf")


def test_overall_rates_are_hand_computed_stratified_estimates(models):
    base, _ = models
    _, n = counts(BASELINE_LAYERS, 1)
    p, low, high, _ = stratified(strata_counts(BASELINE_LAYERS, 1))
    text = summary_table(base)
    blocks = {b.split("\n", 1)[0]: b for b in text.split("\n\n")}
    overall = next(row for row in text_cells(blocks["Per layer: baseline"]) if row[0] == "(all)")
    assert overall[:4] == ["(all)", f"{n:,}", fmt_rate(p), fmt_interval(low, high)]
    models_row = text_cells(blocks["Models"])[1]
    assert models_row[0] == "baseline" and models_row[5:7] == [
        fmt_rate(p), fmt_interval(low, high)]
    pd, dlow, dhigh, _ = stratified(strata_counts(BASELINE_LAYERS, 1, outcome="due"))
    assert models_row[7:9] == [fmt_rate(pd), fmt_interval(dlow, dhigh)]
    assert "proportional allocation" in text and "stratified estimates" in text
    assert f"{n:,} injections" in text and "images correct" in text


def test_improvement_per_layer_uses_katz_intervals_with_last_layers_matched(models):
    base, cos = models
    text = summary_table(base, [cos])
    table = next(b for b in text.split("\n\n") if b.startswith("Improvement: baseline / cosine"))
    rows = {row[0]: row for row in text_cells(table)}
    k1, n1 = counts(BASELINE_LAYERS, 1, "fc")
    k2, n2 = counts(COSINE_LAYERS, 2, "head.fc")
    ratio, low, high = katz(k1, n1, k2, n2)
    # Holm across the 3 matched layers, by hand: unadjusted two-sided Katz p-values, sorted,
    # the i-th smallest times (3 - i), made non-decreasing.
    pvals = {}
    for a, b in (("features.1", "backbone.features.1"), ("features.3", "backbone.features.3"),
                 ("fc", "head.fc")):
        ka, na = counts(BASELINE_LAYERS, 1, a)
        kb, nb = counts(COSINE_LAYERS, 2, b)
        z = abs(math.log((ka / na) / (kb / nb))) / math.sqrt(1 / ka - 1 / na + 1 / kb - 1 / nb)
        pvals[a] = math.erfc(z / math.sqrt(2))
    ordered = sorted(pvals, key=pvals.get)
    holm, running = {}, 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (3 - i) * pvals[name]))
        holm[name] = running
    assert rows["last"][3:7] == [fmt_factor(ratio), f"[{fmt_factor(low)}, {fmt_factor(high)}]",
                                 f"{holm['fc']:.2g}", "LESS resilient"]
    for name in ("features.1", "features.3"):
        assert rows[name][5] == f"{holm[name]:.2g}"
        assert (rows[name][6] == "no clear difference") == (holm[name] >= 0.01)
    assert rows["last"][1] == f"{fmt_rate(k1 / n1)} ({k1}/{n1})"
    # (all) compares the layers both have: the cosine model's backbone.fc is left out.
    ratio, low, high = stratified_katz(
        strata_counts(BASELINE_LAYERS, 1),
        strata_counts(COSINE_LAYERS, 2, keep={"backbone.features.1", "backbone.features.3",
                                              "head.fc"}))
    assert rows["(all)"][3:5] == [fmt_factor(ratio), fmt_factor_interval(low, high)]
    assert high < 1
    # The projection layer a cosine head adds has no baseline counterpart.
    assert "only in cosine, not compared (left out of (all) too): backbone.fc." in table
    assert set(rows) == {"layer", "features.1", "features.3", "last", "(all)"}


def test_verdicts_say_which_way_and_how_sure(models, campaigns, tmp_path):
    base, cos = models
    worse = headline(base, cos)
    assert len(worse) == 2 and all("LESS resilient than baseline" in s for s in worse)
    ratio, _, _ = stratified_katz(
        strata_counts(BASELINE_LAYERS, 1),
        strata_counts(COSINE_LAYERS, 2, keep={"backbone.features.1", "backbone.features.3",
                                              "head.fc"}))
    assert f"{fmt_factor(1 / ratio)} LESS resilient" in worse[0]
    assert worse[0].startswith("Over the 3 layers both campaigns injected, cosine is")
    assert "DUE rate (NaN/Inf, detectable)" in worse[0] and "DUE" not in worse[1]
    better = headline(cos, base)
    assert better[0].startswith("Over the 3 layers both campaigns injected, baseline is ")
    assert "more resilient than cosine" in better[0]
    shutil.copytree(campaigns["baseline"], tmp_path / "again")
    same = headline(base, load_results(tmp_path / "again"))
    assert "no clear difference" in same[0] and "1.00x" in same[0] and "includes 1" in same[0]


def test_text_tables_round_trip_to_their_cells(models):
    base, cos = models
    text = summary_table(base, [cos])
    for table in summary_tables(base, [cos]):
        block = next(b for b in text.split("\n\n") if b.startswith(table.title + "\n"))
        assert text_cells(block) == [table.header, *table.rows]


def test_classifier_layer_is_marked(models):
    base, cos = models
    assert "fc (last)" in summary_table(base)
    assert "head.fc (last)" in summary_table(cos)


def test_wide_text_tables_are_cut_into_column_groups_within_80_columns(models):
    base, cos = models
    for table in summary_tables(base, [cos]):
        lines = table.render_text().splitlines()
        assert max(len(line) for line in lines[1:len(lines) - len(table.notes)]) <= 80
    # By hand: key column 10 wide, four 20-wide columns; 10+2+20+2+20+2+20 = 76 fits,
    # the fourth does not and starts a second group with the key column again.
    table = TextTable("T", ["k" * 10, *(c * 20 for c in "abcd")],
                      [["r" * 10, *(c * 20 for c in "ABCD")]])
    assert table.render_text().splitlines() == [
        "T",
        f"{'k' * 10}  {'a' * 20}  {'b' * 20}  {'c' * 20}",
        "  ".join(["-" * 10] + ["-" * 20] * 3),
        f"{'r' * 10}  {'A' * 20}  {'B' * 20}  {'C' * 20}",
        f"{'k' * 10}  {'d' * 20}",
        f"{'-' * 10}  {'-' * 20}",
        f"{'r' * 10}  {'D' * 20}",
    ]
    assert len(table.render_text(width=200).splitlines()) == 4


def test_factor_table_shows_every_definition_side_by_side(models):
    base, cos = models
    text = summary_table(base, [cos])
    block = next(b for b in text.split("\n\n")
                 if b.startswith("Improvement factor by definition: baseline / cosine\n"))
    rows = {(row[0], row[1]): row for row in text_cells(block)}
    improvement = next(b for b in text.split("\n\n")
                       if b.startswith("Improvement: baseline / cosine"))
    sdc = {row[0]: row for row in text_cells(improvement)}
    # The SDC row repeats the comparison's factors, overall and in the last layer.
    assert rows[("(all)", "SDC rate")][4:6] == sdc["(all)"][3:5]
    assert rows[("last", "SDC rate")][4:6] == sdc["last"][3:5]
    # Mismatch with non-finite rows dropped, by hand over the matched layers.
    matched = {"features.1", "features.3", "fc", "backbone.features.1",
               "backbone.features.3", "head.fc"}

    def finite_counts(layers, seed, keep):
        r = make_rows(layers, N_PER_LAYER, seed).to_pydict()
        use = [lay in keep and not nf for lay, nf in zip(r["layer"], r["nonfinite"])]
        return sum(s for s, u in zip(r["sdc"], use) if u), sum(use)

    ratio, low, high = katz(*finite_counts(BASELINE_LAYERS, 1, matched),
                            *finite_counts(COSINE_LAYERS, 2, matched))
    row = rows[("(all)", "mismatch rate, non-finite dropped (GoldenEye)")]
    assert row[4:6] == [fmt_factor(ratio), fmt_factor_interval(low, high)]
    # In the last layer the baseline's 1e35 losses put the mean-|dLoss| factor orders of
    # magnitude above 1 while its SDC factor is below 1: the reading says they disagree.
    mean = rows[("last", "mean |dLoss|, finite values (GoldenEye)")]
    assert mean[7] == "above 1" and rows[("last", "SDC rate")][7] == "below 1"
    assert "e+" in mean[4]
    assert "last: Reading (above 1: cosine has fewer or smaller): the definitions disagree" \
        in block
    assert rows[("(all)", "median |dLoss|, finite values")][6] == (
        "percentile bootstrap, 2000 resamples, seed 0")


def test_column_groups_repeat_every_key_column():
    # 4 + 2 + 5 + 2 + 35 + 2 + 35 = 85 columns: the second 35-wide column starts a group.
    table = TextTable("T", ["site", "layer", *(c * 35 for c in "ab")],
                      [["acts", "fc", *(c * 35 for c in "AB")]], key_columns=2)
    assert table.render_text().splitlines() == [
        "T",
        f"site  layer  {'a' * 35}",
        f"----  -----  {'-' * 35}",
        f"acts  fc     {'A' * 35}",
        f"site  layer  {'b' * 35}",
        f"----  -----  {'-' * 35}",
        f"acts  fc     {'B' * 35}",
    ]


def test_a_clear_due_difference_is_worded_with_its_factor(tmp_path, base_plan):
    from report_rows import Behaviour, write_campaign

    # Every top-exponent flip is a DUE in a, one in ten in b: about 10x more DUEs in a.
    many = {"fc": Behaviour(0.25, 0.01, 0.0, 1.0, True)}
    few = {"fc": Behaviour(0.25, 0.01, 0.0, 0.1, True)}
    write_campaign(tmp_path / "a", base_plan, make_rows(many, 4000, 1))
    write_campaign(tmp_path / "b", base_plan, make_rows(few, 4000, 2))
    a, b = load_results(tmp_path / "a"), load_results(tmp_path / "b")
    [sentence] = headline(a, b)
    factor = stratified(strata_counts_of(a, "due"))[0] / stratified(strata_counts_of(b, "due"))[0]
    # The words give the direction (b has fewer), the factor is a / b, as in every table.
    assert re.search(rf"b has {re.escape(fmt_factor(factor))} FEWER DUEs \(factor "
                     rf"{re.escape(fmt_factor(factor))}, 99% interval [0-9.]+x to [0-9.]+x, "
                     r"above 1\)", sentence), sentence
    [reverse] = headline(b, a)
    assert re.search(rf"a has {re.escape(fmt_factor(factor))} MORE DUEs \(factor "
                     rf"{re.escape(fmt_factor(1 / factor))}, 99% interval [0-9.]+x to "
                     r"[0-9.]+x, below 1\)", reverse), reverse


def strata_counts_of(results, outcome):
    """(k, n, size) per stratum of a results folder, sizes from its manifest."""
    rows = results.table.select(["layer", "field", outcome]).to_pylist()
    out = []
    for s in results.strata:
        hits = [r[outcome] for r in rows if (r["layer"], r["field"]) == (s.layer, s.field)]
        if hits:
            out.append((sum(hits), len(hits), s.size))
    return out


def test_the_logs_brief_line_carries_the_comparisons_rates_and_factor(campaigns):
    """brief_lines (the demo's log): per comparison one line with the other model's SDC
    rate, the reference's, and the improvement factor with its interval, the very numbers
    of the comparison; the last layer gets its own line when more layers were injected."""
    from flipsafe.report.tables import brief_lines, comparison

    base, cos = (load_results(campaigns[n]) for n in ("baseline", "cosine"))
    comp = comparison(base, cos)
    lines = brief_lines(base, [cos])
    assert len(lines) == 2
    r = comp.overall.sdc
    assert lines[0] == (
        f"cosine vs baseline, {len(comp.groups)} layers: SDC "
        f"{fmt_rate(comp.overall_b.sdc.rate)} vs {fmt_rate(comp.overall_a.sdc.rate)}, factor "
        f"{fmt_factor(r.ratio)} 99% {fmt_factor_interval(r.low, r.high)}: "
        + ("fewer SDCs" if r.low > 1 else "MORE SDCs" if r.high < 1 else "no clear difference"))
    assert lines[1].startswith("cosine vs baseline, last layer: SDC ")
