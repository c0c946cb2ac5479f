"""The Format interface, the Encoded container and shared tensor helpers."""

from __future__ import annotations

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


class Format:
    """A number format: how values become bit patterns and back.

    Subclasses set ``name``, ``bits`` (width of one element code), ``fields``
    (field name -> tuple of element bit positions, 0 = LSB), ``meta_fields``
    (metadata name -> bit width) and ``block_size`` (None for element formats).
    """

    name: str
    bits: int
    fields: dict[str, tuple[int, ...]]
    meta_fields: dict[str, int]
    block_size: int | None = None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable values of x as a float32 tensor of x's shape."""
        return self.decode(self.encode(x))

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
