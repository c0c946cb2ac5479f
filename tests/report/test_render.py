"""HTML and Markdown reports from a small campaign: structure, images and numbers."""

import base64
import io
import json
import re
from dataclasses import replace

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pytest
import torch
from report_helpers import PNG_MAGIC, hand_ece, parse, stratified_rows, text_cells
from report_rows import BASELINE_LAYERS, N_PER_LAYER, make_rows, write_campaign

import flipsafe
from flipsafe.data import load as load_data
from flipsafe.errors import ConfigError
from flipsafe.report import fmt_rate, headline, load_results, summary_table, write_report


@pytest.fixture(scope="module")
def models(campaigns):
    return [load_results(campaigns[name], evaluate=True) for name in ("baseline", "cosine")]


@pytest.fixture(scope="module")
def html_report(models, tmp_path_factory):
    out = write_report(models, tmp_path_factory.mktemp("html") / "report.html")
    return out, parse(out)


def test_html_is_self_contained_with_decodable_png_images(html_report):
    _, doc = html_report
    assert doc.stack == [] and doc.mismatched == []
    assert doc.external == []
    assert len(doc.images) == 6  # layers, bit curves, heatmaps (a panel per model), ΔLoss, margin, calibration
    for src in doc.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_MAGIC
        pixels = mpimg.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 150 and pixels.shape[1] > 300
        # A blank figure would be one colour.
        assert pixels[..., :3].std() > 0.05


def test_html_summary_equals_what_flipsafe_summary_prints(html_report, models):
    _, doc = html_report
    text = summary_table(models[0], models[1:])
    blocks = {b.split("\n", 1)[0]: b for b in text.split("\n\n")}
    summary = [t for t in doc.tables if t["class"] == "summary"]
    assert [t["caption"] for t in summary] == [
        "Models", "Per layer: baseline", "Per layer: cosine", "Improvement: baseline / cosine",
        "Improvement factor by definition: baseline / cosine"]
    readings = [p for cls, p in doc.paragraphs if cls == "tablenote" and "Reading (" in p]
    assert [r.split(":", 1)[0] for r in readings] == ["(all)", "last"]
    assert all(r in text for r in readings)
    for table in summary:
        assert table["rows"] == text_cells(blocks[table["caption"]])
    verdicts = [p for cls, p in doc.paragraphs if cls == "verdict"]
    assert verdicts == headline(*models)
    assert all(v in text for v in verdicts)
    assert any(p == text.split("\n\n")[0] for _, p in doc.paragraphs)  # the plan line


def test_html_summary_numbers_match_the_rows_and_checkpoints(html_report, models, checkpoints):
    _, doc = html_report
    rows = {row[0]: row for row in doc.tables[0]["rows"]}
    for r, name in zip(models, ("baseline", "cosine")):
        accuracy = json.loads((checkpoints[name] / "config.json").read_text())["accuracy"]
        sdc = r.table["sdc"].to_numpy()
        assert rows[name][3] == fmt_rate(accuracy)
        assert rows[name][4] == f"{len(sdc):,}"
        assert rows[name][5] == fmt_rate(stratified_rows(r.table, r.strata)[0])


def test_html_has_every_section_and_warns_when_mean_loss_misleads(html_report):
    _, doc = html_report
    for heading in ("Summary", "SDC rate per layer", "Sensitivity by bit position",
                    "ΔLoss and the clean margin", "Calibration on clean data", "Model card",
                    "Intended use", "Fault model assumed", "Limitations of the evidence"):
        assert heading in doc.headings
    warnings = [p for cls, p in doc.paragraphs if cls == "warning"]
    assert any("wrong way round" in w and "cosine has the smaller mean" in w for w in warnings)


def test_calibration_table_holds_the_ece_of_each_clean_model(html_report, checkpoints):
    _, doc = html_report
    table = next(t for t in doc.tables if t["caption"] == "Calibration")
    rows = {row[0]: row for row in table["rows"][1:]}
    test = load_data("digits").test
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = np.array([test[i][1] for i in range(len(test))])
    for name in ("baseline", "cosine"):
        with torch.no_grad():
            probs = torch.softmax(flipsafe.load(checkpoints[name])(images).double(), 1).numpy()
        assert rows[name][1] == f"{len(labels):,}"
        assert rows[name][2] == fmt_rate(np.mean(probs.argmax(1) == labels))
        assert rows[name][4] == fmt_rate(hand_ece(probs, labels))


def test_markdown_writes_png_files_beside_it_under_the_given_names(models, tmp_path):
    names = ["linear head", "cosine head"]
    out = write_report(models, tmp_path / "r" / "report.md", fmt="md", names=names)
    text = out.read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(linked) == 6
    assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(linked)
    for name in linked:
        assert name.startswith("report-")
        assert (out.parent / name).read_bytes()[:8] == PNG_MAGIC
    renamed = [replace(r, name=n) for r, n in zip(models, names)]
    summary = summary_table(renamed[0], renamed[1:])
    for block in summary.split("\n\n")[2:6]:  # the tables, after plan and design lines
        for row in text_cells(block):
            assert "| " + " | ".join(row) + " |" in text
    assert "**Improvement: linear head / cosine head**" in text
    assert "cosine head is" in text and "LESS resilient than linear head" in text
    # The caller's results keep their own names.
    assert [r.name for r in models] == ["baseline", "cosine"]


@pytest.mark.parametrize("kwargs, match", [
    ({"fmt": "pdf"}, "unknown report format"),
    ({"names": ["one"]}, "one per folder"),
])
def test_bad_arguments_are_refused(models, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        write_report(models, tmp_path / "x.html", **kwargs)


def test_output_path_that_is_a_folder_is_refused(models, tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        write_report(models[:1], tmp_path)


def test_single_model_without_bit_faults_reports_rates_and_skips_bit_plots(tmp_path, base_plan):
    rows = make_rows(BASELINE_LAYERS, N_PER_LAYER, 7)
    no_bits = pa.array([[]] * rows.num_rows, pa.list_(pa.int16()))
    rows = rows.set_column(rows.schema.get_field_index("bits"), "bits", no_bits)
    write_campaign(tmp_path / "zero", replace(base_plan, fault="zero"), rows)
    doc = parse(write_report([tmp_path / "zero"], tmp_path / "zero.html"))
    assert len(doc.images) == 4  # layers, delta loss, margin, calibration
    assert any("does not flip individual bits" in p for _, p in doc.paragraphs)
    rate, low, high, _ = stratified_rows(rows, load_results(tmp_path / "zero").strata)
    verdict = [p for cls, p in doc.paragraphs if cls == "verdict"]
    assert len(verdict) == 1
    assert (f"in {fmt_rate(rate)} [{fmt_rate(low)}, {fmt_rate(high)}] of the injected fault "
            f"space (estimated from {rows.num_rows:,} injections)") in verdict[0]


def test_failed_write_leaves_the_previous_report_intact(campaigns, tmp_path, monkeypatch, capsys):
    import errno
    import pathlib

    from flipsafe.cli import main

    out = tmp_path / "report.html"
    args = ["report", str(campaigns["baseline"]), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    previous = out.read_bytes()
    real_write_text = pathlib.Path.write_text

    def disk_fills_up(self, text, *a, **kw):
        real_write_text(self, text[: len(text) // 2], *a, **kw)  # part of it lands
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", disk_fills_up)
    assert main(args) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flipsafe: error: no space left"), err
    assert "unchanged" in err[0]
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left


def test_reports_on_other_campaigns_have_other_titles(models, tmp_path):
    base, cos = models
    every = write_report(models, tmp_path / "all.html")
    last_plan = replace(base.plan, layers="last", clamp="profiled")
    last = write_report([replace(base, plan=last_plan), replace(cos, plan=last_plan)],
                        tmp_path / "last.html")
    titles = [re.search(r"<title>(.*?)</title>", p.read_text(encoding="utf-8")).group(1)
              for p in (every, last)]
    assert titles[0] != titles[1]
    assert "baseline vs cosine" in titles[0] and "all layers" in titles[0]
    assert "the classifier layer" in titles[1] and "clamp profiled" in titles[1]
    assert parse(last).headings[0] == titles[1].replace("&#x27;", "'")


def test_figure_captions_say_what_the_whiskers_are(html_report):
    html_text = html_report[0].read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html_text)
    margin = next(c for c in captions if "top2diff" in c)
    assert "whiskers: 99% Wilson interval" in margin
    assert "whiskers: 99% Wilson interval" in next(c for c in captions if "per layer" in c)
    size = re.search(r"figcaption \{ font-size: (\d+)px; color: #(\w+)", html_text)
    assert int(size.group(1)) >= 14 and size.group(2) == "111"  # readable, not small grey


def test_a_one_layer_comparison_names_its_layer(campaigns, checkpoints, base_plan, tmp_path):
    one = {"features.1": BASELINE_LAYERS["features.1"]}
    plan = replace(base_plan, layers="features.1")
    write_campaign(tmp_path / "a", plan, make_rows(one, N_PER_LAYER, 1))
    write_campaign(tmp_path / "b", plan, make_rows(one, N_PER_LAYER, 2))
    [sentence] = headline(load_results(tmp_path / "a"), load_results(tmp_path / "b"))
    assert sentence.startswith("In the only injected layer, features.1, ")
    assert "all injected layers" not in sentence
    last = {"fc": BASELINE_LAYERS["fc"]}
    plan = replace(base_plan, layers="last")
    write_campaign(tmp_path / "c", plan, make_rows(last, N_PER_LAYER, 1))
    write_campaign(tmp_path / "d", plan, make_rows(last, N_PER_LAYER, 2))
    [sentence] = headline(load_results(tmp_path / "c"), load_results(tmp_path / "d"))
    assert sentence.startswith("In the classifier (last) layer, the only one injected, ")


def test_whiskers_are_drawn_over_the_bars_with_a_white_outline(models):
    from matplotlib.collections import LineCollection

    from flipsafe.report import plots

    ax = plots.layer_sdc_figure(models).axes[0]
    whiskers = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(whiskers) == len(models)
    top_bar = max(p.get_zorder() for p in ax.patches)
    for w in whiskers:
        assert w.get_zorder() > top_bar and w.get_path_effects()


def test_heatmap_panels_share_one_bit_axis_whatever_their_label_widths(models):
    from flipsafe.report import plots

    fig = plots.bit_heatmap_figure(models)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][:len(models)]
    boxes = [ax.get_position() for ax in panels]
    # cosine's layer names are longer than baseline's; the panels still line up.
    assert all(abs(b.x0 - boxes[0].x0) < 1e-9 and abs(b.x1 - boxes[0].x1) < 1e-9 for b in boxes)
    assert [ax.get_title(loc="left") for ax in panels] == [r.name for r in models]


def test_every_table_fits_a_1280_pixel_window_in_a_headless_browser(html_report):
    from report_helpers import chromium, tables_too_wide

    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium here (Debian: apt install chromium)")
    out, _ = html_report
    assert tables_too_wide(out, 1280, browser) == []
