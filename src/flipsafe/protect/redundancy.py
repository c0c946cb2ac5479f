"""Selective duplication (dup: compare two copies, detects) and triplication (tmr: majority
vote, corrects) of whole layers or of chosen output channels (HarDNN, Mahmoud et al. 2020).

A selection is a boolean mask over one image's output of a layer (True: computed twice or
three times). A fault at the layer's output is detected by dup iff it changes (bitwise,
NaN-aware) a duplicated element, and corrected by tmr iff it changes at least one element
and only triplicated ones. Channels can be chosen from a vulnerability map under a FLOP
budget (`choose_channels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def channel_mask(output_shape: tuple, conv: bool, channels) -> torch.Tensor:
    """Mask over one image's output (`output_shape`) selecting output `channels`: dim 0 of
    a Conv output, the last dim otherwise."""
    mask = torch.zeros(output_shape, dtype=torch.bool)
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    if conv:
        mask[idx] = True
    else:
        mask[..., idx] = True
    return mask


def verdicts(golden: torch.Tensor, faulty: torch.Tensor, mask: torch.Tensor, *,
             corrects: bool):
    """(detected, corrected) numpy bool arrays for faulty outputs `faulty` of golden outputs
    `golden` ([n, ...] each) of a layer whose elements `mask` ([...]) are duplicated and
    compared (corrects=False: a difference inside the mask is detected) or triplicated and
    voted (corrects=True: a fault confined to the mask is outvoted)."""
    changed = (_bits(faulty) != _bits(golden)).reshape(faulty.shape[0], -1)
    flat = mask.to(changed.device).reshape(1, -1)
    inside = (changed & flat).any(1)
    outside = (changed & ~flat).any(1)
    n = changed.shape[0]
    if not corrects:
        return inside.cpu().numpy(), np.zeros(n, dtype=bool)
    return np.zeros(n, dtype=bool), (inside & ~outside).cpu().numpy()


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Float values as their bit patterns (so NaN equals itself and -0 differs from 0)."""
    if not x.is_floating_point():
        return x
    return x.contiguous().view(_INTS[x.element_size()])


@dataclass(frozen=True)
class Candidate:
    """One output channel that may be protected: its SDC rate, the Wilson lower bound of
    that rate (what channels are ranked by) and what copying it costs."""

    layer: str
    channel: int
    rate: float
    flops: int
    low: float


def choose_channels(candidates, budget: float) -> dict[str, list[int]]:
    """Channels to protect, chosen greedily by the Wilson lower bound of their SDC rate
    (highest first, so one SDC in one fault does not outrank a well-sampled channel; ties
    to the higher rate, then the cheaper, then by layer and channel) while their summed
    FLOPs stay within `budget`; channels without SDCs are not chosen. {layer: sorted
    channels}."""
    order = sorted((c for c in candidates if c.rate > 0),
                   key=lambda c: (-c.low, -c.rate, c.flops, c.layer, c.channel))
    left = budget
    chosen: dict[str, list[int]] = {}
    for c in order:
        if c.flops <= left:
            chosen.setdefault(c.layer, []).append(int(c.channel))
            left -= c.flops
    return {k: sorted(v) for k, v in chosen.items()}


def channel_flops(info) -> int:
    """FLOPs (2 per multiply-add) of computing one output channel of Conv/Linear layer
    `info` (an engine LayerInfo) for one image."""
    w, out = info.weight_shape, info.output_shape
    if info.kind == "conv":
        return 2 * math.prod(w[1:]) * math.prod(out[1:])
    return 2 * w[1] * math.prod(out[:-1])


def layer_flops(info) -> int:
    """FLOPs of a Conv/Linear layer for one image (all its output channels)."""
    channels = info.output_shape[0] if info.kind == "conv" else info.output_shape[-1]
    return channel_flops(info) * channels
