"""The adaptive design: a pilot that only allocates, then a second stage whose size is fixed
from the pilot before it runs, and estimates from the second stage alone.

Why two stages and not "stop when the interval is narrow enough": stopping on the data
makes a fixed-n interval invalid. Here the pilot's rows decide how many faults each
(layer, field) stratum gets in stage 2 (Neyman: n_h proportional to N_h s_h, with
s_h = sqrt(q (1 - q)) of the pilot's adjusted rate q = (k + 1/2) / (n + 1), the larger of
SDC's and DUE's, and at least FLOOR faults), and each layer's stage-2 size is the smallest
for which the interval predicted at the pilot's rates has half-width (high - low) / 2 at most
the plan's margin. Stage 2 draws its faults afresh (a generator of its own per stratum), so
given its allocation it is an ordinary stratified sample, and metrics.stats.effective_rate
gives it an interval that holds whatever the pilot showed. The pilot's rows are kept and
counted as spent, never estimated from. A stage 2 predicted at the pilot's rates can still
end a little wider than the margin when the pilot was unlucky; summaries say which layers
reached the margin and which did not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from flipsafe.campaign.plan import Stratum
from flipsafe.errors import ConfigError
from flipsafe.metrics.stats import adjusted_rate, effective_rate

# Pilot faults per layer, shared across its strata in proportion to their fault space, and
# at least PILOT_MIN per stratum (a stratum smaller than that is taken whole).
PILOT_PER_LAYER = 200
PILOT_MIN = 5
# The fewest faults a stratum gets in stage 2, so none starves on an unlucky pilot.
FLOOR = 10
OUTCOMES = ("sdc", "due")


def stage_seed(seed: int, stage: int) -> int:
    """The seed stage `stage` draws its faults with: the plan's own for the first (so a
    stage-1 list is drawn as any campaign's is), a derived one for later stages."""
    if stage == 0:
        return seed
    digest = hashlib.sha256(f"{seed}\x00stage {stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _by_layer(strata: Sequence[Stratum]) -> dict[str, list[Stratum]]:
    layers: dict[str, list[Stratum]] = {}
    for s in strata:
        layers.setdefault(s.layer, []).append(s)
    return layers


def pilot(strata: Sequence[Stratum]) -> list[Stratum]:
    """The pilot of each layer of `strata` (their sizes; their n is ignored): PILOT_PER_LAYER
    faults in proportion to each stratum's share of the layer, at least PILOT_MIN each."""
    out = []
    for layer_strata in _by_layer(strata).values():
        total = sum(s.size for s in layer_strata)
        for s in layer_strata:
            n = max(PILOT_MIN, round(PILOT_PER_LAYER * s.size / total)) if total else 0
            out.append(Stratum(s.layer, s.field, s.size, min(s.size, n), s.elements, s.width))
    return out


def counts_of(table, strata: Sequence[Stratum]) -> dict:
    """{(layer, field): (n, {outcome: events})} of campaign rows `table` (a pyarrow table
    with layer, field, sdc and due columns), for every stratum of `strata`."""
    from flipsafe.campaign.store import stratum_counts

    got = stratum_counts(table)
    out = {}
    for s in strata:
        n, sdc, due = got.get((s.layer, s.field), (0, 0, 0))
        out[(s.layer, s.field)] = (n, {"sdc": sdc, "due": due})
    return out


def half_width(strata: Sequence[Stratum], rates: Mapping[tuple, Mapping[str, float]],
               n: Sequence[int], confidence: float) -> float:
    """The widest (SDC or DUE) half-width effective_rate would give strata with sizes from
    `strata`, n[h] faults each and events at the given rates (expected counts)."""
    size = np.array([s.size for s in strata], dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    widest = 0.0
    for o in OUTCOMES:
        k = np.array([rates[(s.layer, s.field)][o] for s in strata]) * n
        e = effective_rate(np.minimum(k, n), n, size, confidence)
        widest = max(widest, (e.high - e.low) / 2.0)
    return widest


def _layer_stage(strata: list[Stratum], rates: dict, margin: float,
                 confidence: float) -> list[int]:
    """Stage-2 counts of one layer's strata: Neyman shares, the smallest total that reaches
    `margin` at the pilot's rates (capped at each stratum's size)."""
    size = np.array([s.size for s in strata], dtype=np.float64)
    spread = np.array([max(math.sqrt(r * (1.0 - r)) for r in rates[(s.layer, s.field)].values())
                       for s in strata])
    weight = size * spread
    share = weight / weight.sum() if weight.sum() > 0 else size / size.sum()
    cap = np.array([s.size for s in strata], dtype=np.int64)

    def counts(total: int) -> np.ndarray:
        return np.minimum(cap, np.maximum(FLOOR, np.ceil(total * share))).astype(np.int64)

    lo, hi = 1, 1
    while half_width(strata, rates, counts(hi), confidence) > margin:
        if (counts(hi) >= cap).all():
            return counts(hi).tolist()  # the whole fault space: nothing more to draw
        lo, hi = hi, hi * 2
    while lo < hi:  # the smallest total whose predicted half-width reaches the margin
        mid = (lo + hi) // 2
        if half_width(strata, rates, counts(mid), confidence) <= margin:
            hi = mid
        else:
            lo = mid + 1
    return counts(hi).tolist()


def second_stage(pilot_strata: Sequence[Stratum], counts: Mapping, margin: float,
                 confidence: float, budget: int | None = None) -> list[Stratum]:
    """Stage 2 of the design: the pilot's strata with their stage-2 n, from the pilot's
    `counts` (counts_of). With `budget` (injections in all, pilot included) a stage 2 that
    would not fit shrinks: one fault per stratum, the rest in proportion to the plan, never
    more than the budget."""
    rates = {}
    for s in pilot_strata:
        n, events = counts[(s.layer, s.field)]
        rates[(s.layer, s.field)] = {o: float(adjusted_rate(events[o], n)) for o in OUTCOMES}
    planned: list[tuple[Stratum, int]] = []
    for layer_strata in _by_layer(pilot_strata).values():
        planned += zip(layer_strata, _layer_stage(layer_strata, rates, margin, confidence))
    spent = sum(s.n for s in pilot_strata)
    wanted = sum(n for _, n in planned)
    if budget is not None and spent + wanted > budget:
        # One fault each (check_budget made room), the rest shared as the plan had it.
        spare = budget - spent - len(planned)
        scaled = [1 + math.floor((n - 1) * spare / (wanted - len(planned))) for _, n in planned]
        planned = [(s, n) for (s, _), n in zip(planned, scaled)]
    return [Stratum(s.layer, s.field, s.size, int(n), s.elements, s.width) for s, n in planned]


def check_budget(budget: int | None, pilot_strata: Sequence[Stratum]) -> None:
    """Refuse a budget that cannot pay for the pilot and one stage-2 fault per stratum."""
    if budget is None:
        return
    need = sum(s.n for s in pilot_strata) + len(pilot_strata)
    if budget < need:
        raise ConfigError(f"--budget {budget:,} cannot pay for the adaptive pilot: it needs "
                          f"{need:,} injections at least ({sum(s.n for s in pilot_strata):,} "
                          f"for the pilot of {len(pilot_strata)} strata, then one per stratum); "
                          "raise --budget or use --sampling fixed --n K")


def estimation_rows(store, table):
    """The rows of `table` (a results store's rows, sorted by fault_id) that estimates use:
    an adaptive campaign's second stage once it has one (its pilot only allocated), else
    all of them."""
    import pyarrow.compute as pc

    if store.pilot is None:
        return table
    return table.filter(pc.greater_equal(table["fault_id"], store.stages[0]))


def interval(plan) -> str:
    """How summaries of the plan's rows compute intervals (metrics.stats.INTERVALS)."""
    return "effective" if plan.adaptive else "kish"


# What `flipsafe plan` projects an adaptive campaign's stage 2 at, before anything runs:
# (label, a layer's SDC rate, the field its SDCs lie in; None: spread evenly). Trained
# models' layers are typically a few per cent, nearly all in exponent bits; 50 % spread
# evenly is Leveugle's worst case.
PROJECTIONS = (("SDC 2% in exponent", 0.02, "exponent"),
               ("SDC 10% in exponent", 0.10, "exponent"),
               ("SDC 50% anywhere", 0.50, None))


def projection(pilot_strata: Sequence[Stratum], margin: float, confidence: float,
               profiles=PROJECTIONS) -> dict[str, dict[str, int]]:
    """{label: {layer: stage-2 faults}} if each layer's pilot saw the profile's SDC rate
    (in its field when the layer has it, else spread evenly) and no DUE."""
    out = {}
    for label, rate, where in profiles:
        counts = {}
        for layer_strata in _by_layer(pilot_strata).values():
            total = sum(s.size for s in layer_strata)
            inside = [s for s in layer_strata if s.field == where] or layer_strata
            share = sum(s.size for s in inside) / total
            for s in layer_strata:
                p = min(1.0, rate / share) if s in inside else 0.0
                counts[(s.layer, s.field)] = (s.n, {"sdc": round(p * s.n), "due": 0})
        per_layer: dict[str, int] = {}
        for s in second_stage(pilot_strata, counts, margin, confidence):
            per_layer[s.layer] = per_layer.get(s.layer, 0) + s.n
        out[label] = per_layer
    return out
