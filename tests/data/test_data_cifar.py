"""cifar10:/cifar100: loaders against tiny fake batch files in the official pickle layout."""

import os
import pickle

import numpy as np
import pytest
import torch

from flipsafe.data import load
from flipsafe.errors import ConfigError, DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def images(rng, n):
    """[n, 3, 32, 32] uint8 images; the file rows are these flattened (R, G, B planes)."""
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def cifar10(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    truth = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs = images(rng, 3)
        labels = [(i + j) % 10 for j in range(3)]
        truth[name] = (imgs, labels)
        # The official files are Python 2 pickles read back with bytes keys; mix both.
        key = (lambda k: k.encode()) if i % 2 else (lambda k: k)
        dump(folder / name, {key("data"): imgs.reshape(3, -1), key("labels"): labels,
                             key("batch_label"): f"batch {i}"})
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                   b"num_vis": 3072})
    return tmp_path, truth


def denormalise(x, mean, std):
    return x * torch.tensor(std).reshape(3, 1, 1) + torch.tensor(mean).reshape(3, 1, 1)


def test_cifar10_loads_from_parent_or_batch_folder(cifar10):
    root, _ = cifar10
    for spec in (f"cifar10:{root}", f"cifar10:{root / 'cifar-10-batches-py'}"):
        bundle = load(spec)
        assert bundle.classes == CIFAR10_NAMES
        assert (bundle.in_channels, bundle.image_size, bundle.spec) == (3, 32, spec)
        assert len(bundle.train) == 15 and len(bundle.test) == 3
        image, label = bundle.test[1]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert type(label) is int


def test_cifar10_pixels_labels_and_order(cifar10):
    root, truth = cifar10
    bundle = load(f"cifar10:{root}")
    expected = np.concatenate([truth[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = [y for k in range(1, 6) for y in truth[f"data_batch_{k}"][1]]
    train, train_labels = bundle.train.tensors()
    assert train_labels.tolist() == labels
    torch.testing.assert_close(denormalise(train, CIFAR10_MEAN, CIFAR10_STD),
                               torch.from_numpy(expected).float() / 255, atol=1e-5, rtol=0)
    test, test_labels = bundle.test.tensors()
    assert test_labels.tolist() == truth["test_batch"][1]
    torch.testing.assert_close(denormalise(test, CIFAR10_MEAN, CIFAR10_STD),
                               torch.from_numpy(truth["test_batch"][0]).float() / 255,
                               atol=1e-5, rtol=0)
    # Channel planes: the first 1024 bytes of a row are red, stored row-major.
    row = truth["test_batch"][0][0].reshape(-1)
    red_pixel_1_2 = row[1 * 32 + 2] / 255
    assert denormalise(test[0], CIFAR10_MEAN, CIFAR10_STD)[0, 1, 2].item() == \
        pytest.approx(red_pixel_1_2, abs=1e-5)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{i:03d}" for i in range(100)]
    train, test = images(rng, 4), images(rng, 2)
    dump(folder / "train", {"data": train.reshape(4, -1), "fine_labels": [0, 99, 50, 7],
                            "coarse_labels": [1, 2, 3, 4]})
    dump(folder / "test", {"data": test.reshape(2, -1), "fine_labels": [42, 3],
                           "coarse_labels": [0, 0]})
    dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20})
    bundle = load(f"cifar100:{tmp_path}")
    assert bundle.classes == names
    assert bundle.train.labels.tolist() == [0, 99, 50, 7]
    assert bundle.test.labels.tolist() == [42, 3]
    torch.testing.assert_close(denormalise(bundle.test.tensors()[0], CIFAR100_MEAN, CIFAR100_STD),
                               torch.from_numpy(test).float() / 255, atol=1e-5, rtol=0)


def test_missing_batch_file_is_named(cifar10):
    root, _ = cifar10
    os.remove(root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3") as err:
        load(f"cifar10:{root}")
    assert "cifar.html" in str(err.value)  # says where to get the files


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(f"cifar100:{tmp_path / 'nope'}")


def test_wrong_shape_and_labels(cifar10):
    root, _ = cifar10
    folder = root / "cifar-10-batches-py"
    dump(folder / "test_batch", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    with pytest.raises(DataError, match="3072"):
        load(f"cifar10:{root}")
    dump(folder / "test_batch", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    with pytest.raises(DataError, match="labels outside"):
        load(f"cifar10:{root}")
    dump(folder / "test_batch", {"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DataError, match="'labels'"):
        load(f"cifar10:{root}")


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.remove, (self.target,))


def test_pickle_cannot_run_code(cifar10):
    root, _ = cifar10
    sentinel = root / "sentinel"
    sentinel.write_text("keep me")
    dump(root / "cifar-10-batches-py" / "test_batch",
         {"data": _Payload(str(sentinel)), "labels": [0]})
    with pytest.raises(DataError, match="test_batch"):
        load(f"cifar10:{root}")
    assert sentinel.exists()


def test_options_rejected(cifar10):
    root, _ = cifar10
    with pytest.raises(ConfigError, match="no options"):
        load(f"cifar10:{root}?size=64")


def test_numpy_1_pickles_load(cifar10):
    # The official files name numpy.core.multiarray (numpy 1.x); numpy 2 writes
    # numpy._core. Both must pass the unpickler's allow-list.
    root, _ = cifar10
    imgs = images(np.random.default_rng(2), 2)
    raw = pickle.dumps({b"data": imgs.reshape(2, -1), b"labels": [4, 5]}, protocol=2)
    old_style = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old_style != raw
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(old_style)
    bundle = load(f"cifar10:{root}")
    assert bundle.test.labels.tolist() == [4, 5]
    assert torch.equal(bundle.test.pixels, torch.from_numpy(imgs))


@pytest.mark.parametrize("batch, needle", [
    ({"data": "not pixels", "labels": [0, 1]}, "'data'"),
    ({"data": [[0] * 3072, [0] * 5], "labels": [0, 1]}, "'data'"),
    ({"data": np.full((2, 3072), 0.5), "labels": [0, 1]}, "'data'"),
    ({"data": np.full((2, 3072), 300), "labels": [0, 1]}, "'data'"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]}, "'labels'"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": 7}, "'labels'"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0.5, 1.0]}, "'labels'"),
])
def test_batches_holding_wrong_types_are_data_errors(cifar10, batch, needle):
    root, _ = cifar10
    dump(root / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(DataError, match=needle) as err:
        load(f"cifar10:{root}")
    assert "test_batch" in str(err.value)


@pytest.mark.parametrize("names", [5, "abcdefghij", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], None, ["a"]])
def test_class_names_of_the_wrong_type_are_data_errors(cifar10, names):
    root, _ = cifar10
    dump(root / "cifar-10-batches-py" / "batches.meta", {"label_names": names})
    with pytest.raises(DataError, match="'label_names'") as err:
        load(f"cifar10:{root}")
    assert "batches.meta" in str(err.value)
