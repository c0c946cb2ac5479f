"""scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download)."""

from __future__ import annotations

import torch

from flipsafe.data.tensors import DatasetBundle, ImageTensors, channel_stats, stratified_split

# Words read better than bare numerals in a text prompt ("a handwritten seven").
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# The split is fixed, not taken from load()'s seed, so an image_id (an index into
# .test) names the same image on every run and machine.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits(spec: str = "digits") -> DatasetBundle:
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    pixels = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    train_idx, test_idx = stratified_split(raw.target, TEST_FRACTION, SPLIT_SEED)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = channel_stats(pixels[train_idx])

    def split(idx):
        sources = [f"sklearn load_digits #{i}" for i in idx.tolist()]
        return ImageTensors(pixels[idx], labels[idx], mean, std, sources)

    return DatasetBundle(
        train=split(train_idx),
        test=split(test_idx),
        classes=list(DIGIT_NAMES),
        in_channels=1,
        image_size=8,
        spec=spec,
        mean=mean,
        std=std,
    )
