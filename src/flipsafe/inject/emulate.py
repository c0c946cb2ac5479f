"""How tensors live in an emulated format: calibration, fault groups, corrupt, clamp."""

from __future__ import annotations

import math

import torch

from flipsafe import formats
from flipsafe.errors import InjectionError
from flipsafe.faults import apply
from flipsafe.formats import Encoded

CLAMPS = ("none", "profiled", "goldeneye")


def needs_scale(fmt) -> bool:
    """Formats whose scale must be calibrated (else it would depend on the whole batch)."""
    return fmt.calibrate(1.0) is not fmt


def meta_name(fmt) -> str | None:
    if not fmt.meta_fields:
        return None
    if len(fmt.meta_fields) > 1:
        raise InjectionError(f"format {fmt.name} has {len(fmt.meta_fields)} metadata tensors; "
                             f"the engine handles formats with at most one")
    return next(iter(fmt.meta_fields))


def param_view_shape(shape) -> tuple[int, ...]:
    """Parameters are held as [out, fan_in] (blocks run along the fan-in, scales per out)."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) > 2 else shape


def calibrate_param(fmt, p: torch.Tensor):
    if not needs_scale(fmt):
        return fmt
    view = p.reshape(param_view_shape(p.shape)) if p.dim() else p.reshape(1)
    a = view.abs().float()
    if getattr(fmt, "per_channel", False) and view.dim() > 1:
        amax = a.reshape(view.shape[0], -1).amax(1)
    else:
        amax = a.amax()
    # An all-zero tensor (or channel) has no range; any positive scale holds it exactly.
    return fmt.calibrate(torch.where(amax > 0, amax, torch.ones_like(amax)))


def calibrate_output(fmt, amax: float | None, layer: str):
    if not needs_scale(fmt):
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
        self.fmt = fmt
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self.view = param_view_shape(self.shape) if is_param else (self.shape or (1,))
        self.meta = meta_name(fmt)
        self.block = fmt.block_size
        self.last = self.view[-1]
        if self.block:
            self.nb = -(-self.last // self.block)
            self.meta_numel = math.prod(self.view[:-1]) * self.nb
            self.group_size = self.block
        elif self.meta:
            # Per-channel scales follow dim 0, as the format does (1-D: one per element).
            channels = getattr(fmt, "per_channel", False)
            self.meta_numel = self.view[0] if channels else 1
            self.group_size = self.numel // self.meta_numel
        else:
            self.meta_numel = 0
            self.group_size = 1

    def meta_groups(self, k: torch.Tensor) -> torch.Tensor:
        """Flat element positions [n, G] governed by metadata codes k [n] (a partial block
        repeats its last element, which changes neither its maximum nor its codes)."""
        if self.block:
            row, blk = k // self.nb, k % self.nb
            cols = (blk * self.block)[:, None] + torch.arange(self.block, device=k.device)
            return row[:, None] * self.last + cols.clamp_(max=self.last - 1)
        return (k * self.group_size)[:, None] + torch.arange(self.group_size, device=k.device)

    def element_groups(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For element faults encoded on the fly: the block around each element [n, G]
        and the element's offset in it (G = 1 outside block formats)."""
        if not self.block:
            return index[:, None], torch.zeros_like(index)
        row, col = index // self.last, index % self.last
        k = row * self.nb + col // self.block
        return self.meta_groups(k), col % self.block

    def meta_of_element(self, index: torch.Tensor) -> torch.Tensor:
        """Flat metadata index governing each element (parameters, precomputed codes)."""
        if self.block:
            row, col = index // self.last, index % self.last
            return row * self.nb + col // self.block
        return index // self.group_size

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


def clamp(values: torch.Tensor, limit: torch.Tensor, mode: str) -> torch.Tensor:
    """Clamp corrupted values beyond +-limit (or NaN/Inf) to +-limit.

    'profiled' keeps the sign (a NaN goes to the side of its sign bit); 'goldeneye'
    reproduces GoldenEye's range detector, where `NaN < 0` is false, so every NaN
    becomes +limit.
    """
    if mode == "none":
        return values
    limit = limit.to(values.dtype)
    bad = ~torch.isfinite(values) | (values.abs() > limit)
    if mode == "profiled":
        fixed = torch.copysign(limit.expand_as(values), values)
    else:
        fixed = torch.where(values < 0, -limit, limit)
    return torch.where(bad, fixed, values)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise identity of float32 values as bit patterns (NaN equals itself)."""
    return a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)


def _probe_tensor() -> torch.Tensor:
    """Values that exercise every branch of a block quantiser: spread exponents, zeros,
    float32 subnormals, huge values, +-Inf and NaN, in rows of several lengths."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-140, 120, (64, 1),
                                                                    generator=g).float())
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 3e38])
    x[1, 7], x[2, 40], x[3, 3] = float("inf"), float("-inf"), float("nan")
    x[4] = torch.randn(96, generator=g) * 1e-30
    return x


def _pow2(e: torch.Tensor) -> torch.Tensor:
    return ((e + 127) << 23).view(torch.float32)


def _mul_pow2(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x * 2**e for integer e in [-252, 254]: two normal factors, one final rounding."""
    half = e >> 1
    return x * _pow2(half) * _pow2(e - half)


def _mx_quantizer(fmt):
    """Block quantiser for MX formats with saturating float elements, in a few fused-friendly
    tensor ops: shared exponent from the block maximum, then each scaled value rounded to
    the element's mantissa width by adding and subtracting 2**(its exponent + 23 - m), the
    exponent clamped at the element's smallest normal so subnormals round at its spacing."""
    el = getattr(fmt, "element", None)
    if not all(hasattr(el, a) for a in ("exp_bits", "man_bits", "max")) or not getattr(
            el, "saturate", False):
        return None
    bs, emax, top = fmt.block_size, fmt.emax, float(el.max)
    emin = 2 - 2 ** (el.exp_bits - 1)
    lo, shift = (emin + 127) << 23, (23 - el.man_bits) << 23

    def quantize(x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1] if x.dim() else 1
        if length % bs == 0:
            xb = x.reshape(*x.shape[:-1], length // bs, bs)
        elif length < bs:
            xb = x.unsqueeze(-2)  # one short block per row: zero padding leaves its max
        else:
            return fmt.quantize(x)
        xb = xb.float()
        lo_, hi_ = torch.aminmax(xb, dim=-1, keepdim=True)  # one pass; NaN propagates
        amax = torch.maximum(-lo_, hi_).view(torch.int32) & 0x7FFFFFFF
        shared = ((amax >> 23) - (127 + emax)).clamp_(min=-127)
        v = (xb * _pow2(-shared)).clamp_(-top, top)  # -shared <= 127: a normal factor
        a = v.abs()
        c = (a.view(torch.int32) & 0x7F800000).clamp_(min=lo).add_(shift).view(torch.float32)
        r = torch.copysign(a.add_(c).sub_(c), v, out=v)
        # 2**shared is a normal float32 except for the smallest shared exponent, -127.
        out = _mul_pow2(r, shared) if bool((shared < -126).any()) else r.mul_(_pow2(shared))
        if bool((amax >= 0x7F800000).any()):
            out = torch.where(amax >= 0x7F800000, float("nan"), out)
        return out.reshape(x.shape)
    return quantize


def fast_quantizer(fmt):
    """fmt.quantize, or a faster equivalent for OCP MX float formats. The shortcut is used
    only if it reproduces fmt.quantize bit for bit on a probe tensor, so a change in the
    format cannot go unnoticed."""
    if getattr(fmt, "block_size", None) is None:
        return fmt.quantize
    fast = _mx_quantizer(fmt)
    if fast is None:
        return fmt.quantize
    probe = _probe_tensor()
    for t in (probe, probe[:, :32], probe[:, :4], probe[:, :16].reshape(8, 8, 16)):
        want, got = fmt.quantize(t), fast(t)
        if not bool(same_bits(want, got).all()):
            return fmt.quantize
    return fast


def get_format(name):
    if not isinstance(name, str):
        return name
    return formats.get(name)
