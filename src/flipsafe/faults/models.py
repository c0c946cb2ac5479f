"""Fault models on format bits: per-fault masks, op codes and replacement codes."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from flipsafe.errors import ConfigError, unknown

FAULT_MODELS = ("bitflip", "bitflip2", "burst2", "stuck0", "stuck1", "random", "zero")

# Op codes stored with every fault. FLIP xors the mask in; every other op replaces the
# masked bits by the matching bits of `value` (0 for SET0/ZERO, the mask for SET1).
FLIP, SET0, SET1, RANDOM, ZERO = 0, 1, 2, 3, 4
OPS = ("flip", "set0", "set1", "random", "zero")

_PATTERN = re.compile(r"(bitflip|burst)(\d+)")


@dataclass(frozen=True)
class FaultModel:
    """A parsed fault-model name: `kind` in flip/burst/stuck0/stuck1/random/zero, `k` bits."""

    name: str
    kind: str
    k: int

    @property
    def op(self) -> int:
        return {"flip": FLIP, "burst": FLIP, "stuck0": SET0, "stuck1": SET1,
                "random": RANDOM, "zero": ZERO}[self.kind]


def parse(name: str) -> FaultModel:
    """Parse 'bitflip', 'bitflipK' (K distinct random bits), 'burstK' (K adjacent bits),
    'stuck0', 'stuck1', 'random' or 'zero'."""
    key = str(name).strip().lower()
    if key == "bitflip":
        return FaultModel(key, "flip", 1)
    if key in ("stuck0", "stuck1", "random", "zero"):
        return FaultModel(key, key, 1)
    match = _PATTERN.fullmatch(key)
    if match and int(match[2]) >= 1:
        return FaultModel(key, "flip" if match[1] == "bitflip" else "burst", int(match[2]))
    raise unknown("fault model", str(name), [*FAULT_MODELS, "bitflip<K>", "burst<K>"])


def _meta_width(fmt) -> int:
    return sum(fmt.meta_fields.values())


def positions(fmt, field=None, meta: bool = False) -> list[int]:
    """Allowed bit positions (0 = LSB) of an element code, or of a metadata code if meta.

    `field` restricts them: None (all bits), a field name of `fmt.fields` (e.g.
    'exponent'), or a list of names. Metadata codes have one field per entry of
    `fmt.meta_fields` (all formats here have at most one), named by it.
    """
    if meta:
        if not fmt.meta_fields:
            raise ConfigError(
                f"format {fmt.name} has no metadata to corrupt; formats with metadata are "
                f"the block formats (mx*, bfp*) and the scaled integers (int8, int4, "
                f"int8_channel)")
        fields, offset = {}, 0
        for name, width in fmt.meta_fields.items():
            fields[name] = tuple(range(offset, offset + width))
            offset += width
    else:
        fields = dict(fmt.fields)
    if field is None or field == "all":
        return sorted({p for bits in fields.values() for p in bits})
    names = [field] if isinstance(field, str) else list(field)
    chosen = set()
    for name in names:
        if name not in fields:
            kind = "metadata field" if meta else "field"
            raise unknown(f"{kind} of {fmt.name}", name, [*fields, "all"])
        chosen.update(fields[name])
    return sorted(chosen)


@dataclass
class Draw:
    """Per-fault int64 tensors: bit `mask`, `op` code and replacement `value` bits."""

    mask: torch.Tensor
    op: torch.Tensor
    value: torch.Tensor


def draw(fault_model: str, fmt, n: int, field=None, generator: torch.Generator | None = None,
         meta: bool = False) -> Draw:
    """Draw n faults of `fault_model` on the bits of `fmt` (element codes, or the metadata
    codes if meta), restricted to `field`; randomness comes only from `generator`, so a
    seed gives the same faults on every machine."""
    model = parse(fault_model)
    allowed = positions(fmt, field, meta)
    if n < 0:
        raise ConfigError(f"number of faults must be >= 0, got {n}")
    pos = torch.tensor(allowed, dtype=torch.int64)
    width = len(allowed)
    if model.k > width:
        raise ConfigError(
            f"{model.name} needs {model.k} bits but only {width} "
            f"{'is' if width == 1 else 'are'} allowed in {fmt.name}"
            f"{' metadata' if meta else ''} (field {field!r}); choose at most {width} "
            f"bit{'' if width == 1 else 's'}")
    op = torch.full((n,), model.op, dtype=torch.int64)
    if model.kind == "flip" and model.k == 1 or model.kind in ("stuck0", "stuck1"):
        chosen = pos[torch.randint(width, (n,), generator=generator)]
        mask = torch.ones(n, dtype=torch.int64) << chosen
    elif model.kind == "flip":
        # k distinct bits per fault: the first k of a random permutation of the positions.
        order = torch.rand(n, width, generator=generator).argsort(dim=1)[:, : model.k]
        mask = (torch.ones((), dtype=torch.int64) << pos[order]).sum(1)
    elif model.kind == "burst":
        allowed_set = set(allowed)
        starts = [p for p in allowed if all(p + j in allowed_set for j in range(model.k))]
        if not starts:
            raise ConfigError(
                f"{model.name} needs {model.k} adjacent bits, but the allowed bits of "
                f"{fmt.name} ({allowed}) hold no such run; choose a smaller burst or field")
        first = torch.tensor(starts, dtype=torch.int64)[
            torch.randint(len(starts), (n,), generator=generator)]
        mask = ((1 << model.k) - 1) << first
    else:
        full = int((torch.ones((), dtype=torch.int64) << pos).sum())
        mask = torch.full((n,), full, dtype=torch.int64)
    if model.kind == "random":
        hi = max(allowed) + 1
        value = torch.randint(0, 2**hi, (n,), generator=generator, dtype=torch.int64) & mask
    elif model.kind == "stuck1":
        value = mask.clone()
    else:
        value = torch.zeros(n, dtype=torch.int64)
    return Draw(mask, op, value)


def apply(codes: torch.Tensor, mask: torch.Tensor, op: torch.Tensor,
          value: torch.Tensor | None = None) -> torch.Tensor:
    """Faulty codes: element i of `codes` (int32 or int64) under fault (mask, op, value)[i]."""
    dtype = codes.dtype
    m = mask.to(dtype)  # int64 -> int32 wraps bit 31 onto the sign bit, as the codes have it
    op = op.to(codes.device)
    if value is None:
        value = torch.zeros_like(mask)
    v = value.to(dtype)
    # SET0/SET1/ZERO are defined by the op alone, so hand-built fault sets need no value.
    v = torch.where(op == SET1, m, torch.where((op == SET0) | (op == ZERO), 0, v))
    replaced = (codes & ~m) | (v & m)
    return torch.where(op == FLIP, codes ^ m, replaced)


def mask_bits(mask: torch.Tensor) -> list[list[int]]:
    """Bit positions set in each mask (what the campaign store records as `bits`)."""
    mask = torch.as_tensor(mask, dtype=torch.int64).reshape(-1)
    if mask.numel() == 0:
        return []
    shifts = torch.arange(64, dtype=torch.int64)
    hit = ((mask[:, None] >> shifts) & 1).bool()
    _, cols = hit.nonzero(as_tuple=True)
    counts = hit.sum(1).tolist()
    out, start, flat = [], 0, cols.tolist()
    for c in counts:
        out.append(flat[start:start + c])
        start += c
    return out


def bits_mask(bits) -> torch.Tensor:
    """int64 masks from lists of bit positions (the inverse of mask_bits)."""
    return torch.tensor([sum(1 << int(b) for b in row) for row in bits], dtype=torch.int64)
