"""Intervals, sample sizes and summaries checked against hand-worked values."""

import math

import numpy as np
import pyarrow as pa
import pytest

from flipsafe.errors import ConfigError, FlipsafeError
from flipsafe.metrics import (
    OVERALL,
    clopper_pearson_interval,
    compare,
    mean_interval,
    median_quantiles,
    rate_ratio,
    ratio_of_means,
    sample_size,
    summarise,
    wilson_interval,
)

# Two-sided normal quantiles from printed tables: 95 % -> 1.959964, 99 % -> 2.575829.
Z95 = 1.959964
Z99 = 2.575829


def test_wilson_matches_textbook_values():
    # 5/10 at 95 %: z^2/n = 0.3841459, centre 0.5,
    # half = z / 1.3841459 * sqrt(0.025 + 0.3841459 / 40) = 1.416009 * 0.186020 = 0.263407.
    low, high = wilson_interval(5, 10, 0.95)
    assert low == pytest.approx(0.236593, abs=1e-5)
    assert high == pytest.approx(0.763407, abs=1e-5)
    # 0/10 at 95 %: upper = (z^2/n) / (1 + z^2/n) = 0.3841459 / 1.3841459; lower exactly 0.
    low, high = wilson_interval(0, 10, 0.95)
    assert low == 0.0
    assert high == pytest.approx(0.3841459 / 1.3841459, abs=1e-6)


def test_wilson_bounds_solve_the_score_equation():
    # By definition each bound p satisfies (phat - p)^2 = z^2 p (1 - p) / n.
    k, n = 81, 263
    for bound in wilson_interval(k, n, 0.99):
        assert (k / n - bound) ** 2 == pytest.approx(Z99**2 * bound * (1 - bound) / n, rel=1e-5)


def test_wilson_edges_and_arrays():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(7, 7, 0.95)[1] == 1.0
    # 7/7 at 95 % is the mirror image of 0/7.
    assert wilson_interval(7, 7, 0.95)[0] == pytest.approx(1 - wilson_interval(0, 7, 0.95)[1])
    low, high = wilson_interval(np.array([5, 0, 0]), np.array([10, 10, 0]), 0.95)
    assert low == pytest.approx([0.236593, 0.0, 0.0], abs=1e-5)
    assert high == pytest.approx([0.763407, 0.277533, 1.0], abs=1e-5)


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5)])
def test_wilson_rejects_impossible_counts(k, n):
    with pytest.raises(ConfigError, match="0 <= k <= n"):
        wilson_interval(k, n)


def test_clopper_pearson_closed_forms():
    # 1/2: the beta quantiles have closed forms, Beta(1,2): 1 - sqrt(1 - q), Beta(2,1): sqrt(q).
    low, high = clopper_pearson_interval(1, 2, 0.95)
    assert low == pytest.approx(1 - math.sqrt(0.975), abs=1e-9)  # 0.012579
    assert high == pytest.approx(math.sqrt(0.975), abs=1e-9)  # 0.987421
    # 0/10 at 99 %: upper = 1 - 0.005^(1/10) = 0.411296; 10/10: lower = 0.005^(1/10) = 0.588704.
    assert clopper_pearson_interval(0, 10, 0.99) == pytest.approx((0.0, 0.411296), abs=1e-6)
    assert clopper_pearson_interval(10, 10, 0.99) == pytest.approx((0.588704, 1.0), abs=1e-6)
    assert clopper_pearson_interval(0, 0, 0.99) == (0.0, 1.0)


def test_sample_size_leveugle_table():
    # t^2 p (1 - p) / e^2: 1.959964^2 / 4 / 0.05^2 = 384.15 -> 385,
    # / 0.01^2 = 9603.6 -> 9604; 2.575829^2 / 4 / 0.01^2 = 16587.2 -> 16588.
    assert sample_size(0.95, 0.05) == 385
    assert sample_size(0.95, 0.01) == 9604
    assert sample_size(0.99, 0.01) == 16588
    # Tables rounding t to 2.576 get 2.576^2 / 4 / 0.0001 = 16589.4 -> 16,590.
    assert sample_size(0.99, 0.01, t=2.576) == 16590
    # A population of 10^12 is effectively infinite.
    assert sample_size(0.99, 0.01, population=10**12) == 16588


def test_sample_size_small_population():
    # N = 1000, 95 %, +-5 %: 1000 / (1 + 0.0025 * 999 / 0.960365) = 1000 / 3.600574 = 277.7 -> 278.
    assert sample_size(0.95, 0.05, population=1000) == 278
    # N = 3200, 99 %, +-1 %: 3200 / (1 + 0.0001 * 3199 / 1.658724) = 3200 / 1.192858 -> 2683.
    assert sample_size(0.99, 0.01, population=3200) == 2683
    assert sample_size(0.99, 0.01, population=1) == 1
    assert sample_size(0.99, 0.01, population=0) == 0
    # p = 0.1: 1.959964^2 * 0.09 / 0.0025 = 138.3 -> 139.
    assert sample_size(0.95, 0.05, p=0.1) == 139


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"confidence": 1.0, "margin": 0.01}, "confidence"),
        ({"confidence": 0.99, "margin": 0.0}, "margin"),
        ({"confidence": 0.99, "margin": 0.01, "p": 1.0}, "p must"),
        ({"confidence": 0.99, "margin": 0.01, "population": -3}, "population"),
    ],
)
def test_sample_size_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sample_size(**kwargs)


def test_rate_ratio_katz():
    # 20/100 vs 10/100: RR = 2, se = sqrt(1/20 - 1/100 + 1/10 - 1/100) = sqrt(0.13) = 0.360555,
    # 95 %: 2 * exp(-+1.959964 * 0.360555) = 2 * exp(-+0.706675) = 0.986563, 4.054479.
    rr = rate_ratio(20, 100, 10, 100, 0.95)
    assert rr.ratio == pytest.approx(2.0)
    assert rr.low == pytest.approx(0.986563, abs=1e-5)
    assert rr.high == pytest.approx(4.054479, abs=1e-5)
    assert not rr.corrected


def test_rate_ratio_zero_count_correction():
    # 0/50 vs 5/50 -> 0.5/51 vs 5.5/51: RR = 0.5 / 5.5 = 0.090909,
    # se = sqrt(1/0.5 - 1/51 + 1/5.5 - 1/51) = sqrt(2.142602) = 1.463763,
    # 95 %: 0.090909 * exp(-+2.868928) = 0.005160, 1.601639.
    rr = rate_ratio(0, 50, 5, 50, 0.95)
    assert rr.corrected
    assert rr.ratio == pytest.approx(0.090909, abs=1e-6)
    assert rr.low == pytest.approx(0.005160, abs=1e-6)
    assert rr.high == pytest.approx(1.601639, abs=1e-5)
    # No SDC on either side: ratio 1 with a wide interval around it.
    both = rate_ratio(0, 50, 0, 50, 0.95)
    assert both.ratio == pytest.approx(1.0) and both.low < 1 < both.high


def test_rate_ratio_needs_trials():
    with pytest.raises(ConfigError, match="n > 0"):
        rate_ratio(0, 0, 1, 10)


def test_mean_interval_t_and_normal():
    # 1..5: mean 3, sd sqrt(2.5), se = sqrt(0.5) = 0.707107; t(0.975, df 4) = 2.776445
    # from t tables -> 3 -+ 1.963243; normal -> 3 -+ 1.959964 * 0.707107 = 3 -+ 1.385904.
    values = [1, 2, 3, 4, 5, math.nan, math.inf]
    est = mean_interval(values, 0.95)
    assert (est.mean, est.n, est.excluded) == (3.0, 5, 2)
    assert est.std == pytest.approx(math.sqrt(2.5))
    assert (est.low, est.high) == pytest.approx((1.036757, 4.963243), abs=1e-5)
    est = mean_interval(values, 0.95, method="normal")
    assert (est.low, est.high) == pytest.approx((1.614096, 4.385904), abs=1e-5)


def test_mean_interval_too_few_values():
    one = mean_interval([2.5, -math.inf], 0.99)
    assert one.mean == 2.5 and math.isnan(one.low) and math.isnan(one.high) and one.excluded == 1
    none = mean_interval([], 0.99)
    assert math.isnan(none.mean) and none.n == 0


def test_median_quantiles_linear_interpolation():
    # Positions q * (5 - 1) between sorted values 10..50: 0.05 -> 0.2 -> 12, 0.95 -> 3.8 -> 48.
    out = median_quantiles([50, 10, math.nan, 40, 20, 30])
    assert out == pytest.approx({0.05: 12.0, 0.25: 20.0, 0.5: 30.0, 0.75: 40.0, 0.95: 48.0})
    assert all(math.isnan(v) for v in median_quantiles([math.nan], qs=(0.5,)).values())
    with pytest.raises(ConfigError, match="quantiles"):
        median_quantiles([1.0], qs=(1.5,))


def test_ratio_of_means_delta_method():
    # mean 2 (var 1, n 3) over mean 4 (var 4, n 3): R = 0.5,
    # var(log R) = 1 / (3 * 4) + 4 / (3 * 16) = 1/6, se = 0.408248,
    # 95 %: 0.5 * exp(-+0.800152) = 0.224630, 1.112940.
    est = ratio_of_means([1, 2, 3], [2, 4, 6], 0.95)
    assert est.ratio == pytest.approx(0.5)
    assert (est.low, est.high) == pytest.approx((0.224630, 1.112940), abs=1e-5)
    # A non-positive mean has no log: the ratio is reported, the interval is not.
    neg = ratio_of_means([-1, -2, -3], [2, 4, 6], 0.95)
    assert neg.ratio == pytest.approx(-0.5) and math.isnan(neg.low) and math.isnan(neg.high)


def _rows():
    # Layer "a" (rows 0, 2, 3, 5): sdc 2/4, due 1/4, delta-loss 0.5, 0, nan, 1.5.
    # Layer "b" (rows 1, 4): sdc 0/2, due 0/2, delta-loss 0.1, 0.3.
    return {
        "layer": ["a", "b", "a", "a", "b", "a"],
        "field": ["m", "m", "e", "m", "e", "m"],
        "sdc": [True, False, False, False, False, True],
        "due": [False, False, True, False, False, False],
        "delta_loss": [0.5, 0.1, 0.0, math.nan, 0.3, 1.5],
    }


def test_summarise_per_layer():
    s = summarise(pa.table(_rows()), by=("layer",), confidence=0.99)
    assert list(s.groups) == [("a",), ("b",)]
    a, b = s.groups[("a",)], s.groups[("b",)]
    assert (a.n, a.sdc.k, a.due.k, b.n, b.sdc.k) == (4, 2, 1, 2, 0)
    # Wilson 2/4 at 99 %: z^2/n = 1.658724, centre 0.5,
    # half = 2.575829 / 2.658724 * sqrt(0.0625 + 1.658724 / 16) = 0.968822 * 0.407640 = 0.394930.
    assert (a.sdc.low, a.sdc.high) == pytest.approx((0.105070, 0.894930), abs=1e-5)
    assert b.sdc.rate == 0.0 and b.sdc.low == 0.0
    # Finite delta-loss of "a" is 0.5, 0, 1.5: mean 2/3, median 0.5, one NaN left out.
    assert a.delta_loss.mean == pytest.approx(2 / 3)
    assert a.delta_loss.excluded == 1
    assert a.delta_loss_quantiles[0.5] == pytest.approx(0.5)
    assert b.delta_loss.mean == pytest.approx(0.2)
    overall = s.overall
    assert overall.key == (OVERALL,)
    assert (overall.n, overall.sdc.k, overall.due.k, overall.delta_loss.n) == (6, 2, 1, 5)
    # Wilson 2/6 at 99 %: z^2/n = 1.105816, centre (1/3 + 0.552908) / 2.105816 = 0.420854,
    # half = 1.223197 * sqrt((2/9) / 6 + 1.105816 / 24) = 1.223197 * 0.288293 = 0.352639.
    assert (overall.sdc.low, overall.sdc.high) == pytest.approx((0.068215, 0.773493), abs=1e-5)


def test_summarise_dict_and_two_keys_and_table():
    s = summarise(_rows(), by=("layer", "field"), confidence=0.99)
    assert list(s.groups) == [("a", "m"), ("b", "m"), ("a", "e"), ("b", "e")]
    assert s.groups[("a", "m")].n == 3 and s.groups[("a", "m")].sdc.k == 2
    assert s.groups[("a", "e")].due.k == 1
    table = s.to_table()
    assert table.num_rows == 5
    assert table["layer"].to_pylist() == ["a", "b", "a", "b", OVERALL]
    assert table["n"].to_pylist() == [3, 1, 1, 1, 6]
    assert table["delta_loss_q50"][0].as_py() == pytest.approx(1.0)  # median of 0.5, 1.5


def test_summarise_names_missing_columns():
    rows = _rows()
    del rows["due"]
    with pytest.raises(FlipsafeError, match="due"):
        summarise(rows)


def test_summarise_without_grouping():
    s = summarise(_rows(), by=())
    assert s.groups == {} and s.overall.n == 6 and s.overall.key == ()


def _campaign(layers_counts):
    # layer -> (n rows, SDC count, delta-loss values to repeat over the rows).
    cols = {"layer": [], "sdc": [], "due": [], "delta_loss": []}
    for layer, (n, k, losses) in layers_counts.items():
        cols["layer"] += [layer] * n
        cols["sdc"] += [True] * k + [False] * (n - k)
        cols["due"] += [False] * n
        cols["delta_loss"] += [losses[i % len(losses)] for i in range(n)]
    return summarise(cols, confidence=0.95)


def test_compare_matches_layers_and_relabels_last():
    a = _campaign({"conv1": (100, 20, [1, 2, 3]), "fc": (90, 9, [1.0])})
    b = _campaign({"conv1": (100, 10, [2, 4, 6]), "head.fc": (90, 3, [1.0])})
    out = compare(a, b, last_layer=("fc", "head.fc"))
    assert list(out.groups) == [("conv1",), ("last",)]
    conv = out.groups[("conv1",)]
    # Same numbers as the Katz example above: 20/100 over 10/100.
    assert (conv.sdc.ratio, conv.sdc.low, conv.sdc.high) == pytest.approx(
        (2.0, 0.986563, 4.054479), abs=1e-5
    )
    # 100 rows cycling 1, 2, 3 (34, 33, 33 of each): mean 1.99; 2, 4, 6: mean 3.98.
    assert conv.delta_loss.ratio == pytest.approx(1.99 / 3.98)
    assert out.groups[("last",)].sdc.ratio == pytest.approx(3.0)  # (9/90) / (3/90)
    # Overall: 29/190 over 13/190.
    assert out.overall.sdc.ratio == pytest.approx(29 / 13)
    assert out.only_a == [] and out.only_b == []


def test_compare_reports_unmatched_layers():
    a = _campaign({"conv1": (10, 1, [1.0]), "fc": (10, 1, [1.0])})
    b = _campaign({"conv1": (10, 1, [1.0]), "head.fc": (10, 1, [1.0])})
    out = compare(a, b)
    assert list(out.groups) == [("conv1",)]
    assert out.only_a == [("fc",)] and out.only_b == [("head.fc",)]
    with pytest.raises(ConfigError, match="same `by`"):
        compare(a, summarise({"field": ["m"], "sdc": [1], "due": [0], "delta_loss": [0.0]},
                             by=("field",)))


def test_stratified_rate_weights_strata_by_fault_space_by_hand():
    from flipsafe.metrics.stats import stratified_rate

    # Two strata: 3 of 100 faults in a space of 9,000 and 10 of 100 in a space of 1,000.
    est = stratified_rate([3, 10], [100, 100], [9000, 1000], confidence=0.99)
    p = 0.9 * 0.03 + 0.1 * 0.10  # 0.037, where pooling would say 13/200 = 0.065
    n_eff = 1 / (0.81 / 100 + 0.01 / 100)  # Kish: 121.95, not the 200 injected
    low, high = wilson_interval(p * n_eff, n_eff, 0.99)
    assert est.rate == pytest.approx(p) and est.effective_n == pytest.approx(n_eff)
    assert est.variance == pytest.approx(p * (1 - p) / n_eff)
    assert (est.low, est.high) == pytest.approx((low, high))
    assert (est.k, est.n, est.method) == (13, 200, "stratified")
    # Proportional allocation (W_h = n_h / n) is self-weighting: the pooled Wilson interval.
    same = stratified_rate([3, 10], [100, 300], [25, 75])
    assert same.rate == pytest.approx(13 / 400) and same.effective_n == pytest.approx(400)
    assert (same.low, same.high) == pytest.approx(wilson_interval(13, 400))
    # Strata without events keep their sampling error: one event in a small stratum does
    # not make the interval narrower than no event at all would.
    none = stratified_rate([0, 0], [50, 50], [975, 25])
    one = stratified_rate([0, 1], [50, 50], [975, 25])
    assert none.effective_n == one.effective_n == pytest.approx(1 / (0.975**2 / 50 + 0.025**2 / 50))
    assert one.high > none.high
    # Every stratum exhaustive (nothing else sampled): the rate is exact.
    exact = stratified_rate([3, 10], [100, 100], [100, 100], exhaustive=True)
    assert exact.low == exact.high == exact.rate == pytest.approx(0.065)
    with pytest.raises(ConfigError, match="n > 0"):
        stratified_rate([0], [0], [10])


def test_a_side_without_events_is_compared_on_the_same_footing():
    from flipsafe.metrics.stats import estimate_ratio, stratified_rate

    # The audit's case: base 0 DUEs, other 2 DUEs in a heavily weighted small layer.
    sizes = [9750, 250]
    base = stratified_rate([0, 0], [75, 75], sizes)
    other = stratified_rate([0, 2], [75, 75], sizes)
    r = estimate_ratio(base, other)
    assert r.corrected and r.ratio < 1  # base has fewer DUEs: the factor is below 1
    n_eff = 1 / ((0.975 ** 2 + 0.025 ** 2) / 75)
    k_other = other.rate * n_eff
    assert r.ratio == pytest.approx((0.5 / (n_eff + 1)) / ((k_other + 0.5) / (n_eff + 1)))


def test_estimate_ratio_reduces_to_katz_and_tests_against_one():
    from flipsafe.metrics.stats import estimate_ratio, rate_estimate, rate_ratio

    a, b = rate_estimate(20, 100), rate_estimate(10, 100)
    katz = rate_ratio(20, 100, 10, 100)
    got = estimate_ratio(a, b)
    assert (got.ratio, got.low, got.high) == pytest.approx((katz.ratio, katz.low, katz.high))
    se = math.sqrt(1 / 20 - 1 / 100 + 1 / 10 - 1 / 100)
    p = math.erfc(abs(math.log(2.0)) / se / math.sqrt(2))
    assert got.p_value == pytest.approx(p) and katz.p_value == pytest.approx(p)
    # A side without events uses the 0.5-corrected Katz interval.
    zero = estimate_ratio(rate_estimate(0, 100), b)
    assert zero.corrected and zero.ratio == pytest.approx((0.5 / 101) / (10.5 / 101))


def test_holm_adjusts_by_hand():
    from flipsafe.metrics.stats import holm

    # Sorted 0.01, 0.02, 0.04, 0.5 -> 4*0.01, 3*0.02, max(0.06, 2*0.04), max(0.08, 0.5).
    got = holm([0.04, 0.01, 0.5, 0.02])
    assert got.tolist() == pytest.approx([0.08, 0.04, 0.5, 0.06])
    assert holm([0.6, 0.9]).tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError):
        holm([float("nan")])


def test_overall_comparison_uses_only_matched_layers_and_strata():
    def rows(spec):
        cols = {"layer": [], "field": [], "sdc": [], "due": [], "delta_loss": []}
        for (layer, field_), (n, k) in spec.items():
            cols["layer"] += [layer] * n
            cols["field"] += [field_] * n
            cols["sdc"] += [True] * k + [False] * (n - k)
            cols["due"] += [False] * n
            cols["delta_loss"] += [1.0] * n
        return cols

    sizes = {("conv", "exp"): 800, ("conv", "man"): 200, ("fc", "exp"): 80, ("fc", "man"): 20,
             ("extra", "exp"): 10}
    a = summarise(rows({("conv", "exp"): (100, 10), ("conv", "man"): (100, 1)}), sizes=sizes)
    b = summarise(rows({("conv", "exp"): (100, 5), ("conv", "man"): (100, 1),
                        ("extra", "exp"): (50, 50)}), sizes=sizes)
    out = compare(a, b)
    assert out.only_b == [("extra",)]
    # Both sides over conv only: 0.8 * 0.10 + 0.2 * 0.01 against 0.8 * 0.05 + 0.2 * 0.01.
    assert out.overall_a.sdc.rate == pytest.approx(0.082)
    assert out.overall_b.sdc.rate == pytest.approx(0.042)
    assert out.overall.sdc.ratio == pytest.approx(0.082 / 0.042)
    # b's own overall (its "extra" layer included) is another number.
    assert b.overall.sdc.rate == pytest.approx((800 * 0.05 + 200 * 0.01 + 10 * 1.0) / 1010)
