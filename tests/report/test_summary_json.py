"""`flipsafe summary --json`, unique model names, incomplete and legacy folders."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from report_helpers import katz, stratified, wilson
from report_rows import BASELINE_LAYERS, N_PER_LAYER, make_rows, write_campaign

from flipsafe.report import headline, load_results, summary_json, summary_table


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flipsafe", *args], capture_output=True,
                          text=True, check=False)


def _by_stratum(table, outcome="sdc"):
    counts = {}
    for r in table.select(["layer", "field", outcome]).to_pylist():
        c = counts.setdefault((r["layer"], r["field"]), [0, 0])
        c[0] += r[outcome]
        c[1] += 1
    return counts


def test_json_numbers_equal_hand_computations_from_the_rows(campaigns):
    proc = _cli("summary", str(campaigns["baseline"]), "--vs", str(campaigns["cosine"]),
                "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    base_rows = load_results(campaigns["baseline"]).table
    cos_rows = load_results(campaigns["cosine"]).table
    base = data["models"][0]
    assert base["name"] == "baseline" and base["rows"] == base_rows.num_rows
    # Per layer: plain k / n with Wilson intervals.
    for layer in base["layers"]:
        sdc = [r["sdc"] for r in base_rows.to_pylist() if r["layer"] == layer["layer"]]
        k, n = sum(sdc), len(sdc)
        assert (layer["sdc"]["k"], layer["sdc"]["n"]) == (k, n)
        assert (layer["sdc"]["low"], layer["sdc"]["high"]) == pytest.approx(wilson(k, n))
    # Overall: the stratified estimate over the manifest's fault-space sizes.
    sizes = {(s["layer"], s["field"]): s["fault_space"] for s in base["strata"]}
    for outcome in ("sdc", "due"):
        counts = _by_stratum(base_rows, outcome)
        p, low, high, _ = stratified([(*counts[key], sizes[key]) for key in sizes
                                      if key in counts])
        got = base["overall"][outcome]
        assert (got["rate"], got["low"], got["high"]) == pytest.approx((p, low, high))
        assert got["method"] == "stratified"
    # Comparison: the last layers matched, Katz by hand.
    (comp,) = data["comparisons"]
    last = next(x for x in comp["layers"] if x["layer"] == "last")
    k1, n1 = _by_layer(base_rows, "fc")
    k2, n2 = _by_layer(cos_rows, "head.fc")
    ratio, low, high = katz(k1, n1, k2, n2)
    assert (last["sdc"]["ratio"], last["sdc"]["low"], last["sdc"]["high"]) == pytest.approx(
        (ratio, low, high))
    assert last["sdc"]["reading"] == "LESS resilient"
    assert comp["only_other"] == ["backbone.fc"]
    assert comp["verdicts"] == headline(load_results(campaigns["baseline"]),
                                        load_results(campaigns["cosine"]))
    # The factor under each definition: its SDC row is the comparison's, by hand in last.
    scopes = {f["layers"]: f for f in comp["factors"]}
    assert list(scopes) == ["(all)", "last"]
    assert [d["definition"] for d in scopes["last"]["definitions"]] == [
        "sdc_rate", "mismatch_finite", "mean_delta_loss", "median_delta_loss",
        "sdc_golden_top2diff"]
    sdc_last = scopes["last"]["definitions"][0]
    assert (sdc_last["ratio"], sdc_last["low"], sdc_last["high"]) == pytest.approx(
        (ratio, low, high))
    assert (sdc_last["reference"], sdc_last["other"]) == pytest.approx((k1 / n1, k2 / n2))
    sdc_all = scopes["(all)"]["definitions"][0]
    assert sdc_all["ratio"] == pytest.approx(comp["overall"]["sdc"]["ratio"])
    assert (scopes["(all)"]["resamples"], scopes["(all)"]["seed"]) == (2000, 0)
    assert scopes["last"]["reading"].startswith(
        "Reading (above 1: cosine has fewer or smaller): the definitions disagree")
    assert scopes["last"]["outliers"][0]["removed_from"] == "baseline"


def _by_layer(table, layer):
    sdc = [r["sdc"] for r in table.select(["layer", "sdc"]).to_pylist() if r["layer"] == layer]
    return sum(sdc), len(sdc)


def test_summary_names_two_folders_of_the_same_name_apart(campaigns, tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copytree(campaigns["baseline"], tmp_path / "a" / "base")
    shutil.copytree(campaigns["baseline"], tmp_path / "base")
    proc = _cli("summary", str(tmp_path / "base"), "--vs", str(tmp_path / "a" / "base"))
    assert proc.returncode == 0, proc.stderr
    assert "Improvement: base / base-2" in proc.stdout
    verdicts = [b for b in proc.stdout.split("\n\n") if b.startswith("Over the")]
    assert verdicts and all("between base-2 and base:" in v for v in verdicts)


def test_incomplete_side_is_named_in_the_verdict_and_compared_like_for_like(
        campaigns, tmp_path, base_plan):
    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 1)
    # Only the first part (512 rows: all of features.1, some of features.3) was written.
    write_campaign(tmp_path / "partial", base_plan, rows)
    for part in sorted((tmp_path / "partial" / "parts").glob("part-*.parquet"))[1:]:
        part.unlink()
    partial = load_results(tmp_path / "partial")
    full = load_results(campaigns["baseline"])
    assert not partial.complete and partial.n == 512
    (sentence, *_) = headline(full, partial)
    assert "Caution: partial (512 of 1,200 planned rows) is incomplete" in sentence
    data = summary_json(full, [partial])
    overall = data["comparisons"][0]["overall"]
    # The full side is restricted to the strata the partial side has rows in.
    assert overall["reference"]["n"] < full.n
    assert not any(layer["layer"] == "fc" for layer in data["models"][1]["layers"])


def test_legacy_folder_without_strata_pools_and_says_so(tmp_path, base_plan):
    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 1)
    write_campaign(tmp_path / "old", replace(base_plan), rows, legacy=True)
    r = load_results(tmp_path / "old")
    assert r.strata is None
    assert any("before flipsafe recorded the fault-space size" in note for note in r.notes)
    sdc = rows["sdc"].to_numpy()
    assert r.by_layer.overall.sdc.rate == pytest.approx(sdc.mean())
    assert "(all) rows pool the rows" in summary_table(r)
