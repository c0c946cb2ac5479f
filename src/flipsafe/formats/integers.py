"""Symmetric scaled integers (int8, int4, per-channel int8) and two's-complement fixed point."""

from __future__ import annotations

import copy

import torch

from flipsafe.errors import ConfigError
from flipsafe.formats.base import (
    CHUNK,
    Encoded,
    Format,
    MetaLayout,
    as_codes,
    as_float32,
    bit_range,
    chunked,
)


def sign_extend(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed value of the low ``bits`` bits of int32 codes (two's complement)."""
    if bits == 32:
        return c
    sign = 1 << (bits - 1)
    return (c & ((1 << bits) - 1)).bitwise_xor_(sign).sub_(sign)


def twos_toward_zero(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement codes (low ``bits`` bits) one step closer to zero."""
    v = sign_extend(c, bits)
    v = v - torch.sign(v)
    return v if bits == 32 else v.bitwise_and_((1 << bits) - 1)


def twos_fields(bits: int) -> dict[str, tuple[int, ...]]:
    return {"sign": (bits - 1,), "magnitude": bit_range(0, bits - 1)}


def _abs_max(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Largest finite |x| (over all, or over ``dim``); 0 where there is none."""
    if x.numel() == 0:
        return x.new_zeros(() if dim is None else x.shape[0])
    hi, lo = (x.amax(), x.amin()) if dim is None else (x.amax(dim), x.amin(dim))
    amax = torch.maximum(hi, -lo)
    if not bool(torch.isfinite(amax).all()):
        # Only tensors holding inf/NaN pay for a masked second pass.
        finite = torch.where(torch.isfinite(x), x.abs(), 0.0)
        amax = finite.amax() if dim is None else finite.amax(dim)
    return amax


class IntFormat(Format):
    """Symmetric signed integers with a float32 scale: value = code * scale, codes in
    [-(2**(bits-1) - 1), 2**(bits-1) - 1].

    The scale is ``amax / (2**(bits-1) - 1)``, from ``calibrate(amax)`` when given,
    otherwise from the largest finite |x| of the tensor (per tensor, or per output channel
    = dim 0 when ``per_channel``). Codes are ``round(x / scale)`` (float32 division, ties
    to even) clamped to the range, so values beyond ±amax saturate and ±inf becomes the
    end of the range; NaN becomes 0. A tensor whose finite values are all 0 gets scale 1.

    ``encode`` stores the scale in ``meta["scale"]`` as float32 bit patterns (int32, shape
    () per tensor, (C,) per channel), so its bits can be faulted like any metadata; the
    code -2**(bits-1), which quantization never produces, decodes to -2**(bits-1) * scale.
    """

    needs_calibration = True

    def __init__(self, name: str, bits: int, per_channel: bool = False, amax=None):
        self.name, self.bits, self.per_channel = name, bits, per_channel
        self.fields = twos_fields(bits)
        self.meta_fields = {"scale": 32}
        self.qmax = 2 ** (bits - 1) - 1
        self.scale = None if amax is None else self._scale_from(amax)

    def _scale_from(self, amax) -> torch.Tensor:
        a = torch.as_tensor(amax, dtype=torch.float32)
        if a.dim() > (1 if self.per_channel else 0):
            want = "a scalar or a 1-D per-channel tensor" if self.per_channel else "a scalar"
            raise ConfigError(f"{self.name}: calibration amax must be {want}, "
                              f"got shape {tuple(a.shape)}")
        if not bool((torch.isfinite(a) & (a > 0)).all()):
            raise ConfigError(f"{self.name}: calibration amax must be finite and > 0, got {amax}")
        return a / self.qmax

    def calibrate(self, amax) -> IntFormat:
        """A copy whose scale comes from ``amax`` (scalar; per channel also 1-D)."""
        out = copy.copy(self)
        out.scale = self._scale_from(amax)
        return out

    def calibrated_for(self, x: torch.Tensor) -> IntFormat:
        """A copy whose scale comes from x's largest |value|: per dim-0 channel when
        ``per_channel`` and x has two or more dimensions, else over all of x. An all-zero
        tensor (or channel) has no range; it gets amax 1, which holds it exactly."""
        a = x.detach().abs().float()
        amax = a.reshape(a.shape[0], -1).amax(1) if self.per_channel and a.dim() > 1 else a.amax()
        return self.calibrate(torch.where(amax > 0, amax, torch.ones_like(amax)))

    def meta_layout(self, shape) -> MetaLayout:
        """One scale per tensor, or per dim-0 channel when ``per_channel``."""
        kind = "channel" if self.per_channel and len(tuple(shape)) > 0 else "tensor"
        return MetaLayout(kind, shape, "scale")

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        return twos_toward_zero(codes, self.bits)

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        """The scale per tensor (shape ()) or per channel (shape (C,))."""
        channels = self.per_channel and x.dim() > 0
        if self.scale is not None:
            s = self.scale.to(x.device)
            if not channels or s.dim() == 0:
                return s.expand(x.shape[0]).contiguous() if channels else s.reshape(())
            if s.numel() != x.shape[0]:
                raise ConfigError(f"{self.name}: calibrated for {s.numel()} channels but the "
                                  f"tensor has {x.shape[0]} (dim 0)")
            return s
        amax = _abs_max(x.reshape(x.shape[0], -1), 1) if channels else _abs_max(x)
        s = amax / self.qmax
        return torch.where(s > 0, s, 1.0)

    def _per_row(self, x: torch.Tensor, s: torch.Tensor, fn):
        """fn(values, scales) over chunks: flat with a scalar scale, or (C, K) rows with a
        (C, 1) scale column."""
        if s.dim() == 0:
            return chunked(lambda v: fn(v, s), CHUNK, x.reshape(-1)).view(x.shape)
        rows = x.reshape(x.shape[0], -1)
        step = max(1, CHUNK // max(rows.shape[1], 1))
        return chunked(fn, step, rows, s.reshape(-1, 1)).view(x.shape)

    def _round(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        q = torch.div(x, s).round_().clamp_(-self.qmax, self.qmax)
        return q.nan_to_num_(nan=0.0)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest multiples of the scale, saturating at ±qmax * scale."""
        x = as_float32(x, f"{self.name}.quantize")
        return self._per_row(x, self._scales(x), lambda v, s: self._round(v, s).mul_(s))

    def encode(self, x: torch.Tensor) -> Encoded:
        x = as_float32(x, f"{self.name}.encode")
        s = self._scales(x)
        mask = (1 << self.bits) - 1
        fn = lambda v, s: self._round(v, s).to(torch.int32).bitwise_and_(mask)
        codes = self._per_row(x, s, fn)
        return Encoded(codes, {"scale": s.view(torch.int32).clone()})

    def decode(self, enc: Encoded) -> torch.Tensor:
        who = f"{self.name}.decode"
        if "scale" not in enc.meta:
            raise ConfigError(f"{who} needs meta['scale']; choose one of: scale")
        c = as_codes(enc.codes, who)
        s = as_codes(enc.meta["scale"], who).view(torch.float32)
        if s.dim() == 1 and (c.dim() == 0 or s.numel() != c.shape[0]):
            raise ConfigError(f"{who}: {s.numel()} channel scales for codes of shape "
                              f"{tuple(c.shape)}; dim 0 must match")
        bits = self.bits
        return self._per_row(c, s, lambda v, s: sign_extend(v, bits).to(torch.float32).mul_(s))


class FixedFormat(Format):
    """Two's-complement fixed point ``fixed_q{I}.{F}``: I integer bits (the sign bit
    included) and F fraction bits, value = code * 2**-F.

    Values round to the nearest multiple of 2**-F (ties to even) and saturate at the ends
    of the range [-2**(I-1), 2**(I-1) - 2**-F]; ±inf saturate, NaN becomes 0. Formats wider
    than 25 bits hold values float32 cannot represent exactly; those decode rounded to
    float32.
    """

    def __init__(self, name: str, int_bits: int, frac_bits: int):
        if int_bits < 1 or frac_bits < 0 or int_bits + frac_bits > 32:
            raise ConfigError(f"{name}: impossible fixed point q{int_bits}.{frac_bits}; choose "
                              "I >= 1 integer bits (sign included), F >= 0, I + F <= 32")
        self.name, self.int_bits, self.frac_bits = name, int_bits, frac_bits
        self.bits = n = int_bits + frac_bits
        self.fields = twos_fields(n)
        self.meta_fields = {}
        self._lo, self._hi = -(2 ** (n - 1)), 2 ** (n - 1) - 1
        self._mask = -1 if n == 32 else (1 << n) - 1

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        return twos_toward_zero(codes, self.bits)

    def _ints(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.mul(x, 2.0**self.frac_bits).round_().nan_to_num_(nan=0.0)
        if self.bits <= 24:
            return q.clamp_(self._lo, self._hi).to(torch.int32)
        # 2**(n-1) - 1 is not a float32 for n > 24: clamp in float to bounds it holds,
        # then in int64, so inf and huge values never reach an out-of-range conversion.
        q = q.clamp_(self._lo, -float(self._lo)).to(torch.int64).clamp_(self._lo, self._hi)
        return q.to(torch.int32)

    def _values(self, c: torch.Tensor) -> torch.Tensor:
        return sign_extend(c, self.bits).to(torch.float32).mul_(2.0**-self.frac_bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x = as_float32(x, f"{self.name}.quantize")
        scale = 2.0**-self.frac_bits
        fn = lambda v: self._ints(v).to(torch.float32).mul_(scale)
        return chunked(fn, CHUNK, x.reshape(-1)).view(x.shape)

    def encode(self, x: torch.Tensor) -> Encoded:
        x = as_float32(x, f"{self.name}.encode")
        codes = chunked(lambda v: self._ints(v).bitwise_and_(self._mask), CHUNK, x.reshape(-1))
        return Encoded(codes.view(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        c = as_codes(enc.codes, f"{self.name}.decode")
        return chunked(self._values, CHUNK, c.reshape(-1)).view(c.shape)
