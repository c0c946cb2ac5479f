"""Failure rates in FIT and ISO 26262-5 metrics from stored campaign results."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flipsafe import accel
from flipsafe.errors import CampaignError, ConfigError
from flipsafe.faults import SITE_SPECS
from flipsafe.metrics.stats import wilson_interval

# FIT: failures per 10^9 device-hours. A raw rate in FIT/Mbit is per 10^6 bits.
BITS_PER_MBIT = 1e6
# Units a raw rate may carry after a "/": bits per unit (bytes are decimal: 1 MB = 8e6 bits).
RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "Mbit": 1e6, "Gbit": 1e9,
              "B": 8.0, "kB": 8e3, "MB": 8e6, "GB": 8e9}
# Which raw rate and whether residency applies, per campaign site. Activations live in
# datapath registers / buffers; metadata is the activation blocks' shared scale, stored
# with them; weights stay in memory for the whole mission.
# (faults.SITE_SPECS owns both.)
MEMORY, DATAPATH = "memory", "datapath"
SITE_RATE = {s.name: s.raw_rate for s in SITE_SPECS.values() if s.campaign}
TRANSIENT_SITES = tuple(s.name for s in SITE_SPECS.values() if s.campaign and s.transient)
# sites whose bits are not memory or datapath elements of their own: a PE's registers,
# shared by every layer in time (_exposure)
NO_FIT_SITES = tuple(s.name for s in SITE_SPECS.values() if s.campaign and not s.fit)
# ISO 26262-5 targets: (name, PMHF target in FIT, single-point fault metric target).
ASIL_TARGETS = (("ASIL-D", 10.0, 0.99), ("ASIL-C", 100.0, 0.97), ("ASIL-B", 100.0, 0.90))
MEETS, FAILS, NOT_SHOWN = "meets", "does not meet", "not shown at this sample size"
# The largest sample the "how many more injections" search considers, per stratum.
MAX_INJECTIONS = 10**12

INTERVAL_METHOD = (
    "Bonferroni-combined Wilson: each stratum's probability has a Wilson interval at "
    "confidence 1 - (1 - c) / H, H the strata with sampling error, so all hold at once with "
    "probability >= c; a sum of FIT over strata takes the sums of their bounds "
    "(conservative: wider than an exact c interval)"
)
SPFM_DEFINITION = (
    "SPFM = 1 - (residual FIT / raw FIT of the modelled bits) (ISO 26262-5 single-point fault "
    "metric with no latent faults modelled): residual = SDC (faults that change the top-1 "
    "class with no safety mechanism), detected = DUE (NaN/Inf outputs, when the system checks "
    "for them), corrected = 0 (no protection is modelled)"
)
NOT_MODELLED = (
    "control logic, sequencers, interconnect, clocks and I/O (only the stored bits of the "
    "injected sites count); sites and layers that were not injected; multi-bit upsets and "
    "faults lasting longer than one inference, unless the campaign injected them; derating "
    "beyond the residency fraction (timing and logical masking in the hardware itself); "
    "latent multiple-point faults, so the PMHF is taken to be the residual FIT and the "
    "latent-fault metric (LFM) is not computed"
)


def parse_raw_rate(value, option: str = "--raw-fit-per-mbit") -> float:
    """A raw fault rate in FIT per Mbit from a number or text such as "20.49", "20.49/Mbit"
    or "600 FIT/MB" (units: bit, kbit, Mbit, Gbit, B, kB, MB, GB; bytes are 8 bits, decimal
    prefixes); ConfigError for anything else or a rate that is not positive."""
    if isinstance(value, bool):
        raise ConfigError(f"{option} must be a positive number of FIT per Mbit, got {value!r}")
    if isinstance(value, (int, float)):
        number, per_bits = float(value), BITS_PER_MBIT
    else:
        m = re.fullmatch(r"\s*([^\s/]+?)\s*(?:(?:FIT)?\s*/\s*(\S+))?\s*", str(value))
        if m is None:
            raise ConfigError(f"{option} {value!r} is not a rate; give FIT per Mbit such as "
                              "20.49, or with a unit such as 20.49/Mbit or 600/MB")
        try:
            number = float(m.group(1))
        except ValueError:
            raise ConfigError(f"{option} {value!r} is not a rate; give FIT per Mbit such as "
                              "20.49, or with a unit such as 20.49/Mbit or 600/MB") from None
        unit = m.group(2) or "Mbit"
        if unit not in RATE_UNITS:
            raise ConfigError(f"{option} {value!r} has unknown unit {unit!r}; use one of "
                              f"{', '.join(RATE_UNITS)} (bytes are 8 bits, 1 MB = 8e6 bits)")
        per_bits = RATE_UNITS[unit]
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{option} must be a positive, finite raw fault rate, got {value!r}")
    return number * BITS_PER_MBIT / per_bits


@dataclass(frozen=True)
class FitAssumptions:
    """What the user states about the hardware; checked on construction.

    raw_fit_per_mbit: raw fault rate of memory bits (weights, metadata) in FIT per 10^6 bits;
    raw_fit_per_mbit_datapath: the same for activations (datapath flip-flops and buffers),
    None to use the memory rate; residency: fraction of the time an activation (and its
    metadata) is live in the hardware, in (0, 1]; confidence: of every interval, None for
    the campaign plan's; due_detected: count DUE (NaN/Inf outputs) as detected, i.e. the
    system checks its outputs, else DUE adds to the residual; allow_mixed_formats: sum
    campaigns run in different number formats into one estimate.
    """

    raw_fit_per_mbit: float
    raw_fit_per_mbit_datapath: float | None = None
    residency: float = 1.0
    confidence: float | None = None
    due_detected: bool = True
    allow_mixed_formats: bool = False

    def __post_init__(self):
        if self.raw_fit_per_mbit is None:
            raise ConfigError("give the raw fault rate of memory bits with --raw-fit-per-mbit "
                              "(e.g. 20.49 for 16 nm SRAM, Li et al. SC'17); there is no default")
        object.__setattr__(self, "raw_fit_per_mbit", parse_raw_rate(self.raw_fit_per_mbit))
        if self.raw_fit_per_mbit_datapath is not None:
            object.__setattr__(self, "raw_fit_per_mbit_datapath", parse_raw_rate(
                self.raw_fit_per_mbit_datapath, "--raw-fit-per-mbit-datapath"))
        r = self.residency
        if isinstance(r, str):
            try:
                r = float(r)
            except ValueError:
                pass
            object.__setattr__(self, "residency", r)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
            raise ConfigError(f"--residency must be a fraction in (0, 1] (1: an activation "
                              f"occupies its buffer all the time), got {r!r}")
        c = self.confidence
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float))
                              or not 0.0 < c < 1.0):
            raise ConfigError(f"confidence must be strictly between 0 and 1, got {c!r}")

    def fit_per_mbit(self, site: str) -> float:
        if SITE_RATE[site] == DATAPATH and self.raw_fit_per_mbit_datapath is not None:
            return self.raw_fit_per_mbit_datapath
        return self.raw_fit_per_mbit

    def fit_per_bit(self, site: str) -> float:
        """lambda: raw FIT of one bit at this site."""
        return self.fit_per_mbit(site) / BITS_PER_MBIT

    def residency_of(self, site: str) -> float:
        return self.residency if site in TRANSIENT_SITES else 1.0


@dataclass(frozen=True)
class Interval:
    """A figure with the lower and upper ends of its interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class StratumFit:
    """One (site, layer, field) stratum: bits at risk, counts, probabilities and FIT.

    bits = elements x width x residency; raw_fit = bits x fit_per_bit; the probabilities
    are k/n with Wilson intervals at the Bonferroni-adjusted confidence (exact when the
    stratum was injected exhaustively).
    """

    site: str
    layer: str
    field: str
    elements: int
    width: int
    residency: float
    fit_per_bit: float
    n: int
    sdc: int
    due: int
    residual: int
    exhaustive: bool
    p_sdc: Interval
    p_due: Interval
    p_residual: Interval

    @property
    def bits(self) -> float:
        return self.elements * self.width * self.residency

    @property
    def raw_fit(self) -> float:
        return self.bits * self.fit_per_bit

    def fit(self, outcome: str) -> Interval:
        p = getattr(self, f"p_{outcome}")
        return Interval(self.raw_fit * p.value, self.raw_fit * p.low, self.raw_fit * p.high)


@dataclass(frozen=True)
class GroupFit:
    """FIT summed over a group of strata (a layer, a site, or all)."""

    site: str  # "all" for the total
    layer: str  # "all" for a site's or the total
    bits: float
    raw_fit: float
    n: int
    sdc: Interval
    due: Interval


@dataclass(frozen=True)
class Needed:
    """Injections to show a target if the true rates equal today's estimates.

    per_stratum[i] is the new total for strata[i] (today's allocation scaled up); total
    their sum; None values mean no sample size can show it (today's estimate misses it).
    """

    per_stratum: list[int] | None
    total: int | None
    more: int | None


@dataclass(frozen=True)
class AsilVerdict:
    asil: str
    fit_target: float
    spfm_target: float
    verdict: str
    needed: Needed | None = None


@dataclass(frozen=True)
class FitEstimate:
    """The safety estimate of one model: per stratum, layer and site, total, SPFM, verdicts."""

    model: str
    model_sha: str
    folders: list[str]
    format: str
    fault: str
    images: str
    assumptions: FitAssumptions
    confidence: float
    stratum_confidence: float
    strata: list[StratumFit]
    by_layer: list[GroupFit]
    by_site: list[GroupFit]
    total: GroupFit
    residual: Interval
    detected: Interval
    corrected: Interval
    spfm: Interval
    verdicts: list[AsilVerdict]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Every figure as plain JSON-ready values (NaN as None)."""
        out = asdict(self)
        out["strata"] = [dict(asdict(s), bits=s.bits, raw_fit=s.raw_fit, fit_sdc=asdict(s.fit("sdc")),
                              fit_due=asdict(s.fit("due")), fit_residual=asdict(s.fit("residual")))
                         for s in self.strata]
        return _json_clean(out)


def _json_clean(x):
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -- reading campaigns -------------------------------------------------------------------


@dataclass(frozen=True)
class _Campaign:
    folder: Path
    plan: object
    strata: list
    counts: dict  # (layer, field) -> (n, sdc, due)
    incomplete: bool


def _read_campaign(folder) -> _Campaign:
    from flipsafe.campaign.store import PLAN_FILE, ResultsStore, stratum_counts

    folder = Path(folder)
    if not (folder / PLAN_FILE).is_file():
        raise CampaignError(f"{folder} is not a campaign results folder (no {PLAN_FILE}); give "
                            "the --out folder of `flipsafe campaign`")
    store = ResultsStore(folder)
    plan = store.open()
    if store.strata is None or any(s.elements is None or s.width is None for s in store.strata):
        raise CampaignError(f"{folder} was written before flipsafe recorded the bits at risk of "
                            "each stratum; rerun the same `flipsafe campaign` command on it "
                            "(finished parts are kept) to record them, then retry")
    from flipsafe.campaign.adaptive import estimation_rows

    spent = store.read()
    table = estimation_rows(store, spent)  # an adaptive pilot only allocated
    counts = stratum_counts(table)
    known = {(s.layer, s.field) for s in store.strata}
    stray = [key for key in counts if key not in known]
    if stray:
        raise CampaignError(f"{folder} has rows for stratum {stray[0]} that its manifest does "
                            "not list; the folder was altered, rerun the campaign elsewhere")
    return _Campaign(folder, plan, list(store.strata), counts,
                     spent.num_rows < store.total_rows)


def _interval(k, n, confidence, exhaustive) -> Interval:
    p = k / n
    if exhaustive:
        return Interval(p, p, p)
    low, high = wilson_interval(k, n, confidence)
    return Interval(p, float(low), float(high))


def _sum(strata: Sequence[StratumFit], outcome: str) -> Interval:
    parts = [s.fit(outcome) for s in strata]
    return Interval(math.fsum(p.value for p in parts), math.fsum(p.low for p in parts),
                    math.fsum(p.high for p in parts))


def _group(strata: Sequence[StratumFit], site: str, layer: str) -> GroupFit:
    return GroupFit(site, layer, math.fsum(s.bits for s in strata),
                    math.fsum(s.raw_fit for s in strata), sum(s.n for s in strata),
                    _sum(strata, "sdc"), _sum(strata, "due"))


def spfm_of(residual: Interval, raw_fit: float) -> Interval:
    """SPFM = 1 - residual / raw FIT; its low end comes from the residual's high end."""
    return Interval(1.0 - residual.value / raw_fit, 1.0 - residual.high / raw_fit,
                    1.0 - residual.low / raw_fit)


def judge(residual: Interval, spfm: Interval, fit_target: float, spfm_target: float) -> str:
    """MEETS when the unfavourable ends (upper FIT, lower SPFM) satisfy both targets, FAILS
    when even a favourable end (lower FIT, upper SPFM) misses one, else NOT_SHOWN."""
    if residual.high < fit_target and spfm.low >= spfm_target:
        return MEETS
    if residual.low >= fit_target or spfm.high < spfm_target:
        return FAILS
    return NOT_SHOWN


def residual_upper(strata: Sequence[StratumFit], n: Sequence[int], confidence: float) -> float:
    """Residual FIT's upper end if stratum i had n[i] injections and today's rate k_i / n_i."""
    total = []
    for s, m in zip(strata, n):
        p = s.residual / s.n
        high = p if s.exhaustive else float(wilson_interval(p * m, m, confidence)[1])
        total.append(s.raw_fit * high)
    return math.fsum(total)


def injections_needed(strata: Sequence[StratumFit], confidence: float, fit_target: float,
                      spfm_target: float) -> Needed:
    """The smallest scale-up of today's allocation that shows the target (see Needed).

    Strata keep their shares: with r the new count of the stratum that has most
    injections today (n_max), stratum i gets ceil(r * n_i / n_max); r is the smallest
    integer whose residual upper bound (Wilson at `confidence`, k = today's rate x n)
    meets both the FIT and the SPFM target. Exhaustive strata keep their counts.
    """
    raw = math.fsum(s.raw_fit for s in strata)
    limit = min(fit_target, (1.0 - spfm_target) * raw)
    n_max = max(s.n for s in strata)

    def counts(r: int) -> list[int]:
        return [s.n if s.exhaustive else max(s.n, math.ceil(r * s.n / n_max)) for s in strata]

    def shown(r: int) -> bool:
        high = residual_upper(strata, counts(r), confidence)
        return high < fit_target and 1.0 - high / raw >= spfm_target

    point = math.fsum(s.raw_fit * s.residual / s.n for s in strata)
    if not (point < limit) or not shown(MAX_INJECTIONS):
        return Needed(None, None, None)
    lo, hi = n_max, n_max  # shown(hi) is searched for, lo stays not shown
    while not shown(hi):
        lo, hi = hi, min(hi * 2, MAX_INJECTIONS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if shown(mid) else (mid, hi)
    new = counts(hi)
    total = sum(new)
    return Needed(new, total, total - sum(s.n for s in strata))


# -- the estimate ------------------------------------------------------------------------


def _check_group(campaigns: list[_Campaign], assumptions: FitAssumptions) -> None:
    formats = sorted({c.plan.format for c in campaigns})
    if len(formats) > 1 and not assumptions.allow_mixed_formats:
        listed = ", ".join(f"{c.folder} ({c.plan.format})" for c in campaigns)
        raise ConfigError(f"these campaigns of one model ran in different number formats "
                          f"({listed}); their FIT would be summed as one chip, so say so with "
                          "--allow-mixed-formats, or give campaigns of one format")
    for c in campaigns:
        if c.plan.site in NO_FIT_SITES and not accel.parse(c.plan.accelerator).transient:
            raise ConfigError(f"{c.folder} holds permanent PE faults (stuck while one layer "
                              f"runs); a hard fault's rate is another metric than an upset's "
                              f"FIT, which flipsafe does not model: estimate FIT from a "
                              f"transient campaign (--fault bitflip) or from element faults")
    seen: dict[tuple, Path] = {}
    for c in campaigns:
        bits = SITE_SPECS[c.plan.site].bits_of or c.plan.site  # weight words: the weights
        for s in c.strata:
            key = (bits, s.layer, s.field)
            if key in seen:
                raise ConfigError(f"{seen[key]} and {c.folder} both cover the {c.plan.site} of "
                                  f"layer {s.layer!r}; its bits would be counted twice, so give "
                                  "each site and layer of a model once")
            seen[key] = c.folder


def _exposure(c: _Campaign, s, a: FitAssumptions) -> tuple[int, float]:
    """(elements, residency) of a stratum's bits. Transient PE faults (site pe): the
    array's PEs, each unit's bits, for the layer's share of the array's time - its share
    of the PE's events (products), since a fault's time step is uniform over them."""
    if c.plan.site not in NO_FIT_SITES:
        return s.elements, a.residency_of(c.plan.site)
    steps = {t.layer: t.elements for t in c.strata}
    return accel.parse(c.plan.accelerator).pes, s.elements / sum(steps.values())


def _estimate(campaigns: list[_Campaign], a: FitAssumptions) -> FitEstimate:
    _check_group(campaigns, a)
    first = campaigns[0].plan
    confidence = a.confidence if a.confidence is not None else first.confidence
    notes: list[str] = []
    rows = []
    for c in campaigns:
        site = c.plan.site
        for s in c.strata:
            if s.elements * s.width == 0:
                continue
            n, sdc, due = c.counts.get((s.layer, s.field), (0, 0, 0))
            if n == 0:
                raise CampaignError(
                    f"{c.folder}: stratum ({s.layer}, {s.field}) has no results, so nothing is "
                    "known about its bits; resume the campaign, or rerun with a larger --n so "
                    "every bit field gets injections")
            # `--n all` lists every (element, bit) once but each on one random image, so
            # even then the rates are estimates with sampling error: no stratum is exact.
            exhaustive = False
            rows.append((c, site, s, n, sdc, due, exhaustive))
        if c.incomplete:
            notes.append(f"{c.folder} is incomplete; the estimate uses the rows written so far.")
    if not rows:
        raise CampaignError(f"{', '.join(str(c.folder) for c in campaigns)} record no bits at "
                            "risk; run a campaign on layers that have some")
    h = sum(1 for r in rows if not r[-1])
    stratum_confidence = 1.0 - (1.0 - confidence) / h if h else confidence
    strata = []
    for c, site, s, n, sdc, due, exhaustive in rows:
        residual = sdc + (0 if a.due_detected else due)
        elements, residency = _exposure(c, s, a)
        strata.append(StratumFit(
            site, s.layer, s.field, elements, s.width, residency,
            a.fit_per_bit(site), n, sdc, due, residual, exhaustive,
            _interval(sdc, n, stratum_confidence, exhaustive),
            _interval(due, n, stratum_confidence, exhaustive),
            _interval(residual, n, stratum_confidence, exhaustive)))
    by_layer = []
    for key in dict.fromkeys((s.site, s.layer) for s in strata):
        by_layer.append(_group([s for s in strata if (s.site, s.layer) == key], *key))
    by_site = [_group([s for s in strata if s.site == site], site, "all")
               for site in dict.fromkeys(s.site for s in strata)]
    total = _group(strata, "all", "all")
    residual = _sum(strata, "residual")
    detected = _sum(strata, "due") if a.due_detected else Interval(0.0, 0.0, 0.0)
    spfm = spfm_of(residual, total.raw_fit)
    verdicts = []
    for name, fit_target, spfm_target in ASIL_TARGETS:
        v = judge(residual, spfm, fit_target, spfm_target)
        needed = (injections_needed(strata, stratum_confidence, fit_target, spfm_target)
                  if v == NOT_SHOWN else None)
        verdicts.append(AsilVerdict(name, fit_target, spfm_target, v, needed))
    faults = sorted({c.plan.fault for c in campaigns})
    if faults != ["bitflip"]:
        notes.append(f"The raw rate counts single-bit upsets, but these campaigns injected "
                     f"{', '.join(faults)}; the probabilities are for that fault model.")
    if first.images == "correct":
        notes.append("Only correctly classified images were injected: P(SDC) is per fault "
                     "during an inference the model gets right.")
    return FitEstimate(
        model=" + ".join(dict.fromkeys(c.folder.resolve().name for c in campaigns)),
        model_sha=first.model_sha,
        folders=[str(c.folder) for c in campaigns],
        format=", ".join(sorted({c.plan.format for c in campaigns})),
        fault=", ".join(faults), images=first.images, assumptions=a, confidence=confidence,
        stratum_confidence=stratum_confidence, strata=strata, by_layer=by_layer,
        by_site=by_site, total=total, residual=residual, detected=detected,
        corrected=Interval(0.0, 0.0, 0.0), spfm=spfm, verdicts=verdicts, notes=notes)


def estimate_fit(folders: Sequence, assumptions: FitAssumptions | None = None,
                 **kwargs) -> list[FitEstimate]:
    """FIT estimates from campaign results folders, one per model (by weights hash).

    Campaigns of the same model (e.g. its weights and its activations) are summed into one
    estimate; give the assumptions as a FitAssumptions or as its fields, e.g.
    estimate_fit(["results/w"], raw_fit_per_mbit=20.49).
    """
    if assumptions is None:
        assumptions = FitAssumptions(**kwargs)
    elif kwargs:
        raise ConfigError("give either a FitAssumptions or its fields, not both")
    if isinstance(folders, (str, Path)):
        folders = [folders]
    if not folders:
        raise ConfigError("give at least one campaign results folder")
    groups: dict[str, list[_Campaign]] = {}
    for folder in folders:
        c = _read_campaign(folder)
        groups.setdefault(c.plan.model_sha, []).append(c)
    return [_estimate(cs, assumptions) for cs in groups.values()]
