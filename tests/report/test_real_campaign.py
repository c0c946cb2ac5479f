"""A report from small campaigns the runner really injected into two trained MLPs."""

import base64
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from report_helpers import PNG_MAGIC, parse, text_cells, wilson

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

    # ...and those counted straight from the Parquet parts.
    models = {row[0]: row for row in doc.tables[0]["rows"][1:]}
    for d in dirs:
        sdc = np.concatenate([pq.read_table(p)["sdc"].to_numpy()
                              for p in sorted((d / "parts").glob("part-*.parquet"))])
        k, n = int(sdc.sum()), sdc.size
        assert models[d.name][4:7] == [f"{n:,}", fmt_rate(k / n), fmt_interval(*wilson(k, n))]
    assert re.search(r"last = the classifier layer \(fc in baseline, head\.fc in cosine\)",
                     "\n".join(p for _, p in doc.paragraphs))
