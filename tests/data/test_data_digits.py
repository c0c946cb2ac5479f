"""The digits dataset: real sklearn images, fixed stratified split, train-set normalisation."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from flipsafe.data import load


@pytest.fixture(scope="module")
def bundle():
    return load("digits")


@pytest.fixture(scope="module")
def raw():
    return load_digits()


def pixel_rows(split, bundle):
    """Back to sklearn's 0..16 integer pixels, one row of 64 per image."""
    images, labels = split.tensors()
    pixels = (images * bundle.std[0] + bundle.mean[0]) * 16
    return pixels.reshape(len(labels), 64).round().numpy().astype(np.int64), labels.numpy()


def test_metadata(bundle):
    assert bundle.classes == ["zero", "one", "two", "three", "four", "five", "six", "seven",
                              "eight", "nine"]
    assert (bundle.in_channels, bundle.image_size, bundle.spec) == (1, 8, "digits")


def test_items_are_float_images_and_int_labels(bundle):
    image, label = bundle.test[0]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    assert type(label) is int and 0 <= label <= 9
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(bundle.train, batch_size=32)))
    assert batch_x.shape == (32, 1, 8, 8) and batch_y.dtype == torch.int64


def test_split_partitions_the_1797_real_images(bundle, raw):
    assert len(bundle.train) + len(bundle.test) == 1797
    # Every (image, label) pair of sklearn's set appears exactly once across the splits.
    loaded = Counter()
    for split in (bundle.train, bundle.test):
        rows, labels = pixel_rows(split, bundle)
        loaded.update((row.tobytes(), int(y)) for row, y in zip(rows, labels))
    expected = Counter(
        (row.astype(np.int64).tobytes(), int(y)) for row, y in zip(raw.data, raw.target)
    )
    assert loaded == expected


def test_split_is_stratified_80_20(bundle, raw):
    totals = Counter(raw.target.tolist())
    in_test = Counter(bundle.test.labels.tolist())
    assert set(in_test) == set(range(10))
    for cls, n in totals.items():
        assert abs(in_test[cls] - 0.2 * n) <= 1, (cls, in_test[cls], n)
    # Per-class round(20%) of sklearn's class sizes 178, 182, 177, 183, 181, 182, 181,
    # 179, 174, 180 is 36+36+35+37+36+36+36+36+35+36.
    assert len(bundle.test) == 359


def test_split_is_fixed_and_independent_of_seed(bundle):
    again = load("digits", seed=123)
    assert torch.equal(again.test.tensors()[0], bundle.test.tensors()[0])
    assert torch.equal(again.test.labels, bundle.test.labels)
    # Pinned when the split was introduced: a change here silently renumbers every
    # image_id in saved campaign results, so it must be deliberate.
    assert bundle.test.sources[:3] == [
        "sklearn load_digits #3", "sklearn load_digits #7", "sklearn load_digits #13"
    ]


def test_sources_name_the_sklearn_image(bundle, raw):
    rows, labels = pixel_rows(bundle.test, bundle)
    for i in (0, 100, 358):
        index = int(bundle.test.sources[i].rsplit("#", 1)[1])
        assert np.array_equal(rows[i], raw.data[index].astype(np.int64))
        assert labels[i] == raw.target[index]


def test_normalised_with_train_statistics(bundle, raw):
    train, _ = bundle.train.tensors()
    assert abs(train.mean().item()) < 1e-4
    assert abs(train.std().item() - 1) < 1e-3
    # The statistics are those of the train pixels on the 0..1 scale, not of all images.
    train_ids = [int(s.rsplit("#", 1)[1]) for s in bundle.train.sources]
    train_pixels = raw.data[train_ids] / 16.0
    assert bundle.mean[0] == pytest.approx(train_pixels.mean(), abs=1e-9)
    assert bundle.std[0] == pytest.approx(train_pixels.std(ddof=1), abs=1e-9)
    test, _ = bundle.test.tensors()
    assert abs(test.mean().item()) < 0.1 and abs(test.std().item() - 1) < 0.1
