"""Untrained torchvision / timm models, imported only when one is asked for."""

from __future__ import annotations

import difflib
import importlib

from torch import nn

from flipsafe.errors import FlipsafeError, UnknownNameError, install_hint

INSTALL_HINT = install_hint("vision")


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FlipsafeError(
            f"architecture '{package}:<name>' needs the {package} package, which is not "
            f"installed; run: {INSTALL_HINT}"
        ) from exc


def _check_name(package: str, name: str, choices, listing: str) -> None:
    # These libraries know hundreds of models, so suggest near matches instead of all.
    if name in choices:
        return
    close = difflib.get_close_matches(name, choices, n=5)
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    raise UnknownNameError(
        f"unknown {package} architecture {name!r}; {hint}(all names: {listing})"
    )


def _call_with_optional(fn, name: str, optional: dict, **kwargs):
    """Call fn, retrying without the `optional` kwargs if the model does not accept them."""
    try:
        return fn(name, **kwargs, **optional)
    except TypeError as exc:
        if not any(key in str(exc) for key in optional):
            raise
        return fn(name, **kwargs)


def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first Conv2d for one with `in_channels` inputs (torchvision stems are RGB)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != in_channels:
                new = nn.Conv2d(
                    in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None,
                    module.padding_mode,
                )
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, new)
            break
    return model


def torchvision_model(name: str, num_classes: int, in_channels: int, image_size: int):
    models = _import("torchvision.models", "torchvision")
    _check_name("torchvision", name, models.list_models(module=models),
                "torchvision.models.list_models()")
    model = _call_with_optional(
        models.get_model, name, {"image_size": image_size}, weights=None, num_classes=num_classes
    )
    return _replace_first_conv(model, in_channels)


def timm_model(name: str, num_classes: int, in_channels: int, image_size: int):
    timm = _import("timm", "timm")
    _check_name("timm", name, timm.list_models(), "timm.list_models()")
    return _call_with_optional(
        timm.create_model, name, {"img_size": image_size},
        pretrained=False, num_classes=num_classes, in_chans=in_channels,
    )
