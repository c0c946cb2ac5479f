"""The Protections table (text, JSON, HTML) and its Pareto plot, recomputed by hand from the
rows and the costs a campaign records in its manifest; folders without costs still report."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from report_helpers import PNG_MAGIC, Z99, ReportParser, stratified_rows
from report_rows import BASELINE_LAYERS, N_PER_LAYER, make_rows, write_campaign

from flipsafe.campaign import ResultsStore
from flipsafe.campaign.store import read_cost
from flipsafe.errors import CampaignError
from flipsafe.report import load_results, summary_json, summary_table, write_report
from flipsafe.report.plots import pareto_figure, pareto_groups, to_png
from flipsafe.report.tables import comparison, fmt_factor, fmt_rate, protection_table, protections


def _cost(total: dict, model_flops=1000, param_bits=3200) -> dict:
    """A cost record as protect.cost.for_plan writes it (only the fields the report reads)."""
    zero = {"flops": 0, "flops_overhead": 0.0, "memory_bits": 0, "memory_overhead": 0.0,
            "latency_s": 0.01, "latency_overhead": 0.0, "accuracy": 0.9,
            "accuracy_change": 0.0, "detected_clean": 0}
    return {"model_flops": model_flops, "param_bits": param_bits, "weight_bits": 32,
            "images": 8, "repeats": 3, "clean_latency_s": 0.01, "clean_accuracy": 0.9,
            "protections": {}, "total": {**zero, **total}, "skipped": [], "protect": None,
            "label": "CPU emulation figures on this machine, not accelerator figures",
            "machine": "test cpu"}


def _record(folder, cost: dict) -> None:
    store = ResultsStore(folder)
    with store.lock():
        store.open()
        store.write_cost(cost)


DUP = {"flops": 250, "flops_overhead": 0.25, "latency_overhead": 0.4, "memory_overhead": 0.0,
       "accuracy_change": -0.0125}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, base_plan, campaigns):
    """base (unprotected, cost recorded), dup (every SDC of fc detected, cost recorded),
    abft (the SDCs of features.1 gone, no cost: as an older folder), and cosine."""
    root = tmp_path_factory.mktemp("protections")
    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 1)
    write_campaign(root / "base", base_plan, rows)
    _record(root / "base", _cost({}))
    layer = np.array(rows["layer"].to_pylist())
    sdc = rows["sdc"].to_numpy(zero_copy_only=False)
    hit = sdc & (layer == "fc")
    dup = rows.set_column(rows.schema.get_field_index("sdc"), "sdc", pa.array(sdc & ~hit))
    dup = dup.set_column(dup.schema.get_field_index("detected"), "detected", pa.array(hit))
    write_campaign(root / "dup", replace(base_plan, protect="dup"), dup)
    _record(root / "dup", _cost(DUP))
    gone = sdc & (layer == "features.1")
    abft = rows.set_column(rows.schema.get_field_index("sdc"), "sdc", pa.array(sdc & ~gone))
    write_campaign(root / "abft", replace(base_plan, protect="abft"), abft)
    _record(campaigns["cosine"], _cost({}, model_flops=1040, param_bits=3232))
    return {"base": root / "base", "dup": root / "dup", "abft": root / "abft",
            "cosine": campaigns["cosine"], "rows": rows, "hit": hit, "gone": gone}


def _hand_paired(a: np.ndarray, b: np.ndarray, table=None, strata=None):
    """Ratio a/b of paired flags, its log interval and McNemar's exact p, written out; with
    a results table and its strata, each cell is n_eff times its stratified share (the
    ratio of the two stratified rates; n_eff = 1 / sum W_h^2 / n_h)."""
    n11, n10, n01 = np.sum(a & b), np.sum(a & ~b), np.sum(~a & b)
    k, n = min(n10, n01), n10 + n01
    p = min(1.0, 2 * sum(math.comb(int(n), i) for i in range(int(k) + 1)) / 2 ** int(n))
    if strata is not None:
        keys = list(zip(table["layer"].to_pylist(), table["field"].to_pylist()))
        present = [(s.layer, s.field) for s in strata if (s.layer, s.field) in set(keys)]
        size = {(s.layer, s.field): s.size for s in strata}
        total = sum(size[h] for h in present)
        in_h = {h: np.array([key == h for key in keys]) for h in present}
        w = {h: size[h] / total for h in present}
        n_eff = 1 / sum(w[h] ** 2 / in_h[h].sum() for h in present)

        def cell(m):
            return n_eff * sum(w[h] * m[in_h[h]].sum() / in_h[h].sum() for h in present)
        n11, n10, n01 = cell(a & b), cell(a & ~b), cell(~a & b)
    ratio = (n11 + n10) / (n11 + n01)
    se = math.sqrt((n10 + n01) / ((n11 + n10) * (n11 + n01)))
    return ratio, ratio * math.exp(-Z99 * se), ratio * math.exp(Z99 * se), p


def _factor(x: float) -> str:
    return fmt_factor(x)  # formatting only; the numbers are the hand computation's


def test_the_table_recomputed_by_hand_from_rows_and_recorded_costs(folders):
    base, dup, abft = (load_results(folders[k]) for k in ("base", "dup", "abft"))
    table = protection_table(base, [dup, abft])
    assert table.header == ["campaign", "protection", "SDC", "SDC 99% CI", "detected",
                            "corrected", "SDC factor", "factor 99% CI", "McNemar p", "FLOPs",
                            "latency", "memory", "accuracy"]
    rows = {r[1]: dict(zip(table.header, r)) for r in table.rows}
    sdc = folders["rows"]["sdc"].to_numpy(zero_copy_only=False)
    hit = folders["hit"]
    # The unprotected reference: its own rate, overheads 0.
    assert rows["none"]["SDC factor"] == "reference"
    assert [rows["none"][c] for c in ("FLOPs", "latency", "memory", "accuracy")] == \
        ["+0%", "+0%", "+0%", "+0 pp"]
    # dup: SDC rate stratified over its rows, detected = the fc SDCs, paired factor by hand.
    d = rows["dup"]
    dup_table = folders["rows"].set_column(folders["rows"].schema.get_field_index("sdc"), "sdc",
                                           pa.array(sdc & ~hit))
    p, low, high, _ = stratified_rows(dup_table, dup.strata)
    assert d["SDC"] == fmt_rate(p) and d["SDC 99% CI"] == f"[{fmt_rate(low)}, {fmt_rate(high)}]"
    assert d["detected"] == f"{int(hit.sum()):,}" and d["corrected"] == "0"
    ratio, lo, hi, mcnemar = _hand_paired(sdc, sdc & ~hit, folders["rows"], base.strata)
    assert d["SDC factor"] == _factor(ratio)
    assert d["factor 99% CI"] == f"[{_factor(lo)}, {_factor(hi)}]"
    assert float(d["McNemar p"]) == pytest.approx(mcnemar, rel=1e-2)
    assert [d[c] for c in ("FLOPs", "latency", "memory", "accuracy")] == \
        ["+25%", "+40%", "+0%", "-1.25 pp"]
    # abft, a folder without a recorded cost: its factor is still paired, its costs n/a.
    a = rows["abft"]
    ratio, lo, hi, mcnemar = _hand_paired(sdc, sdc & ~folders["gone"], folders["rows"],
                                          base.strata)
    assert a["SDC factor"] == _factor(ratio) and float(a["McNemar p"]) == pytest.approx(
        mcnemar, rel=1e-2)
    assert [a[c] for c in ("FLOPs", "latency", "memory", "accuracy")] == ["n/a"] * 4
    assert any("CPU emulation figures on this machine, not accelerator figures" in n
               and "test cpu" in n for n in table.notes)


def test_the_text_guided_head_is_one_more_row_unpaired_with_its_accuracy_cost(folders):
    base, dup, cos = (load_results(folders[k]) for k in ("base", "dup", "cosine"))
    table = protection_table(base, [dup, cos])
    rows = [dict(zip(table.header, r)) for r in table.rows]
    assert [(r["campaign"], r["protection"]) for r in rows] == [
        ("base", "none"), ("dup", "dup"), ("cosine", "none"), ("cosine", "text-guided head")]
    head = rows[3]
    katz = comparison(base, cos).overall.sdc  # base / cosine, on other faults
    assert head["SDC factor"] == _factor(katz.ratio)
    assert head["McNemar p"] == f"{katz.p_value:.3g} (Katz)"
    acc = cos.config["accuracy"] - base.config["accuracy"]
    assert head["accuracy"] == (f"{100 * acc:+.2f} pp" if acc else "+0 pp")
    assert head["FLOPs"] == "+4%" and head["memory"] == "+1%" and head["latency"] == "n/a"
    assert rows[2]["SDC factor"] == "-"  # the cosine campaign pairs with no protection here
    js = summary_json(base, [dup, cos])["protections"]
    assert js[3]["protection"] == "text-guided head" and js[3]["paired_factor"] is None
    assert js[3]["unpaired_factor"]["ratio"] == pytest.approx(katz.ratio)
    assert js[3]["accuracy_change"] == pytest.approx(acc)
    assert js[1]["paired_factor"]["p_value"] == pytest.approx(_hand_paired(
        folders["rows"]["sdc"].to_numpy(zero_copy_only=False),
        folders["rows"]["sdc"].to_numpy(zero_copy_only=False) & ~folders["hit"])[3], rel=1e-2)
    assert js[1]["flops_overhead"] == 0.25 and js[1]["cost"]["machine"] == "test cpu"
    assert js[1]["reference"] == "base"
    json.dumps(js, allow_nan=False)


def test_summary_text_shows_the_table_and_older_folders_still_report(folders):
    base, abft = load_results(folders["base"]), load_results(folders["abft"])
    assert abft.cost is None and read_cost(folders["abft"]) is None
    text = summary_table(base, [abft])
    assert "Protections" in text and "n/a" in text


def test_the_pareto_plot_renders_with_a_marker_per_protection(folders, tmp_path):
    base, dup, abft, cos = (load_results(folders[k]) for k in ("base", "dup", "abft", "cosine"))
    entries = protections(base, [dup, abft, cos])
    groups = pareto_groups(entries)
    assert list(groups) == ["base"]  # cosine has nothing but "none" to show
    assert [e["protection"] for e in groups["base"]] == [None, "dup", "abft", "text-guided head"]
    fig = pareto_figure(entries)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    for name in ("none", "dup", "text-guided head"):
        assert name in texts
    assert any("not recorded: abft" in t for t in texts)
    assert to_png(fig).startswith(PNG_MAGIC)
    out = write_report([folders["base"], folders["dup"], folders["abft"], folders["cosine"]],
                       tmp_path / "r.html")
    page = out.read_text()
    parser = ReportParser()
    parser.feed(page)
    assert len(parser.images) >= 1 and not parser.external
    caption = ("one marker per protection (none, dup, abft, text-guided head)")
    assert caption in page
    table = next(t for t in parser.tables if t["caption"] == "Protections")
    assert table["rows"][0][-4:] == ["FLOPs", "latency", "memory", "accuracy"]
    assert "Protections: SDC rate against cost" in parser.headings
    md = write_report([folders["base"], folders["dup"]], tmp_path / "r.md", fmt="md")
    assert (tmp_path / "r-pareto.png").read_bytes().startswith(PNG_MAGIC)
    assert "Protections: SDC rate against cost" in md.read_text()


def test_a_report_without_protections_has_no_pareto_plot(folders, tmp_path):
    out = write_report([folders["base"]], tmp_path / "plain.md", fmt="md")
    assert not (tmp_path / "plain-pareto.png").exists()
    assert "Protections" not in out.read_text()



def test_a_recorded_cost_survives_the_manifest_rewrite_of_a_resume(tmp_path, base_plan):
    from report_rows import strata_of

    rows = make_rows(BASELINE_LAYERS, 50, 3)
    write_campaign(tmp_path / "old", base_plan, rows, legacy=True)
    _record(tmp_path / "old", _cost(DUP))
    store = ResultsStore(tmp_path / "old")
    with store.lock():
        store.create_or_resume(base_plan, total_rows=rows.num_rows, strata=strata_of(rows))
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert manifest["strata"] and manifest["cost"]["total"]["flops_overhead"] == 0.25
    assert load_results(tmp_path / "old").cost["total"]["latency_overhead"] == 0.4
    reader = ResultsStore(tmp_path / "old")
    reader.open()
    with pytest.raises(CampaignError, match="lock"):
        reader.write_cost({})


def test_protected_campaigns_are_compared_with_their_own_twin_in_paired_words(folders):
    from flipsafe.report.tables import comparison_pairs, summary_lines

    base, dup, cosine = (load_results(folders[k]) for k in ("base", "dup", "cosine"))
    # Given after another model, the dup campaign still pairs with base (its fault rows).
    pairs = comparison_pairs(cosine, [base, dup])
    assert [(a.name, b.name) for a, b in pairs] == [(cosine.name, base.name),
                                                    (base.name, dup.name)]
    sdc = folders["rows"]["sdc"].to_numpy(zero_copy_only=False)
    ratio, low, _, p = _hand_paired(sdc, sdc & ~folders["hit"], folders["rows"], base.strata)
    line = next(x for x in summary_lines(cosine, [base, dup]) if x.startswith("On the very"))
    assert f"paired factor {_factor(ratio)}" in line and f"p = {p:.3g}" in line
    assert f"{int(folders['hit'].sum()):,} detected" in line
    assert ("cuts SDCs" in line) == (low > 1)
    js = summary_json(cosine, [base, dup])
    assert [(c["reference"], c["other"]) for c in js["comparisons"]] == [
        (cosine.name, base.name), (base.name, dup.name)]


def test_a_protections_report_fits_a_1280_pixel_window_in_a_headless_browser(folders,
                                                                             tmp_path):
    from report_helpers import chromium, tables_too_wide

    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium here (Debian: apt install chromium)")
    out = write_report([folders["base"], folders["dup"], folders["abft"], folders["cosine"]],
                       tmp_path / "r.html")
    assert tables_too_wide(out, 1280, browser) == []
