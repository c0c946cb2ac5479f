"""Image datasets by spec string, held in memory, never downloaded."""

from __future__ import annotations

from flipsafe.data.imagefolder import MAX_IMAGE_SIZE
from flipsafe.data.tensors import DatasetBundle, ImageTensors, stratified_split
from flipsafe.errors import ConfigError, DataError, unknown

KINDS = ("digits", "imagefolder:<dir>", "cifar10:<dir>", "cifar100:<dir>",
         "tensors:<file.safetensors>")
IMAGEFOLDER_OPTIONS = {"size": 32, "channels": 3}


def _options(query: str, spec: str) -> dict:
    options = dict(IMAGEFOLDER_OPTIONS)
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in IMAGEFOLDER_OPTIONS:
            raise unknown("imagefolder option", key, IMAGEFOLDER_OPTIONS)
        if not sep or not value.isdigit():
            raise ConfigError(f"imagefolder option {key!r} needs a whole number, as in "
                              f"'imagefolder:<dir>?{key}={IMAGEFOLDER_OPTIONS[key]}'; got {item!r}")
        options[key] = int(value)
    if options["channels"] not in (1, 3):
        raise ConfigError(f"imagefolder channels must be 1 (grayscale) or 3 (RGB) in {spec!r}")
    return options


def load(spec: str = "digits", seed: int = 0) -> DatasetBundle:
    """Load a dataset; items are `(normalised float32 [C, H, W] tensor, int label)`.

    Specs:
      - ``digits``: scikit-learn's 1797 real 8x8 digits, [1, 8, 8], classes named
        "zero" .. "nine" (words read well in a text prompt).
      - ``imagefolder:<dir>[?size=32&channels=3]``: one sub-folder per class (sorted
        names); images are converted to RGB (channels=3) or grayscale (channels=1) and
        stretched to size x size (1 to MAX_IMAGE_SIZE = 1024; a folder whose images
        would take over half the available memory as float32 is refused). ``<dir>/train`` with ``<dir>/test`` (or ``val``) is
        used as given; otherwise every class is split 80/20.
      - ``tensors:<file.safetensors>``: tensors ``images`` and ``labels`` (see
        load_tensor_file); every image is both a test and a train image.
      - ``cifar10:<dir>`` / ``cifar100:<dir>``: the official python-pickle batches in
        ``<dir>`` or its ``cifar-10-batches-py`` / ``cifar-100-python`` sub-folder,
        normalised with the usual per-channel CIFAR mean/std.

    digits and imagefolder are normalised with the mean/std of their train split.
    Every split is fixed (stratified, seed 0), so an index into ``.test`` names the
    same image on every run and machine; `seed` does not change any built-in split
    and is kept so callers can pass their run seed through.
    """
    spec = str(spec).strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "digits" and not rest:
        from flipsafe.data.digits import load_digits

        return load_digits(spec)
    if kind == "tensors":
        from flipsafe.data.tensors import load_tensor_file

        if not rest:
            raise DataError("dataset 'tensors' needs a file: use 'tensors:<file.safetensors>'")
        return load_tensor_file(rest, spec)
    if kind not in ("imagefolder", "cifar10", "cifar100"):
        raise unknown("dataset", spec, KINDS)
    path, _, query = rest.partition("?")
    if not path:
        raise DataError(f"dataset {kind!r} needs a folder: use '{kind}:<dir>'")
    if kind == "imagefolder":
        from flipsafe.data.imagefolder import load_imagefolder

        options = _options(query, spec)
        return load_imagefolder(path, options["size"], options["channels"], spec)
    if query:
        raise ConfigError(f"{kind} takes no options; remove '?{query}' from {spec!r}")
    from flipsafe.data.cifar import load_cifar

    return load_cifar(kind, path, spec)


__all__ = ["KINDS", "MAX_IMAGE_SIZE", "DatasetBundle", "ImageTensors", "load", "stratified_split"]
