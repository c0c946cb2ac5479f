"""McNemar's exact test and the paired ratio, against hand-computed values."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from flipsafe.errors import ConfigError
from flipsafe.metrics import mcnemar_exact, paired_ratio


def _table(both, only_a, only_b, neither):
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_mcnemar_on_a_small_table_by_hand():
    # 8 discordant pairs split 7 / 1: p = 2 * (C(8,0) + C(8,1)) / 2**8 = 18 / 256.
    assert mcnemar_exact(7, 1) == pytest.approx(18 / 256, abs=1e-15)
    assert mcnemar_exact(1, 7) == mcnemar_exact(7, 1)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(4, 4) == 1.0  # 2 * P(X <= 4) > 1 is capped
    assert mcnemar_exact(0, 2) == pytest.approx(0.5)


@pytest.mark.parametrize("a,b", [(7, 1), (0, 5), (3, 9), (12, 30), (0, 1)])
def test_mcnemar_is_the_binomial_test_on_discordant_pairs(a, b):
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue, rel=1e-12)


def test_paired_ratio_on_a_small_table_by_hand():
    a, b = _table(3, 7, 1, 9)
    r = paired_ratio(a, b, confidence=0.95)
    assert (r.both, r.only_a, r.only_b, r.neither, r.n) == (3, 7, 1, 9, 20)
    # Rates 10/20 and 4/20: ratio 2.5, SE(log) = sqrt((7 + 1) / (10 * 4)).
    se = math.sqrt(8 / 40)
    z = 1.959963984540054
    assert r.ratio.ratio == pytest.approx(2.5)
    assert r.ratio.low == pytest.approx(2.5 * math.exp(-z * se), rel=1e-9)
    assert r.ratio.high == pytest.approx(2.5 * math.exp(z * se), rel=1e-9)
    assert r.ratio.p_value == pytest.approx(18 / 256)
    assert not r.ratio.corrected


def test_paired_ratio_with_no_event_on_one_side_adds_half_to_every_cell():
    # A protection that removed every SDC: 0 / 2 becomes (0.5 + 0.5) / (0.5 + 2.5).
    a, b = _table(0, 0, 2, 8)
    r = paired_ratio(a, b, confidence=0.99)
    assert r.ratio.corrected
    assert r.ratio.ratio == pytest.approx(1 / 3)
    se = math.sqrt((0.5 + 2.5) / (1.0 * 3.0))
    z = 2.5758293035489004
    assert r.ratio.high == pytest.approx(math.exp(z * se) / 3, rel=1e-9)
    assert r.ratio.p_value == pytest.approx(0.5)


def test_identical_runs_give_ratio_one_and_p_one():
    a, _ = _table(4, 0, 0, 6)
    r = paired_ratio(a, a)
    assert (r.ratio.ratio, r.ratio.low, r.ratio.high, r.ratio.p_value) == (1.0, 1.0, 1.0, 1.0)


def test_unpaired_lengths_are_refused():
    with pytest.raises(ConfigError, match="same"):
        paired_ratio([True, False], [True])
    with pytest.raises(ConfigError):
        mcnemar_exact(-1, 2)


def test_stratified_paired_ratio_is_the_ratio_of_stratified_rates_by_hand():
    import math

    from flipsafe.metrics.stats import stratified_paired_ratio, stratified_rate, z_value

    # Stratum x: 4 rows, weight 0.8; stratum y: 6 rows, weight 0.2 (unequal allocation).
    keys = ["x"] * 4 + ["y"] * 6
    a = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    sizes = {"x": 800, "y": 200}
    got = stratified_paired_ratio(a, b, keys, sizes, 0.95)
    ra = 0.8 * 2 / 4 + 0.2 * 3 / 6  # stratified rates, as stratified_rate gives them
    rb = 0.8 * 1 / 4 + 0.2 * 1 / 6
    assert stratified_rate([2, 3], [4, 6], [800, 200]).rate == pytest.approx(ra)
    assert got.ratio.ratio == pytest.approx(ra / rb)
    n_eff = 1 / (0.8 ** 2 / 4 + 0.2 ** 2 / 6)
    n11 = n_eff * (0.8 * 1 / 4 + 0.2 * 1 / 6)
    n10 = n_eff * (0.8 * 1 / 4 + 0.2 * 2 / 6)
    n01 = 0.0
    se = math.sqrt((n10 + n01) / ((n11 + n10) * (n11 + n01)))
    z = z_value(0.95)
    assert got.ratio.low == pytest.approx(ra / rb * math.exp(-z * se))
    assert got.ratio.high == pytest.approx(ra / rb * math.exp(z * se))
    # McNemar on the pooled discordant rows: 3 only-a, 0 only-b.
    assert got.ratio.p_value == pytest.approx(2 * 0.5 ** 3)
    assert (got.both, got.only_a, got.only_b) == (2, 3, 0)


def test_stratified_paired_ratio_with_proportional_allocation_is_the_pooled_one():
    from flipsafe.metrics.stats import paired_ratio, stratified_paired_ratio

    rng = np.random.default_rng(3)
    keys = ["x"] * 30 + ["y"] * 70
    a, b = rng.random(100) < 0.3, rng.random(100) < 0.2
    strat = stratified_paired_ratio(a, b, keys, {"x": 3, "y": 7}).ratio
    pooled = paired_ratio(a, b).ratio
    assert (strat.ratio, strat.low, strat.high, strat.p_value) == pytest.approx(
        (pooled.ratio, pooled.low, pooled.high, pooled.p_value))
    assert stratified_paired_ratio(a, b, keys, None).ratio == pooled


def test_a_side_with_less_than_one_effective_event_gets_the_half_count():
    import math

    from flipsafe.metrics.stats import stratified_paired_ratio, z_value

    # b's only event sits in stratum y of weight 0.01: 0.01 * n_eff / 50 effective events.
    keys = ["x"] * 50 + ["y"] * 50
    a = np.zeros(100, dtype=bool)
    a[:20] = True
    b = np.zeros(100, dtype=bool)
    b[50] = True
    got = stratified_paired_ratio(a, b, keys, {"x": 99, "y": 1}, 0.99)
    w = {"x": 0.99, "y": 0.01}
    n_eff = 1 / (w["x"] ** 2 / 50 + w["y"] ** 2 / 50)
    n11, n10, n01 = 0.0, n_eff * w["x"] * 20 / 50, n_eff * w["y"] * 1 / 50
    assert n01 < 1 and got.ratio.corrected
    n11, n10, n01 = n11 + 0.5, n10 + 0.5, n01 + 0.5
    ratio = (n11 + n10) / (n11 + n01)
    se = math.sqrt((n10 + n01) / ((n11 + n10) * (n11 + n01)))
    assert (got.ratio.ratio, got.ratio.low) == pytest.approx(
        (ratio, ratio * math.exp(-z_value(0.99) * se)))
    assert got.ratio.low > 1  # 20 against 1 in 100 paired rows: clearly fewer
