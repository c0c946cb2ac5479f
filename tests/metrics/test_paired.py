"""McNemar's exact test and the paired ratio, against hand-computed values."""

import math

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
