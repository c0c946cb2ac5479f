"""A report from small campaigns the runner really injected into two trained MLPs."""

import base64
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_helpers import PNG_MAGIC, parse, stratified, text_cells

from flipsafe.report import fmt_interval, fmt_rate, load_results, summary_table, write_report

runner = pytest.importorskip("flipsafe.campaign.runner")

@pytest.fixture(scope="module")
def real_campaigns(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for name in ("baseline", "cosine"):
        plan = runner.make_plan(checkpoints[name], n=150, part_size=200)
        runner.run_campaign(plan, root / name, show_progress=False)
    return root


def test_report_of_a_real_campaign(real_campaigns, tmp_path):
    dirs = [real_campaigns / "baseline", real_campaigns / "cosine"]
    doc = parse(write_report(dirs, tmp_path / "report.html"))
    assert doc.stack == [] and doc.mismatched == [] and doc.external == []
    assert len(doc.images) == 6  # layers, bit curves, heatmaps (one panel per model), delta loss, margin, calibration
    for src in doc.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC

    # The numbers in the summary are those `flipsafe summary` prints...
    text = summary_table(load_results(dirs[0]), [load_results(dirs[1])])
    blocks = {b.split("\n", 1)[0]: b for b in text.split("\n\n")}
    for table in (t for t in doc.tables if t["class"] == "summary"):
        assert table["rows"] == text_cells(blocks[table["caption"]])

    # ...and those counted straight from the Parquet parts, each (layer, field) stratum
    # weighted by its fault-space size recorded in the manifest.
    models = {row[0]: row for row in doc.tables[0]["rows"][1:]}
    for d in dirs:
        rows = pa.concat_tables([pq.read_table(p) for p in sorted((d / "parts").glob(
            "part-*.parquet"))]).select(["layer", "field", "sdc"]).to_pylist()
        sizes = {(s["layer"], s["field"]): s["size"]
                 for s in json.loads((d / "manifest.json").read_text())["strata"]}
        strata = []
        for key, size in sizes.items():
            hits = [r["sdc"] for r in rows if (r["layer"], r["field"]) == key]
            if hits:
                strata.append((sum(hits), len(hits), size))
        p, low, high, _ = stratified(strata)
        assert models[d.name][4:7] == [f"{len(rows):,}", fmt_rate(p), fmt_interval(low, high)]
        pooled = sum(r["sdc"] for r in rows) / len(rows)
        # Equal samples per layer, unequal fault spaces: pooling would misstate the rate.
        assert p != pytest.approx(pooled, rel=1e-3)
    assert re.search(r"last = the classifier layer \(fc in baseline, head\.fc in cosine\)",
                     "\n".join(p for _, p in doc.paragraphs))
