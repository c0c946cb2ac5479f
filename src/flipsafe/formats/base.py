"""The Format interface, the Encoded container and shared tensor helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flipsafe.errors import ConfigError

INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CODE_DTYPES = {"int32": torch.int32, "int64": torch.int64}

SIGN32 = -(2**31)  # 0x80000000 as an int32
ABS32 = 0x7FFFFFFF
INF32 = 0x7F800000
NAN32 = 0x7FC00000


@dataclass
class Encoded:
    """Raw bit patterns of a tensor in some format.

    ``codes`` is an int32 tensor of x's shape holding one element code per value
    (the low ``Format.bits`` bits; fp32 codes are the float32 bit pattern viewed as
    int32, so they are negative when the sign bit is set). ``meta`` maps metadata
    names (``Format.meta_fields``) to int32 tensors of metadata codes.
    """

    codes: torch.Tensor
    meta: dict[str, torch.Tensor] = field(default_factory=dict)


LAYOUTS = ("none", "tensor", "channel", "block")


class MetaLayout:
    """Which elements of a tensor of ``shape`` each metadata code governs.

    ``kind``: ``"none"`` (no metadata), ``"tensor"`` (one code for the whole tensor),
    ``"channel"`` (one code per dim-0 slice; a 1-D tensor has one per element) or
    ``"block"`` (one code per run of ``block`` consecutive elements along the last
    dimension; a partial final block holds the rest). Element positions are flat
    (row-major) indices into the tensor, metadata positions flat indices into the metadata
    tensor, whose shape the format's ``encode`` gives. ``name`` is the metadata tensor's
    name in ``Encoded.meta`` (None for ``"none"``); ``numel`` is the number of metadata
    codes and ``group_size`` the number of elements one code governs (a full block).
    """

    def __init__(self, kind: str, shape, name: str | None = None, block: int | None = None):
        if kind not in LAYOUTS:
            raise ConfigError(f"unknown metadata layout {kind!r}; choose one of: "
                              f"{', '.join(LAYOUTS)}")
        self.kind, self.name, self.block = kind, name, block
        self.shape = tuple(shape) or (1,)
        self.elements = math.prod(self.shape)
        self.last = self.shape[-1]
        if kind == "block":
            self.blocks_per_row = -(-self.last // block)
            self.numel = math.prod(self.shape[:-1]) * self.blocks_per_row
            self.group_size = block
        elif kind == "channel":
            self.numel = self.shape[0]
            self.group_size = self.elements // self.numel
        elif kind == "tensor":
            self.numel, self.group_size = 1, self.elements
        else:
            self.numel, self.group_size = 0, 1

    def groups(self, k: torch.Tensor) -> torch.Tensor:
        """Element positions [n, G] governed by metadata codes k [n] (G = group_size; a
        partial block repeats its last element, which changes neither its maximum nor its
        codes)."""
        span = torch.arange(self.group_size, device=k.device)
        if self.kind == "block":
            row, blk = k // self.blocks_per_row, k % self.blocks_per_row
            cols = (blk * self.block)[:, None] + span
            return row[:, None] * self.last + cols.clamp_(max=self.last - 1)
        return (k * self.group_size)[:, None] + span

    def of_element(self, index: torch.Tensor) -> torch.Tensor:
        """The metadata position governing each element position."""
        if self.kind == "block":
            row, col = index // self.last, index % self.last
            return row * self.blocks_per_row + col // self.block
        return index // self.group_size

    def element_groups(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For element positions [n]: the positions [n, G] whose values an encoding of the
        element depends on (its block; G = 1 outside block layouts), and the element's
        offset in them."""
        if self.kind != "block":
            return index[:, None], torch.zeros_like(index)
        return self.groups(self.of_element(index)), (index % self.last) % self.block

    def __repr__(self) -> str:
        return f"<MetaLayout {self.kind} of {self.shape}: {self.numel} codes>"


class Format:
    """A number format: how values become bit patterns and back.

    Subclasses set ``name``, ``bits`` (width of one element code), ``fields``
    (field name -> tuple of element bit positions, 0 = LSB), ``meta_fields``
    (metadata name -> bit width) and ``block_size`` (None for element formats), and
    ``needs_calibration`` when their scale must come from a calibration range.
    """

    name: str
    bits: int
    fields: dict[str, tuple[int, ...]]
    meta_fields: dict[str, int]
    block_size: int | None = None
    # True when the scale comes from a range (calibrate / calibrated_for): without one
    # it would follow whatever tensor is encoded, so a batch would change its neighbours.
    needs_calibration: bool = False
    native: bool = False  # each layer uses the codes its model stores (formats.stored)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable values of x as a float32 tensor of x's shape."""
        return self.decode(self.encode(x))

    def fast_quantizer(self):
        """A function equal to ``quantize`` bit for bit, possibly faster (it skips input
        checks, so give it float tensors)."""
        return self.quantize

    def meta_layout(self, shape) -> MetaLayout:
        """How the metadata codes of a tensor of ``shape`` map onto its elements."""
        if self.meta_fields:
            raise NotImplementedError(f"{self.name} has metadata but no layout")
        return MetaLayout("none", shape)

    def calibrated_for(self, x: torch.Tensor) -> Format:
        """A copy calibrated to the range of x itself (per channel where the format has
        channels); formats without a scale return self."""
        return self

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        """Element codes of the next value closer to zero (codes of zero stay)."""
        raise NotImplementedError

    def toward_zero(self, x: torch.Tensor) -> torch.Tensor:
        """For finite x: the values of the format nearest x whose magnitude is at most
        |x|, keeping x's sign (rounding toward zero; as ``quantize`` in everything else,
        e.g. the scale a block or an uncalibrated tensor gets)."""
        x = as_float32(x, f"{self.name}.toward_zero")
        enc = self.encode(x)
        v = self.decode(enc)
        # Round to nearest gave the neighbour below or above; one step down from above
        # suffices, a second covers a scale product that rounded up.
        for _ in range(2):
            over = ~(v.abs() <= x.abs())  # NaN (an overflow code) counts as over
            if not bool(over.any()):
                break
            enc = Encoded(torch.where(over, self.step_toward_zero(enc.codes), enc.codes),
                          enc.meta)
            v = self.decode(enc)
        return v

    def encode(self, x: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, amax) -> Format:
        """A copy with a fixed scale from a calibration range; formats without a scale
        return self."""
        return self

    def __repr__(self) -> str:
        return f"<Format {self.name}: {self.bits} bits>"


def bit_range(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi))


def as_float32(x, who: str) -> torch.Tensor:
    """x as a float32 tensor; other float widths convert exactly, anything else is refused."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(
            f"{who} expects a torch.Tensor, got {type(x).__name__}; "
            f"choose one of: {', '.join(INPUT_DTYPES)} tensors"
        )
    if x.dtype not in INPUT_DTYPES.values():
        # float64 would be rounded twice (to float32, then to the format), so it is
        # refused rather than silently giving results that are not the nearest value.
        raise ConfigError(
            f"{who} expects a float tensor, got {x.dtype}; choose one of: {', '.join(INPUT_DTYPES)}"
        )
    return x.detach().to(torch.float32).contiguous()


def as_codes(codes, who: str) -> torch.Tensor:
    """Integer codes as a contiguous int32 tensor (int64 wraps modulo 2**32)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in CODE_DTYPES.values():
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ConfigError(
            f"{who} expects an integer code tensor, got {got}; choose one of: "
            f"{', '.join(CODE_DTYPES)}"
        )
    return codes.to(torch.int32).contiguous()


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32 for integer e in [-127, 127], built from the bit pattern (2**-127 is
    the subnormal 1 << 22)."""
    return torch.where(e > -127, (e + 127) << 23, 1 << 22).view(torch.float32)


CHUNK = 1 << 18


def chunked(fn, step: int, *tensors: torch.Tensor):
    """fn applied to slices [i:i + step * threads] along dim 0 of every tensor, results
    gathered along dim 0 (fn returns a tensor or a tuple of them).

    On CPU, elementwise chains over a few hundred thousand values per thread keep their
    temporaries in cache and let the allocator reuse them, which is markedly faster than
    one pass over a large tensor; other devices get a single call.
    """
    n = tensors[0].shape[0]
    step *= torch.get_num_threads()
    if tensors[0].device.type != "cpu" or n <= step:
        return fn(*tensors)
    outs = single = None
    for i in range(0, n, step):
        res = fn(*(t[i:i + step] for t in tensors))
        if outs is None:
            single = isinstance(res, torch.Tensor)
            outs = [torch.empty((n, *r.shape[1:]), dtype=r.dtype) for r in
                    ((res,) if single else res)]
        for out, r in zip(outs, (res,) if single else res):
            out[i:i + step] = r
    return outs[0] if single else tuple(outs)
