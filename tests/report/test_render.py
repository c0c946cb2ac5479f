"""HTML and Markdown reports from a small campaign: structure, images and numbers."""

import base64
import io
import json
import re
from dataclasses import replace
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pytest
import torch
from report_rows import BASELINE_LAYERS, N_PER_LAYER, make_rows, write_campaign

import flipsafe
from flipsafe.data import load as load_data
from flipsafe.errors import ConfigError
from flipsafe.report import fmt_rate, headline, load_results, summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"img", "meta", "br", "hr", "input", "link", "source", "wbr"}


class ReportParser(HTMLParser):
    """Collects images, tables (with their class and caption), headings, paragraphs and any
    tag or attribute that would load something from outside the file."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.headings, self.paragraphs = [], [], [], []
        self.external, self.stack, self.mismatched = [], [], []
        self._text = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        for name, value in attrs.items():
            if value and re.match(r"\s*(https?:|//|ftp:)", value):
                self.external.append((tag, name, value))
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append((tag, "", ""))
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append({"class": attrs.get("class", ""), "caption": "", "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th", "caption", "h1", "h2", "h3", "p"):
            self._text = []
            self._p_class = attrs.get("class", "")

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.mismatched.append(tag)
        if self._text is None:
            return
        text = "".join(self._text)
        if tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append(text)
        elif tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag in ("h1", "h2", "h3"):
            self.headings.append(text)
        elif tag == "p":
            self.paragraphs.append((self._p_class, text))
        else:
            return
        self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def text_cells(block: str) -> list[list[str]]:
    rows = [re.split(r" {2,}", line.strip()) for line in block.splitlines()[1:]
            if not set(line) <= {"-", " "}]
    return [row for row in rows if len(row) > 1]


def hand_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    total = 0.0
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == labels
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        inside = [j for j in range(len(conf)) if lo < conf[j] <= hi or (i == 0 and conf[j] == 0)]
        if inside:
            gap = abs(np.mean(right[inside]) - np.mean(conf[inside]))
            total += len(inside) / len(conf) * gap
    return total


def parse(path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


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
    assert len(doc.images) == 7  # layers, bit curves, 2 heatmaps, delta loss, margin, calibration
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
        "Models", "Per layer: baseline", "Per layer: cosine", "Improvement: baseline / cosine"]
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
        assert rows[name][5] == fmt_rate(sdc.sum() / len(sdc))


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


def test_markdown_writes_png_files_beside_it(models, tmp_path):
    out = write_report(models, tmp_path / "r" / "report.md", fmt="md")
    text = out.read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(linked) == 7
    assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(linked)
    for name in linked:
        assert name.startswith("report-")
        assert (out.parent / name).read_bytes()[:8] == PNG_MAGIC
    summary = summary_table(models[0], models[1:])
    models_block = summary.split("\n\n")[1]
    for row in text_cells(models_block):
        assert "| " + " | ".join(row) + " |" in text


def test_names_replace_folder_names(models, tmp_path):
    out = write_report(models, tmp_path / "n.html", names=["linear head", "cosine head"])
    html = out.read_text(encoding="utf-8")
    assert "Improvement: linear head / cosine head" in html
    assert "cosine head is" in html and "LESS resilient than linear head" in html
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
    sdc = rows["sdc"].to_numpy()
    verdict = [p for cls, p in doc.paragraphs if cls == "verdict"]
    assert len(verdict) == 1
    assert f"in {fmt_rate(sdc.mean())} of {len(sdc):,} injections" in verdict[0]
