"""How tensors live in an emulated format: calibration, fault groups, corrupt, clamp; and
the full-precision arithmetic (no TF32) the engine computes in."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from flipsafe import formats
from flipsafe.errors import InjectionError, UnknownNameError
from flipsafe.faults import apply
from flipsafe.formats import Encoded

# Clamp modes for corrupted values (see clamp); this module owns the list.
CLAMPS = ("none", "profiled", "goldeneye")


@contextlib.contextmanager
def full_precision():
    """No TF32 while the engine computes: on recent GPUs cuDNN convolutions (and matmuls,
    where allowed) would otherwise round fp32 operands to 10 mantissa bits, and the
    campaign would not be the fp32 (or emulated-format) model it claims."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic,
                                        allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def exact(method):
    """Run a method under full_precision."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with full_precision():
            return method(*args, **kwargs)
    return run


def check_clamp(mode) -> str:
    """`mode` in its one spelling (any case given) if it is a clamp mode, else
    UnknownNameError naming the choices."""
    mode = mode.lower() if isinstance(mode, str) else mode
    if mode not in CLAMPS:
        raise UnknownNameError(f"clamp must be one of: {', '.join(CLAMPS)}; got {mode!r}")
    return mode


def param_view_shape(shape) -> tuple[int, ...]:
    """Parameters are held as [out, fan_in] (blocks run along the fan-in, scales per out)."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) > 2 else shape


def calibrate_param(fmt, p: torch.Tensor):
    """fmt calibrated to parameter p's own range (as held: [out, fan_in])."""
    if not fmt.needs_calibration:
        return fmt
    return fmt.calibrated_for(p.reshape(param_view_shape(p.shape)) if p.dim() else p.reshape(1))


def calibrate_output(fmt, amax: float | None, layer: str):
    if not fmt.needs_calibration:
        return fmt
    if amax is None:
        raise InjectionError(
            f"format {fmt.name} needs an activation range for layer {layer!r}; call "
            f"engine.profile(training_images) first or pass ranges= to the Engine")
    return fmt.calibrate(max(float(amax), 1e-30))


class TensorCoder:
    """One tensor in a format: its per-image (or parameter) shape, view and metadata layout.

    Faults act on groups of elements that share one metadata code: a block (block
    formats), the whole tensor or one dim-0 channel (scaled integers). An element fault
    needs the group only to recover its metadata; a metadata fault rewrites all of it.
    """

    def __init__(self, fmt, shape, is_param: bool):
        if len(fmt.meta_fields) > 1:
            raise InjectionError(f"format {fmt.name} has {len(fmt.meta_fields)} metadata "
                                 f"tensors; the engine handles formats with at most one")
        self.fmt = fmt
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.view = param_view_shape(self.shape) if is_param else (self.shape or (1,))
        self.layout = fmt.meta_layout(self.view)
        self.meta = self.layout.name
        self.block = self.layout.kind == "block"
        self.meta_numel = self.layout.numel
        self.group_size = self.layout.group_size
        self.meta_groups = self.layout.groups
        self.element_groups = self.layout.element_groups
        self.meta_of_element = self.layout.of_element

    def encode_rows(self, vals: torch.Tensor):
        """Codes [n, G] and one metadata code per row [n] (None without metadata)."""
        enc = self.fmt.encode(vals)
        if self.meta is None:
            return enc.codes, None
        m = enc.meta[self.meta]
        if self.block:
            return enc.codes, m[:, 0]
        return enc.codes, m.reshape(-1).expand(vals.shape[0])

    def decode_rows(self, codes: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        if self.meta is None:
            return self.fmt.decode(Encoded(codes))
        if self.block:
            return self.fmt.decode(Encoded(codes, {self.meta: meta[:, None].contiguous()}))
        return self.fmt.decode(Encoded(codes, {self.meta: meta.contiguous()}))


class ParamCodes:
    """A parameter's encoding computed once: codes (flat) and metadata (flat)."""

    def __init__(self, fmt, p: torch.Tensor):
        self.coder = TensorCoder(fmt, p.shape, is_param=True)
        view = p.detach().float().reshape(self.coder.view)
        enc = fmt.encode(view)
        self.codes = enc.codes.reshape(-1)
        self.meta = (enc.meta[self.coder.meta].reshape(-1)
                     if self.coder.meta is not None else None)
        self.values = fmt.decode(enc).reshape(p.shape)

    def corrupt(self, index, is_meta, mask, op, value):
        """(positions [n, G], new values [n, G]) of the parameter under each fault."""
        c = self.coder
        if is_meta:
            if c.meta is None:
                raise InjectionError(f"format {c.fmt.name} has no metadata to corrupt")
            pos = c.meta_groups(index)
            codes = self.codes[pos]
            meta = apply(self.meta[index], mask, op, value)
            return pos, c.decode_rows(codes, meta)
        pos = index[:, None]
        codes = apply(self.codes[index], mask, op, value)[:, None]
        meta = self.meta[c.meta_of_element(index)] if c.meta is not None else None
        return pos, c.decode_rows(codes, meta)


def corrupt_values(coder: TensorCoder, pre: torch.Tensor, index, is_meta, mask, op, value):
    """Faults on per-image tensors encoded on the fly from `pre` [n, numel] (the values
    the format encodes: the raw output of a quantised layer).

    Returns (positions [n, G], new values [n, G]); element faults report G = 1.
    """
    if is_meta:
        if coder.meta is None:
            raise InjectionError(f"format {coder.fmt.name} has no metadata to corrupt")
        pos = coder.meta_groups(index)
        codes, meta = coder.encode_rows(pre.gather(1, pos))
        meta = apply(meta, mask, op, value)
        return pos, coder.decode_rows(codes, meta)
    pos, offset = coder.element_groups(index)
    codes, meta = coder.encode_rows(pre.gather(1, pos))
    rows = torch.arange(len(index), device=index.device)
    codes = codes.clone()
    codes[rows, offset] = apply(codes[rows, offset], mask, op, value)
    new = coder.decode_rows(codes, meta)[rows, offset]
    return index[:, None], new[:, None]


def clamp(values: torch.Tensor, limit: torch.Tensor, mode: str, fmt=None) -> torch.Tensor:
    """Clamp corrupted values beyond +-limit (or NaN/Inf) to +-L, where L is the limit
    rounded into the emulated format `fmt` toward zero: the largest value of the format
    whose magnitude is at most the limit (a block format: as a lone value in its block),
    so a clamped value is one the format holds and never exceeds the limit. With fmt None
    the limit is used as it is (it must then be a value of the format already, like the
    largest emulated weight, or the values are not held in a format).

    'profiled' keeps the sign (a NaN goes to the side of its sign bit); 'goldeneye'
    reproduces GoldenEye's range detector, where `NaN < 0` is false, so every NaN
    becomes +limit.
    """
    check_clamp(mode)
    if mode == "none":
        return values
    limit = limit.to(values.dtype)
    bad = ~torch.isfinite(values) | (values.abs() > limit)
    if fmt is not None:
        limit = fmt.toward_zero(limit)
    if mode == "profiled":
        fixed = torch.copysign(limit.expand_as(values), values)
    else:
        fixed = torch.where(values < 0, -limit, limit)
    return torch.where(bad, fixed, values)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise identity of float32 values as bit patterns (NaN equals itself)."""
    return a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)


def get_format(name):
    if not isinstance(name, str):
        return name
    return formats.get(name)
