"""The improvement factor a / b under each candidate definition, each with its interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flipsafe.errors import ConfigError
from flipsafe.metrics.stats import (
    RateEstimate,
    estimate_ratio,
    rate_estimate,
    rate_ratio,
    ratio_of_means,
    z_value,
)

RESAMPLES = 2000
SEED = 0
# The mean-|dLoss| factor is called outlier-driven when removing one value moves it by more.
OUTLIER_MOVE = 10.0
COLUMNS = ("sdc", "nonfinite", "delta_loss", "golden_top2diff")
# Each definition: its key and its label, in table order.
DEFINITIONS = (
    ("sdc_rate", "SDC rate"),
    ("mismatch_finite", "mismatch rate, non-finite dropped (GoldenEye)"),
    ("mean_delta_loss", "mean |dLoss|, finite values (GoldenEye)"),
    ("median_delta_loss", "median |dLoss|, finite values"),
    ("sdc_golden_top2diff", "mean golden top2diff of SDC images"),
)
# How the interval of each definition is computed, for the table's notes.
KATZ = "Katz"
DELTA = "delta method"
STRATIFIED = "stratified, delta method"
CORRECTED = " (0.5 added to each count: a side had none)"


@dataclass(frozen=True)
class Factor:
    """One definition's value on each side and the factor a / b with its interval.

    n_a and n_b count the rows (or values) the definition used on each side; low and high
    are nan where no interval is defined (a side without values, a zero statistic).
    """

    key: str
    label: str
    a: float
    b: float
    n_a: int
    n_b: int
    ratio: float
    low: float
    high: float
    method: str

    @property
    def position(self) -> str:
        """Where the interval lies: "above 1", "below 1", "includes 1" or "undefined"."""
        if math.isnan(self.ratio) or math.isnan(self.low) or math.isnan(self.high):
            return "undefined"
        if self.low > 1:
            return "above 1"
        if self.high < 1:
            return "below 1"
        return "includes 1"


@dataclass(frozen=True)
class OutlierEffect:
    """The mean-|dLoss| factor recomputed with one side's largest finite |dLoss| removed."""

    side: str  # "a" or "b"
    removed: float
    ratio: float
    before: float

    @property
    def moves(self) -> float:
        """How many times larger or smaller the factor becomes (>= 1; nan if undefined)."""
        if not (self.before > 0 and self.ratio > 0):
            return math.nan
        if math.isinf(self.before) or math.isinf(self.ratio):
            return math.inf if self.before != self.ratio else 1.0
        return max(self.ratio / self.before, self.before / self.ratio)

    @property
    def flips(self) -> bool:
        """True when removing the value moves the factor to the other side of 1."""
        return (self.before - 1.0) * (self.ratio - 1.0) < 0

    @property
    def drives(self) -> bool:
        """True when this one value moves the factor by more than OUTLIER_MOVE or flips it."""
        return self.flips or (not math.isnan(self.moves) and self.moves > OUTLIER_MOVE)


@dataclass(frozen=True)
class FactorTable:
    """The factor a / b under every definition (DEFINITIONS order) and the outlier check."""

    factors: tuple[Factor, ...]
    outliers: tuple[OutlierEffect, ...]
    confidence: float
    resamples: int
    seed: int

    def __getitem__(self, key: str) -> Factor:
        for f in self.factors:
            if f.key == key:
                return f
        raise KeyError(key)

    def agreement(self) -> dict[str, list[str]]:
        """Definition keys grouped by where their interval lies (Factor.position)."""
        out: dict[str, list[str]] = {}
        for f in self.factors:
            out.setdefault(f.position, []).append(f.key)
        return out

    def driving_outliers(self) -> list[OutlierEffect]:
        return [o for o in self.outliers if o.drives]


def _column(rows, name: str) -> np.ndarray:
    try:
        col = rows[name]
    except KeyError:
        raise ConfigError(f"campaign rows lack column {name!r}; needed: "
                          f"{', '.join(COLUMNS)}") from None
    return np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col)


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or (a == 0 and b == 0):
        return math.nan
    if b == 0:
        return math.inf
    return a / b


def _resampled_medians(ordered: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """np.median(ordered[idx], axis=1) for sorted `ordered`, from the middle indices alone:
    ordered is sorted, so the middle values of a resample are those at its middle indices."""
    k = idx.shape[1] // 2
    idx = np.sort(idx, axis=1)  # numpy's vectorised sort beats a two-element partition
    if idx.shape[1] % 2:
        return ordered[idx[:, k]]
    return (ordered[idx[:, k - 1]] + ordered[idx[:, k]]) / 2.0


def bootstrap_median_ratio(x, y, confidence: float = 0.99, resamples: int = RESAMPLES,
                           seed: int = SEED, chunk: int = 1 << 22) -> tuple[float, float]:
    """Percentile interval of median(x) / median(y) from a seeded bootstrap.

    Each side is resampled on its own (independent samples) from its sorted values: with
    rng = numpy.random.default_rng(seed), xs = numpy.sort(x) and ys = numpy.sort(y), the
    resampled medians are numpy.median(xs[rng.integers(0, len(x), (m, len(x)))], axis=1)
    and then the same for ys, in blocks of m resamples (about `chunk` indices a block; one
    block for small samples). The bounds are numpy.percentile's (linear) at
    100 (1 - c) / 2 and 100 (1 + c) / 2 of the ratios; a zero denominator gives inf (nan
    when both medians are zero), and the interval is (nan, nan) when any resample gives nan
    or a side has no values.
    """
    xs = np.sort(np.asarray(x, dtype=np.float64).ravel())
    ys = np.sort(np.asarray(y, dtype=np.float64).ravel())
    if not (isinstance(resamples, int) and resamples >= 2):
        raise ConfigError(f"resamples must be an integer >= 2, got {resamples!r}")
    z_value(confidence)  # checks it
    if xs.size == 0 or ys.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    step = max(1, chunk // max(xs.size, ys.size))
    ratios = np.empty(resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo in range(0, resamples, step):
            m = min(resamples, lo + step) - lo
            mx = _resampled_medians(xs, rng.integers(0, xs.size, (m, xs.size)))
            my = _resampled_medians(ys, rng.integers(0, ys.size, (m, ys.size)))
            ratios[lo:lo + m] = mx / my
    if np.isnan(ratios).any():
        return math.nan, math.nan
    tail = 100.0 * (1.0 - confidence) / 2.0
    if np.isfinite(ratios).all():
        low, high = np.percentile(ratios, [tail, 100.0 - tail])
        return float(low), float(high)
    return _percentile(np.sort(ratios), tail), _percentile(np.sort(ratios), 100.0 - tail)


def _percentile(ordered: np.ndarray, q: float) -> float:
    """numpy.percentile's linear method on sorted values that may include +inf (where
    numpy's interpolation would give inf - inf = nan)."""
    pos = q / 100.0 * (ordered.size - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.size - 1)
    a, b, t = float(ordered[lo]), float(ordered[hi]), pos - lo
    if t == 0 or a == b:
        return a
    return a + (b - a) * t


def _rate_factor(key, label, a: RateEstimate, b: RateEstimate, confidence) -> Factor:
    if a.n == 0 or b.n == 0:
        return Factor(key, label, a.rate, b.rate, a.n, b.n, math.nan, math.nan, math.nan,
                      KATZ)
    stratified = "stratified" in (a.method, b.method)
    r = estimate_ratio(a, b, confidence)
    method = (STRATIFIED if stratified else KATZ) + (CORRECTED if r.corrected else "")
    return Factor(key, label, a.rate, b.rate, a.n, b.n, r.ratio, r.low, r.high, method)


def _mean_factor(key, label, x: np.ndarray, y: np.ndarray, confidence) -> Factor:
    ma = float(x.mean()) if x.size else math.nan
    mb = float(y.mean()) if y.size else math.nan
    r = ratio_of_means(x, y, confidence)
    return Factor(key, label, ma, mb, int(x.size), int(y.size), _ratio(ma, mb), r.low,
                  r.high, DELTA)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _without_largest(x: np.ndarray) -> np.ndarray:
    return np.delete(x, int(np.argmax(x))) if x.size else x


def improvement_factors(
    a,
    b,
    confidence: float = 0.99,
    sdc: tuple[RateEstimate, RateEstimate] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> FactorTable:
    """The factor a / b (a the reference) under each definition in DEFINITIONS.

    a and b are per-injection rows (a pyarrow Table or a mapping of columns) with the
    columns sdc, nonfinite, delta_loss and golden_top2diff; give only the layers both
    sides have. Definitions and intervals:

    - sdc_rate: `sdc` (the two rates of an existing comparison, e.g. stratified
      fault-space averages) through estimate_ratio; without it, the pooled rows' SDC rates
      (Katz).
    - mismatch_finite: SDC rate among the rows whose corrupted value was finite
      (nonfinite False), GoldenEye's denominator; Katz.
    - mean_delta_loss: mean of the finite |dLoss| values; delta method (ratio_of_means).
    - median_delta_loss: median of the finite |dLoss| values; percentile bootstrap with
      `resamples` and `seed` (bootstrap_median_ratio).
    - sdc_golden_top2diff: mean golden top2diff (finite) of the SDC rows; delta method.

    outliers holds the mean-|dLoss| factor recomputed without a's largest finite |dLoss|
    and without b's (when that side has at least two values).
    """
    z_value(confidence)
    cols = [{name: _column(rows, name) for name in COLUMNS} for rows in (a, b)]
    labels = dict(DEFINITIONS)
    ca, cb = cols
    sdc_a, sdc_b = (c["sdc"].astype(bool) for c in cols)
    if sdc is None:
        sdc = tuple(rate_estimate(int(s.sum()), int(s.size), confidence) for s in (sdc_a, sdc_b))
    factors = [_rate_factor("sdc_rate", labels["sdc_rate"], *sdc, confidence)]

    finite_a, finite_b = (~c["nonfinite"].astype(bool) for c in cols)
    ka, na = int((sdc_a & finite_a).sum()), int(finite_a.sum())
    kb, nb = int((sdc_b & finite_b).sum()), int(finite_b.sum())
    key = "mismatch_finite"
    if na and nb:
        r = rate_ratio(ka, na, kb, nb, confidence)
        factors.append(Factor(key, labels[key], ka / na, kb / nb, na, nb, r.ratio, r.low,
                              r.high, KATZ + (CORRECTED if r.corrected else "")))
    else:
        factors.append(Factor(key, labels[key], ka / na if na else math.nan,
                              kb / nb if nb else math.nan, na, nb, math.nan, math.nan,
                              math.nan, KATZ))

    dl_a, dl_b = (_finite(c["delta_loss"]) for c in cols)
    mean = _mean_factor("mean_delta_loss", labels["mean_delta_loss"], dl_a, dl_b, confidence)
    factors.append(mean)

    med_a = float(np.median(dl_a)) if dl_a.size else math.nan
    med_b = float(np.median(dl_b)) if dl_b.size else math.nan
    low, high = bootstrap_median_ratio(dl_a, dl_b, confidence, resamples, seed)
    key = "median_delta_loss"
    factors.append(Factor(key, labels[key], med_a, med_b, int(dl_a.size), int(dl_b.size),
                          _ratio(med_a, med_b), low, high,
                          f"percentile bootstrap, {resamples} resamples, seed {seed}"))

    t2_a = _finite(ca["golden_top2diff"][sdc_a])
    t2_b = _finite(cb["golden_top2diff"][sdc_b])
    factors.append(_mean_factor("sdc_golden_top2diff", labels["sdc_golden_top2diff"], t2_a,
                                t2_b, confidence))

    outliers = []
    for side, x, y in (("a", dl_a, dl_b), ("b", dl_b, dl_a)):
        if x.size < 2 or not y.size:
            continue
        rest = _without_largest(x)
        ma, mb = (float(rest.mean()), float(y.mean())) if side == "a" else \
            (float(y.mean()), float(rest.mean()))
        outliers.append(OutlierEffect(side, float(x.max()), _ratio(ma, mb), mean.ratio))
    return FactorTable(tuple(factors), tuple(outliers), confidence, resamples, seed)
