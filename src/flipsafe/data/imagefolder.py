"""A folder of images with one sub-folder per class, read with Pillow into memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flipsafe.data.tensors import DatasetBundle, ImageTensors, channel_stats, stratified_split
from flipsafe.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm")
TEST_DIRS = ("test", "val")
# Fixed for the same reason as the digits split: stable image ids across runs.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# Images are stretched to size x size; larger sizes are refused before anything is read
# (a 100000-pixel side once grew to 24 GB and was OOM-killed).
MAX_IMAGE_SIZE = 1024
# The largest share of the available memory the images may take as float32, leaving
# room for the model, its activations and the rest of the machine.
MEMORY_FRACTION = 0.5


def _visible_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(folder: Path) -> list[str]:
    classes = _visible_dirs(folder)
    if not classes:
        raise DataError(
            f"no class sub-folders in '{folder}'; expected {folder}/<class name>/<images>"
        )
    if len(classes) == 1:
        raise DataError(
            f"'{folder}' has one class sub-folder ({classes[0]}); a classifier needs at least "
            f"two classes, so add a sub-folder per class"
        )
    return classes


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (folder / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of "
            f"'{folder}'"
        )
    return paths, labels


def _read(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image file '{path}' ({exc}); delete or replace it") from exc
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def available_memory_bytes() -> int | None:
    """Memory this process can still use: the smaller of the system's MemAvailable and
    what its cgroup (container) limit leaves; None when neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            found.append(max(int(limit) - int(used), 0))
    except OSError:
        pass
    return min(found) if found else None


def _check_fits(n_images: int, size: int, channels: int, spec: str) -> None:
    need = n_images * channels * size * size * 4
    free = available_memory_bytes()
    if free is not None and need > MEMORY_FRACTION * free:
        gb = 1 << 30
        raise ConfigError(
            f"{spec or 'the image folder'}: {n_images} images at {channels}x{size}x{size} need "
            f"about {need / gb:.1f} GB as float32, more than {MEMORY_FRACTION:.0%} of the "
            f"{free / gb:.1f} GB of memory available; choose a smaller size (?size=N)"
        )


def _read_all(paths: list[Path], size: int, channels: int) -> torch.Tensor:
    # Filled in place: one C-contiguous [N, C, H, W] array (np.stack of the transposed
    # RGB arrays would be channels-last) and no second copy of the whole split.
    pixels = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        pixels[i] = _read(p, size, channels)
    return torch.from_numpy(pixels)


def load_imagefolder(root, size: int = 32, channels: int = 3, spec: str = "") -> DatasetBundle:
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"imagefolder size must be at least 1 and at most {MAX_IMAGE_SIZE} "
                          f"pixels, got {size} in {spec or 'load_imagefolder'!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder '{root}' {what}; give imagefolder:<dir> with one "
                        f"sub-folder per class (or train/ and test/ sub-folders)")

    test_dir = next((root / d for d in TEST_DIRS if (root / d).is_dir()), None)
    has_train = (root / "train").is_dir()
    if has_train and test_dir is not None:
        classes = _class_names(root / "train")
        test_classes = _class_names(test_dir)
        if classes != test_classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise DataError(
                f"class folders differ between '{root / 'train'}' and '{test_dir}': "
                f"only in train: {only_train or 'none'}; only in {test_dir.name}: "
                f"{only_test or 'none'}; use the same class sub-folders in both"
            )
        train_paths, train_labels = _scan(root / "train", classes)
        test_paths, test_labels = _scan(test_dir, classes)
    elif has_train or test_dir is not None:
        raise DataError(
            f"'{root}' has a train/ folder without test/ or val/ (or the reverse); add the "
            f"missing one, or put the class folders directly in '{root}' to split automatically"
        )
    else:
        classes = _class_names(root)
        paths, labels = _scan(root, classes)
        train_idx, test_idx = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
        train_paths, train_labels = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
        test_paths, test_labels = [paths[i] for i in test_idx], [labels[i] for i in test_idx]

    missing = sorted(set(range(len(classes))) - set(train_labels))
    if missing:
        raise DataError(f"class folders without training images: {[classes[i] for i in missing]}; "
                        f"add images or remove the folders")
    if not test_paths:
        raise DataError(f"too few images in '{root}' to hold any out for testing; give a class "
                        f"at least 2 images, or add train/ and test/ sub-folders")
    _check_fits(len(train_paths) + len(test_paths), size, channels, spec)
    train_pixels = _read_all(train_paths, size, channels)
    test_pixels = _read_all(test_paths, size, channels)
    mean, std = channel_stats(train_pixels)
    return DatasetBundle(
        train=ImageTensors(train_pixels, train_labels, mean, std, [str(p) for p in train_paths]),
        test=ImageTensors(test_pixels, test_labels, mean, std, [str(p) for p in test_paths]),
        classes=classes,
        in_channels=channels,
        image_size=size,
        spec=spec,
        mean=mean,
        std=std,
    )
