"""Ranger (Chen et al., DSN 2021): each protected layer's outputs clamped to the range
profiled on clean data, so a fault cannot push an activation beyond what the layer ever
produced. A NaN or an infinity goes to the bound on its side (sign kept), as the engine's
'profiled' clamp does.

`protect(model, ranges)` returns a protected copy; the model given is never changed.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from flipsafe.errors import ConfigError
from flipsafe.inject.emulate import clamp

# The layers Ranger guards by default: Conv and Linear outputs, as the campaigns' "all".
DEFAULT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Operations a clamp costs per output value: one comparison with each bound.
FLOPS_PER_VALUE = 2


def protected_layers(model: nn.Module, ranges: dict, select: str | None = None) -> list[str]:
    """Names of the leaf modules Ranger guards: those with a profiled range that are Conv or
    Linear (select None) or whose names match the regular expression `select`."""
    names = []
    for name, mod in model.named_modules():
        if not name or name not in ranges or list(mod.children()):
            continue
        if select is None and not isinstance(mod, DEFAULT_TYPES):
            continue
        if select is not None and not re.search(select, name):
            continue
        names.append(name)
    if not names:
        raise ConfigError(f"ranger: no profiled layer matches {select or 'Conv/Linear'}; "
                          f"profiled layers: {', '.join(sorted(ranges)) or 'none'}")
    return names


def protect(model: nn.Module, ranges: dict, select: str | None = None) -> nn.Module:
    """A copy of `model` whose protected layers (protected_layers) clamp their outputs to
    +-ranges[layer] (max |output| from Engine.profile)."""
    names = protected_layers(model, ranges, select)
    guarded = copy.deepcopy(model)
    modules = dict(guarded.named_modules())
    for name in names:
        limit = float(ranges[name])
        if not limit >= 0:
            raise ConfigError(f"ranger: the range of {name} must be a number >= 0, got {limit!r}")
        modules[name].register_forward_hook(_clamp_hook(limit))
    return guarded


def _clamp_hook(limit: float):
    def hook(mod, inputs, out):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        return clamp(out, torch.tensor(limit, device=out.device), "profiled")
    return hook


def flops(model: nn.Module, ranges: dict, example: torch.Tensor,
          select: str | None = None) -> int:
    """Extra operations per image of Ranger on `model`: FLOPS_PER_VALUE per value each
    protected layer outputs, counted on one run of `example` ([batch, ...])."""
    names = set(protected_layers(model, ranges, select))
    count = [0]
    handles = []

    def hook(mod, inputs, out):
        if isinstance(out, torch.Tensor):
            count[0] += out[0].numel() if out.dim() else 1

    for name, mod in model.named_modules():
        if name in names:
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return FLOPS_PER_VALUE * count[0]
