"""The fixed stratified split shared by digits and imagefolder, and ImageTensors."""

import numpy as np
import torch

from flipsafe.data import ImageTensors, stratified_split

LABELS = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3] * 1 + [4] * 7)


def test_partition_and_per_class_counts():
    train, test = stratified_split(LABELS, 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(LABELS)))
    assert list(train) == sorted(train) and list(test) == sorted(test)
    counts = {c: int((LABELS[test] == c).sum()) for c in range(5)}
    # round(20%) with at least one test and one train image where a class has two:
    # 10 -> 2, 5 -> 1, 2 -> 1, 1 -> 0, 7 -> round(1.4) = 1.
    assert counts == {0: 2, 1: 1, 2: 1, 3: 0, 4: 1}
    assert set(LABELS[train]) == {0, 1, 2, 3, 4}


def test_deterministic_per_seed():
    a = stratified_split(LABELS, 0.2, seed=0)[1]
    b = stratified_split(LABELS, 0.2, seed=0)[1]
    c = stratified_split(LABELS, 0.5, seed=1)[1]
    d = stratified_split(LABELS, 0.5, seed=2)[1]
    assert np.array_equal(a, b)
    assert not np.array_equal(c, d)


def test_image_tensors_normalise_uint8_and_float():
    pixels = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    ds = ImageTensors(pixels, [3], mean=(0.5, 0.2), std=(0.5, 0.1))
    image, label = ds[0]
    # (0/255 - .5)/.5 = -1, (255/255 - .5)/.5 = 1, (51/255 - .2)/.1 = 0, (102/255 - .2)/.1 = 2
    torch.testing.assert_close(image, torch.tensor([[[-1.0, 1.0]], [[0.0, 2.0]]]))
    assert label == 3 and type(label) is int
    floats = ImageTensors(pixels.float() / 255, [3], mean=(0.5, 0.2), std=(0.5, 0.1))
    torch.testing.assert_close(floats[0][0], image)
    torch.testing.assert_close(ds.tensors()[0][0], image)
