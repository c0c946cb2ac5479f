"""Block formats with a shared power-of-two scale: block floating point and OCP MX."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flipsafe.errors import ConfigError
from flipsafe.formats.base import (
    ABS32,
    CHUNK,
    INF32,
    Encoded,
    Format,
    MetaLayout,
    as_codes,
    as_float32,
    chunked,
    pow2,
)
from flipsafe.formats.floats import FloatFormat
from flipsafe.formats.integers import sign_extend, twos_fields, twos_toward_zero

SCALE_NAN = 255  # the E8M0 NaN code


class ScaledInt:
    """Block element: ``bits``-bit two's complement with ``bits - 2`` fraction bits
    (MXINT8: value = code * 2**-6), clamped symmetrically to ±(2**(bits-1) - 1)."""

    def __init__(self, bits: int):
        self.bits, self.fields = bits, twos_fields(bits)
        self.frac, self.qmax = bits - 2, 2 ** (bits - 1) - 1
        self.emax = 0  # the largest element magnitude is just under 2**(emax + 1) = 2

    def encode_codes(self, v: torch.Tensor) -> torch.Tensor:
        q = torch.round(v * 2.0**self.frac).clamp_(-self.qmax, self.qmax).nan_to_num_(nan=0.0)
        return q.to(torch.int32).bitwise_and_((1 << self.bits) - 1)

    def decode_codes(self, c: torch.Tensor) -> torch.Tensor:
        return sign_extend(c, self.bits).to(torch.float32).mul_(2.0**-self.frac)

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        return twos_toward_zero(codes, self.bits)


class BlockFormat(Format):
    """Blocks of ``block_size`` values along the last dimension share one 8-bit E8M0
    scale X = 2**(code - 127) (code 255 = NaN); each element stores P and means X * P.

    Encoding follows OCP MX v1.0 §6.3: the shared exponent is
    floor(log2(max |V|)) - emax, where emax is the exponent of the element format's
    largest normal, clamped below at -127 (all-zero and tiny blocks get code 0); each
    element is V / X rounded to nearest (ties to even) in the element format, saturating
    at its largest magnitude. A block holding NaN or ±inf gets the NaN scale, so it
    decodes to NaN throughout; its element codes are those of its finite values under the
    scale those alone would give (±inf saturates, NaN becomes the element NaN, or 0 for
    elements without one).

    ``mx*`` formats (blocks of 32) name the metadata ``scale``. ``bfp{M}`` (blocks of 16)
    is the same construction with M-bit two's-complement mantissas of M - 2 fraction bits
    (so ``bfp8`` is MXINT8 with a different block size), and names the metadata
    ``exponent``: its shared exponent is floor(log2(max |V|)).

    Any last-dimension length is accepted: a partial final block is padded with zeros
    for the maximum. Metadata shape is ``x.shape[:-1] + (n_blocks,)`` (a 0-d x is treated
    as shape (1,)). Decoding multiplies exactly in float32, so a faulted scale that takes
    a value past the float32 range gives ±inf.
    """

    def __init__(self, name: str, element, block_size: int, meta_name: str):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"{name}: block_size must be a positive integer, got "
                              f"{block_size!r}; choose 1 or more (OCP MX uses 32)")
        self.name, self.element, self.block_size = name, element, block_size
        self.bits, self.fields = element.bits, element.fields
        self.meta_name = meta_name
        self.meta_fields = {meta_name: 8}
        self._step = max(1, CHUNK // block_size)
        self.emax = element.emax

    def meta_layout(self, shape) -> MetaLayout:
        """One scale per block of ``block_size`` along the last dimension."""
        return MetaLayout("block", shape, self.meta_name, self.block_size)

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        """Element codes one step closer to zero under the same scale."""
        return self.element.step_toward_zero(codes)

    def fast_quantizer(self):
        """``quantize`` in a few fused-friendly tensor operations for blocks of saturating
        float elements (OCP MX FP8/FP6/FP4) along a last dimension that is a multiple of
        the block size or shorter than one block; other shapes, and other formats, go to
        ``quantize``.

        The shortcut is used only if it reproduces ``quantize`` bit for bit on a probe
        tensor (zeros, float32 subnormals, huge values, ±inf and NaN in rows of several
        lengths), so a format whose ``quantize`` changes cannot silently disagree.
        """
        fast = self._mx_float_quantizer()
        if fast is None:
            return self.quantize
        probe = _probe_tensor()
        for t in (probe, probe[:, :32], probe[:, :4], probe[:, :16].reshape(8, 8, 16)):
            want, got = self.quantize(t), fast(t)
            if not torch.equal(want.view(torch.int32), got.view(torch.int32)):
                return self.quantize
        return fast

    def _mx_float_quantizer(self):
        """The shared exponent from the block maximum, then each scaled value rounded to
        the element's mantissa width by adding and subtracting 2**(its exponent + 23 - m),
        the exponent clamped at the element's smallest normal so that subnormals round at
        its spacing; None unless the elements are saturating floats."""
        el = self.element
        if not isinstance(el, FloatFormat) or not el.saturate:
            return None
        bs, emax, top = self.block_size, self.emax, float(el.max)
        lo, shift = (el.emin + 127) << 23, (23 - el.man_bits) << 23
        slow = self.quantize

        def quantize(x: torch.Tensor) -> torch.Tensor:
            length = x.shape[-1] if x.dim() else 1
            if length % bs == 0:
                xb = x.reshape(*x.shape[:-1], length // bs, bs)
            elif length < bs:
                xb = x.unsqueeze(-2)  # one short block per row: zero padding leaves its max
            else:
                return slow(x)
            xb = xb.float()
            lo_, hi_ = torch.aminmax(xb, dim=-1, keepdim=True)  # one pass; NaN propagates
            amax = torch.maximum(-lo_, hi_).view(torch.int32) & ABS32
            shared = ((amax >> 23) - (127 + emax)).clamp_(min=-127)
            v = (xb * pow2(-shared)).clamp_(-top, top)  # -shared <= 127: a normal factor
            a = v.abs()
            c = (a.view(torch.int32) & INF32).clamp_(min=lo).add_(shift).view(torch.float32)
            r = torch.copysign(a.add_(c).sub_(c), v, out=v)
            # 2**shared is a normal float32 except for the smallest shared exponent, -127,
            # where two normal factors give the one rounding a subnormal result needs.
            if bool((shared < -126).any()):
                half = shared >> 1
                out = r * pow2(half) * pow2(shared - half)
            else:
                out = r.mul_(pow2(shared))
            if bool((amax >= INF32).any()):
                out = torch.where(amax >= INF32, float("nan"), out)
            return out.reshape(x.shape)
        return quantize

    def _blocks(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        t = t.reshape(1) if t.dim() == 0 else t
        length = t.shape[-1]
        nb = -(-length // self.block_size)
        if nb * self.block_size != length:
            t = F.pad(t, (0, nb * self.block_size - length))
        return t.reshape(*t.shape[:-1], nb, self.block_size), length

    def _unblock(self, t: torch.Tensor, length: int, shape) -> torch.Tensor:
        t = t.reshape(*t.shape[:-2], -1)
        if t.shape[-1] != length:
            t = t[..., :length]
        return t.reshape(shape).contiguous()

    def encode(self, x: torch.Tensor) -> Encoded:
        x = as_float32(x, f"{self.name}.encode")
        xb, length = self._blocks(x)
        rows = xb.reshape(-1, self.block_size)
        codes, scale = chunked(self._encode_rows, self._step, rows)
        codes = self._unblock(codes.view(xb.shape), length, x.shape)
        return Encoded(codes, {self.meta_name: scale.view(xb.shape[:-1])})

    def _encode_rows(self, xb: torch.Tensor):
        """(element codes, scale codes) of float32 blocks, one block per row."""
        a = xb.view(torch.int32) & ABS32
        amax = a.amax(-1)
        bad = amax >= INF32
        if bool(bad.any()):
            amax = torch.where(bad, torch.where(a < INF32, a, 0).amax(-1), amax)
        # amax's float32 exponent field is floor(log2(amax)) + 127; zero and subnormal
        # maxima read as -127 or less, which the clamp at -127 absorbs.
        shared = ((amax >> 23) - (127 + self.emax)).clamp_(min=-127)
        # V / X as V * 2**-shared: exact, except for values so far below the block maximum
        # that they round to zero in any element format.
        scaled = torch.mul(xb, pow2(-shared).unsqueeze(-1), out=a.view(torch.float32))
        codes = self.element.encode_codes(scaled)
        return codes, torch.where(bad, SCALE_NAN, shared + 127)

    def decode(self, enc: Encoded) -> torch.Tensor:
        who = f"{self.name}.decode"
        if self.meta_name not in enc.meta:
            raise ConfigError(f"{who} needs meta[{self.meta_name!r}]; choose one of: "
                              f"{self.meta_name}")
        c = as_codes(enc.codes, who)
        scale = as_codes(enc.meta[self.meta_name], who)
        cb, length = self._blocks(c)
        if scale.shape != cb.shape[:-1]:
            raise ConfigError(f"{who}: meta[{self.meta_name!r}] has shape {tuple(scale.shape)}"
                              f" but codes of shape {tuple(c.shape)} need "
                              f"{tuple(cb.shape[:-1])}")
        out = chunked(self._decode_rows, self._step, cb.reshape(-1, self.block_size),
                      scale.reshape(-1, 1))
        return self._unblock(out.view(cb.shape), length, c.shape)

    def _decode_rows(self, cb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale = scale & 0xFF
        # P * X is exact whenever it is a float32 (P has few bits; X is a power of two).
        out = self.element.decode_codes(cb).mul_(pow2((scale - 127).clamp_(max=127)))
        # A NaN scale makes the whole block the canonical quiet NaN; a NaN * NaN product
        # would carry whichever payload the CPU's kernel picks (vector and scalar differ).
        return out.masked_fill_((scale == SCALE_NAN).expand_as(out), float("nan"))


def _probe_tensor() -> torch.Tensor:
    """Values that exercise every branch of a block quantiser: spread exponents, zeros,
    float32 subnormals, huge values, ±inf and NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-140, 120, (64, 1),
                                                                    generator=g).float())
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 3e38])
    x[1, 7], x[2, 40], x[3, 3] = float("inf"), float("-inf"), float("nan")
    x[4] = torch.randn(96, generator=g) * 1e-30
    return x
