"""Summary tables and plain-language verdicts shared by `flipsafe summary` and the reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow.compute as pc

from flipsafe.metrics.stats import (
    OVERALL,
    Comparison,
    GroupComparison,
    GroupSummary,
    RateRatio,
    compare,
)
from flipsafe.report.results import LAST, Results, check_same_plan


def fmt_rate(p: float) -> str:
    """A proportion as a percentage: 2 decimals from 1 % up, 3 significant digits below."""
    if p is None or not math.isfinite(p):
        return "n/a"
    v = 100.0 * p
    if v == 0:
        return "0%"
    # "#" keeps trailing zeros, so 0.430% does not print as 0.43%.
    return f"{v:.2f}%" if v >= 1 else f"{v:#.3g}%"


def fmt_interval(low: float, high: float) -> str:
    return f"[{fmt_rate(low)}, {fmt_rate(high)}]"


def fmt_factor(r: float) -> str:
    """A ratio such as an improvement factor: 0.0912x, 2.31x, 14.4x, 250x."""
    if r is None or math.isnan(r):
        return "n/a"
    if math.isinf(r):
        return "inf"
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x" if r >= 1 else f"{r:#.3g}x"


def fmt_factor_interval(low: float, high: float) -> str:
    return f"[{fmt_factor(low)}, {fmt_factor(high)}]"


def fmt_value(x: float) -> str:
    """A loss value: 4 significant digits, scientific when very large or very small."""
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.4g}"


def fmt_count(n: int) -> str:
    return f"{n:,}"


def fmt_confidence(c: float) -> str:
    return f"{100 * c:g}%"


# Text tables wider than this are cut into column groups (a terminal's usual width).
TEXT_WIDTH = 80


@dataclass(frozen=True)
class TextTable:
    """A table of already formatted cells, rendered as text, HTML or Markdown."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def render_text(self, width: int = TEXT_WIDTH) -> str:
        """The table as text lines of at most `width` characters where it can be done:
        a wider table is cut into column groups shown one below the other, each starting
        with the first (key) column and with its own header and dashed line."""
        cells = [self.header, *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = []
        for group in _column_groups(widths, width):
            # Two spaces between columns, so the text can be split back into cells.
            lines += ["  ".join(row[i].ljust(widths[i]) for i in group).rstrip() for row in cells]
            lines.insert(len(lines) - len(self.rows), "  ".join("-" * widths[i] for i in group))
        return "\n".join([self.title, *lines, *self.notes])


def _column_groups(widths: list[int], width: int) -> list[list[int]]:
    """Column indices per group: every group starts with column 0 and takes the next
    columns while the line stays within `width` (a group holds at least one more)."""
    groups = [[0]]
    used = widths[0]
    for i in range(1, len(widths)):
        if len(groups[-1]) > 1 and used + 2 + widths[i] > width:
            groups.append([0])
            used = widths[0]
        groups[-1].append(i)
        used += 2 + widths[i]
    return groups


@dataclass(frozen=True)
class Verdict:
    """How model `other` compares with `reference` on one group, in words."""

    reference: str
    other: str
    group: str
    ratio: RateRatio
    direction: str  # "more", "less" or "unclear"

    @property
    def reading(self) -> str:
        return {"more": "more resilient", "less": "LESS resilient",
                "unclear": "no clear difference"}[self.direction]


def verdict(reference: str, other: str, group: str, ratio: RateRatio) -> Verdict:
    if ratio.low > 1:
        direction = "more"
    elif ratio.high < 1:
        direction = "less"
    else:
        direction = "unclear"
    return Verdict(reference, other, group, ratio, direction)


def _rate_words(g: GroupSummary) -> str:
    return f"{fmt_rate(g.sdc.rate)} ({fmt_count(g.sdc.k)} of {fmt_count(g.sdc.n)})"


def _matched_group(results: Results, key: str) -> GroupSummary:
    return results.matched.overall if key == OVERALL else results.matched.groups[(key,)]


def sentence(v: Verdict, reference: Results, other: Results) -> str:
    """One sentence a manager can read: which model is more resilient, by how much, how sure."""
    r = v.ratio
    group = v.group
    if group == OVERALL and list(reference.matched.groups) == list(other.matched.groups) \
            and len(reference.matched.groups) == 1:
        group = next(iter(reference.matched.groups))[0]  # one layer: name it, not "all"
    if group == OVERALL:
        where = "Over all injected layers"
    elif group == LAST:
        where = "In the classifier (last) layer, the only one injected" if v.group == OVERALL \
            else "In the classifier (last) layer"
    else:
        where = f"In the only injected layer, {group}"
    rates = (f"SDC rate {_rate_words(_matched_group(other, v.group))} for {v.other} against "
             f"{_rate_words(_matched_group(reference, v.group))} for {v.reference}")
    level = fmt_confidence(r.confidence)
    corrected = " (0.5 added to every count because one side had no SDCs)" if r.corrected else ""
    if v.direction == "more":
        return (f"{where}, {v.other} is {fmt_factor(r.ratio)} more resilient than "
                f"{v.reference} ({level} interval {fmt_factor(r.low)} to {fmt_factor(r.high)})"
                f"{corrected}: {rates}.")
    if v.direction == "less":
        return (f"{where}, {v.other} is {fmt_factor(1 / r.ratio)} LESS resilient "
                f"than {v.reference} (improvement factor {fmt_factor(r.ratio)}, {level} interval "
                f"{fmt_factor(r.low)} to {fmt_factor(r.high)}, below 1){corrected}: {rates}.")
    return (f"{where}, the campaign shows no clear difference between {v.other} and "
            f"{v.reference}: the improvement factor {fmt_factor(r.ratio)} has a {level} interval "
            f"{fmt_factor(r.low)} to {fmt_factor(r.high)}, which includes 1{corrected}; {rates}.")


def comparison(reference: Results, other: Results) -> Comparison:
    """SDC rate ratios reference / other per matched layer (classifier layers as "last")."""
    check_same_plan(reference, other)
    return compare(reference.matched, other.matched)


def headline(reference: Results, other: Results) -> list[str]:
    """The overall verdict sentence for other against reference, and the last layer's when
    more than the last layer was injected."""
    comp = comparison(reference, other)
    out = [sentence(verdict(reference.name, other.name, OVERALL, comp.overall.sdc),
                    reference, other)]
    last = comp.groups.get((LAST,))
    if last is not None and len(comp.groups) > 1:
        out.append(sentence(verdict(reference.name, other.name, LAST, last.sdc), reference, other))
    return out


def plan_line(results: Results) -> str:
    p = results.plan
    images = pc.count_distinct(results.table["image_id"]).as_py()
    n = f"n sized for +-{fmt_rate(p.margin)}" if p.n is None else f"n={p.n}"
    return (f"plan: dataset {p.dataset}, site {p.site}, format {p.format}, fault {p.fault}, "
            f"clamp {p.clamp}, layers {p.layers} ({n} per layer), images {p.images} "
            f"({fmt_count(images)} distinct), seed {p.seed}, {fmt_count(results.n)} injections; "
            f"intervals are {fmt_confidence(results.by_layer.confidence)} Wilson (rates) and "
            "Katz (ratios)")


def models_table(all_results: Sequence[Results]) -> TextTable:
    conf = fmt_confidence(all_results[0].by_layer.confidence)
    rows = []
    for r in all_results:
        o = r.by_layer.overall
        acc = "n/a" if r.accuracy is None else fmt_rate(r.accuracy)
        arch = "n/a" if r.config is None else str(r.config.get("arch", "n/a"))
        rows.append([r.name, arch, r.head, acc, fmt_count(o.n), fmt_rate(o.sdc.rate),
                     fmt_interval(o.sdc.low, o.sdc.high), fmt_rate(o.due.rate),
                     fmt_interval(o.due.low, o.due.high)])
    return TextTable("Models", ["model", "arch", "head", "accuracy", "injections", "SDC",
                                f"SDC {conf} CI", "DUE", f"DUE {conf} CI"], rows)


def layer_table(results: Results) -> TextTable:
    conf = fmt_confidence(results.by_layer.confidence)
    rows = []
    for g in results.by_layer.rows():
        layer = g.key[0]
        if layer == results.classifier_layer:
            layer = f"{layer} (last)"
        dl = g.delta_loss
        rows.append([layer, fmt_count(g.n), fmt_rate(g.sdc.rate),
                     fmt_interval(g.sdc.low, g.sdc.high), fmt_rate(g.due.rate),
                     fmt_interval(g.due.low, g.due.high),
                     fmt_value(g.delta_loss_quantiles.get(0.5, math.nan)),
                     fmt_count(dl.excluded)])
    return TextTable(f"Per layer: {results.name}",
                     ["layer", "n", "SDC", f"SDC {conf} CI", "DUE", f"DUE {conf} CI",
                      "dLoss median", "dLoss non-finite"], rows)


def _comparison_row(key: str, g: GroupComparison, ref: Results, other: Results) -> list[str]:
    a, b = _matched_group(ref, key), _matched_group(other, key)
    return [key, f"{fmt_rate(a.sdc.rate)} ({a.sdc.k}/{a.n})",
            f"{fmt_rate(b.sdc.rate)} ({b.sdc.k}/{b.n})", fmt_factor(g.sdc.ratio),
            fmt_factor_interval(g.sdc.low, g.sdc.high),
            verdict(ref.name, other.name, key, g.sdc).reading]


def comparison_table(reference: Results, other: Results) -> TextTable:
    """Per matched layer and overall: both SDC rates, factor reference / other, its interval."""
    comp = comparison(reference, other)
    rows = [_comparison_row(key[0], g, reference, other) for key, g in comp.groups.items()]
    rows.append(_comparison_row(OVERALL, comp.overall, reference, other))
    notes = []
    if (LAST,) in comp.groups:
        notes.append(f"last = the classifier layer ({reference.classifier_layer} in "
                     f"{reference.name}, {other.classifier_layer} in {other.name}).")
    for side, keys in ((reference, comp.only_a), (other, comp.only_b)):
        if keys:
            names = ", ".join(side.real_name(k[0]) for k in keys)
            notes.append(f"only in {side.name}, not compared: {names}.")
    notes.append(f"factor = SDC rate of {reference.name} / SDC rate of {other.name}; "
                 f"above 1 means {other.name} has fewer SDCs.")
    return TextTable(f"Improvement: {reference.name} / {other.name}",
                     ["layer", f"{reference.name} SDC", f"{other.name} SDC", "factor",
                      f"factor {fmt_confidence(comp.confidence)} CI", "reading"], rows, notes)


def summary_tables(results: Results, vs: Sequence[Results] = ()) -> list[TextTable]:
    """The models table, one per-layer table per model and one comparison per partner."""
    everyone = [results, *vs]
    tables = [models_table(everyone), *(layer_table(r) for r in everyone)]
    tables += [comparison_table(results, other) for other in vs]
    return tables


def summary_lines(results: Results, vs: Sequence[Results] = ()) -> list[str]:
    """Plan line, notes and the verdict sentences, in the order summary_table prints them."""
    for other in vs:
        check_same_plan(results, other)
    lines = [plan_line(results)]
    for r in (results, *vs):
        lines += [f"note ({r.name}): {note}" for note in r.notes]
    for other in vs:
        lines += headline(results, other)
    return lines


def summary_table(results: Results, vs: Sequence[Results] = ()) -> str:
    """What `flipsafe summary DIR [--vs DIR2 ...]` prints: plan, tables and verdicts as text."""
    lines = summary_lines(results, vs)
    blocks = [lines[0], *(t.render_text() for t in summary_tables(results, vs)), *lines[1:]]
    return "\n\n".join(blocks) + "\n"
