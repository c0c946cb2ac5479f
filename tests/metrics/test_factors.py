"""The improvement factor under each definition, checked against hand computations."""

import math

import numpy as np
import pytest

from flipsafe.errors import ConfigError
from flipsafe.metrics.factors import (
    Factor,
    FactorTable,
    OutlierEffect,
    bootstrap_median_ratio,
    improvement_factors,
)
from flipsafe.metrics.stats import RateEstimate, stratified_rate
from flipsafe.report.tables import factor_reading

Z99 = 2.5758293035489004
T, F = True, False
NAN, INF = float("nan"), float("inf")


def log_interval(ratio, se, z=Z99):
    return ratio * math.exp(-z * se), ratio * math.exp(z * se)


def mean_sd(x):
    m = sum(x) / len(x)
    return m, math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


# Ten rows a side. a: 4 SDCs, two rows whose corrupted value was NaN/Inf (one of them an
# SDC after clamping), a NaN and an inf delta loss; b: 2 SDCs, all finite.
A = {
    "sdc": [T, T, T, T, F, F, F, F, F, F],
    "nonfinite": [T, F, F, F, T, F, F, F, F, F],
    "delta_loss": [3.0, 2.0, 4.0, INF, NAN, 0.5, 0.25, 1.0, 0.75, 0.5],
    "golden_top2diff": [10.0, 20.0, 30.0, NAN, 90.0, 80.0, 70.0, 60.0, 50.0, 40.0],
}
B = {
    "sdc": [T, T, F, F, F, F, F, F, F, F],
    "nonfinite": [F] * 10,
    "delta_loss": [1.0, 2.0, 0.5, 0.25, 0.25, 0.5, 0.125, 0.25, 0.5, 1.0],
    "golden_top2diff": [5.0, 15.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0],
}
A_DL = [3.0, 2.0, 4.0, 0.5, 0.25, 1.0, 0.75, 0.5]  # finite values of A's delta loss
B_DL = B["delta_loss"]


@pytest.fixture(scope="module")
def table():
    return improvement_factors(A, B, 0.99, resamples=400, seed=7)


def test_sdc_rate_factor_is_katz_on_the_pooled_rows(table):
    f = table["sdc_rate"]
    assert (f.a, f.b, f.n_a, f.n_b) == (0.4, 0.2, 10, 10)
    assert f.ratio == pytest.approx(2.0)
    low, high = log_interval(2.0, math.sqrt(1 / 4 - 1 / 10 + 1 / 2 - 1 / 10))
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))
    assert f.method == "Katz" and f.position == "includes 1"


def test_sdc_rate_factor_uses_the_comparisons_stratified_rates():
    # Two strata of sizes 3:1 on side a, one stratum on side b.
    ra = stratified_rate([2, 1], [10, 10], [300, 100])
    rb = stratified_rate([5], [20], [100])
    f = improvement_factors(A, B, sdc=(ra, rb))["sdc_rate"]
    pa_ = 0.75 * 0.2 + 0.25 * 0.1
    va = pa_ * (1 - pa_) * (0.75 ** 2 / 10 + 0.25 ** 2 / 10)  # p (1 - p) / Kish n_eff
    pb, vb = 0.25, 0.25 * 0.75 / 20
    assert f.ratio == pytest.approx(pa_ / pb)
    low, high = log_interval(pa_ / pb, math.sqrt(va / pa_ ** 2 + vb / pb ** 2))
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))
    assert f.method == "stratified, delta method"


def test_mismatch_drops_non_finite_rows_from_the_denominator(table):
    f = table["mismatch_finite"]
    # a: 3 SDCs among its 8 finite rows; b: 2 of 10.
    assert (f.n_a, f.n_b) == (8, 10)
    assert (f.a, f.b) == (pytest.approx(3 / 8), pytest.approx(2 / 10))
    assert f.ratio == pytest.approx(1.875)
    low, high = log_interval(1.875, math.sqrt(1 / 3 - 1 / 8 + 1 / 2 - 1 / 10))
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))


def test_mean_delta_loss_over_finite_values_with_delta_method(table):
    f = table["mean_delta_loss"]
    ma, sa = mean_sd(A_DL)
    mb, sb = mean_sd(B_DL)
    assert (f.n_a, f.n_b) == (8, 10)
    assert (f.a, f.b, f.ratio) == (pytest.approx(ma), pytest.approx(mb), pytest.approx(ma / mb))
    se = math.sqrt(sa ** 2 / (8 * ma ** 2) + sb ** 2 / (10 * mb ** 2))
    low, high = log_interval(ma / mb, se)
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))
    assert f.method == "delta method"


def test_median_delta_loss_with_a_seeded_bootstrap(table):
    f = table["median_delta_loss"]
    # Sorted finite a: .25 .5 .5 .75 1 2 3 4 -> (0.75 + 1) / 2; b: 0.5 (middle two 0.5, 0.5).
    assert (f.a, f.b, f.ratio) == (0.875, 0.5, 1.75)
    assert (f.low, f.high) == bootstrap_median_ratio(A_DL, B_DL, 0.99, 400, 7)
    assert f.method == "percentile bootstrap, 400 resamples, seed 7"


def test_golden_top2diff_of_the_sdc_images(table):
    f = table["sdc_golden_top2diff"]
    # a's SDC rows have golden top2diff 10, 20, 30 and NaN (left out); b's 5 and 15.
    assert (f.n_a, f.n_b) == (3, 2)
    assert (f.a, f.b, f.ratio) == (pytest.approx(20.0), pytest.approx(10.0), pytest.approx(2.0))
    se = math.sqrt(10.0 ** 2 / (3 * 20.0 ** 2) + math.sqrt(50) ** 2 / (2 * 10.0 ** 2))
    low, high = log_interval(2.0, se)
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))


def test_factors_come_in_table_order(table):
    assert [f.key for f in table.factors] == [
        "sdc_rate", "mismatch_finite", "mean_delta_loss", "median_delta_loss",
        "sdc_golden_top2diff"]


def test_outlier_drives_the_mean_factor_against_the_sdc_factor():
    # a has half b's SDC rate, but one exponent flip gave it a 1e30 delta loss.
    n = 200
    sdc_a = [i < 10 for i in range(n)]
    sdc_b = [i < 20 for i in range(n)]
    dl_a = [0.01 * (1 + i % 5) for i in range(n - 1)] + [1e30]
    dl_b = [0.01 * (1 + i % 5) for i in range(n)]

    def rows(sdc, dl):
        return {"sdc": sdc, "nonfinite": [F] * n, "delta_loss": dl, "golden_top2diff": [50.0] * n}

    t = improvement_factors(rows(sdc_a, dl_a), rows(sdc_b, dl_b), resamples=200)
    sdc, mean = t["sdc_rate"], t["mean_delta_loss"]
    assert sdc.ratio == pytest.approx(0.5) and sdc.position == "includes 1"
    ma, mb = sum(dl_a) / n, sum(dl_b) / n
    assert mean.ratio == pytest.approx(ma / mb) and mean.ratio / sdc.ratio > 1e25
    assert mean.position == "above 1"
    # Without a's largest value the mean factor falls back to about 1 (below, in fact).
    o_a = next(o for o in t.outliers if o.side == "a")
    assert o_a.removed == 1e30
    assert o_a.ratio == pytest.approx((sum(dl_a[:-1]) / (n - 1)) / mb)
    assert o_a.moves > 1e25 and o_a.drives and o_a.flips
    o_b = next(o for o in t.outliers if o.side == "b")
    assert o_b.removed == 0.05 and not o_b.drives
    reading = factor_reading(t, "base", "text")
    assert "the definitions disagree" in reading
    assert "lies above 1 by mean |dLoss|" in reading
    assert "includes 1 by SDC rate, mismatch (non-finite dropped)" in reading
    assert ("the mean-|dLoss| factor changes by more than 10x and crosses 1 (1.67e+29x to "
            "0.997x) if the single largest |dLoss| (1.00e+30, base) is removed") in reading


def test_bootstrap_matches_a_direct_numpy_percentile_computation():
    rng = np.random.default_rng(1)
    for nx, ny in ((7, 8), (8, 7), (1, 3)):
        x, y = rng.lognormal(0, 1, nx), rng.lognormal(0, 1, ny)
        got = bootstrap_median_ratio(x, y, confidence=0.95, resamples=500, seed=3)
        direct = np.random.default_rng(3)
        mx = np.median(np.sort(x)[direct.integers(0, nx, (500, nx))], axis=1)
        my = np.median(np.sort(y)[direct.integers(0, ny, (500, ny))], axis=1)
        want = np.percentile(mx / my, [2.5, 97.5])
        assert got == (want[0], want[1])


def test_bootstrap_is_deterministic_for_a_seed_and_resampling_in_blocks():
    rng = np.random.default_rng(2)
    x, y = rng.lognormal(0, 1, 50), rng.lognormal(0, 1, 60)
    once = bootstrap_median_ratio(x, y, resamples=300, seed=5)
    assert bootstrap_median_ratio(x, y, resamples=300, seed=5) == once
    assert bootstrap_median_ratio(x, y, resamples=300, seed=6) != once
    # Small blocks (as for large samples) are deterministic too and agree closely.
    blocks = bootstrap_median_ratio(x, y, resamples=300, seed=5, chunk=600)
    assert blocks == bootstrap_median_ratio(x, y, resamples=300, seed=5, chunk=600)
    assert blocks == pytest.approx(once, rel=0.5)


def test_bootstrap_with_zero_medians():
    # b's resampled median is 0 unless two of its three draws are the 1: ratio inf.
    low, high = bootstrap_median_ratio([1.0, 1.0, 1.0], [0.0, 0.0, 1.0], resamples=2000)
    assert (low, high) == (1.0, INF)
    assert all(math.isnan(v) for v in bootstrap_median_ratio([0.0, 0.0], [0.0, 0.0]))
    assert all(math.isnan(v) for v in bootstrap_median_ratio([], [1.0]))
    with pytest.raises(ConfigError):
        bootstrap_median_ratio([1.0], [1.0], resamples=1)


def test_sides_without_values_give_undefined_factors():
    empty = {"sdc": [], "nonfinite": [], "delta_loss": [], "golden_top2diff": []}
    t = improvement_factors(A, empty)
    assert all(f.position == "undefined" for f in t.factors)
    assert t.outliers == ()
    assert factor_reading(t, "a", "b").startswith(
        "Reading (above 1: b has fewer or smaller): no factor is defined")


def _factor(key, ratio, low, high):
    return Factor(key, key, 1.0, 1.0, 10, 10, ratio, low, high, "Katz")


@pytest.mark.parametrize("low, high, position", [
    (1.2, 3.0, "above 1"), (0.1, 0.9, "below 1"), (0.5, 2.0, "includes 1"),
    (1.0, 2.0, "includes 1"), (NAN, NAN, "undefined"), (3.0, INF, "above 1"),
])
def test_position_follows_the_interval(low, high, position):
    assert _factor("sdc_rate", 1.5, low, high).position == position


KEYS = ("sdc_rate", "mismatch_finite", "mean_delta_loss", "median_delta_loss",
        "sdc_golden_top2diff")


def _table(intervals, outliers=()):
    factors = tuple(_factor(k, (lo + hi) / 2 if math.isfinite(lo) else NAN, lo, hi)
                    for k, (lo, hi) in zip(KEYS, intervals))
    return FactorTable(factors, tuple(outliers), 0.99, 2000, 0)


def test_reading_says_every_definition_agrees():
    t = _table([(1.5, 3.0)] * 5, [OutlierEffect("a", 9.0, 2.1, 2.25),
                                  OutlierEffect("b", 4.0, 2.4, 2.25)])
    assert factor_reading(t, "base", "tg") == (
        "Reading (above 1: tg has fewer or smaller): every definition agrees: the interval "
        "lies above 1; no single |dLoss| drives the mean-|dLoss| factor (removing either "
        "side's largest moves it by less than 10x and not across 1).")


def test_reading_groups_disagreeing_definitions_and_names_a_flip():
    t = _table([(0.5, 2.0), (0.4, 0.9), (1.1, 3.0), (NAN, NAN), (0.5, 2.0)],
               [OutlierEffect("a", 9.0, 2.0, 2.05), OutlierEffect("b", 40.0, 0.5, 2.05)])
    assert factor_reading(t, "base", "tg") == (
        "Reading (above 1: tg has fewer or smaller): the definitions disagree: the interval "
        "lies above 1 by mean |dLoss|; includes 1 by SDC rate and SDC images' golden "
        "top2diff; lies below 1 by mismatch (non-finite dropped); is undefined by median "
        "|dLoss|; the mean-|dLoss| factor crosses 1 (2.05x to 0.500x) if the single largest "
        "|dLoss| (40, tg) is removed.")


def test_reading_with_one_defined_position_and_undefined_ones():
    t = _table([(0.1, 0.5), (0.1, 0.5), (0.2, 0.6), (NAN, NAN), (NAN, NAN)],
               [OutlierEffect("a", 9.0, 0.3, 0.35)])
    reading = factor_reading(t, "base", "tg")
    assert ("the defined factors agree: the interval lies below 1 by SDC rate, mismatch "
            "(non-finite dropped) and mean |dLoss|; is undefined by median |dLoss| and SDC "
            "images' golden top2diff;") in reading


def test_outlier_effect_moves_and_flips():
    assert OutlierEffect("a", 1.0, 20.0, 1.5).moves == pytest.approx(20.0 / 1.5)
    assert OutlierEffect("a", 1.0, 0.1, 2.0).moves == pytest.approx(20.0)
    assert OutlierEffect("a", 1.0, 0.1, 2.0).flips
    assert not OutlierEffect("a", 1.0, 5.0, 2.0).drives
    assert OutlierEffect("a", 1.0, 25.0, 2.0).drives
    assert OutlierEffect("a", 1.0, 5.0, INF).drives
    assert math.isnan(OutlierEffect("a", 1.0, NAN, 2.0).moves)


def test_rows_without_a_needed_column_are_refused():
    with pytest.raises(ConfigError, match="nonfinite"):
        improvement_factors({k: v for k, v in A.items() if k != "nonfinite"}, B)


def test_rate_estimates_are_used_as_given():
    ra = RateEstimate(3, 10, 0.3, 0.1, 0.6, 0.99, "wilson", 0.3 * 0.7 / 10)
    rb = RateEstimate(1, 10, 0.1, 0.01, 0.4, 0.99, "wilson", 0.1 * 0.9 / 10)
    f = improvement_factors(A, B, sdc=(ra, rb))["sdc_rate"]
    low, high = log_interval(3.0, math.sqrt(1 / 3 - 1 / 10 + 1 / 1 - 1 / 10))
    assert f.ratio == pytest.approx(3.0) and f.method == "Katz"
    assert (f.low, f.high) == (pytest.approx(low), pytest.approx(high))


def test_reading_when_the_mean_factor_cannot_be_checked():
    one = {"sdc": [T], "nonfinite": [F], "delta_loss": [1.0], "golden_top2diff": [50.0]}
    t = improvement_factors(A, one)
    assert len(t.outliers) == 1  # only a has two values to remove one from
    assert factor_reading(t, "a", "b").endswith(
        "too few |dLoss| values to check the mean-|dLoss| factor for outliers.")
    zero = {**one, "delta_loss": [0.0]}
    assert factor_reading(improvement_factors(A, zero), "a", "b").endswith(
        "the mean-|dLoss| factor is not a finite number.")


def test_a_side_without_sdc_gets_the_corrected_katz_interval():
    none = {**B, "sdc": [F] * 10}
    f = improvement_factors(A, none)["mismatch_finite"]
    # Haldane-Anscombe: 3.5 of 9 against 0.5 of 11.
    ratio = (3.5 / 9) / (0.5 / 11)
    low, high = log_interval(ratio, math.sqrt(1 / 3.5 - 1 / 9 + 1 / 0.5 - 1 / 11))
    assert (f.ratio, f.low, f.high) == (pytest.approx(ratio), pytest.approx(low),
                                        pytest.approx(high))
    assert f.method == "Katz (0.5 added to each count: a side had none)"
