"""In-memory image datasets, the bundle `load` returns, and a fixed stratified split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageTensors(Dataset):
    """Images held in memory, normalised per item to `(pixels - mean) / std`.

    `pixels` is [N, C, H, W], either uint8 0..255 or float in [0, 1]; keeping uint8
    as is holds CIFAR-10 in 150 MB instead of 600 MB of float32. Items are
    `(float32 [C, H, W] tensor, int label)`; `tensors()` gives the whole split at once.
    """

    def __init__(self, pixels: torch.Tensor, labels, mean, std, sources=None):
        self.pixels = pixels
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        # Where each image came from (file paths for imagefolder), or None.
        self.sources = sources

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def __getitem__(self, i):
        return self._normalise(self.pixels[i]), int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images normalised (float32 [N, C, H, W]) and their int64 labels."""
        return self._normalise(self.pixels), self.labels


@dataclass
class DatasetBundle:
    """A train/test pair with its class names and image geometry."""

    train: ImageTensors
    test: ImageTensors
    classes: list[str]
    in_channels: int
    image_size: int
    spec: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    # False when the class names were made up from the labels (a tensors file without a
    # class list): the class count is then only a lower bound.
    classes_known: bool = True


def channel_stats(pixels: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of [N, C, H, W] pixels on the 0..1 scale."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    x = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    std = x.std(dim=1)
    # A channel constant in training (say, always-zero green) is only centred:
    # dividing by its ~0 std would blow up any test image that has that colour.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def stratified_split(labels, test_fraction: float = 0.2, seed: int = 0):
    """Train and test index arrays (ascending) holding ~test_fraction of every class.

    Uses numpy's legacy RandomState, whose stream numpy keeps fixed across versions
    and machines, so the same labels always give the same split.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = len(members)
        # Every class with two or more images lands in both splits.
        n_test = min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0
        test.extend(rng.permutation(members)[:n_test].tolist())
    test = np.sort(np.asarray(test, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_tensor_file(path: str, spec: str) -> DatasetBundle:
    """A `tensors:<file.safetensors>` dataset: tensors `images` ([N, C, H, W] or [N, H, W];
    uint8 0..255 or float on the 0..1 scale) and `labels` ([N] integers). The class names
    may be given as a JSON list in the file's metadata under "classes". Every image is an
    evaluation image (test split); profiling uses the same images (train split)."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    from flipsafe.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"tensors file {path!r} not found ({spec})")
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted({"images", "labels"} - keys)
            if missing:
                raise DataError(f"{path} has no tensor named {' or '.join(missing)}; a tensors: "
                                f"dataset needs 'images' and 'labels' (it has: "
                                f"{', '.join(sorted(keys)) or 'none'})")
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({exc})") from None
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise DataError(f"{path}: 'images' must be uint8 or float [N, C, H, W] (or [N, H, W]), "
                        f"got {images.dtype} {list(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool \
            or len(labels) != len(images):
        raise DataError(f"{path}: 'labels' must be {len(images)} integers (one per image), got "
                        f"{labels.dtype} {list(labels.shape)}")
    if len(labels) == 0 or int(labels.min()) < 0:
        raise DataError(f"{path}: labels must be class indices >= 0, and there must be images")
    n_classes = int(labels.max()) + 1
    classes, known = [str(i) for i in range(n_classes)], False
    if "classes" in meta:
        try:
            named = json.loads(meta["classes"])
        except ValueError:
            named = None
        if not (isinstance(named, list) and len(named) >= n_classes):
            raise DataError(f"{path}: metadata 'classes' must be a JSON list of at least "
                            f"{n_classes} class names")
        classes, known = [str(c) for c in named], True
    if images.is_floating_point():
        images = images.float()
        # Checked before the statistics: one NaN pixel would make every image NaN.
        bad = torch.nonzero((~torch.isfinite(images)).flatten(1).any(1)).reshape(-1).tolist()
        if bad:
            listed = ", ".join(str(i) for i in bad[:10]) + (", …" if len(bad) > 10 else "")
            raise DataError(f"{path}: {len(bad)} of {len(images)} images hold NaN or infinite "
                            f"pixels (index {listed}); remove or repair them")
    mean, std = channel_stats(images)
    split = ImageTensors(images, labels.long(), mean, std)
    return DatasetBundle(train=split, test=split, classes=classes, in_channels=images.shape[1],
                         image_size=images.shape[-1], spec=spec, mean=mean, std=std,
                         classes_known=known)
