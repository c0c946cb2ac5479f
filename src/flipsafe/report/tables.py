"""Summary tables and plain-language verdicts shared by `flipsafe summary` and the reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from flipsafe.errors import FlipsafeError
from flipsafe.metrics.factors import OUTLIER_MOVE, FactorTable, improvement_factors
from flipsafe.metrics.stats import (
    EFFECTIVE_METHOD,
    OVERALL,
    STRATIFIED_METHOD,
    Comparison,
    GroupComparison,
    GroupSummary,
    RateRatio,
    compare,
    stratified_paired_ratio,
)
from flipsafe.protect.spec import label as protection_label
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
    """A ratio such as an improvement factor: 0.0912x, 2.31x, 14.4x, 250x, 4.71e+35x."""
    if r is None or math.isnan(r):
        return "n/a"
    if math.isinf(r):
        return "inf"
    if r >= 1e6:
        return f"{r:.3g}x"
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
    key_columns: int = 1

    def render_text(self, width: int = TEXT_WIDTH) -> str:
        """The table as text lines of at most `width` characters where it can be done:
        a wider table is cut into column groups shown one below the other, each starting
        with the key columns (the first `key_columns`) and with its own header and dashed
        line."""
        cells = [self.header, *self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.header))]
        lines = []
        for group in _column_groups(widths, width, self.key_columns):
            # Two spaces between columns, so the text can be split back into cells.
            lines += ["  ".join(row[i].ljust(widths[i]) for i in group).rstrip() for row in cells]
            lines.insert(len(lines) - len(self.rows), "  ".join("-" * widths[i] for i in group))
        return "\n".join([self.title, *lines, *self.notes])


def _column_groups(widths: list[int], width: int, keys: int = 1) -> list[list[int]]:
    """Column indices per group: every group starts with the first `keys` columns and takes
    the next columns while the line stays within `width` (a group holds at least one more)."""
    keys = max(1, min(keys, len(widths) - 1)) if len(widths) > 1 else len(widths)
    key = list(range(keys))
    key_width = sum(widths[:keys]) + 2 * (keys - 1)
    groups = [list(key)]
    used = key_width
    for i in range(keys, len(widths)):
        if len(groups[-1]) > keys and used + 2 + widths[i] > width:
            groups.append(list(key))
            used = key_width
        groups[-1].append(i)
        used += 2 + widths[i]
    return groups


@dataclass(frozen=True)
class Verdict:
    """How model `other` compares with `reference` on one group, in words.

    p_adjusted, when given, is the Holm-adjusted p-value of the ratio among a family of
    per-layer tests; the direction then follows it instead of the unadjusted interval.
    """

    reference: str
    other: str
    group: str
    ratio: RateRatio
    direction: str  # "more", "less" or "unclear"
    p_adjusted: float | None = None

    @property
    def reading(self) -> str:
        return {"more": "more resilient", "less": "LESS resilient",
                "unclear": "no clear difference"}[self.direction]


def verdict(reference: str, other: str, group: str, ratio: RateRatio,
            p_adjusted: float | None = None) -> Verdict:
    if p_adjusted is not None and not p_adjusted < 1.0 - ratio.confidence:
        direction = "unclear"
    elif ratio.low > 1:
        direction = "more"
    elif ratio.high < 1:
        direction = "less"
    else:
        direction = "unclear"
    return Verdict(reference, other, group, ratio, direction, p_adjusted)


def _rate_words(g: GroupSummary, outcome: str = "sdc") -> str:
    r = getattr(g, outcome)
    if r.method == "stratified":
        return (f"{fmt_rate(r.rate)} (fault-space weighted; {fmt_count(r.k)} in "
                f"{fmt_count(r.n)} injections)")
    return f"{fmt_rate(r.rate)} ({fmt_count(r.k)} of {fmt_count(r.n)})"


def _matched_group(results: Results, key: str) -> GroupSummary:
    return results.matched.overall if key == OVERALL else results.matched.groups[(key,)]


def _scope(comp: Comparison, group: str) -> str:
    """Where a verdict applies, in words: the layer, or the layers both sides have."""
    if group == LAST:
        return "In the classifier (last) layer"
    if group != OVERALL:
        return f"In layer {group}"
    keys = [key[0] for key in comp.groups]
    if len(keys) == 1:
        return ("In the classifier (last) layer, the only one injected" if keys[0] == LAST
                else f"In the only injected layer, {keys[0]}")
    shared = "both campaigns injected" if comp.only_a or comp.only_b else "injected"
    return f"Over the {len(keys)} layers {shared}"


def _incomplete_words(*models: Results) -> str:
    partial = [r for r in models if not r.complete]
    if not partial:
        return ""
    names = " and ".join(f"{r.name} ({fmt_count(r.n)} of {fmt_count(r.planned_rows)} planned "
                         "rows)" for r in partial)
    return (f" Caution: {names} {'is' if len(partial) == 1 else 'are'} incomplete; only the "
            "strata both sides have rows in are compared.")


def _factor_words(r: RateRatio) -> str:
    corrected = ", 0.5 added to every count because one side had none" if r.corrected else ""
    return (f"{fmt_confidence(r.confidence)} interval {fmt_factor(r.low)} to "
            f"{fmt_factor(r.high)}{corrected}")


def _due_words(comp: Comparison, ref: Results, other: Results) -> str:
    """The DUE (detectable NaN/Inf) half of a verdict: how often, and whether it differs."""
    r = comp.overall.due
    rates = (f"DUE rate (NaN/Inf, detectable) {_rate_words(comp.overall_b, 'due')} for "
             f"{other.name} against {_rate_words(comp.overall_a, 'due')} for {ref.name}")
    if r is None or not math.isfinite(r.ratio):
        return f"{rates}."
    if r.low > 1:
        return (f"{rates}: {other.name} has {fmt_factor(r.ratio)} FEWER DUEs "
                f"(factor {fmt_factor(r.ratio)}, {_factor_words(r)}, above 1).")
    if r.high < 1:
        return (f"{rates}: {other.name} has {fmt_factor(1 / r.ratio)} MORE DUEs "
                f"(factor {fmt_factor(r.ratio)}, {_factor_words(r)}, below 1).")
    return (f"{rates}: no clear difference (factor {fmt_factor(r.ratio)}, {_factor_words(r)}, "
            "which includes 1).")


def sentence(v: Verdict, reference: Results, other: Results,
             comp: Comparison | None = None) -> str:
    """A manager-readable verdict: which model has fewer SDCs, by how much, how sure, and
    how their DUE rates compare (for the overall group)."""
    comp = comparison(reference, other) if comp is None else comp
    r = v.ratio
    where = _scope(comp, v.group)
    if v.group == OVERALL:
        a, b = comp.overall_a, comp.overall_b
    else:
        a, b = _matched_group(reference, v.group), _matched_group(other, v.group)
    rates = (f"SDC rate {_rate_words(b)} for {v.other} against {_rate_words(a)} for "
             f"{v.reference}")
    if v.direction == "more":
        text = (f"{where}, {v.other} is {fmt_factor(r.ratio)} more resilient than "
                f"{v.reference} ({_factor_words(r)}): {rates}.")
    elif v.direction == "less":
        text = (f"{where}, {v.other} is {fmt_factor(1 / r.ratio)} LESS resilient "
                f"than {v.reference} (improvement factor {fmt_factor(r.ratio)}, "
                f"{_factor_words(r)}, below 1): {rates}.")
    else:
        text = (f"{where}, the campaign shows no clear difference in SDCs between {v.other} "
                f"and {v.reference}: the improvement factor {fmt_factor(r.ratio)} has a "
                f"{_factor_words(r)}, which includes 1; {rates}.")
    if v.group == OVERALL:
        text += " " + _due_words(comp, reference, other)
    return text + _incomplete_words(reference, other)


def comparison(reference: Results, other: Results) -> Comparison:
    """SDC and DUE rate ratios reference / other per matched layer (classifier layers as
    "last"), and overall over the matched layers' common strata."""
    check_same_plan(reference, other)
    return compare(reference.matched, other.matched)


def headline(reference: Results, other: Results) -> list[str]:
    """The overall verdict sentence for other against reference (SDC and DUE), and the last
    layer's when more than the last layer was injected."""
    comp = comparison(reference, other)
    out = [sentence(verdict(reference.name, other.name, OVERALL, comp.overall.sdc),
                    reference, other, comp)]
    last = comp.groups.get((LAST,))
    if last is not None and len(comp.groups) > 1:
        out.append(sentence(verdict(reference.name, other.name, LAST, last.sdc), reference,
                            other, comp))
    return out


_PROTOCOL_WORDS = {
    "goldeneye": "GoldenEye's conventions: faults in Conv/Linear outputs, one image each, "
                 "correctly classified images with a positive margin, NaN clamped to +max, "
                 "single-bit flips; GoldenEye drops non-finite outcomes from mismatch and "
                 "mean |dLoss|, as the improvement-factor table shows beside SDC rate",
}


def interval_method(results: Results) -> str:
    """How the whole-model (and, adaptive, every layer's) interval was computed."""
    if results.by_layer.interval == "effective":
        return EFFECTIVE_METHOD
    return STRATIFIED_METHOD if results.strata is not None else "pooled rows"


def precision(results: Results) -> dict:
    """What an adaptive campaign reached: its target half-width, each layer's (SDC and
    DUE, the wider) and the layers that missed the target, by how much."""
    target = results.plan.margin
    reached = {}
    for key, g in (*results.by_layer.groups.items(), ((OVERALL,), results.by_layer.overall)):
        reached[key[0]] = max((g.sdc.high - g.sdc.low) / 2, (g.due.high - g.due.low) / 2)
    return {"target": target, "confidence": results.by_layer.confidence,
            "spent": int(results.n), "pilot": int(results.pilot_rows),
            "half_width": {k: _number(v) for k, v in reached.items()},
            "missed": {k: _number(v) for k, v in reached.items() if v > target}}


def precision_line(results: Results) -> str | None:
    """One line on the precision an adaptive campaign reached; None for fixed ones."""
    if not results.plan.adaptive:
        return None
    got = precision(results)
    widest = max(got["half_width"], key=lambda k: got["half_width"][k])
    head = (f"precision: +-{fmt_rate(got['target'])} at {fmt_confidence(got['confidence'])} "
            f"asked; widest +-{fmt_rate(got['half_width'][widest])} ({widest}), from "
            f"{fmt_count(got['spent'])} injections ({fmt_count(got['pilot'])} pilot)")
    if not results.complete:
        return head + "; the campaign is incomplete: resume it for the planned precision"
    if not got["missed"]:
        return head + "; every layer reached it"
    missed = ", ".join(f"{k} +-{fmt_rate(v)}" for k, v in got["missed"].items())
    return head + f"; missed by: {missed} (a --budget cap or an unlucky pilot)"


def decided_line(results: Results) -> str:
    """How many of the rows were decided exactly without a forward pass."""
    n = results.table.num_rows
    k = _count(results, "decided")
    return (f"{fmt_rate(k / n if n else math.nan)} of {fmt_count(n)} injections decided "
            "exactly without a forward pass (the code did not change, or its change provably "
            "cannot reach the scores; counted with their outcomes)")


def plan_line(results: Results) -> str:
    p = results.plan
    images = pc.count_distinct(results.table["image_id"]).as_py()
    n = f"n sized for +-{fmt_rate(p.margin)}" if p.n is None else f"n={p.n}"
    allocation = f"{p.allocation} allocation"
    overall = ("(all) rows are stratified estimates of the fault-space-average rate, each "
               "layer x field stratum weighted by its share of the fault space, with Wilson "
               "intervals on Kish's effective sample size" if results.strata is not None else
               "(all) rows pool the rows (fault-space sizes not recorded)")
    if p.adaptive:
        allocation = "adaptive: a pilot, then Neyman allocation"
        overall = (f"layer and (all) rows are estimates of stage 2 only ({fmt_count(results.n)} "
                   f"injections spent, {fmt_count(results.pilot_rows)} of them the pilot's, "
                   "which only allocated): " + EFFECTIVE_METHOD)
    protocol = "" if p.protocol is None else (
        f"protocol {p.protocol} ({_PROTOCOL_WORDS.get(p.protocol, 'named conventions')}), ")
    if p.protect is not None:
        protocol += f"protection {p.protect}, "
    site = p.site if p.accelerator is None else f"{p.site} (array {p.accelerator})"
    return (f"plan: {protocol}dataset {p.dataset}, site {site}, format {p.format}, "
            f"fault {p.fault}, clamp {p.clamp}, layers {p.layers} ({n} per layer, {allocation} "
            f"across bit fields), images {p.images} ({fmt_count(images)} distinct), seed "
            f"{p.seed}, {fmt_count(results.n)} injections; intervals are "
            f"{fmt_confidence(results.by_layer.confidence)} Wilson (rates) and Katz (ratios); "
            f"{overall}")


def models_table(all_results: Sequence[Results]) -> TextTable:
    conf = fmt_confidence(all_results[0].by_layer.confidence)
    rows = []
    for r in all_results:
        o = r.by_layer.overall
        acc = "n/a" if r.accuracy is None else fmt_rate(r.accuracy)
        arch = r.arch or "n/a"
        rows.append([r.name, arch, r.head, acc, fmt_count(o.n), fmt_rate(o.sdc.rate),
                     fmt_interval(o.sdc.low, o.sdc.high), fmt_rate(o.due.rate),
                     fmt_interval(o.due.low, o.due.high)])
    weighted = ("SDC and DUE: whole-model rates, each layer x field stratum weighted by its "
                "share of the fault space (see the plan line).")
    notes = [weighted] if any(r.strata is not None for r in all_results) else []
    return TextTable("Models", ["model", "arch", "head", "accuracy", "injections", "SDC",
                                f"SDC {conf} CI", "DUE", f"DUE {conf} CI"], rows, notes)


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


def _comparison_row(key: str, g: GroupComparison, a: GroupSummary, b: GroupSummary,
                    v: Verdict) -> list[str]:
    due = "n/a" if g.due is None else fmt_factor(g.due.ratio)
    p = "-" if v.p_adjusted is None else f"{v.p_adjusted:.2g}"
    return [key, f"{fmt_rate(a.sdc.rate)} ({a.sdc.k}/{a.n})",
            f"{fmt_rate(b.sdc.rate)} ({b.sdc.k}/{b.n})", fmt_factor(g.sdc.ratio),
            fmt_factor_interval(g.sdc.low, g.sdc.high), p, v.reading, due]


def layer_verdicts(reference: Results, other: Results,
                   comp: Comparison | None = None) -> dict[tuple, Verdict]:
    """Per matched layer SDC verdicts, Holm-adjusted across the layers of this comparison."""
    comp = comparison(reference, other) if comp is None else comp
    return {k: verdict(reference.name, other.name, k[0], comp.groups[k].sdc, q)
            for k, q in comp.holm_sdc().items()}


def comparison_table(reference: Results, other: Results) -> TextTable:
    """Per matched layer and overall: both SDC rates, factor reference / other, its interval,
    the Holm-adjusted p-value and reading, and the DUE factor."""
    comp = comparison(reference, other)
    verdicts = layer_verdicts(reference, other, comp)
    rows = [_comparison_row(key[0], g, _matched_group(reference, key[0]),
                            _matched_group(other, key[0]), verdicts[key])
            for key, g in comp.groups.items()]
    overall = verdict(reference.name, other.name, OVERALL, comp.overall.sdc)
    rows.append(_comparison_row(OVERALL, comp.overall, comp.overall_a, comp.overall_b, overall))
    conf = fmt_confidence(comp.confidence)
    notes = []
    if (LAST,) in comp.groups:
        notes.append(f"last = the classifier layer ({reference.classifier_layer} in "
                     f"{reference.name}, {other.classifier_layer} in {other.name}).")
    for side, keys in ((reference, comp.only_a), (other, comp.only_b)):
        if keys:
            names = ", ".join(side.real_name(k[0]) for k in keys)
            notes.append(f"only in {side.name}, not compared (left out of (all) too): {names}.")
    notes.append(f"factor = rate of {reference.name} / rate of {other.name}; above 1 means "
                 f"{other.name} has fewer.")
    notes.append(f"Per-layer readings: {len(comp.groups)} tests of factor = 1 with Holm's "
                 f"correction (family-wise error at most {fmt_rate(1 - comp.confidence)}); "
                 "the intervals are per layer, unadjusted. (all) compares the stratified "
                 "rates over the layers both sides have.")
    return TextTable(f"Improvement: {reference.name} / {other.name}",
                     ["layer", f"{reference.name} SDC", f"{other.name} SDC", "factor",
                      f"factor {conf} CI", "Holm p", "reading", "DUE factor"], rows, notes)


# Short names of the factor definitions for the reading.
_SHORT = {"sdc_rate": "SDC rate", "mismatch_finite": "mismatch (non-finite dropped)",
          "mean_delta_loss": "mean |dLoss|", "median_delta_loss": "median |dLoss|",
          "sdc_golden_top2diff": "SDC images' golden top2diff"}


def _rows_of(results: Results, layers: Sequence[str]) -> pa.Table:
    table = results.matched_table()
    return table.filter(pc.is_in(table["layer"], value_set=pa.array(list(layers), pa.string())))


def factor_tables(reference: Results, other: Results,
                  comp: Comparison | None = None) -> list[tuple[str, FactorTable]]:
    """The improvement factor reference / other under every definition, over the matched
    layers ((all)) and, when more layers than the classifier were matched, in it (last)."""
    comp = comparison(reference, other) if comp is None else comp
    layers = [key[0] for key in comp.groups]
    if not layers:
        return []
    conf = comp.confidence
    out = [(OVERALL, improvement_factors(
        _rows_of(reference, layers), _rows_of(other, layers), conf,
        sdc=(comp.overall_a.sdc, comp.overall_b.sdc)))]
    if LAST in layers and len(layers) > 1:
        a, b = _matched_group(reference, LAST), _matched_group(other, LAST)
        out.append((LAST, improvement_factors(_rows_of(reference, [LAST]),
                                              _rows_of(other, [LAST]), conf,
                                              sdc=(a.sdc, b.sdc))))
    return out


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def factor_reading(ft: FactorTable, reference: str, other: str) -> str:
    """One line from the numbers: where each definition's interval lies against 1, and
    whether one |dLoss| value drives the mean-|dLoss| factor."""
    groups = ft.agreement()
    verbs = {"above 1": "lies above 1", "includes 1": "includes 1", "below 1": "lies below 1",
             "undefined": "is undefined"}
    parts = [f"{verbs[where]} by {_join([_SHORT[k] for k in groups[where]])}"
             for where in verbs if where in groups]
    defined = [where for where in verbs if where in groups and where != "undefined"]
    if not defined:
        agree = "no factor is defined"
    elif len(defined) == 1 and "undefined" not in groups:
        agree = f"every definition agrees: the interval {verbs[defined[0]]}"
    elif len(defined) == 1:
        agree = "the defined factors agree: the interval " + "; ".join(parts)
    else:
        agree = "the definitions disagree: the interval " + "; ".join(parts)
    mean = ft["mean_delta_loss"]
    names = {"a": reference, "b": other}
    driving = ft.driving_outliers()
    if driving:
        o = driving[0]
        how = (f"changes by more than {OUTLIER_MOVE:g}x" if o.moves > OUTLIER_MOVE
               else "crosses 1")
        if o.flips and o.moves > OUTLIER_MOVE:
            how += " and crosses 1"
        outliers = (f"the mean-|dLoss| factor {how} ({fmt_factor(o.before)} to "
                    f"{fmt_factor(o.ratio)}) if the single largest |dLoss| "
                    f"({fmt_value(o.removed)}, {names[o.side]}) is removed")
        if len(driving) > 1:
            outliers += f", and also with {names[driving[1].side]}'s largest removed"
    elif not math.isfinite(mean.ratio):
        outliers = "the mean-|dLoss| factor is not a finite number"
    elif len(ft.outliers) < 2:
        outliers = "too few |dLoss| values to check the mean-|dLoss| factor for outliers"
    else:
        outliers = (f"no single |dLoss| drives the mean-|dLoss| factor (removing either "
                    f"side's largest moves it by less than {OUTLIER_MOVE:g}x and not across 1)")
    return f"Reading (above 1: {other} has fewer or smaller): {agree}; {outliers}."


def _factor_cell(key: str, value: float, n: int) -> str:
    shown = fmt_rate(value) if key in ("sdc_rate", "mismatch_finite") else fmt_value(value)
    return f"{shown} (n={fmt_count(n)})"


def factor_table(reference: Results, other: Results,
                 comp: Comparison | None = None) -> TextTable | None:
    """The factor reference / other under every definition, side by side, with intervals,
    the interval method and a reading per scope; None when no layer matches."""
    scopes = factor_tables(reference, other, comp)
    if not scopes:
        return None
    conf = fmt_confidence(scopes[0][1].confidence)
    rows, notes = [], []
    for scope, ft in scopes:
        for f in ft.factors:
            rows.append([scope, f.label, _factor_cell(f.key, f.a, f.n_a),
                         _factor_cell(f.key, f.b, f.n_b), fmt_factor(f.ratio),
                         fmt_factor_interval(f.low, f.high), f.method, f.position])
        reading = factor_reading(ft, reference.name, other.name)
        notes.append(reading if len(scopes) == 1 else f"{scope}: {reading}")
    notes.append(
        f"factor = value of {reference.name} / value of {other.name}, over the layers both "
        "injected ((all); last = the classifier layer). SDC rate: the comparison's rates; "
        "mismatch: SDC rate among the rows whose corrupted value stayed finite, pooled "
        "(GoldenEye's denominator); |dLoss| and top2diff over finite values; n counts the "
        "rows or values used. Intervals: Katz and delta method on the log ratio, the median "
        f"by a percentile bootstrap ({scopes[0][1].resamples} resamples, seed "
        f"{scopes[0][1].seed}, each side resampled on its own).")
    return TextTable(f"Improvement factor by definition: {reference.name} / {other.name}",
                     ["layers", "definition", reference.name, other.name, "factor",
                      f"factor {conf} CI", "interval", "vs 1"], rows, notes)


# Columns that name a fault row: two campaigns whose rows agree in all of them (and whose
# model, data and fault plan agree) injected the very same faults, row by row.
PAIRED_COLUMNS = ("fault_id", "layer", "param", "index", "bits", "image_id", "golden_top1")


def same_faults(a: Results, b: Results) -> bool:
    """Whether two campaigns injected the very same faults into the same model and data
    (e.g. one with a protection, one without), so their rows pair one to one."""
    pa_, pb = a.plan, b.plan
    if (pa_.model_sha != pb.model_sha or pa_.data_sha != pb.data_sha
            or pa_.fault_plan != pb.fault_plan or a.n != b.n or a.n == 0):
        return False
    return all(a.table[c].equals(b.table[c]) for c in PAIRED_COLUMNS)


TEXT_GUIDED = "text-guided head"


def _is_text_guided(r: Results) -> bool:
    return r.head not in ("linear", "unknown")


def _same_plan(a: Results, b: Results) -> bool:
    try:
        check_same_plan(a, b)
    except FlipsafeError:
        return False
    return True


def _cost_total(r: Results) -> dict | None:
    total = (r.cost or {}).get("total")
    return total if isinstance(total, dict) else None


def _number_or_none(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _own_costs(r: Results) -> dict:
    """Overheads of campaign r's protections on its model, as fractions (None: unknown).

    An unprotected campaign costs nothing by definition. Without a recorded cost (folders
    from before flipsafe measured it) only ecc and parity over every word have a known
    memory figure: their check bits per stored weight bit."""
    from flipsafe.protect import word_cost

    if r.plan.protect is None:
        return {"flops": 0.0, "latency": 0.0, "memory": 0.0, "accuracy": 0.0}
    total = _cost_total(r)
    if total is None:
        items = r.plan.protections
        whole = len(items) == 1 and not items[0].options  # one code over every word
        memory = (word_cost(items[0].name).memory_overhead
                  if whole and word_cost(items[0].name).word_bits else None)
        return {"flops": None, "latency": None, "memory": memory, "accuracy": None}
    return {"flops": _number_or_none(total.get("flops_overhead")),
            "latency": _number_or_none(total.get("latency_overhead")),
            "memory": _number_or_none(total.get("memory_overhead")),
            "accuracy": _number_or_none(total.get("accuracy_change"))}


def _ratio_of(a: Results, b: Results, key: str) -> float | None:
    """b's recorded model figure `key` over a's, minus 1 (None unless both recorded it)."""
    x, y = (_number_or_none((r.cost or {}).get(key)) for r in (a, b))
    return None if not x or y is None else y / x - 1


def _head_costs(base: Results, tg: Results) -> dict:
    """What the text-guided head costs against the baseline: the accuracy difference and
    the two models' FLOPs and parameter bits as recorded by their campaigns; latency is not
    compared (measured in different runs)."""
    acc = (None if base.accuracy is None or tg.accuracy is None
           else tg.accuracy - base.accuracy)
    return {"flops": _ratio_of(base, tg, "model_flops"), "latency": None,
            "memory": _ratio_of(base, tg, "param_bits"), "accuracy": acc}


def _count(r: Results, column: str) -> int:
    return int(pc.sum(r.table[column]).as_py() or 0)


def protections(results: Results, vs: Sequence[Results] = ()) -> list[dict] | None:
    """Protections side by side (None when no campaign ran one), one dict per campaign: its
    protection, SDC rate (a RateEstimate), faults detected and corrected, its `reference`
    (the first unprotected campaign with the very same fault rows, itself when unprotected;
    None if there is none), the reference's SDC rate over its own paired on the same faults
    (`factor`, a RateRatio whose p_value is McNemar's exact p; None for the reference) and
    its overheads against the unprotected model as fractions (`flops`, `latency`, `memory`;
    `accuracy`: the clean top-1 change), None where unknown (costs are read from the
    folder's manifest, see protect.cost.for_plan).

    An unprotected text-guided campaign on the same plan as an unprotected baseline also
    gets a "text-guided head" entry: its factor is the baseline's SDC rate over its own
    (unpaired, Katz, other faults), its costs the accuracy difference and the models'
    recorded FLOPs and parameter bits."""
    everyone = [results, *vs]
    if all(r.plan.protect is None for r in everyone):
        return None
    conf = results.by_layer.confidence
    bare = [r for r in everyone if r.plan.protect is None]
    out = []
    for r in everyone:
        ref = r if r.plan.protect is None else next(
            (b for b in bare if same_faults(b, r)), None)
        factor = None
        if ref is not None and ref is not r:
            keys = zip(ref.table["layer"].to_pylist(), ref.table["field"].to_pylist())
            factor = stratified_paired_ratio(
                ref.table["sdc"].to_numpy(zero_copy_only=False),
                r.table["sdc"].to_numpy(zero_copy_only=False), keys, ref.sizes(), conf).ratio
        out.append({
            "campaign": r, "protection": r.plan.protect, "sdc": r.by_layer.overall.sdc,
            "detected": _count(r, "detected"), "corrected": _count(r, "corrected"),
            "reference": ref, "factor": factor, "paired": True, **_own_costs(r),
        })
        if r.plan.protect is None and _is_text_guided(r):
            base = next((b for b in bare if b.head == "linear" and _same_plan(b, r)), None)
            if base is not None:
                out.append({
                    "campaign": r, "protection": TEXT_GUIDED, "sdc": r.by_layer.overall.sdc,
                    "detected": 0, "corrected": 0, "reference": base,
                    "factor": comparison(base, r).overall.sdc, "paired": False,
                    **_head_costs(base, r),
                })
    return out


def fmt_overhead(x: float | None) -> str:
    """An overhead fraction as a signed percentage (+12.5%, -3.10%), n/a when unknown."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return "+0%" if x == 0 else f"{100 * x:+.3g}%"


def fmt_points(x: float | None) -> str:
    """An accuracy change in percentage points (+0.56 pp), n/a when unknown."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return "+0 pp" if x == 0 else f"{100 * x:+.2f} pp"


def _latency_note(entries: list[dict]) -> str | None:
    costs = [e["campaign"].cost for e in entries if e["campaign"].cost]
    if not costs:
        return None
    from flipsafe.protect.cost import LABEL

    machines = sorted({str(c.get("machine") or "unknown machine") for c in costs})
    return (f"latency: fastest of repeated clean inferences on the campaign's example images with "
            f"the protections against without, repeats interleaved; {LABEL} "
            f"({'; '.join(machines)}).")


def protection_table(results: Results, vs: Sequence[Results] = ()) -> TextTable | None:
    """The Protections table of `protections` (None when no campaign ran one)."""
    entries = protections(results, vs)
    if entries is None:
        return None
    c = fmt_confidence(results.by_layer.confidence)
    rows = []
    paired_any = False
    for e in entries:
        r, sdc, f = e["campaign"], e["sdc"], e["factor"]
        if e["reference"] is r:
            referenced = any(x["reference"] is r and x["campaign"] is not r for x in entries)
            paired = ["reference" if referenced else "-", "", ""]
        elif e["reference"] is None:
            paired = ["n/a (no unprotected run of these faults given)", "", ""]
        else:
            paired_any = True
            p = f"{f.p_value:.3g}" if e["paired"] else f"{f.p_value:.3g} (Katz)"
            mark = " (0.5 added)" if f.corrected else ""
            paired = [fmt_factor(f.ratio) + mark, fmt_factor_interval(f.low, f.high), p]
        rows.append([r.name, protection_label(e["protection"]), fmt_rate(sdc.rate),
                     fmt_interval(sdc.low, sdc.high), fmt_count(e["detected"]),
                     fmt_count(e["corrected"]), *paired, fmt_overhead(e["flops"]),
                     fmt_overhead(e["latency"]), fmt_overhead(e["memory"]),
                     fmt_points(e["accuracy"])])
    notes = [("An SDC is a changed top-1 no protection flagged. Overheads against the "
             "unprotected model: FLOPs counted per image, memory as extra stored bits per "
             "parameter bit (ecc 8 and parity 1 per 64-bit word of the protected weights; "
             "without a recorded cost, per protected weight bit), accuracy the change in "
             "clean top-1 in percentage points; n/a: not recorded by the campaign.")]
    if paired_any:
        notes.insert(0, "SDC factor = SDC rate of the unprotected campaign on the very same "
                        "fault rows / that of the campaign; above 1 means the campaign has "
                        "fewer: the ratio of the two stratified rates (the SDC column), its "
                        "interval the log interval for paired proportions on Kish's effective "
                        "sample size, McNemar's exact p on the discordant rows; '0.5 added': a "
                        "side had less than one effective SDC (none, or a few in lightly "
                        "weighted strata), so 0.5 was added to each cell first.")
    if any(e["protection"] == TEXT_GUIDED for e in entries):
        notes.append(f"{TEXT_GUIDED}: the baseline's SDC rate / the text-guided model's, on "
                     "other faults, over the layers both models have (unpaired: Katz interval "
                     "and its p; its SDC column covers all of its own layers); its cost is the "
                     "accuracy difference and the FLOPs and parameters of the two models "
                     "(the cosine head against the linear one).")
    latency = _latency_note(entries)
    if latency:
        notes.append(latency)
    return TextTable("Protections", ["campaign", "protection", "SDC", f"SDC {c} CI", "detected",
                                     "corrected", "SDC factor", f"factor {c} CI",
                                     "McNemar p", "FLOPs", "latency", "memory", "accuracy"],
                     rows, notes, key_columns=2)


def summary_tables(results: Results, vs: Sequence[Results] = ()) -> list[TextTable]:
    """The models table, one per-layer table per model, and per partner its comparison and
    its improvement factor by definition."""
    everyone = [results, *vs]
    tables = [models_table(everyone), *(layer_table(r) for r in everyone)]
    protections = protection_table(results, vs)
    if protections is not None:
        tables.append(protections)
    for ref, other in comparison_pairs(results, vs):
        tables.append(comparison_table(ref, other))
        factors = factor_table(ref, other)
        if factors is not None:
            tables.append(factors)
    return tables


def comparison_pairs(results: Results, vs: Sequence[Results] = ()) -> list[tuple]:
    """(reference, other) for every campaign of `vs`: a protected campaign is compared with
    the unprotected campaign of the very same fault rows (its own model), every other one
    with `results`."""
    everyone = [results, *vs]
    bare = [r for r in everyone if r.plan.protect is None]
    pairs = []
    for other in vs:
        ref = results
        if other.plan.protect is not None:
            ref = next((b for b in bare if same_faults(b, other)), results)
        pairs.append((ref, other))
    return pairs


def protection_headline(entry: dict) -> str:
    """The verdict sentence of a protected campaign against its unprotected twin (an entry
    of `protections` with a paired factor)."""
    r, ref, f = entry["campaign"], entry["reference"], entry["factor"]
    sdc, base = entry["sdc"], ref.by_layer.overall.sdc
    c = f"{100 * r.by_layer.confidence:g}%"
    if f.low > 1:
        reading = f"{protection_label(entry['protection'])} cuts SDCs {fmt_factor(f.ratio)}"
    elif f.high < 1:
        reading = (f"{protection_label(entry['protection'])} leaves MORE SDCs (factor "
                   f"{fmt_factor(f.ratio)})")
    else:
        reading = f"{protection_label(entry['protection'])} makes no clear difference in SDCs"
    half = (" (0.5 added to each paired count: a side had less than one effective SDC)"
            if f.corrected else "")
    return (f"On the very same {fmt_count(r.n)} faults of {ref.name}, {reading}: paired factor "
            f"{fmt_factor(f.ratio)}{half}, {c} interval {fmt_factor_interval(f.low, f.high)}, "
            f"McNemar's exact p = {f.p_value:.3g}; SDC rate {fmt_rate(sdc.rate)} "
            f"{fmt_interval(sdc.low, sdc.high)} against {fmt_rate(base.rate)} "
            f"{fmt_interval(base.low, base.high)} unprotected; {fmt_count(entry['detected'])} "
            f"detected, {fmt_count(entry['corrected'])} corrected.")


def _paired_entries(results: Results, vs: Sequence[Results]) -> dict:
    """{id(campaign): its `protections` entry} of the protected campaigns paired with an
    unprotected twin on the same faults."""
    return {id(e["campaign"]): e for e in protections(results, vs) or ()
            if e["paired"] and e["factor"] is not None}


def _reading(ratio) -> str:
    """'fewer SDCs', 'MORE SDCs' or 'no clear difference' for a ratio reference / other."""
    if ratio.low > 1:
        return "fewer SDCs"
    if ratio.high < 1:
        return "MORE SDCs"
    return "no clear difference"


def brief_lines(results: Results, vs: Sequence[Results] = ()) -> list[str]:
    """One short line per comparison summary_lines makes (what a log shows; the sentences,
    tables and notes are the report's): the other side's SDC rate against its reference's
    and the factor with its interval, paired for a protection on the same faults."""
    entries = _paired_entries(results, vs)
    c = fmt_confidence(results.by_layer.confidence)
    lines = []
    for ref, other in comparison_pairs(results, vs):
        if id(other) in entries:
            e = entries[id(other)]
            f, sdc, base = e["factor"], e["sdc"], ref.by_layer.overall.sdc
            lines.append(
                f"{protection_label(e['protection'])} on {ref.name}: SDC {fmt_rate(sdc.rate)} "
                f"vs {fmt_rate(base.rate)} unprotected, paired factor {fmt_factor(f.ratio)} "
                f"{c} {fmt_factor_interval(f.low, f.high)}: {_reading(f)}")
            continue
        comp = comparison(ref, other)
        scopes = [(OVERALL, comp.overall.sdc, comp.overall_a, comp.overall_b)]
        last = comp.groups.get((LAST,))
        if last is not None and len(comp.groups) > 1:
            scopes.append((LAST, last.sdc, _matched_group(ref, LAST),
                           _matched_group(other, LAST)))
        for group, r, a, b in scopes:
            where = "last layer" if group == LAST else (
                "the last layer" if len(comp.groups) == 1 else f"{len(comp.groups)} layers")
            lines.append(
                f"{other.name} vs {ref.name}, {where}: SDC {fmt_rate(b.sdc.rate)} vs "
                f"{fmt_rate(a.sdc.rate)}, factor {fmt_factor(r.ratio)} {c} "
                f"{fmt_factor_interval(r.low, r.high)}: {_reading(r)}")
    return lines


def summary_lines(results: Results, vs: Sequence[Results] = ()) -> list[str]:
    """Plan line, notes and the verdict sentences, in the order summary_table prints them."""
    for other in vs:
        check_same_plan(results, other)
    lines = [plan_line(results)]
    for r in (results, *vs):
        lines += [f"note ({r.name}): {note}" for note in r.notes]
    entries = _paired_entries(results, vs)
    for ref, other in comparison_pairs(results, vs):
        if id(other) in entries:
            lines.append(protection_headline(entries[id(other)]))
        else:
            lines += headline(ref, other)
    return lines


def design_lines(results: Results, vs: Sequence[Results] = ()) -> list[str]:
    """What each campaign's design gave: the precision an adaptive one reached, and the
    share of injections decided without a forward pass."""
    lines = []
    for r in (results, *vs):
        reached = precision_line(r)
        lines += [] if reached is None else [f"{r.name} {reached}"]
        lines.append(f"{r.name}: {decided_line(r)}")
    return lines


def summary_table(results: Results, vs: Sequence[Results] = ()) -> str:
    """What `flipsafe summary DIR [--vs DIR2 ...]` prints: plan, tables and verdicts as text."""
    lines = summary_lines(results, vs)
    blocks = [lines[0], "\n".join(design_lines(results, vs)),
              *(t.render_text() for t in summary_tables(results, vs)), *lines[1:]]
    return "\n\n".join(blocks) + "\n"


def _number(x):
    """A JSON-safe number: NaN and infinities become None (null)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _rate_json(r) -> dict:
    return {"k": int(r.k), "n": int(r.n), "rate": _number(r.rate), "low": _number(r.low),
            "high": _number(r.high), "method": r.method}


def _ratio_json(r: RateRatio | None, reading: str | None = None,
                p_holm: float | None = None) -> dict | None:
    if r is None:
        return None
    out = {"ratio": _number(r.ratio), "low": _number(r.low), "high": _number(r.high),
           "p_value": _number(r.p_value), "corrected": bool(r.corrected)}
    if p_holm is not None:
        out["p_holm"] = _number(p_holm)
    if reading is not None:
        out["reading"] = reading
    return out


def _group_json(g: GroupSummary) -> dict:
    return {"n": int(g.n), "sdc": _rate_json(g.sdc), "due": _rate_json(g.due),
            "delta_loss": {"mean_finite": _number(g.delta_loss.mean),
                           "low": _number(g.delta_loss.low), "high": _number(g.delta_loss.high),
                           "non_finite": int(g.delta_loss.excluded),
                           "quantiles": {f"{q:g}": _number(v)
                                         for q, v in g.delta_loss_quantiles.items()}}}


def _model_json(r: Results) -> dict:
    by_field = r.by_field.groups
    return {
        "name": r.name, "dir": str(r.dir),
        "arch": r.arch,
        "head": r.head, "accuracy": _number(r.accuracy), "classifier_layer": r.classifier_layer,
        "rows": int(r.n), "planned_rows": int(r.planned_rows), "complete": bool(r.complete),
        "decided_without_running": _count(r, "decided"),
        "overall": _group_json(r.by_layer.overall),
        "layers": [{"layer": key[0], **_group_json(g)} for key, g in r.by_layer.groups.items()],
        "strata": [
            {"layer": s.layer, "field": s.field, "fault_space": int(s.size),
             "planned": int(s.n), "elements": s.elements, "width": s.width,
             **({"n": 0} if (s.layer, s.field) not in by_field else
                _group_json(by_field[(s.layer, s.field)]))}
            for s in (r.strata or [])],
        "notes": list(r.notes),
    }


def _factors_json(scope: str, ft: FactorTable, reference: Results, other: Results) -> dict:
    names = {"a": reference.name, "b": other.name}
    return {
        "layers": scope, "confidence": ft.confidence, "resamples": ft.resamples,
        "seed": ft.seed,
        "definitions": [{"definition": f.key, "label": f.label, "reference": _number(f.a),
                         "other": _number(f.b), "n_reference": int(f.n_a),
                         "n_other": int(f.n_b), "ratio": _number(f.ratio),
                         "low": _number(f.low), "high": _number(f.high), "method": f.method,
                         "position": f.position} for f in ft.factors],
        "outliers": [{"removed_from": names[o.side], "removed": _number(o.removed),
                      "ratio_before": _number(o.before), "ratio_after": _number(o.ratio),
                      "drives": bool(o.drives)} for o in ft.outliers],
        "reading": factor_reading(ft, reference.name, other.name),
    }


def _comparison_json(reference: Results, other: Results) -> dict:
    comp = comparison(reference, other)
    verdicts = layer_verdicts(reference, other, comp)
    overall = verdict(reference.name, other.name, OVERALL, comp.overall.sdc)
    return {
        "reference": reference.name, "other": other.name,
        "factor": f"rate of {reference.name} / rate of {other.name}; above 1: {other.name} "
                  "has fewer",
        "layers": [{"layer": key[0], "n_reference": int(g.n_a), "n_other": int(g.n_b),
                    "sdc": _ratio_json(g.sdc, verdicts[key].reading, verdicts[key].p_adjusted),
                    "due": _ratio_json(g.due)}
                   for key, g in comp.groups.items()],
        "overall": {"reference": _group_json(comp.overall_a), "other": _group_json(comp.overall_b),
                    "sdc": _ratio_json(comp.overall.sdc, overall.reading),
                    "due": _ratio_json(comp.overall.due)},
        "factors": [_factors_json(scope, ft, reference, other)
                    for scope, ft in factor_tables(reference, other, comp)],
        "only_reference": [reference.real_name(k[0]) for k in comp.only_a],
        "only_other": [other.real_name(k[0]) for k in comp.only_b],
        "verdicts": headline(reference, other),
    }


def summary_json(results: Results, vs: Sequence[Results] = ()) -> dict:
    """What `flipsafe summary --json` prints: the same figures as the text, as one object.

    Rates carry k, n, rate, interval and method ("wilson" per layer and stratum,
    "stratified" for whole-model rates); comparisons carry ratio, interval, p-value and, per
    layer, the Holm-adjusted p-value and reading. Undefined numbers are null.
    """
    lines = summary_lines(results, vs)
    return {
        "confidence": results.by_layer.confidence,
        "plan": results.plan.to_dict(),
        "plan_line": lines[0],
        "overall_method": interval_method(results),
        "interval_method": interval_method(results),
        **({"precision": precision(results)} if results.plan.adaptive else {}),
        "models": [_model_json(r) for r in (results, *vs)],
        "comparisons": [_comparison_json(ref, other)
                        for ref, other in comparison_pairs(results, vs)],
        **_protections_json(results, vs),
    }


def _protections_json(results: Results, vs: Sequence[Results]) -> dict:
    entries = protections(results, vs)
    if entries is None:
        return {}
    return {"protections": [
        {"name": e["campaign"].name, "protection": e["protection"], "sdc": _rate_json(e["sdc"]),
         "detected": e["detected"], "corrected": e["corrected"],
         "reference": None if e["reference"] is None else e["reference"].name,
         "paired_factor": (None if e["factor"] is None or not e["paired"]
                           else _ratio_json(e["factor"])),
         "unpaired_factor": (None if e["factor"] is None or e["paired"]
                             else _ratio_json(e["factor"])),
         "flops_overhead": _number(e["flops"]), "latency_overhead": _number(e["latency"]),
         "memory_overhead": _number(e["memory"]), "accuracy_change": _number(e["accuracy"]),
         "cost": e["campaign"].cost if e["protection"] != TEXT_GUIDED else None}
        for e in entries]}
