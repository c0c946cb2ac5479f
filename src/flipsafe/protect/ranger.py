"""Ranger (Chen et al., DSN 2021) and FT-ClipAct (Hoang et al., DATE 2020): each protected
layer's outputs held within the range [lo, hi] profiled on clean data, so a fault cannot
push an activation beyond what the layer ever produced.

Campaigns use `profile_bounds` (the held outputs of an Engine, per layer or per channel)
and `guards` (engine guards: ranger clamps to [lo, hi], a NaN going to the bound on the
side of its sign bit and an infinity to the bound on its side; clip sets a value outside
[lo, hi], NaN or infinite, to 0). `protect(model, ranges)` returns a clamped copy of a
plain model (symmetric +-range); the model given is never changed.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from flipsafe.errors import ConfigError

# The layers Ranger guards by default: Conv and Linear outputs, as the campaigns' "all".
DEFAULT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Operations a clamp costs per output value: one comparison with each bound.
FLOPS_PER_VALUE = 2


def profile_bounds(engine, layers, batches, per_channel: bool = False) -> dict:
    """{layer: (lo, hi)} of what each of `layers` hands on (its output held in the engine's
    format, engine.quantize_output of the raw output) over image `batches` (an iterable of
    image tensors), the engine's guards unset. Per layer, lo and hi are 0-d tensors; per
    channel they hold one value per output channel, shaped to broadcast over an output
    (C, 1, ...) for Conv outputs (channel dim 1 of the batch) and (F,) on the last dim
    otherwise. Non-finite clean values are left out."""
    layers = list(layers)
    if engine.guards:
        raise ConfigError("profile_bounds needs an engine without guards (bounds are those "
                          "of the unprotected model)")
    lo: dict = {}
    hi: dict = {}
    seen = False
    for x in batches:
        labels = torch.zeros(x.shape[0], dtype=torch.long)
        g = engine.golden(x, labels, layers=set(layers))
        for name in layers:
            held = engine.quantize_output(name, g.raw[name])
            dim = _channel_dim(engine, name, held) if per_channel else None
            a, b = _extremes(held, dim)
            lo[name] = a if name not in lo else torch.minimum(lo[name], a)
            hi[name] = b if name not in hi else torch.maximum(hi[name], b)
        seen = True
    if not seen:
        raise ConfigError("ranger/clip bounds need at least one batch of images")
    out = {}
    for name in layers:
        a, b = lo[name], hi[name]
        if per_channel:
            shape = _bound_shape(engine, name, a.numel())
            a, b = a.reshape(shape), b.reshape(shape)
        out[name] = (a, b)
    return out


def _channel_dim(engine, name: str, held: torch.Tensor) -> int:
    """The batch dim of `held` that holds output channels: 1 for Conv, else the last."""
    return 1 if engine.kinds.get(name) == "conv" and held.dim() >= 3 else held.dim() - 1


def _bound_shape(engine, name: str, channels: int) -> tuple:
    """Shape of per-channel bounds broadcasting over one or more outputs of `name`."""
    shape = engine.layers("activations", name)[0].output_shape
    if engine.kinds.get(name) == "conv" and len(shape) >= 2:
        return (channels,) + (1,) * (len(shape) - 1)
    return (channels,)


def _extremes(held: torch.Tensor, dim: int | None):
    finite = torch.isfinite(held)
    big = torch.finfo(held.dtype).max
    low = torch.where(finite, held, big)
    high = torch.where(finite, held, -big)
    if dim is None:
        return low.amin(), high.amax()
    other = [d for d in range(held.dim()) if d != dim]
    return low.amin(dim=other), high.amax(dim=other)


def guards(bounds: dict, make=None, device=None) -> dict:
    """Engine guards {layer: fn} holding each layer of `bounds` ({layer: (lo, hi)}) within
    its bounds with `make(lo, hi)`: ranger_guard (the default) clamps (NaN to the bound on
    its sign bit's side), clip_guard sets values outside [lo, hi] and non-finite ones to
    0. Both act element-wise and are idempotent, as engine guards must be."""
    make = ranger_guard if make is None else make
    return {name: make(torch.as_tensor(lo, device=device, dtype=torch.float32),
                       torch.as_tensor(hi, device=device, dtype=torch.float32))
            for name, (lo, hi) in bounds.items()}


def ranger_guard(lo: torch.Tensor, hi: torch.Tensor):
    """x clamped to [lo, hi]; a NaN goes to lo when its sign bit is set, else to hi."""
    def guard(x):
        low, high = lo.to(x.device, x.dtype), hi.to(x.device, x.dtype)
        held = torch.maximum(torch.minimum(x, high), low)  # NaN propagates through both
        side = torch.where(torch.signbit(x), low, high)
        return torch.where(torch.isnan(x), side, held)
    return guard


def clip_guard(lo: torch.Tensor, hi: torch.Tensor):
    """x where lo <= x <= hi, else 0 (NaN and infinities included): FT-ClipAct."""
    def guard(x):
        inside = (x >= lo.to(x.device, x.dtype)) & (x <= hi.to(x.device, x.dtype))
        return torch.where(inside, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return guard


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
    """The campaign's ranger guard on [-limit, limit] as a forward hook."""
    guard = ranger_guard(torch.tensor(-limit), torch.tensor(limit))

    def hook(mod, inputs, out):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        return guard(out)
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
