"""Model backbones by name: built-in small-input networks plus torchvision/timm adapters."""

from __future__ import annotations

from torch import nn

from flipsafe.errors import ConfigError, unknown
from flipsafe.models import adapters, cnn, vit

_BUILDERS = {
    "mlp": cnn.mlp,
    "lenet": cnn.lenet,
    "resnet20": cnn.resnet20,
    "resnet18": cnn.resnet18,
    "vgg11_bn": cnn.vgg11_bn,
    "mobilenetv2": cnn.mobilenetv2,
    "vit_tiny": vit.vit_tiny,
}

# Smallest input side each design needs: 2 ** (number of halvings) for the
# networks that downsample, so the last feature map is at least 1x1.
MIN_IMAGE_SIZE = {
    "mlp": 1,
    "lenet": 4,
    "resnet20": 4,
    "resnet18": 8,
    "vgg11_bn": 2,
    "mobilenetv2": 8,
    "vit_tiny": 2,
}

_ADAPTERS = {"torchvision": adapters.torchvision_model, "timm": adapters.timm_model}

ARCHITECTURES = tuple(_BUILDERS)


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_arch(arch: str) -> tuple[str, str]:
    """(library or '', name) of an architecture spec; UnknownNameError (a ConfigError)
    unless it is a name in ARCHITECTURES or 'torchvision:<name>' / 'timm:<name>' (those
    libraries are imported only when the model is built)."""
    choices = list(ARCHITECTURES) + [f"{lib}:<name>" for lib in _ADAPTERS]
    library, sep, name = str(arch).partition(":")
    if sep:
        if library not in _ADAPTERS or not name:
            raise unknown("architecture", str(arch), choices)
        return library, name
    key = str(arch).strip().lower()
    if key not in _BUILDERS:
        raise unknown("architecture", str(arch), choices)
    return "", key


def build(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build an untrained classifier for [N, in_channels, image_size, image_size] inputs.

    `arch` is a name in ARCHITECTURES, or 'torchvision:<name>' / 'timm:<name>' for an
    untrained model from those libraries (imported only then, nothing downloaded;
    a torchvision stem is given `in_channels` inputs by replacing its first Conv2d).

    Every built-in model ends in one nn.Linear producing the logits, registered last
    among the Linears in named_modules() order; it uses only standard modules (so
    torch.fx.symbolic_trace works), each activation is its own non-inplace module,
    and any image_size from MIN_IMAGE_SIZE[arch] up works (8 for digits, 32 for CIFAR).
    """
    _positive_int("num_classes", num_classes, 2)
    _positive_int("in_channels", in_channels, 1)
    _positive_int("image_size", image_size, 1)

    library, name = check_arch(arch)
    if library:
        return _ADAPTERS[library](name, num_classes, in_channels, image_size)
    key = name
    if image_size < MIN_IMAGE_SIZE[key]:
        raise ConfigError(
            f"{key} needs images of at least {MIN_IMAGE_SIZE[key]}x{MIN_IMAGE_SIZE[key]} "
            f"pixels, got {image_size}x{image_size}; resize the data or pick another "
            f"architecture (mlp works at any size)"
        )
    return _BUILDERS[key](num_classes, in_channels, image_size)


__all__ = ["ARCHITECTURES", "MIN_IMAGE_SIZE", "build", "check_arch"]
