"""ABFT checksums on Conv/Linear outputs (Huang & Abraham 1984; ABED, Li et al. 2016): the
output summed over output channels is compared with the layer input convolved with the
summed filters (precomputed once from the clean weights) plus the summed bias.

Tolerance, per output position (so clean runs are never flagged): the rounding of each
held output into the format, u/(1-u) * sum_c |y_c| with u = 2^-(p+1) for p stored mantissa
bits, plus half a subnormal step per channel, plus the float32 accumulation bound of the
layer's own computation, gamma * (|x| conv sum_c |W_c| + sum_c |b_c|) with gamma = (K+1) *
2^-24 for K terms per output (2^-11 where CUDA computes float32 convolutions or matmuls
in TF32). The checksum side is computed in float64. Detected: |difference| > tolerance
(or not finite) at some position of the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flipsafe.compat import ConvNd
from flipsafe.errors import ConfigError

# Layer types the checksums understand.
TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def unit_roundoff(fmt) -> tuple[float, float]:
    """(u, half the smallest subnormal step) of float format `fmt` (fp32: 2^-24, 2^-150);
    ConfigError for formats whose rounding is not per element relative (integers, blocks)."""
    fields = getattr(fmt, "fields", {})
    if "mantissa" not in fields or "exponent" not in fields or getattr(fmt, "block_size", None):
        raise ConfigError(f"abft derives its tolerance from a floating-point format's "
                          f"rounding; {fmt.name} is not one (use fp32, fp16, bf16, fp8_*)")
    p, e = len(fields["mantissa"]), len(fields["exponent"])
    emin = 1 - (2 ** (e - 1) - 1)
    return 2.0 ** -(p + 1), 2.0 ** (emin - p - 1)


class Checksum:
    """The checksum of one Conv/Linear module, built from its clean weights."""

    def __init__(self, module: nn.Module, fmt, device=None):
        if not isinstance(module, TYPES):
            raise ConfigError(f"abft checks Conv and Linear layers, not {type(module).__name__}")
        if isinstance(module, ConvNd) and module.padding_mode != "zeros":
            raise ConfigError("abft checks convolutions with zero padding only")
        self.module = module
        self.u, self.tiny = unit_roundoff(fmt)
        w = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else None
        self.conv = isinstance(module, ConvNd)
        self.channels = w.shape[0]
        if self.conv:
            g = module.groups
            grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
            self.wsum = grouped.sum(1)  # [g, Cin/g, k...]: one filter per group
            self.wabs = grouped.abs().sum(1)
            self.terms = math.prod(w.shape[1:])
        else:
            self.wsum, self.wabs = w.sum(0), w.abs().sum(0)  # [K]
            self.terms = w.shape[1]
        self.bsum = float(b.sum()) if b is not None else 0.0
        self.babs = float(b.abs().sum()) if b is not None else 0.0
        tf32 = (torch.device(device or "cpu").type == "cuda"
                and (torch.backends.cudnn.allow_tf32 if self.conv
                     else torch.backends.cuda.matmul.allow_tf32))
        self.gamma = (self.terms + 1) * (2.0 ** -11 if tf32 else 2.0 ** -24)

    def _apply(self, x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        """x with `filters` (the summed filters, or their absolute sums), summed over groups."""
        if not self.conv:
            return x @ filters
        m = self.module
        conv = _CONV[filters.dim() - 2]
        return conv(x, filters, None, m.stride, m.padding, m.dilation, m.groups).sum(1)

    def difference(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|sum_c y_c - reference|, tolerance) per output position of outputs `y` of
        inputs `x` ([n, ...] each)."""
        x = x.double()
        y = y.double()
        dim = 1 if self.conv else -1
        ref = self._apply(x, self.wsum) + self.bsum
        scale = self._apply(x.abs(), self.wabs) + self.babs
        total = y.sum(dim)
        size = y.abs().sum(dim)
        tol = (self.u / (1 - self.u)) * size + self.channels * self.tiny + self.gamma * scale
        return (total - ref).abs(), tol

    def detected(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Whether the checksum flags each of outputs `y` (one row per image)."""
        diff, tol = self.difference(x, y)
        bad = ~(diff <= tol)  # a NaN difference is flagged
        return bad.reshape(bad.shape[0], -1).any(1).cpu().numpy()
