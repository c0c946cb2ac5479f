"""Coverage of the intervals flipsafe prints, against exhaustive ground truth.

The population is a real one: every (element, bit) fault of a small trained digits model's
activations, each injected once (`--n all`), so every fault's SDC and DUE outcome is known.
Campaigns are then replayed many times on it, each with its own seed, by drawing faults
uniformly with replacement inside each (layer, field) stratum as the sampler does and
reading their outcomes from the exhaustive rows: the adaptive design (pilot, stage 2 sized
by campaign.adaptive, intervals of stage 2 by summarise(interval="effective")) and the
fixed one (Leveugle's n per layer, proportional allocation, today's intervals). Each
layer's and the whole model's interval must hold the true rate at least as often as the
nominal confidence, up to the binomial error of the number of replays.

The test's own false alarm: a method whose true coverage is exactly nominal fails a check
with probability 0.1 % (z = 3.09, one-sided); there are 16 checks (2 designs x 4 scopes x
SDC and DUE), so a correct method fails the test with probability under 1.6 %.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from flipsafe.campaign import adaptive
from flipsafe.campaign.plan import FaultPlan, Stratum, allocate, n_from_plan
from flipsafe.campaign.runner import make_plan, run_campaign
from flipsafe.campaign.store import ResultsStore
from flipsafe.metrics.stats import OVERALL, summarise

CONFIDENCE = 0.90  # low enough that 400 replays can tell 90 % from 82 % coverage
MARGIN = 0.02
REPLAYS = 400
Z_FALSE_ALARM = 3.09  # one-sided 0.1 %
# A layer of fewer faults than this (the MLP's 10 class scores: 320) cannot reach the margin
# with replacement, whatever the design; its width is not checked, its coverage is.
SMALL_LAYER = 1000


@pytest.fixture(scope="module")
def population(mlp_checkpoint, tmp_path_factory):
    """{(layer, field): (sdc, due) outcome arrays of every fault in the stratum}."""
    out = tmp_path_factory.mktemp("exhaustive") / "all"
    plan = make_plan(mlp_checkpoint, n="all", margin=None, seed=3, part_size=8192)
    run_campaign(plan, out, show_progress=False)
    store = ResultsStore(out)
    store.open()
    table = store.read()
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in ("layer", "field", "sdc", "due")}
    pop = {}
    for s in store.strata:
        rows = (cols["layer"] == s.layer) & (cols["field"] == s.field)
        pop[(s.layer, s.field)] = (cols["sdc"][rows].astype(bool), cols["due"][rows].astype(bool))
    return pop


def _strata(pop) -> list[Stratum]:
    return [Stratum(layer, field, len(v[0]), 0) for (layer, field), v in pop.items()]


def _truth(pop) -> dict:
    """True rates per layer and overall: each stratum's mean weighted by its size."""
    sums: dict = {}
    for (layer, _), (sdc, due) in pop.items():
        for key in (layer, OVERALL):
            n, s, d = sums.get(key, (0, 0, 0))
            sums[key] = (n + sdc.size, s + sdc.sum(), d + due.sum())
    return {key: {"sdc": s / n, "due": d / n} for key, (n, s, d) in sums.items()}


def _draw(pop, strata, rng) -> dict:
    """Rows of one stage: n faults per stratum drawn with replacement, as columns."""
    cols = {"layer": [], "field": [], "sdc": [], "due": []}
    for s in strata:
        sdc, due = pop[(s.layer, s.field)]
        pick = rng.integers(0, sdc.size, s.n)
        cols["layer"] += [s.layer] * s.n
        cols["field"] += [s.field] * s.n
        cols["sdc"].append(sdc[pick])
        cols["due"].append(due[pick])
    return {"layer": np.array(cols["layer"], dtype=object),
            "field": np.array(cols["field"], dtype=object),
            "sdc": np.concatenate(cols["sdc"]), "due": np.concatenate(cols["due"])}


def _summary(cols, strata, interval):
    cols = {**cols, "delta_loss": np.zeros(cols["sdc"].size)}
    sizes = {(s.layer, s.field): s.size for s in strata}
    return summarise(cols, ("layer",), CONFIDENCE, qs=(), sizes=sizes, interval=interval)


def _adaptive_replay(pop, rng):
    pilot = adaptive.pilot(_strata(pop))
    counts = adaptive.counts_of(pa.table(_draw(pop, pilot, rng)), pilot)
    stage2 = adaptive.second_stage(pilot, counts, MARGIN, CONFIDENCE)
    spent = sum(s.n for s in pilot) + sum(s.n for s in stage2)
    return _summary(_draw(pop, stage2, rng), stage2, "effective"), spent


def _fixed_replay(pop, rng):
    strata = _strata(pop)
    sizes = {(s.layer, s.field): s.size for s in strata}
    per_layer: dict = {}
    for s in strata:
        per_layer[s.layer] = per_layer.get(s.layer, 0) + s.size
    fp = FaultPlan(confidence=CONFIDENCE, margin=MARGIN)
    n = {layer: n_from_plan(fp, size) for layer, size in per_layer.items()}
    fixed = allocate(sizes, n)
    return _summary(_draw(pop, fixed, rng), fixed, "kish"), sum(s.n for s in fixed)


def _coverage(pop, replay):
    truth = _truth(pop)
    layer_size: dict = {}
    for (layer, _), (sdc, _) in pop.items():
        layer_size[layer] = layer_size.get(layer, 0) + sdc.size
    hits: dict = {}
    widths = []
    spent = []
    for seed in range(REPLAYS):
        summary, n = replay(pop, np.random.default_rng(seed))
        spent.append(n)
        for g in summary.rows():
            for outcome in ("sdc", "due"):
                r = getattr(g, outcome)
                key = (g.key[0], outcome)
                hits[key] = hits.get(key, 0) + (r.low <= truth[g.key[0]][outcome] <= r.high)
                if g.key[0] != OVERALL and layer_size[g.key[0]] >= SMALL_LAYER:
                    widths.append((r.high - r.low) / 2)
    return {k: v / REPLAYS for k, v in hits.items()}, np.mean(spent), np.array(widths)


def _floor() -> float:
    return CONFIDENCE - Z_FALSE_ALARM * math.sqrt(CONFIDENCE * (1 - CONFIDENCE) / REPLAYS)


@pytest.fixture(scope="module")
def replays(population):
    return {"adaptive": _coverage(population, _adaptive_replay),
            "fixed": _coverage(population, _fixed_replay)}


@pytest.mark.parametrize("design", ["adaptive", "fixed"])
def test_intervals_cover_the_exhaustive_truth(population, replays, design):
    truth = _truth(population)
    # The population holds rare outcomes: DUEs are a fraction of a per cent here.
    assert 0 < truth[OVERALL]["due"] < 0.02 and truth[OVERALL]["sdc"] > 0
    coverage, _, widths = replays[design]
    low = {k: v for k, v in coverage.items() if v < _floor()}
    assert not low, f"{design}: coverage below {_floor():.3f} at nominal {CONFIDENCE}: {low}"
    if design == "adaptive":  # sized to the margin: an unlucky pilot rarely misses it
        missed = np.mean(widths > MARGIN)
        assert missed < 0.05 and widths.mean() <= MARGIN, (missed, widths.mean())


def test_adaptive_spends_less_than_fixed_for_the_same_margin(replays):
    adaptive_spent, fixed_spent = replays["adaptive"][1], replays["fixed"][1]
    assert adaptive_spent < fixed_spent / 2, (adaptive_spent, fixed_spent)


def test_the_check_catches_an_interval_that_ignores_the_design(population):
    """The same check has the power to fail: per-layer Wilson intervals that pool stage 2's
    rows, ignoring its Neyman allocation (exponent faults over-drawn), miss the truth."""

    def naive(pop, rng):
        pilot = adaptive.pilot(_strata(pop))
        counts = adaptive.counts_of(pa.table(_draw(pop, pilot, rng)), pilot)
        stage2 = adaptive.second_stage(pilot, counts, MARGIN, CONFIDENCE)
        return _summary(_draw(pop, stage2, rng), stage2, "kish"), 0

    coverage, _, _ = _coverage(population, naive)
    assert min(v for (layer, _), v in coverage.items() if layer != OVERALL) < _floor()
