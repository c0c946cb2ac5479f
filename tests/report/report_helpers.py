"""Independent references for the report tests: interval formulas and an HTML inspector."""

import math
import re
from html.parser import HTMLParser

import numpy as np

Z99 = 2.5758293035489004  # two-sided 99 % standard normal quantile


def wilson(k, n, z=Z99):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def katz(k1, n1, k2, n2, z=Z99):
    ratio = (k1 / n1) / (k2 / n2)
    se = math.sqrt(1 / k1 - 1 / n1 + 1 / k2 - 1 / n2)
    return ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se)


def stratified(strata, z=Z99):
    """Hand reference for a stratified rate: strata is a list of (k, n, size).

    p = sum W p_h with W = size / total size; Kish's effective sample size
    n_eff = 1 / sum W^2 / n_h; Wilson on (p n_eff, n_eff); variance p (1 - p) / n_eff."""
    total = sum(size for _, _, size in strata)
    p = inverse = 0.0
    for k, n, size in strata:
        w = size / total
        p += w * k / n
        inverse += w * w / n
    n_eff = 1 / inverse
    low, high = wilson(p * n_eff, n_eff, z)
    return p, low, high, p * (1 - p) / n_eff


def stratified_rows(table, strata, outcome="sdc"):
    """stratified() over a results table's rows, sizes from a folder's Stratum records."""
    rows = table.select(["layer", "field", outcome]).to_pylist()
    counts = {}
    for r in rows:
        c = counts.setdefault((r["layer"], r["field"]), [0, 0])
        c[0] += r[outcome]
        c[1] += 1
    return stratified([(*counts[(s.layer, s.field)], s.size) for s in strata
                       if (s.layer, s.field) in counts])


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
    """The header and rows of a text table, its column groups (one below the other, each
    with its own header over a dashed line, all starting with the key columns) joined."""
    lines = block.splitlines()[1:]
    dashes = [i for i, line in enumerate(lines) if line.strip() and set(line) <= {"-", " "}]
    merged = []
    for g, at in enumerate(dashes):
        end = dashes[g + 1] - 1 if g + 1 < len(dashes) else len(lines)
        rows = [re.split(r" {2,}", line.strip()) for line in [lines[at - 1], *lines[at + 1:end]]]
        rows = [row for row in rows if len(row) > 1]
        if g == 0:
            merged = rows
        else:
            # The key columns: those a group repeats from the first group's header.
            keys = 0
            while keys < len(rows[0]) - 1 and rows[0][keys] == merged[0][keys]:
                keys += 1
            assert [row[:keys] for row in rows] == [row[:keys] for row in merged[:len(rows)]]
            merged = [a + b[keys:] for a, b in zip(merged, rows)] + merged[len(rows):]
    return merged


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




# -- a headless browser's view of a report --------------------------------------------------

def chromium() -> str | None:
    """A headless-capable Chromium on PATH (Debian: apt install chromium), or None."""
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome")) if p), None)


# Runs at the end of the page, after layout: each table's own width against the box that
# holds it and the window, and the page's width against the window.
_FIT_PROBE = """<script>
const tables = [...document.querySelectorAll('table')].map(t => {
  const box = t.parentElement;
  return {caption: t.caption ? t.caption.textContent : '', width: t.scrollWidth,
          box: box.clientWidth, right: Math.ceil(t.getBoundingClientRect().right)};
});
const pre = document.createElement('pre');
pre.id = 'flipsafe-fit';
pre.textContent = JSON.stringify({window: window.innerWidth,
                                  page: document.documentElement.scrollWidth, tables});
document.body.appendChild(pre);
</script>"""


def layout_at(path, width: int, browser: str) -> dict:
    """{window, page, tables: [{caption, width, box, right}]} of the HTML report at `path`
    laid out by headless Chromium in a window `width` CSS pixels wide."""
    import html as html_lib
    import json
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8").replace("</body>", _FIT_PROBE + "</body>")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text, encoding="utf-8")
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={width},1000", f"--user-data-dir={tmp}/profile", "--dump-dom",
             page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="flipsafe-fit">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"Chromium printed no layout (exit {done.returncode}): {done.stderr[-500:]}"
    return json.loads(html_lib.unescape(found.group(1)))


def tables_too_wide(path, width: int, browser: str) -> list[str]:
    """The captions of the tables that do not fit a window `width` pixels wide (wider
    than their box, or reaching past the window), each with its width; [] if all fit."""
    layout = layout_at(path, width, browser)
    assert layout["window"] == width and layout["tables"]
    return [f"{t['caption']!r}: {t['width']} px in a {t['box']} px box"
            for t in layout["tables"] if t["width"] > t["box"] or t["right"] > width]
