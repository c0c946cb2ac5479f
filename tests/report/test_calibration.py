"""Expected calibration error and reliability bins against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from flipsafe.errors import ConfigError
from flipsafe.metrics.calibration import expected_calibration_error, reliability_bins

# Confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.7 (right), 0.4 (wrong).
PROBS = np.array([
    [0.9, 0.1, 0.0],
    [0.2, 0.8, 0.0],
    [0.6, 0.4, 0.0],
    [0.3, 0.7, 0.0],
    [0.25, 0.35, 0.4],
])
LABELS = np.array([0, 0, 0, 1, 1])


def test_ece_matches_hand_computation():
    # 4 bins of width 0.25: (0.75, 1] holds 0.9, 0.8 -> acc 0.5, conf 0.85, gap 0.35;
    # (0.5, 0.75] holds 0.6, 0.7 -> acc 1, conf 0.65, gap 0.35; (0.25, 0.5] holds 0.4
    # -> acc 0, gap 0.4. ECE = (2 * 0.35 + 2 * 0.35 + 1 * 0.4) / 5 = 0.36.
    assert expected_calibration_error(PROBS, LABELS, n_bins=4) == pytest.approx(0.36)


def test_reliability_bins_hold_counts_accuracy_and_confidence():
    bins = reliability_bins(PROBS, LABELS, n_bins=4)
    np.testing.assert_allclose(bins.edges, [0, 0.25, 0.5, 0.75, 1])
    assert bins.count.tolist() == [0, 1, 2, 2]
    assert math.isnan(bins.accuracy[0]) and math.isnan(bins.confidence[0])
    np.testing.assert_allclose(bins.accuracy[1:], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(bins.confidence[1:], [0.4, 0.65, 0.85])
    assert bins.n == 5


def test_a_confidence_on_an_edge_goes_to_the_bin_that_edge_closes():
    probs = np.array([[0.75, 0.25], [1.0, 0.0], [0.5, 0.5]])
    bins = reliability_bins(probs, np.array([0, 0, 0]), n_bins=4)
    # 0.5 closes (0.25, 0.5], 0.75 closes (0.5, 0.75], 1.0 closes (0.75, 1].
    assert bins.count.tolist() == [0, 1, 1, 1]


def test_confident_and_right_is_perfectly_calibrated_and_torch_tensors_work():
    probs = torch.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(probs, torch.tensor([0, 1, 2, 1])) == 0.0
    # All wrong at confidence 1: the gap is 1 everywhere.
    assert expected_calibration_error(probs, torch.tensor([1, 2, 0, 0])) == 1.0


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.array([[2.0, -1.0], [0.5, 0.1]]), np.array([0, 1]), "softmax"),
        (np.array([[0.5, 0.5]]), np.array([0, 1]), "shape"),
        (np.array([[0.5, 0.5]]), np.array([2]), "class indices"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "at least one"),
    ],
)
def test_bad_inputs_say_what_is_wrong(probs, labels, match):
    with pytest.raises(ConfigError, match=match):
        expected_calibration_error(probs, labels)


def test_bins_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="n_bins"):
        reliability_bins(PROBS, LABELS, n_bins=0)
