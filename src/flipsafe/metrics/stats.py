"""Confidence intervals, sample sizes and per-group summaries for fault-injection campaigns."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from flipsafe.errors import ConfigError

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
        0.0 < confidence < 1.0
    ):
        raise ConfigError(
            f"confidence must be a number strictly between 0 and 1 (e.g. 0.99), got {confidence!r}"
        )
    return float(confidence)


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile: 1.96 for 0.95, 2.576 for 0.99."""
    confidence = _check_confidence(confidence)
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def _check_counts(k, n) -> None:
    if np.any(np.asarray(n) < 0) or np.any(np.asarray(k) < 0) or np.any(np.asarray(k) > n):
        raise ConfigError(f"counts must satisfy 0 <= k <= n, got k={k!r}, n={n!r}")


def _scalar_or_array(x):
    return float(x) if np.ndim(x) == 0 else x


def wilson_interval(k, n, confidence: float = 0.99):
    """Wilson score interval for a proportion k/n; k and n may be scalars or arrays.

    With n == 0 there is no information and the interval is (0.0, 1.0).
    k == 0 gives a lower bound of exactly 0 and k == n an upper bound of exactly 1.
    """
    z = z_value(confidence)
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    _check_counts(k, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        z2n = z * z / n
        centre = (p + z2n / 2.0) / (1.0 + z2n)
        half = z / (1.0 + z2n) * np.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    # Rounding can push the bounds a hair past 0 or 1 at k == 0 or k == n.
    low = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    low = np.where(n == 0, 0.0, low)
    high = np.where(n == 0, 1.0, high)
    return _scalar_or_array(low), _scalar_or_array(high)


def clopper_pearson_interval(k, n, confidence: float = 0.99):
    """Exact (Clopper-Pearson) interval for k/n from beta quantiles; (0.0, 1.0) when n == 0."""
    from scipy.stats import beta

    alpha = 1.0 - _check_confidence(confidence)
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    _check_counts(k, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(k > 0, beta.ppf(alpha / 2.0, k, n - k + 1.0), 0.0)
        high = np.where(k < n, beta.ppf(1.0 - alpha / 2.0, k + 1.0, n - k), 1.0)
    low = np.where(n == 0, 0.0, low)
    high = np.where(n == 0, 1.0, high)
    return _scalar_or_array(low), _scalar_or_array(high)


def sample_size(
    confidence: float,
    margin: float,
    population: int | None = None,
    p: float = 0.5,
    t: float | None = None,
) -> int:
    """Number of faults to inject so the rate is within +-margin at this confidence.

    Leveugle et al., DATE 2009: n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))), or
    t^2 p (1 - p) / e^2 when the population N is None (infinite); rounded up.
    t defaults to the exact normal quantile (2.5758 for 99 %); published tables
    that use the rounded t = 2.576 come out up to 2 higher (16,590 vs 16,588).
    """
    if t is None:
        t = z_value(confidence)
    elif not t > 0:
        raise ConfigError(f"t must be positive, got {t!r}")
    if not (0.0 < margin < 1.0):
        raise ConfigError(f"margin must be strictly between 0 and 1 (e.g. 0.01), got {margin!r}")
    if not (0.0 < p < 1.0):
        raise ConfigError(f"p must be strictly between 0 and 1 (0.5 is the safe choice), got {p!r}")
    spread = t * t * p * (1.0 - p)
    if population is None:
        return math.ceil(spread / (margin * margin))
    if isinstance(population, bool) or not isinstance(population, int) or population < 0:
        raise ConfigError(f"population must be a non-negative integer or None, got {population!r}")
    if population == 0:
        return 0
    n = population / (1.0 + margin * margin * (population - 1) / spread)
    return min(population, math.ceil(n))


@dataclass(frozen=True)
class RateEstimate:
    """A proportion with its confidence interval (rate is nan when n == 0).

    method "wilson" or "clopper-pearson": rate = k / n over n rows. method "stratified":
    rate = sum_h W_h k_h / n_h with W_h the stratum's share of the fault space (see
    stratified_rate); k and n are then the raw totals, and variance its estimated variance.
    """

    k: int
    n: int
    rate: float
    low: float
    high: float
    confidence: float
    method: str = "wilson"
    variance: float = math.nan
    effective: float | None = None

    @property
    def effective_n(self) -> float:
        """The sample size the interval behaves as: n for k/n, Kish's n_eff when stratified."""
        return float(self.n) if self.effective is None else self.effective


def rate_estimate(k: int, n: int, confidence: float = 0.99, method: str = "wilson") -> RateEstimate:
    """k/n with a Wilson ("wilson") or Clopper-Pearson ("clopper-pearson") interval."""
    if method == "wilson":
        low, high = wilson_interval(k, n, confidence)
    elif method == "clopper-pearson":
        low, high = clopper_pearson_interval(k, n, confidence)
    else:
        raise ConfigError(
            f"unknown interval method {method!r}; choose one of: clopper-pearson, wilson"
        )
    rate = k / n if n else math.nan
    variance = rate * (1.0 - rate) / n if n else math.nan
    return RateEstimate(int(k), int(n), rate, low, high, confidence, method, variance)


STRATIFIED_METHOD = (
    "stratified estimate (each layer x bit-field stratum weighted by its share of the fault "
    "space), Wilson interval on Kish's effective sample size"
)


def _stratum_arrays(k, n, size, exhaustive):
    """Per-stratum counts, sizes and exhaustive flags as float/bool arrays of one length,
    checked: 0 <= k <= n, and (when there are strata) n > 0 and size > 0 in each."""
    k = np.asarray(k, dtype=np.float64).ravel()
    n = np.asarray(n, dtype=np.float64).ravel()
    size = np.asarray(size, dtype=np.float64).ravel()
    exhaustive = np.broadcast_to(np.asarray(exhaustive, dtype=bool), n.shape)
    _check_counts(k, n)
    if not (k.shape == n.shape == size.shape):
        raise ConfigError(f"k, n and size must have one entry per stratum, got "
                          f"{k.size}, {n.size}, {size.size}")
    if n.size and (np.any(n <= 0) or np.any(size <= 0)):
        raise ConfigError("every stratum needs n > 0 injected faults and a positive size")
    return k, n, size, exhaustive


def stratified_rate(k, n, size, confidence: float = 0.99, exhaustive=False) -> RateEstimate:
    """The fault-space-average rate from per-stratum counts, with its interval.

    Stratum h has size[h] faults in its fault space, n[h] of them injected (drawn
    uniformly, with replacement) and k[h] events. The estimate is p = sum W_h p_h with
    W_h = size_h / sum(size) and p_h = k_h / n_h. Its interval is Wilson's on Kish's
    effective sample size n_eff = 1 / sum W_h^2 / n_h (the design effect of unequal
    weights; n_eff = sum n for proportional allocation, where this is the pooled Wilson
    interval), with p * n_eff events; `variance` is p (1 - p) / n_eff. Kish's n_eff does not
    depend on the counts, so strata without events still carry their sampling error (the
    per-stratum variance sum W_h^2 p_h (1 - p_h) / n_h would call them certain).
    Strata injected exhaustively (exhaustive[h]: every fault of the stratum once, nothing
    else sampled) carry no sampling error; when all are, the interval is exactly [p, p].
    Strata with n_h == 0 must not be given: the estimate says nothing about them.
    """
    k, n, size, exhaustive = _stratum_arrays(k, n, size, exhaustive)
    if n.size == 0:
        return RateEstimate(0, 0, math.nan, 0.0, 1.0, _check_confidence(confidence),
                            "stratified", math.nan)
    w = size / size.sum()
    p = float(np.sum(w * k / n))
    inverse = float(np.sum(np.where(exhaustive, 0.0, w * w / n)))
    if inverse == 0.0:
        low = high = p
        variance, n_eff = 0.0, math.inf
    else:
        n_eff = 1.0 / inverse
        low, high = wilson_interval(p * n_eff, n_eff, confidence)
        variance = p * (1.0 - p) / n_eff
    return RateEstimate(int(k.sum()), int(n.sum()), p, float(low), float(high),
                        _check_confidence(confidence), "stratified", variance, n_eff)


EFFECTIVE_METHOD = (
    "stratified estimate (each stratum weighted by its share of the fault space) with a "
    "Clopper-Pearson interval on the effective sample size of the per-stratum variances "
    "(Korn & Graubard); each sampled stratum's variance uses (k + 1/2) / (n + 1), so a "
    "stratum without events still carries its sampling error"
)
# Events added to each sampled stratum for its variance, and twice that to its trials.
HALF_EVENT = 0.5


def adjusted_rate(k, n):
    """(k + 1/2) / (n + 1) per stratum: the rate the variance of EFFECTIVE_METHOD (and the
    adaptive design's allocation) uses, never 0 or 1 for a sampled stratum."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return (k + HALF_EVENT) / (n + 2 * HALF_EVENT)


def effective_rate(k, n, size, confidence: float = 0.99, exhaustive=False) -> RateEstimate:
    """The fault-space-average rate from per-stratum counts, with an interval that uses
    what each stratum shows (EFFECTIVE_METHOD); for designs whose allocation is not
    proportional (adaptive campaigns), where Kish's design effect alone misleads.

    Stratum h holds size[h] faults, n[h] were drawn uniformly with replacement, k[h] were
    events. p = sum W_h k_h / n_h (W_h = size_h / sum size). Over the sampled strata S
    (weight W_S, exact strata E adding p_E exactly): V = sum_S W_h^2 q_h (1 - q_h) / n_h
    with q_h = adjusted_rate(k_h, n_h); the rate within S, r = sum_S W_h p_h / W_S, behaves
    as x = r n_eff events in n_eff = q (1 - q) / (V / W_S^2) trials, q = sum_S W_h q_h / W_S,
    and its Clopper-Pearson interval (beta quantiles at fractional x) scaled by W_S and
    shifted by p_E is the interval. Coverage against exhaustive ground truth is tested in
    tests/campaign/test_adaptive_coverage.py.
    """
    from scipy.stats import beta

    k, n, size, exhaustive = _stratum_arrays(k, n, size, exhaustive)
    confidence = _check_confidence(confidence)
    if n.size == 0:
        return RateEstimate(0, 0, math.nan, 0.0, 1.0, confidence, "effective", math.nan)
    w = size / size.sum()
    p_h = k / n
    p = float(np.sum(w * p_h))
    sampled = ~exhaustive
    if not sampled.any():
        return RateEstimate(int(k.sum()), int(n.sum()), p, p, p, confidence, "effective",
                            0.0, math.inf)
    w_s = float(w[sampled].sum())
    p_exact = float(np.sum((w * p_h)[exhaustive]))
    q_h = adjusted_rate(k[sampled], n[sampled])
    ws = w[sampled] / w_s
    v = float(np.sum(ws * ws * q_h * (1.0 - q_h) / n[sampled]))
    q = float(np.sum(ws * q_h))
    n_eff = q * (1.0 - q) / v
    r = float(np.sum(ws * p_h[sampled]))
    x = r * n_eff
    alpha = 1.0 - confidence
    low = float(beta.ppf(alpha / 2.0, x, n_eff - x + 1.0)) if x > 0 else 0.0
    high = float(beta.ppf(1.0 - alpha / 2.0, x + 1.0, n_eff - x)) if x < n_eff else 1.0
    return RateEstimate(int(k.sum()), int(n.sum()), p, p_exact + w_s * low,
                        p_exact + w_s * high, confidence, "effective", w_s * w_s * v, n_eff)


@dataclass(frozen=True)
class RateRatio:
    """(k1/n1) / (k2/n2) with a Katz log interval.

    corrected is True when a count was zero and 0.5 was added to every cell of
    the 2x2 table (k + 0.5 events, n - k + 0.5 non-events) before computing.
    """

    ratio: float
    low: float
    high: float
    confidence: float
    corrected: bool
    p_value: float = math.nan


def _two_sided_p(log_ratio: float, se: float) -> float:
    if se == 0:
        return 0.0 if log_ratio != 0 else 1.0
    return 2.0 * (1.0 - NormalDist().cdf(abs(log_ratio) / se))


def rate_ratio(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.99) -> RateRatio:
    """Ratio of two rates with the Katz interval exp(log RR +- z sqrt(1/k1 - 1/n1 + 1/k2 - 1/n2))."""
    z = z_value(confidence)
    for k, n in ((k1, n1), (k2, n2)):
        if n <= 0:
            raise ConfigError(f"rate_ratio needs n > 0 on both sides, got n1={n1}, n2={n2}")
        _check_counts(k, n)
    corrected = k1 == 0 or k2 == 0
    if corrected:
        # Haldane-Anscombe: without it the log ratio or its variance is infinite.
        k1, n1, k2, n2 = k1 + 0.5, n1 + 1.0, k2 + 0.5, n2 + 1.0
    ratio = (k1 / n1) / (k2 / n2)
    se = math.sqrt(1.0 / k1 - 1.0 / n1 + 1.0 / k2 - 1.0 / n2)
    return RateRatio(ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se), confidence,
                     corrected, _two_sided_p(math.log(ratio), se))


def estimate_ratio(a: RateEstimate, b: RateEstimate, confidence: float | None = None) -> RateRatio:
    """a.rate / b.rate with a log-scale interval from the estimates' variances.

    Var(log a.rate) ~= a.variance / a.rate^2 (delta method); for plain k/n estimates this is
    exactly Katz's interval (rate_ratio). When either side has no event the ratio and its
    interval come from rate_ratio on the effective counts (rate * n_eff events of n_eff)
    with its 0.5 correction. The p-value tests ratio == 1 on the same scale.
    """
    confidence = a.confidence if confidence is None else _check_confidence(confidence)
    if a.n <= 0 or b.n <= 0:
        raise ConfigError(f"a ratio needs rows on both sides, got n={a.n} and n={b.n}")
    if a.rate > 0 and b.rate > 0:
        ratio = a.rate / b.rate
        se = math.sqrt(a.variance / a.rate ** 2 + b.variance / b.rate ** 2)
        z = z_value(confidence)
        return RateRatio(ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se), confidence,
                         False, _two_sided_p(math.log(ratio), se))

    def effective(e: RateEstimate) -> tuple[float, float]:
        # Kish's n_eff for stratified estimates; it does not depend on the counts, so a side
        # without events is not given a smaller sample than the other.
        n_eff = e.effective_n if math.isfinite(e.effective_n) else float(e.n)
        return e.rate * n_eff, n_eff

    return rate_ratio(*effective(a), *effective(b), confidence)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for a paired 2x2 table with `only_a` pairs where only
    A had the event and `only_b` where only B had it: the binomial test of only_a successes
    in only_a + only_b trials at p = 1/2 (2 x the smaller tail, at most 1; 1 with no
    discordant pair)."""
    for k in (only_a, only_b):
        if not (isinstance(k, (int, np.integer)) and k >= 0):
            raise ConfigError(f"discordant pair counts must be integers >= 0, got {k!r}")
    n, k = int(only_a) + int(only_b), min(int(only_a), int(only_b))
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedRatio:
    """Rate of an outcome under A over its rate under B on the same faults (paired rows).

    both, only_a, only_b, neither count the rows of the paired 2x2 table; ratio holds
    (both + only_a) / (both + only_b) with a log-scale Wald interval for paired
    proportions, SE(log ratio) = sqrt((only_a + only_b) / ((both + only_a)(both + only_b)))
    (Agresti & Min), and as p_value McNemar's exact test (mcnemar_exact). When either rate
    is zero, 0.5 is added to every cell of the table first (ratio.corrected).
    """

    both: int
    only_a: int
    only_b: int
    neither: int
    ratio: RateRatio

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither


def paired_ratio(flags_a, flags_b, confidence: float = 0.99) -> PairedRatio:
    """PairedRatio of boolean per-fault outcomes (e.g. SDC flags) of two runs of the very same
    faults, row i of one against row i of the other."""
    a = np.asarray(flags_a, dtype=bool).reshape(-1)
    b = np.asarray(flags_b, dtype=bool).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ConfigError(f"paired outcomes need the same, non-zero number of rows on both "
                          f"sides, got {a.size} and {b.size}")
    z = z_value(confidence)
    both, only_a = int(np.sum(a & b)), int(np.sum(a & ~b))
    only_b, neither = int(np.sum(~a & b)), int(np.sum(~a & ~b))
    p = mcnemar_exact(only_a, only_b)
    n11, n10, n01 = float(both), float(only_a), float(only_b)
    corrected = n11 + n10 == 0 or n11 + n01 == 0
    if corrected:
        n11, n10, n01 = n11 + 0.5, n10 + 0.5, n01 + 0.5
    ratio = (n11 + n10) / (n11 + n01)
    se = math.sqrt((n10 + n01) / ((n11 + n10) * (n11 + n01)))
    rr = RateRatio(ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se), confidence,
                   corrected, p)
    return PairedRatio(both, only_a, only_b, neither, rr)


def stratified_paired_ratio(flags_a, flags_b, keys, sizes: Mapping | None,
                            confidence: float = 0.99) -> PairedRatio:
    """PairedRatio of two runs of the very same faults whose rows come from strata of
    unequal weight (row i's stratum is keys[i]; sizes[key] its fault-space size): the ratio
    of the two stratified rates sum W_h p_h (as stratified_rate), its interval the paired
    log interval on Kish's effective sample size n_eff = 1 / sum W_h^2 / n_h, with each
    cell (both, only a, only b) taken as n_eff times its stratified share. For
    proportional allocation this is exactly paired_ratio; without sizes it is paired_ratio.
    McNemar's exact p is on the pooled discordant pairs: under "no effect" each discordant
    pair is equally likely either way in every stratum, so the pooled test stays exact.
    When a side has less than one effective event (none, or a few in lightly weighted
    strata), 0.5 is added to each effective cell (corrected)."""
    a = np.asarray(flags_a, dtype=bool).reshape(-1)
    b = np.asarray(flags_b, dtype=bool).reshape(-1)
    pooled = paired_ratio(a, b, confidence)
    if not sizes:
        return pooled
    keys = list(keys)
    if len(keys) != a.size:
        raise ConfigError(f"need one stratum key per row, got {len(keys)} for {a.size} rows")
    index: dict = {}
    ids = np.fromiter((index.setdefault(k, len(index)) for k in keys), np.int64, a.size)
    missing = [k for k in index if k not in sizes]
    if missing:
        raise ConfigError(f"rows of stratum {missing[0]} have no fault-space size")
    # (n, both, only a, only b) per stratum
    table = np.stack([np.bincount(ids, c, len(index)) for c in
                      (np.ones(a.size), a & b, a & ~b, ~a & b)], axis=1)
    size = np.array([float(sizes[k]) for k in index])
    w = size / size.sum()
    n = table[:, 0]
    n_eff = 1.0 / float(np.sum(w * w / n))
    n11, n10, n01 = (n_eff * float(np.sum(w * table[:, j] / n)) for j in (1, 2, 3))
    # A side with less than one effective event (a few events in lightly weighted strata)
    # gets the same 0.5 as a side with none: a log interval on a fraction of an event says
    # nothing (with whole counts, below one is none).
    corrected = n11 + n10 < 1 or n11 + n01 < 1
    if corrected:
        n11, n10, n01 = n11 + 0.5, n10 + 0.5, n01 + 0.5
    ratio = (n11 + n10) / (n11 + n01)
    se = math.sqrt((n10 + n01) / ((n11 + n10) * (n11 + n01))) if n10 + n01 > 0 else 0.0
    z = z_value(confidence)
    rr = RateRatio(ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se), confidence,
                   corrected, pooled.ratio.p_value)
    return PairedRatio(pooled.both, pooled.only_a, pooled.only_b, pooled.neither, rr)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in input order.

    Sorted ascending, the i-th smallest (i from 0) becomes max over j <= i of
    min(1, (m - j) p_(j)); reject where the adjusted value is below alpha.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ConfigError(f"p-values must lie in [0, 1], got {p.tolist()!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.maximum.accumulate(adjusted)
    out = np.empty(m)
    out[order] = adjusted
    return out


@dataclass(frozen=True)
class MeanEstimate:
    """Mean of the finite values with an interval; excluded counts the NaN/inf values left out.

    low and high are nan when fewer than two finite values remain; mean is nan with none.
    """

    mean: float
    low: float
    high: float
    std: float
    n: int
    excluded: int
    confidence: float


def _finite(values) -> tuple[np.ndarray, int]:
    arr = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(arr)
    return arr[keep], int(arr.size - keep.sum())


def _mean_from_finite(x: np.ndarray, excluded: int, confidence: float, method: str):
    n = int(x.size)
    if n == 0:
        return MeanEstimate(math.nan, math.nan, math.nan, math.nan, 0, excluded, confidence)
    mean = float(x.mean())
    if n == 1:
        return MeanEstimate(mean, math.nan, math.nan, math.nan, 1, excluded, confidence)
    std = float(x.std(ddof=1))
    if method == "t":
        from scipy.stats import t

        q = float(t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1))
    else:
        q = z_value(confidence)
    half = q * std / math.sqrt(n)
    return MeanEstimate(mean, mean - half, mean + half, std, n, excluded, confidence)


def mean_interval(values, confidence: float = 0.99, method: str = "t") -> MeanEstimate:
    """Mean of the finite values with a Student-t ("t") or normal ("normal") interval."""
    _check_confidence(confidence)
    if method not in ("t", "normal"):
        raise ConfigError(f"unknown interval method {method!r}; choose one of: normal, t")
    x, excluded = _finite(values)
    return _mean_from_finite(x, excluded, confidence, method)


def median_quantiles(values, qs: Sequence[float] = DEFAULT_QUANTILES) -> dict[float, float]:
    """Quantiles of the finite values (linear interpolation, numpy's default); nan if none."""
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ConfigError(f"quantiles must lie in [0, 1], got {tuple(qs)!r}")
    x, _ = _finite(values)
    if x.size == 0:
        return {float(q): math.nan for q in qs}
    return {float(q): float(v) for q, v in zip(qs, np.quantile(x, list(qs)))}


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio of two means with a delta-method interval (nan bounds when not defined)."""

    ratio: float
    low: float
    high: float
    confidence: float


def _ratio_from_moments(m1, s1, n1, m2, s2, n2, confidence) -> RatioEstimate:
    ratio = m1 / m2 if m2 != 0 and math.isfinite(m1) and math.isfinite(m2) else math.nan
    # The log needs both means positive; the variance needs two values a side.
    if not (m1 > 0 and m2 > 0 and n1 >= 2 and n2 >= 2):
        return RatioEstimate(ratio, math.nan, math.nan, confidence)
    se = math.sqrt(s1 * s1 / (n1 * m1 * m1) + s2 * s2 / (n2 * m2 * m2))
    z = z_value(confidence)
    return RatioEstimate(ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se), confidence)


def ratio_of_means(values1, values2, confidence: float = 0.99) -> RatioEstimate:
    """mean(values1) / mean(values2) over finite values, for comparing mean delta-loss.

    Delta method on the log ratio of two independent samples:
    Var(log R) ~= s1^2 / (n1 m1^2) + s2^2 / (n2 m2^2), interval R * exp(+-z se).
    The interval is nan unless both means are positive and each side has >= 2 values.
    """
    _check_confidence(confidence)
    a = mean_interval(values1, confidence)
    b = mean_interval(values2, confidence)
    return _ratio_from_moments(a.mean, a.std, a.n, b.mean, b.std, b.n, confidence)


@dataclass(frozen=True)
class GroupSummary:
    """Outcome statistics of one group of campaign rows (e.g. one layer)."""

    key: tuple
    n: int
    sdc: RateEstimate
    due: RateEstimate
    delta_loss: MeanEstimate
    delta_loss_quantiles: dict[float, float]


OVERALL = "(all)"
STRATUM = ("layer", "field")


@dataclass(frozen=True)
class Strata:
    """A campaign's counts per (layer, field) stratum with each stratum's fault-space size.

    Only strata with injected rows are held; exhaustive is True when every fault of each
    stratum was injected once (`--n all`), so its rates carry no sampling error.
    """

    keys: tuple[tuple, ...]
    size: np.ndarray
    n: np.ndarray
    sdc: np.ndarray
    due: np.ndarray
    exhaustive: bool = False

    def select(self, keys) -> Strata:
        """The strata whose key is in `keys`, in this object's order."""
        wanted = set(keys)
        idx = [i for i, key in enumerate(self.keys) if key in wanted]
        return Strata(tuple(self.keys[i] for i in idx), self.size[idx], self.n[idx],
                      self.sdc[idx], self.due[idx], self.exhaustive)

    def estimate(self, outcome: str, confidence: float, interval: str = "kish") -> RateEstimate:
        """The stratified fault-space-average rate of outcome "sdc" or "due", with the
        interval of `interval` (INTERVALS: "kish" stratified_rate, "effective"
        effective_rate)."""
        rate = effective_rate if _choose_interval(interval) == "effective" else stratified_rate
        return rate(getattr(self, outcome), self.n, self.size, confidence, self.exhaustive)


# How summaries of stratified rows compute intervals: "kish" (proportional allocation:
# groups pool their rows, the overall rate is stratified_rate) or "effective" (any
# allocation: every group with a layer is stratified too, by effective_rate).
INTERVALS = ("kish", "effective")


def _choose_interval(interval: str) -> str:
    if interval not in INTERVALS:
        raise ConfigError(f"unknown interval {interval!r}; choose one of: {', '.join(INTERVALS)}")
    return interval


def _strata(cols: dict, sdc, due, sizes: Mapping, exhaustive: bool) -> Strata:
    layer, field_ = cols["layer"], cols["field"]
    counts: dict[tuple, list[int]] = {}
    for lay, fld, s, d in zip(layer.tolist(), field_.tolist(), sdc.tolist(), due.tolist()):
        c = counts.setdefault((lay, fld), [0, 0, 0])
        c[0] += 1
        c[1] += s
        c[2] += d
    unknown_ = [key for key in counts if key not in sizes]
    if unknown_:
        raise ConfigError(f"rows of stratum {unknown_[0]} have no fault-space size; give sizes "
                          "for every (layer, field) that has rows")
    keys = tuple(key for key in sizes if key in counts)
    return Strata(
        keys,
        np.array([sizes[key] for key in keys], dtype=np.float64),
        np.array([counts[key][0] for key in keys], dtype=np.int64),
        np.array([counts[key][1] for key in keys], dtype=np.int64),
        np.array([counts[key][2] for key in keys], dtype=np.int64),
        bool(exhaustive),
    )


@dataclass(frozen=True)
class Summary:
    """Per-group summaries in order of first appearance, plus one over all rows.

    With strata (fault-space sizes given to summarise), the overall SDC and DUE rates are
    stratified estimates of the fault-space-average rate; without, they pool the rows.
    """

    by: tuple[str, ...]
    confidence: float
    groups: dict[tuple, GroupSummary]
    overall: GroupSummary
    qs: tuple[float, ...] = field(default=DEFAULT_QUANTILES)
    strata: Strata | None = None
    # How its stratified intervals were computed (INTERVALS); comparisons use the same.
    interval: str = "kish"

    def rows(self) -> list[GroupSummary]:
        """Group rows followed by the overall row (whose key is OVERALL in every column)."""
        return [*self.groups.values(), self.overall]

    def to_table(self):
        """A flat pyarrow Table, one row per group and a last overall row, for reports."""
        import pyarrow as pa

        cols: dict[str, list] = {name: [] for name in self.by}
        for g in self.rows():
            for name, value in zip(self.by, g.key):
                cols[name].append(value)
            flat = {"n": g.n}
            for tag, r in (("sdc", g.sdc), ("due", g.due)):
                flat.update({f"{tag}_k": r.k, f"{tag}_rate": r.rate, f"{tag}_low": r.low,
                             f"{tag}_high": r.high})
            m = g.delta_loss
            flat.update({"delta_loss_mean": m.mean, "delta_loss_low": m.low,
                         "delta_loss_high": m.high, "delta_loss_excluded": m.excluded})
            for q, v in g.delta_loss_quantiles.items():
                flat[f"delta_loss_q{round(q * 100):02d}"] = v
            for name, value in flat.items():
                cols.setdefault(name, []).append(value)
        return pa.table(cols)


def _columns(table, names: Sequence[str]) -> dict[str, np.ndarray]:
    available = list(table.column_names) if hasattr(table, "column_names") else list(table)
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"campaign rows lack column(s) {', '.join(missing)}; "
            f"available: {', '.join(available) or '(none)'}"
        )
    # pyarrow columns turn into numpy (strings as object arrays); lists pass through.
    return {
        name: np.asarray(table[name].to_numpy() if hasattr(table[name], "to_numpy")
                         else table[name])
        for name in names
    }


def _group_summary(key, sdc, due, dloss, confidence, qs) -> GroupSummary:
    n = int(sdc.size)
    x, excluded = _finite(dloss)
    return GroupSummary(
        key=key,
        n=n,
        sdc=rate_estimate(int(np.count_nonzero(sdc)), n, confidence),
        due=rate_estimate(int(np.count_nonzero(due)), n, confidence),
        delta_loss=_mean_from_finite(x, excluded, confidence, "t"),
        delta_loss_quantiles=median_quantiles(x, qs),
    )


def summarise(
    table,
    by: Sequence[str] = ("layer",),
    confidence: float = 0.99,
    qs: Sequence[float] = DEFAULT_QUANTILES,
    sizes: Mapping[tuple, int] | None = None,
    exhaustive: bool = False,
    interval: str = "kish",
) -> Summary:
    """Summarise campaign rows (a pyarrow Table or a dict of columns) per group.

    Needs the columns in `by` (without missing values) plus sdc (bool), due (bool) and
    delta_loss (float). Groups come in order of first appearance.
    Rates get Wilson intervals; delta-loss gets a t interval over its finite values.
    `sizes` maps each (layer, field) stratum to its fault-space size (needs the layer and
    field columns): the overall SDC and DUE rates are then stratified_rate estimates, and
    group rates stay pooled within the group. interval="effective" (an adaptive design,
    whose allocation is not proportional) stratifies the group rates of groups that hold
    the layer column as well, and gives every stratified rate effective_rate's interval.
    """
    _check_confidence(confidence)
    _choose_interval(interval)
    per_group = interval == "effective" and sizes is not None and "layer" in by
    by = tuple(by)
    extra = tuple(c for c in STRATUM if c not in by) if sizes is not None else ()
    cols = _columns(table, (*by, *extra, "sdc", "due", "delta_loss"))
    sdc = cols["sdc"].astype(bool)
    due = cols["due"].astype(bool)
    dloss = cols["delta_loss"].astype(np.float64)
    qs = tuple(float(q) for q in qs)
    groups: dict[tuple, GroupSummary] = {}
    if by and sdc.size:
        codes = np.zeros(sdc.size, dtype=np.int64)
        for name in by:
            _, inverse = np.unique(cols[name], return_inverse=True)
            codes = codes * (int(inverse.max()) + 1) + inverse.ravel()
        # Stable sort keeps rows of a group in order and first-seen groups first.
        order = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], order.size]))
        bounds.sort(key=lambda b: order[b[0]])
        for lo, hi in bounds:
            rows = order[lo:hi]
            key = tuple(_plain(cols[name][rows[0]]) for name in by)
            group = _group_summary(key, sdc[rows], due[rows], dloss[rows], confidence, qs)
            if per_group:
                mine = _strata({name: cols[name][rows] for name in STRATUM}, sdc[rows],
                               due[rows], sizes, exhaustive)
                group = dataclasses.replace(group, sdc=mine.estimate("sdc", confidence, interval),
                                            due=mine.estimate("due", confidence, interval))
            groups[key] = group
    overall = _group_summary((OVERALL,) * len(by), sdc, due, dloss, confidence, qs)
    strata = None
    if sizes is not None:
        strata = _strata(cols, sdc, due, sizes, exhaustive)
        if strata.keys:
            overall = dataclasses.replace(
                overall, sdc=strata.estimate("sdc", confidence, interval),
                due=strata.estimate("due", confidence, interval))
    return Summary(by, confidence, groups, overall, qs, strata, interval)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class GroupComparison:
    """Model a against model b on one matched group: ratios are a / b."""

    key: tuple
    n_a: int
    n_b: int
    sdc: RateRatio
    delta_loss: RatioEstimate
    due: RateRatio | None = None


@dataclass(frozen=True)
class Comparison:
    """Matched-group comparisons, the overall one, and the keys found on one side only.

    overall compares the two models over the matched groups only (and, with strata, over
    the strata both have rows in): overall_a and overall_b are those like-for-like rates.
    """

    by: tuple[str, ...]
    confidence: float
    groups: dict[tuple, GroupComparison]
    overall: GroupComparison
    only_a: list[tuple]
    only_b: list[tuple]
    overall_a: GroupSummary | None = None
    overall_b: GroupSummary | None = None

    def holm_sdc(self) -> dict[tuple, float]:
        """Per matched group, the Holm-adjusted p-value of its SDC ratio test among this
        comparison's groups (a test without a p-value counts as p = 1)."""
        keys = list(self.groups)
        pvals = [self.groups[k].sdc.p_value for k in keys]
        adjusted = holm([1.0 if math.isnan(p) else p for p in pvals]) if keys else []
        return {k: float(q) for k, q in zip(keys, adjusted)}


def _compare_groups(key, a: GroupSummary, b: GroupSummary, confidence) -> GroupComparison:
    ma, mb = a.delta_loss, b.delta_loss
    return GroupComparison(
        key=key,
        n_a=a.n,
        n_b=b.n,
        sdc=estimate_ratio(a.sdc, b.sdc, confidence),
        delta_loss=_ratio_from_moments(ma.mean, ma.std, ma.n, mb.mean, mb.std, mb.n, confidence),
        due=estimate_ratio(a.due, b.due, confidence),
    )


def _relabel_key(key: tuple, pos: int, last_name: str | None) -> tuple:
    if last_name is not None and key[pos] == last_name:
        return (*key[:pos], "last", *key[pos + 1:])
    return key


def _relabel(summary: Summary, last_name: str | None) -> dict[tuple, GroupSummary]:
    if last_name is None:
        return dict(summary.groups)
    pos = summary.by.index("layer")
    return {_relabel_key(key, pos, last_name): g for key, g in summary.groups.items()}


def _pooled_mean(parts: Sequence[MeanEstimate], confidence: float) -> MeanEstimate:
    """The mean and t interval of the union of groups, from each group's mean, std and n."""
    parts = [m for m in parts if m.n > 0]
    n = sum(m.n for m in parts)
    excluded = sum(m.excluded for m in parts)
    if n == 0:
        return MeanEstimate(math.nan, math.nan, math.nan, math.nan, 0, excluded, confidence)
    mean = sum(m.n * m.mean for m in parts) / n
    if n == 1:
        return MeanEstimate(mean, math.nan, math.nan, math.nan, 1, excluded, confidence)
    ss = sum((m.n - 1) * (m.std * m.std if m.n > 1 else 0.0) + m.n * (m.mean - mean) ** 2
             for m in parts)
    std = math.sqrt(ss / (n - 1))
    from scipy.stats import t

    half = float(t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return MeanEstimate(mean, mean - half, mean + half, std, n, excluded, confidence)


def _matched_overall(summary: Summary, groups: dict, matched: list, strata: Strata | None,
                     confidence: float) -> GroupSummary:
    """The overall row of `summary` restricted to the matched groups (and strata)."""
    parts = [groups[key] for key in matched]
    n = sum(g.n for g in parts)
    if strata is not None and strata.keys:
        sdc = strata.estimate("sdc", confidence, summary.interval)
        due = strata.estimate("due", confidence, summary.interval)
    else:
        k_sdc, k_due = sum(g.sdc.k for g in parts), sum(g.due.k for g in parts)
        sdc, due = rate_estimate(k_sdc, n, confidence), rate_estimate(k_due, n, confidence)
    return GroupSummary(summary.overall.key, n, sdc, due,
                        _pooled_mean([g.delta_loss for g in parts], confidence),
                        summary.overall.delta_loss_quantiles)


def compare(
    summary_a: Summary,
    summary_b: Summary,
    confidence: float | None = None,
    last_layer: tuple[str, str] | None = None,
) -> Comparison:
    """Compare two campaigns group by group: SDC and DUE rate ratios, mean delta-loss ratio a / b.

    A ratio above 1 means b has the lower rate (b improves on a). Groups match by key, so
    layers match by name; `last_layer=(name_in_a, name_in_b)` relabels each model's
    classification layer as "last" so the two heads match. The overall comparison uses only
    the matched groups; when both summaries carry strata it compares their stratified
    fault-space-average rates over the (layer, field) strata both sides have rows in
    (estimate_ratio), otherwise the pooled rows of the matched groups (Katz).
    """
    if summary_a.by != summary_b.by:
        raise ConfigError(
            f"summaries are grouped differently ({summary_a.by} vs {summary_b.by}); "
            "summarise both with the same `by`"
        )
    if last_layer is not None and "layer" not in summary_a.by:
        raise ConfigError("last_layer needs summaries grouped by 'layer'; add it to `by`")
    confidence = summary_a.confidence if confidence is None else _check_confidence(confidence)
    name_a, name_b = last_layer if last_layer is not None else (None, None)
    groups_a = _relabel(summary_a, name_a)
    groups_b = _relabel(summary_b, name_b)
    matched_keys = [key for key in groups_a if key in groups_b]
    matched = {key: _compare_groups(key, groups_a[key], groups_b[key], confidence)
               for key in matched_keys}
    strata_a = strata_b = None
    if summary_a.strata is not None and summary_b.strata is not None and "layer" in summary_a.by:
        pos = summary_a.by.index("layer")
        layers = {key[pos] for key in matched_keys}

        def relabelled(strata: Strata, last_name) -> Strata:
            keys = tuple(_relabel_key(key, 0, last_name) for key in strata.keys)
            return dataclasses.replace(strata, keys=keys)

        ra, rb = relabelled(summary_a.strata, name_a), relabelled(summary_b.strata, name_b)
        common = [key for key in ra.keys if key[0] in layers and key in set(rb.keys)]
        strata_a, strata_b = ra.select(common), rb.select(common)
    overall_a = _matched_overall(summary_a, groups_a, matched_keys, strata_a, confidence)
    overall_b = _matched_overall(summary_b, groups_b, matched_keys, strata_b, confidence)
    if overall_a.n and overall_b.n:
        overall = _compare_groups(summary_a.overall.key, overall_a, overall_b, confidence)
    else:
        nan = RateRatio(math.nan, math.nan, math.nan, confidence, False, math.nan)
        overall = GroupComparison(summary_a.overall.key, overall_a.n, overall_b.n, nan,
                                  RatioEstimate(math.nan, math.nan, math.nan, confidence), nan)
    return Comparison(
        by=summary_a.by,
        confidence=confidence,
        groups=matched,
        overall=overall,
        only_a=[key for key in groups_a if key not in groups_b],
        only_b=[key for key in groups_b if key not in groups_a],
        overall_a=overall_a,
        overall_b=overall_b,
    )
