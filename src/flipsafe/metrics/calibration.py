"""Calibration of a classifier on clean data: reliability bins and expected calibration error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flipsafe.errors import ConfigError


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins over [0, 1]; bin i holds confidences in (edges[i], edges[i+1]].

    accuracy and confidence are nan in empty bins. The first bin also takes a confidence
    of exactly 0, so every prediction lands in one bin.
    """

    edges: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def n(self) -> int:
        return int(self.count.sum())


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def reliability_bins(probs, labels, n_bins: int = 15) -> ReliabilityBins:
    """Bin predictions by top-1 confidence and give each bin's accuracy and mean confidence.

    probs: [N, C] class probabilities (softmax outputs, rows summing to 1); labels: [N]
    true class indices. Arrays or torch tensors.
    """
    probs = _as_numpy(probs).astype(np.float64)
    labels = _as_numpy(labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"need probs of shape [N, C] and labels of shape [N]; got {probs.shape} and "
            f"{labels.shape}"
        )
    if probs.shape[0] == 0:
        raise ConfigError("no predictions to calibrate; pass at least one image")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or (
        labels.max() >= probs.shape[1]
    ):
        raise ConfigError(f"labels must be class indices in [0, {probs.shape[1]})")
    # Logits would give nonsense confidences silently, so insist on probabilities.
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1 or not np.allclose(
        probs.sum(axis=1), 1.0, atol=1e-4
    ):
        raise ConfigError(
            "probs must be probabilities in [0, 1] whose rows sum to 1; "
            "apply softmax to logits first"
        )
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge in the bin that edge closes.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / count
        conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
    return ReliabilityBins(edges, count, acc, conf)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy - mean confidence| (Guo et al. 2017)."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(bins.count[filled] / bins.n * gaps))
