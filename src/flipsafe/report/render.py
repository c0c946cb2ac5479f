"""The campaign report as one self-contained HTML file or Markdown with PNG files beside it."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flipsafe import atomic
from flipsafe.errors import ConfigError, EnvironmentFailure, is_disk_full
from flipsafe.faults import CAMPAIGN_SITES as SITES
from flipsafe.faults import FAULT_MODELS as FAULTS
from flipsafe.metrics.calibration import expected_calibration_error
from flipsafe.protect.spec import label as protection_label
from flipsafe.report import plots
from flipsafe.report.results import Results, load_results, with_unique_names
from flipsafe.report.tables import (
    TextTable,
    comparison,
    design_lines,
    fmt_confidence,
    fmt_count,
    fmt_interval,
    fmt_rate,
    fmt_value,
    protections,
    summary_lines,
    summary_tables,
    verdict,
)

FORMATS = ("html", "md")


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str
    kind: str = ""  # "", "verdict" or "warning"


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Image:
    slug: str
    png: bytes
    alt: str


@dataclass(frozen=True)
class Table:
    table: TextTable
    summary: bool = False


def _named(models: Sequence[Results], names: Sequence[str] | None) -> list[Results]:
    return with_unique_names(models, names)


# -- sections ------------------------------------------------------------------


def summary_section(models: Sequence[Results]) -> list:
    ref, others = models[0], list(models[1:])
    blocks: list = [Heading("Summary")]
    lines = summary_lines(ref, others)
    verdicts = [line for line in lines[1:] if not line.startswith("note (")]
    if not others:
        o = ref.by_layer.overall
        verdicts = [
            (f"{ref.name}: a fault changed the top-1 class (SDC) in {fmt_rate(o.sdc.rate)} "
            f"{fmt_interval(o.sdc.low, o.sdc.high)} of the injected fault space (estimated "
            f"from {fmt_count(o.n)} injections) and was detectable (DUE: NaN/Inf) in "
            f"{fmt_rate(o.due.rate)} {fmt_interval(o.due.low, o.due.high)}.")
        ]
    blocks += [Paragraph(v, "verdict") for v in verdicts]
    blocks.append(Paragraph(lines[0]))
    blocks += [Paragraph(line) for line in design_lines(ref, others)]
    blocks += [Paragraph(line, "warning") for line in lines[1:] if line.startswith("note (")]
    blocks += [Table(t, summary=True) for t in summary_tables(ref, others)]
    return blocks


def protection_section(models: Sequence[Results]) -> list:
    """The Pareto plot of the protections (none when no campaign ran one); their table is in
    the summary."""
    entries = protections(models[0], list(models[1:]))
    if entries is None:
        return []
    from flipsafe.protect.cost import LABEL

    names = list(dict.fromkeys(protection_label(e["protection"]) for e in entries))
    return [
        Heading("Protections: SDC rate against cost"),
        Paragraph("Each protection replays the unprotected campaign's very faults; the table "
                  "in the summary gives the paired factors. Lower left is better: fewer SDCs "
                  f"for less overhead. Latencies are {LABEL}."),
        Image("pareto", plots.to_png(plots.pareto_figure(entries)),
              f"SDC rate against FLOP and latency overhead per model, one marker per "
              f"protection ({', '.join(names)}); {plots.interval_words(models[0])}"),
    ]


def layer_section(models: Sequence[Results]) -> list:
    blocks: list = [Heading("SDC rate per layer")]
    if len(models) > 1:
        blocks.append(Paragraph(
            "Layers are matched by name across models; each model's classifier layer is called "
            "last, and a text-guided model's backbone layers lose their 'backbone.' prefix."))
    blocks.append(Image("layers", plots.to_png(plots.layer_sdc_figure(models)),
                        f"SDC rate per layer; {plots.interval_words(models[0])}"))
    return blocks


def _field_table(r: Results) -> TextTable:
    _, fields = plots.format_bits(r)
    layers = [k[0] for k in r.by_layer.groups]
    order = list(fields)
    keys = sorted(r.by_field.groups, key=lambda k: (
        layers.index(k[0]), order.index(k[1]) if k[1] in order else len(order), k[1]))
    rows = []
    for layer, field in keys:
        g = r.by_field.groups[(layer, field)]
        rows.append([layer, field, fmt_count(g.n), fmt_rate(g.sdc.rate),
                     fmt_interval(g.sdc.low, g.sdc.high), fmt_rate(g.due.rate)])
    return TextTable(f"Per field: {r.name}", ["layer", "field", "n", "SDC",
                     f"SDC {fmt_confidence(r.by_layer.confidence)} CI", "DUE"], rows)


def bit_section(models: Sequence[Results]) -> list:
    blocks: list = [Heading("Sensitivity by bit position")]
    if not any(r.by_bit.groups for r in models):
        return blocks + [Paragraph(f"The fault model {models[0].plan.fault} does not flip "
                                   "individual bits, so there is no per-bit breakdown.")]
    blocks.append(Image("bits", plots.to_png(plots.bit_curves_figure(models)),
                        f"SDC rate by bit position; {plots.interval_words(models[0])}"))
    blocks.append(Image("bits-heatmap", plots.to_png(plots.bit_heatmap_figure(models)),
                        "SDC rate by layer and bit position, one panel per model on one "
                        "colour scale; grey cells had no injections"))
    blocks += [Table(_field_table(r)) for r in models]
    return blocks


def _delta_loss_table(models: Sequence[Results]) -> TextTable:
    rows = []
    for r in models:
        o = r.by_layer.overall
        q = o.delta_loss_quantiles
        rows.append([r.name, fmt_rate(o.sdc.rate), fmt_value(q.get(0.5, math.nan)),
                     fmt_value(q.get(0.05, math.nan)), fmt_value(q.get(0.25, math.nan)),
                     fmt_value(q.get(0.75, math.nan)), fmt_value(q.get(0.95, math.nan)),
                     fmt_value(o.delta_loss.mean), fmt_count(o.delta_loss.excluded)])
    return TextTable("ΔLoss over all injections", [
        "model", "SDC", "median", "q05", "q25", "q75", "q95", "mean of finite",
        "non-finite"], rows)


def delta_loss_warnings(models: Sequence[Results]) -> list[str]:
    """Sentences for each pair where mean delta loss and SDC rate rank the models oppositely."""
    out = []
    ref = models[0]
    for other in models[1:]:
        v = verdict(ref.name, other.name, "(all)", comparison(ref, other).overall.sdc)
        if v.direction == "unclear":
            continue
        worse, better = (other, ref) if v.direction == "less" else (ref, other)
        m_worse, m_better = (r.by_layer.overall.delta_loss.mean for r in (worse, better))
        if not (math.isfinite(m_worse) and math.isfinite(m_better)):
            continue
        if m_worse < m_better:
            out.append(
                f"Mean ΔLoss ranks these models the wrong way round: {worse.name} has the "
                f"smaller mean ΔLoss ({fmt_value(m_worse)} against {fmt_value(m_better)}) "
                f"but the higher SDC rate ({fmt_rate(worse.by_layer.overall.sdc.rate)} against "
                f"{fmt_rate(better.by_layer.overall.sdc.rate)}). A few huge values (one exponent "
                "flip can give about 1e35) decide the mean, and a head with bounded scores caps "
                "them; judge resilience by the SDC rate."
            )
    return out


def delta_loss_section(models: Sequence[Results]) -> list:
    blocks: list = [
        Heading("ΔLoss and the clean margin"),
        Paragraph("ΔLoss is the change in cross-entropy an injection causes. One flip of a "
                  "high exponent bit can make it about 1e35, so a plain mean says little: the "
                  "table gives the median and quantiles first, the mean of the finite values "
                  "last, and the SDC rate beside them."),
        Table(_delta_loss_table(models)),
    ]
    blocks += [Paragraph(w, "warning") for w in delta_loss_warnings(models)]
    blocks += [
        Image("delta-loss", plots.to_png(plots.delta_loss_figure(models)),
              "ΔLoss distribution per model, log scale"),
        Paragraph("The golden top2diff is the gap between the clean top-1 and top-2 "
                  "probabilities (x100). A fault must close that gap to change the class, so "
                  "images with a wide margin should rarely see SDCs."),
        Image("margin", plots.to_png(plots.margin_figure(models)),
              f"SDC rate by golden top2diff; {plots.interval_words(models[0])} on each bin's "
              "rate"),
    ]
    return blocks


def calibration_section(models: Sequence[Results], n_bins: int = 15) -> list:
    blocks: list = [
        Heading("Calibration on clean data"),
        Paragraph("Text-guided and cosine heads change how confident a model is. Expected "
                  f"calibration error (ECE, {n_bins} equal-width bins) is the gap between "
                  "confidence and accuracy, weighted by how many test images fall in each bin; "
                  "0 is perfectly calibrated."),
    ]
    rows = []
    for r in models:
        if r.clean is None:
            rows.append([r.name, "n/a", "n/a", "n/a", "checkpoint not readable"])
            continue
        ece = expected_calibration_error(r.clean.probs, r.clean.labels, n_bins)
        rows.append([r.name, fmt_count(len(r.clean.labels)), fmt_rate(r.clean.accuracy),
                     fmt_rate(float(r.clean.probs.max(axis=1).mean())), fmt_rate(ece)])
    blocks.append(Table(TextTable("Calibration", ["model", "test images", "accuracy",
                                                  "mean confidence", "ECE"], rows)))
    fig = plots.reliability_figure(models, n_bins)
    if fig is not None:
        blocks.append(Image("reliability", plots.to_png(fig), "reliability diagrams"))
    return blocks


def _formats_not_covered(current: str) -> list[str]:
    from flipsafe import formats

    return [n for n in formats.names() if n != current and "{" not in n]


def model_card_section(models: Sequence[Results]) -> list:
    ref = models[0]
    p = ref.plan
    conf = fmt_confidence(ref.by_layer.confidence)
    layer_ns = [g.n for r in models for g in r.by_layer.groups.values()]
    widest = max((g.sdc.high - g.sdc.low) / 2 for r in models for g in r.by_layer.groups.values())
    layers = "every Conv2d/Linear layer" if p.layers == "all" else (
        "the classifier layer only" if p.layers == "last" else f"layers matching {p.layers!r}")
    sizes = fmt_count(min(layer_ns)) if min(layer_ns) == max(layer_ns) else \
        f"{fmt_count(min(layer_ns))} to {fmt_count(max(layer_ns))}"
    limits = [
        (f"Sample sizes: {sizes} injections per layer; the widest {conf} interval on a "
         f"per-layer SDC rate is +-{fmt_rate(widest)}."),
        (f"Only {p.format} arithmetic was simulated; not covered: "
        f"{', '.join(_formats_not_covered(p.format))}."),
        (f"Only the {p.site} site and the {p.fault} fault model; not covered: sites "
        f"{', '.join(s for s in SITES if s != p.site)}, fault models "
        f"{', '.join(f for f in FAULTS if f != p.fault)}, and more than one fault per inference."),
        (f"Clamp convention: {p.clamp}. Clamping and the number format move SDC rates and "
        "ratios a lot; compare only campaigns with the same plan (this report refuses others)."),
        ("Each model is one training run; the intervals cover the sampling of faults, not "
        "seed-to-seed variation between trained models."),
        f"All evidence comes from the test split of {p.dataset}.",
    ]
    if p.images == "correct":
        limits.append("Only images the clean model classifies correctly were injected, so the "
                      "rates are per fault on a correct prediction.")
    excluded = sum(r.by_layer.overall.delta_loss.excluded for r in models)
    if excluded:
        limits.append(f"{fmt_count(excluded)} injections gave a non-finite ΔLoss; they "
                      "count in SDC/DUE rates but not in ΔLoss statistics.")
    limits += [f"{r.name}: {note}" for r in models for note in r.notes]
    return [
        Heading("Model card"),
        Heading("Intended use", 3),
        Paragraph(f"Evidence for reviewing how {', '.join(r.name for r in models)} "
                  f"(image classifiers on {p.dataset}) behave when a hardware fault corrupts "
                  "their computation. The rates are vulnerability factors per injected fault; "
                  "multiply by the raw fault rate of the target hardware to estimate an SDC FIT "
                  "rate. This is not a safety certification."),
        Heading("Models", 3),
        Bullets([f"{r.name}: {r.source}" for r in models]),
        Heading("Fault model assumed", 3),
        Bullets([
            (f"One {p.fault} fault per inference in the {p.site} of {layers}, elements and bits "
            "drawn uniformly at random (stratified by field)."),
            f"Number format {p.format}; clamp {p.clamp}; images: {p.images}; seed {p.seed}.",
            ("SDC: the faulty top-1 class differs from the clean top-1. DUE: the output "
            "became NaN or Inf (detectable)."),
        ]),
        Heading("Limitations of the evidence", 3),
        Bullets(limits),
    ]


def safety_section(models: Sequence[Results], fit) -> list:
    """"Safety estimate": per model, the assumptions, then FIT table and verdicts."""
    from flipsafe.report.safety import assumption_lines, fit_table, verdict_table
    from flipsafe.safety import estimate_fit

    blocks: list = [Heading("Safety estimate")]
    for e in estimate_fit([r.dir for r in models], fit):
        blocks += [Heading(f"{e.model}: assumptions", 3), Bullets(assumption_lines(e)),
                   Table(fit_table(e)), Table(verdict_table(e))]
    return blocks


def worst_case_section(attacks: Sequence[dict]) -> list:
    """"Worst case": each attack's flips-to-break and curve, and each census's table
    (attacks as flipsafe.attack.read_folder gives them)."""
    if not attacks:
        return []
    blocks: list = [Heading("Worst case")]
    searched = [a for a in attacks if a["attack"] is not None]
    if len(searched) > 1:  # side by side: e.g. a baseline's and a text-guided head's
        rows = [[a["name"], str(r.get("arch") or "?"), str(r.get("head") or "?"),
                 r["plan"]["format"], r["plan"].get("protect") or "none",
                 fmt_rate(r["clean_accuracy"]),
                 str(r["flips_needed"]) if r["flips_needed"] else f"> {len(r['flips'])}",
                 fmt_rate(r["final_accuracy"])]
                for a in searched for r in [a["attack"]]]
        blocks.append(Table(TextTable(
            "Flips to break", ["attack", "arch", "head", "format", "protect", "clean",
                               "flips to target", "final accuracy"], rows,
            [("Fewer flips: easier to break. Each search ranks and evaluates its own "
             "candidates; compare attacks of the same format and target.")])))
    for a in searched:
        r = a["attack"]
        needed = (f"reached the target {fmt_rate(r['target_accuracy'])} after "
                  f"{r['flips_needed']} flip(s)" if r["flips_needed"] else
                  f"did not reach the target {fmt_rate(r['target_accuracy'])} in "
                  f"{len(r['flips'])} flip(s)")
        blocks.append(Paragraph(
            f"{a['name']}: a progressive bit search on {r['model']}'s weights stored in "
            f"{r['plan']['format']} {needed}: test accuracy {fmt_rate(r['clean_accuracy'])} "
            f"clean, {fmt_rate(r['final_accuracy'])} after the last flip "
            f"({fmt_count(r['evaluations'])} candidate evaluations).", "verdict"))
        rows = [[str(i + 1), f["layer"], f"{f['index']:,}", str(f["bit"]), fmt_rate(acc)]
                for i, (f, acc) in enumerate(zip(r["flips"], r["accuracy"]))]
        blocks.append(Table(TextTable(f"Flips found: {a['name']}",
                                      ["flip", "parameter", "index", "bit", "accuracy after"],
                                      rows, [("Re-applying these flips to the stored codes, "
                                             "in order, gives these accuracies.")])))
    rows = [[a["name"], p["protection"], fmt_count(p["flips"]),
             fmt_count(p["naive"]["words_corrected"]), fmt_count(p["naive"]["words_detected"]),
             fmt_count(p["naive"]["words_silent"]),
             "DUE" if p["naive"]["due"] else fmt_rate(p["naive"]["accuracy"]),
             fmt_count(sum(p["physical_flips"]))]
            for a in searched for p in a["attack"].get("protections", [])]
    if rows:
        blocks.append(Table(TextTable(
            "Against memory codes", ["attack", "protection", "flips", "words corrected",
                                     "detected", "silent", "naive attacker", "flips knowing it"],
            rows, [("Naive attacker: the same data-bit flips, read back through the code "
                   "(accuracy, or DUE when the code flags a word). Knowing it: the attacker "
                   "also flips the check bits, so every word reads back as written; the "
                   "physical flips that takes for the same search's flips.")])))
    if searched:
        blocks.append(Image("attack", plots.to_png(plots.attack_figure(searched)),
                            "test accuracy after each bit flip of each attack"))
    for a in attacks:
        c = a["census"]
        if c is None:
            continue
        rows = [[r["layer"], str(r["bit"]), fmt_count(r["weights"]), fmt_count(r["catastrophic"]),
                 fmt_rate(r["share"]), fmt_count(r["due"]), fmt_rate(r["worst_accuracy"])]
                for r in c["layers"]]
        blocks.append(Table(TextTable(
            f"Catastrophic bits: {a['name']} ({c['format']})",
            ["layer", "bit", "weights", "catastrophic", "share", "DUE", "worst accuracy"], rows,
            [(f"A weight is catastrophic when flipping that one bit lowers accuracy on "
             f"{c['images']} test images by more than {fmt_rate(c['drop'])} (clean "
             f"{fmt_rate(c['clean_accuracy'])}); every weight was flipped once.")])))
        blocks.append(Image(f"census-{len(blocks)}", plots.to_png(plots.census_figure(c)),
                            f"share of catastrophic weights per layer, {a['name']}"))
    return blocks


def report_title(models: Sequence[Results]) -> str:
    """What the report covers, so reports on other campaigns have other titles."""
    p = models[0].plan
    layers = {"all": "all layers", "last": "the classifier layer"}.get(
        p.layers, f"layers matching {p.layers!r}")
    return (f"flipsafe report: {' vs '.join(r.name for r in models)}, {p.fault} faults in "
            f"the {p.site} of {layers}, {p.format}, clamp {p.clamp}")


def fault_models_section(models: Sequence[Results], faults: Sequence[Results]) -> list:
    """The same model under other fault models (element against PE faults): the tables."""
    if not faults:
        return []
    from flipsafe.report.faults import fault_models_tables

    return [Heading("Fault models on one model"),
            Paragraph("The same model under other faults: each campaign's SDC rate per layer "
                      "and their ratio."),
            *(Table(t) for t in fault_models_tables(models[0], faults))]


def build_blocks(models: Sequence[Results], fit=None, attacks: Sequence[dict] = (),
                 faults: Sequence[Results] = ()) -> list:
    return [
        Heading(report_title(models), 1),
        *summary_section(models),
        *protection_section(models),
        *layer_section(models),
        *bit_section(models),
        *delta_loss_section(models),
        *calibration_section(models),
        *(safety_section(models, fit) if fit is not None else []),
        *worst_case_section(attacks),
        *fault_models_section(models, faults),
        *model_card_section(models),
    ]


# -- renderers -------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #111; line-height: 1.45; }
h1 { border-bottom: 2px solid #111; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 .2em; font-size: 13px; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #eee; white-space: normal; }
th.t, td.t { white-space: normal; min-width: 9em; }
.scroll { overflow-x: auto; }
p.verdict { border-left: 5px solid #111; background: #f2f2f2; padding: .6em .9em;
            font-size: 1.05em; }
p.warning { border-left: 5px solid #777; background: #fff6e0; padding: .5em .9em; }
p.tablenote { font-size: 14px; color: #111; margin: .15em 0; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 15px; color: #111; margin-top: .3em; }
"""


def _cell(tag: str, text: str) -> str:
    """A table cell: figures stay on one line; headers and words (three or more: a
    definition, a method, a reason) may wrap, so every table fits the page."""
    cls = ' class="t"' if len(text.split()) >= 3 else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def _html_table(t: TextTable, summary: bool) -> str:
    cls = ' class="summary"' if summary else ""
    head = "".join(_cell("th", c) for c in t.header)
    body = "".join("<tr>" + "".join(_cell("td", c) for c in row) + "</tr>" for row in t.rows)
    notes = "".join(f'<p class="tablenote">{html.escape(n)}</p>' for n in t.notes)
    return (f'<div class="scroll"><table{cls}><caption>{html.escape(t.title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{notes}")


def render_html(blocks: list, title: str) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            cls = f' class="{b.kind}"' if b.kind else ""
            parts.append(f"<p{cls}>{html.escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items)
                         + "</ul>")
        elif isinstance(b, Table):
            parts.append(_html_table(b.table, b.summary))
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" '
                         f'alt="{html.escape(b.alt)}"><figcaption>{html.escape(b.alt)}'
                         "</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _md_escape(text: str) -> str:
    return re.sub(r"([|*_<>`\\])", r"\\\1", text)


def _md_table(t: TextTable) -> str:
    lines = [f"**{_md_escape(t.title)}**", "",
             "| " + " | ".join(_md_escape(c) for c in t.header) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in t.rows]
    if t.notes:
        lines += [""] + [_md_escape(n) + "  " for n in t.notes]
    return "\n".join(lines)


def render_markdown(blocks: list, out: Path) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + _md_escape(b.text))
        elif isinstance(b, Paragraph):
            prefix = {"verdict": "> **", "warning": "> Warning: "}.get(b.kind, "")
            suffix = "**" if b.kind == "verdict" else ""
            parts.append(prefix + _md_escape(b.text) + suffix)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {_md_escape(i)}" for i in b.items))
        elif isinstance(b, Table):
            parts.append(_md_table(b.table))
        elif isinstance(b, Image):
            path = out.with_name(f"{out.stem}-{b.slug}.png")
            atomic.write_bytes(path, lambda f, png=b.png: f.write(png))
            parts.append(f"![{_md_escape(b.alt)}]({path.name})")
    return "\n\n".join(parts) + "\n"


def write_report(
    dirs: Sequence, out, fmt: str = "html", names: Sequence[str] | None = None, fit=None,
    attacks: Sequence = (), faults: Sequence = (),
) -> Path:
    """Write the report for one or more campaign results folders; returns the file written.

    The first folder is the reference: improvement factors are its SDC rate divided by
    each other model's (above 1: the other model is more resilient). dirs may also hold
    Results from load_results(..., evaluate=True). fmt "html" writes one self-contained
    file; "md" writes Markdown with its PNG figures beside it, named <stem>-<figure>.png.
    fit (a flipsafe.safety.FitAssumptions) adds the "Safety estimate" section; attacks
    (`flipsafe attack --out` folders) the "Worst case" section; faults (campaign folders
    of the first model under other fault models) the "Fault models on one model" section.
    """
    from flipsafe.attack import read_folder

    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not dirs:
        raise ConfigError("give at least one campaign results folder to report on")
    models = _named([d if isinstance(d, Results) else load_results(d, evaluate=True)
                     for d in dirs], names)
    for other in models[1:]:
        comparison(models[0], other)  # refuses partners from another plan before any work
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give a file name such as {out / ('report.' + fmt)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    others = [load_results(d, evaluate=True) for d in faults]
    blocks = build_blocks(models, fit, [read_folder(a) for a in attacks], others)
    # Written atomically: a failure part-way leaves any earlier report as it was.
    try:
        if fmt == "html":
            atomic.write_text(out, render_html(blocks, report_title(models)))
        else:
            atomic.write_text(out, render_markdown(blocks, out))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise EnvironmentFailure(
            f"no space left on the disk to write {out} ({exc.strerror}); any earlier report "
            "there is unchanged: free some space and run the command again"
        ) from None
    return out
