"""One model under several fault models: element faults against PE faults, say.

`flipsafe summary A --faults B` and `flipsafe report A --faults B` set campaigns of the same
model side by side when their plans differ only in what the faults are (site, fault
model, array, layers, clamp): per matched layer, each campaign's SDC rate with its
interval, and the ratio of A's rate to B's with its interval (the comparisons' estimator:
stratified rates, Katz or delta-method intervals on the strata both sides have).
"""

from __future__ import annotations

from collections.abc import Sequence

from flipsafe.errors import ConfigError
from flipsafe.metrics.stats import OVERALL, compare
from flipsafe.report.results import MAY_DIFFER, Results
from flipsafe.report.tables import (
    TextTable,
    fmt_confidence,
    fmt_factor,
    fmt_factor_interval,
    fmt_interval,
    fmt_rate,
)

# The plan fields that say what a fault is; campaigns of one model may differ in these.
FAULT_MODEL_FIELDS = ("site", "fault", "accelerator", "layers", "clamp", "protocol")


def fault_model(r: Results) -> str:
    """What a campaign's faults are, in a few words: 'pe stuck1 ws:16x16:product'."""
    p = r.plan
    return " ".join(w for w in (p.site, p.fault, p.accelerator) if w)


def check_same_model(reference: Results, other: Results) -> None:
    """Refuse to set side by side campaigns of different models, or ones that differ in
    more than what their faults are."""
    if reference.plan.model_sha != other.plan.model_sha:
        raise ConfigError(f"--faults sets fault models of one model side by side; {other.dir} "
                          f"ran on another model than {reference.dir} (use --vs for that)")
    mine, theirs = reference.plan.to_dict(), other.plan.to_dict()
    free = set(MAY_DIFFER) | set(FAULT_MODEL_FIELDS) | {"n", "margin", "sampling", "budget",
                                                        "seed", "allocation"}
    differing = [k for k in mine if k not in free and mine[k] != theirs.get(k)]
    if differing:
        raise ConfigError(f"{other.dir} differs from {reference.dir} in more than its faults "
                          f"({', '.join(differing)}); run both with the same format, images "
                          f"and dataset")


def fault_models_table(reference: Results, other: Results) -> TextTable:
    """Per matched layer and overall: both SDC rates with intervals, and their ratio."""
    check_same_model(reference, other)
    a, b = reference.matched, other.matched
    comp = compare(a, b)
    conf = fmt_confidence(comp.confidence)
    rows = []
    for key, g in [*comp.groups.items(), ((OVERALL,), comp.overall)]:
        ga = a.overall if key == (OVERALL,) else a.groups[key]
        gb = b.overall if key == (OVERALL,) else b.groups[key]
        ra = comp.overall_a if key == (OVERALL,) else ga
        rb = comp.overall_b if key == (OVERALL,) else gb
        rows.append([key[0], f"{fmt_rate(ra.sdc.rate)} {fmt_interval(ra.sdc.low, ra.sdc.high)}",
                     f"{fmt_rate(rb.sdc.rate)} {fmt_interval(rb.sdc.low, rb.sdc.high)}",
                     fmt_factor(g.sdc.ratio), fmt_factor_interval(g.sdc.low, g.sdc.high)])
    na, nb = fault_model(reference), fault_model(other)
    notes = [f"{reference.name}: {na}; {other.name}: {nb} (the same model).",
             (f"ratio = SDC rate under {reference.name}'s faults / under {other.name}'s; "
              f"intervals {conf}, per layer unadjusted; (all) compares the stratified rates "
              f"over the layers both have.")]
    return TextTable(f"Fault models: {reference.name} / {other.name}",
                     ["layer", f"{reference.name} SDC", f"{other.name} SDC", "ratio",
                      f"ratio {conf} CI"], rows, notes)


def fault_models_tables(reference: Results, others: Sequence[Results]) -> list[TextTable]:
    return [fault_models_table(reference, o) for o in others]
