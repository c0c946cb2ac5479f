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
    as_codes,
    as_float32,
    chunked,
    pow2,
)
from flipsafe.formats.integers import sign_extend, twos_fields

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
