"""CIFAR-10/100 from the official python-pickle batch files in a user's folder."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from flipsafe.data.tensors import DatasetBundle, ImageTensors
from flipsafe.errors import DataError

SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html ('CIFAR-10/100 python version')"

# name: (sub-folder of the extracted archive, train files, test file, meta file,
#        label key, class-name key, per-channel mean, per-channel std)
LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
        "batches.meta", "labels", "label_names",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": (
        "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}

# The only globals a CIFAR pickle needs (numpy arrays, possibly py2-era); refusing
# anything else means a tampered file cannot run code when unpickled.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing CIFAR file '{path}'; download and extract the python "
                        f"version from {SOURCE}")
    try:
        with open(path, "rb") as f:
            # latin1 decodes the Python 2 strings of the official files to str.
            content = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # any corruption in a user file is a data error
        raise DataError(f"cannot read CIFAR file '{path}' ({exc}); re-extract it from "
                        f"{SOURCE}") from exc
    if not isinstance(content, dict):
        raise DataError(f"CIFAR file '{path}' does not hold a dict of batch data")
    return {_text(k): v for k, v in content.items()}


def _field(content: dict, key: str, path: Path):
    if key not in content:
        raise DataError(f"CIFAR file '{path}' has no '{key}' entry (has: {sorted(content)}); "
                        f"is it the right CIFAR-10/100 file?")
    return content[key]


def _integers(content: dict, key: str, path: Path, ndim: int, top: int | None = None):
    """Entry `key` as an integer array of `ndim` dims (values within 0..top if given)."""
    value = _field(content, key, path)
    try:
        array = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    except (ValueError, TypeError):  # ragged nested lists
        array = None
    if array is None or array.ndim != ndim or (array.size and array.dtype.kind not in "iu"):
        what = f"{type(value).__name__}" if array is None else f"{array.dtype} {array.shape}"
        raise DataError(f"CIFAR file '{path}' has a '{key}' entry of {what}; expected a "
                        f"{ndim}-d array of whole numbers; re-extract it from {SOURCE}")
    if top is not None and array.size and (array.min() < 0 or array.max() > top):
        raise DataError(f"CIFAR file '{path}' has '{key}' values outside 0..{top}; "
                        f"re-extract it from {SOURCE}")
    return array


def _class_names(content: dict, key: str, path: Path) -> list[str]:
    names = _field(content, key, path)
    if (not isinstance(names, (list, tuple)) or len(names) < 2
            or not all(isinstance(n, (str, bytes)) for n in names)
            or len({_text(n) for n in names}) != len(names)):
        raise DataError(f"CIFAR file '{path}' has a '{key}' entry that is not a list of "
                        f"distinct class names (got {str(names)[:60]!r}); re-extract it "
                        f"from {SOURCE}")
    return [_text(n) for n in names]


def _batches(folder: Path, files: list[str], label_key: str, n_classes: int):
    pixels, labels = [], []
    for name in files:
        path = folder / name
        content = _unpickle(path)
        data = _integers(content, "data", path, ndim=2, top=255).astype(np.uint8)
        target = _integers(content, label_key, path, ndim=1).astype(np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(target):
            raise DataError(f"CIFAR file '{path}' holds data of shape {data.shape} with "
                            f"{len(target)} labels; expected [N, 3072] and N labels")
        if len(target) and (target.min() < 0 or target.max() >= n_classes):
            raise DataError(f"CIFAR file '{path}' has labels outside 0..{n_classes - 1}")
        # Each row is the red, then green, then blue 32x32 plane, row-major.
        pixels.append(data.reshape(-1, 3, 32, 32))
        labels.append(target)
    return torch.from_numpy(np.concatenate(pixels)), torch.from_numpy(np.concatenate(labels))


def load_cifar(kind: str, root, spec: str = "") -> DatasetBundle:
    subdir, train_files, test_file, meta_file, label_key, names_key, mean, std = LAYOUTS[kind]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"CIFAR folder '{root}' does not exist; give {kind}:<dir> pointing at "
                        f"the extracted '{subdir}' folder or its parent")
    folder = root / subdir if (root / subdir).is_dir() else root
    meta_path = folder / meta_file
    classes = _class_names(_unpickle(meta_path), names_key, meta_path)
    train_pixels, train_labels = _batches(folder, train_files, label_key, len(classes))
    test_pixels, test_labels = _batches(folder, [test_file], label_key, len(classes))

    return DatasetBundle(
        train=ImageTensors(train_pixels, train_labels, mean, std),
        test=ImageTensors(test_pixels, test_labels, mean, std),
        classes=classes,
        in_channels=3,
        image_size=32,
        spec=spec,
        mean=mean,
        std=std,
    )
