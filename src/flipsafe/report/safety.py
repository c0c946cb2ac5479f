"""The "Safety estimate" in words and tables: assumptions first, then FIT, SPFM and verdicts."""

from __future__ import annotations

import json
from collections.abc import Sequence

from flipsafe.report.tables import TextTable, fmt_confidence, fmt_count, fmt_rate, fmt_value
from flipsafe.safety.fit import (
    INTERVAL_METHOD,
    NOT_MODELLED,
    NOT_SHOWN,
    SITE_RATE,
    SPFM_DEFINITION,
    TRANSIENT_SITES,
    AsilVerdict,
    FitEstimate,
    Interval,
)

SOURCES = ("reference values, examples only: 20.49 FIT/Mbit for SRAM at 16 nm (Li et al., "
           "SC'17); 600 FIT/MB for flip-flops (FIdelity, MICRO'20, its script's default)")


def fmt_fit(x: float) -> str:
    return "0" if x == 0 else fmt_value(x)


def fmt_fit_interval(i: Interval) -> str:
    return f"[{fmt_fit(i.low)}, {fmt_fit(i.high)}]"


def _sites_with(kind: str) -> str:
    return ", ".join(s for s, k in SITE_RATE.items() if k == kind)


def assumption_lines(e: FitEstimate) -> list[str]:
    """What the figures rest on, in the order a reviewer checks it."""
    a = e.assumptions
    datapath = ("same as memory" if a.raw_fit_per_mbit_datapath is None
                else f"{fmt_value(a.raw_fit_per_mbit_datapath)} FIT/Mbit")
    n_sampled = sum(not s.exhaustive for s in e.strata)
    due = ("." if a.due_detected else
           "; here DUE is NOT counted as detected: it adds to the residual.")
    lines = [
        (f"Raw fault rate of memory bits ({_sites_with('memory')}): "
         f"{fmt_value(a.raw_fit_per_mbit)} FIT/Mbit; of datapath bits "
         f"({_sites_with('datapath')}): {datapath}. 1 Mbit = 10^6 bits. These rates are the "
         f"user's ({SOURCES})."),
        (f"Residency of {' and '.join(TRANSIENT_SITES)}: {a.residency:g} (fraction of the "
         "time their bits are live); weights are resident all the time."),
        ("Bits at risk per stratum = codes x bits of the field x residency; FIT = bits at "
         "risk x raw rate per bit x P(outcome | a fault there), summed per layer, site and "
         "in total."),
        (f"Campaigns: {', '.join(e.folders)}; format {e.format}; fault model {e.fault}; "
         f"images {e.images}; protection: none (corrected FIT is 0)."),
        (f"Intervals: {fmt_confidence(e.confidence)} for every figure at once. Each "
         f"stratum's probability has a Wilson interval at {100 * e.stratum_confidence:.4g}% "
         f"(Bonferroni over the {n_sampled} strata with sampling error), so all hold "
         "together; a FIT summed over strata takes the sums of their bounds. This is "
         "conservative: the intervals are wider than they need to be."),
        SPFM_DEFINITION[0].upper() + SPFM_DEFINITION[1:] + due,
        ("Verdicts are judged on the interval ends, never on the point estimate: meets "
         "when the upper FIT and lower SPFM ends satisfy the target, does not meet when "
         "even the lower FIT or upper SPFM end fails it. ASIL targets are ISO 26262-5's "
         "for a whole item; this estimate covers only the injected sites."),
        "Not modelled: " + NOT_MODELLED + ".",
    ]
    return lines + list(e.notes)


def fit_table(e: FitEstimate) -> TextTable:
    conf = fmt_confidence(e.confidence)
    rows = []

    def row(site, layer, g):
        rows.append([site, layer, fmt_count(round(g.bits)) if g.bits == round(g.bits)
                     else f"{g.bits:,.1f}", fmt_fit(g.raw_fit), fmt_count(g.n),
                     fmt_fit(g.sdc.value), fmt_fit_interval(g.sdc), fmt_fit(g.due.value),
                     fmt_fit_interval(g.due)])

    for site in e.by_site:
        for g in e.by_layer:
            if g.site == site.site:
                row(g.site, g.layer, g)
        if sum(g.site == site.site for g in e.by_layer) > 1:
            row(site.site, "(all)", site)
    row("total", "", e.total)
    return TextTable(f"FIT of {e.model} (failures per 10^9 h)", [
        "site", "layer", "bits at risk", "raw FIT", "injections", "SDC FIT", f"SDC {conf} CI",
        "DUE FIT", f"DUE {conf} CI"], rows, key_columns=2)


def _needed_words(e: FitEstimate, v: AsilVerdict) -> str:
    if v.verdict != NOT_SHOWN or v.needed is None:
        return ""
    if v.needed.total is None:
        what = "residual FIT" if e.residual.value >= v.fit_target else "SPFM"
        return f"none: today's {what} estimate itself misses the target"
    return (f"{fmt_count(v.needed.total)} injections ({fmt_count(v.needed.more)} more, "
            "today's split scaled up)")


def verdict_table(e: FitEstimate) -> TextTable:
    r, s = e.residual, e.spfm
    rows = [[v.asil, f"< {v.fit_target:g}", f">= {fmt_rate(v.spfm_target)}", v.verdict,
             _needed_words(e, v)] for v in e.verdicts]
    notes = [
        (f"residual FIT {fmt_fit(r.value)} {fmt_fit_interval(r)}; detected FIT "
         f"{fmt_fit(e.detected.value)} {fmt_fit_interval(e.detected)}; corrected FIT 0; "
         f"raw FIT {fmt_fit(e.total.raw_fit)}; SPFM {fmt_rate(s.value)} "
         f"[{fmt_rate(s.low)}, {fmt_rate(s.high)}]"),
        ("injections to show it: if the true rates equal today's, the campaign size (every "
         "stratum scaled by one factor) whose intervals would meet the target."),
    ]
    return TextTable(f"ISO 26262-5 verdict for {e.model} (simplified model)", [
        "target", "residual FIT", "SPFM", "verdict", "injections to show it"], rows, notes)


def fit_text(estimates: Sequence[FitEstimate]) -> str:
    """What `flipsafe fit` prints: per model, the assumptions, the FIT table and verdicts."""
    parts = []
    for e in estimates:
        parts.append(f"Safety estimate: {e.model} (weights {e.model_sha[:12]})")
        parts.append("Assumptions:\n" + "\n".join(f"- {line}" for line in assumption_lines(e)))
        parts.append(fit_table(e).render_text())
        parts.append(verdict_table(e).render_text())
    return "\n\n".join(parts)


def fit_json(estimates: Sequence[FitEstimate]) -> str:
    """The same figures as one JSON object."""
    return json.dumps({
        "unit": "FIT (failures per 10^9 device-hours)",
        "interval_method": INTERVAL_METHOD,
        "spfm_definition": SPFM_DEFINITION,
        "not_modelled": NOT_MODELLED,
        "models": [e.to_dict() for e in estimates],
    }, indent=2)
