"""Fault models on format bits: per-fault masks, op codes and replacement codes."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch

from flipsafe.errors import ConfigError, UnknownNameError, unknown
from flipsafe.formats.bits import write_bits

FAULT_MODELS = ("bitflip", "bitflip2", "burst2", "stuck0", "stuck1", "random", "zero")

# Op codes stored with every fault. FLIP xors the mask in; every other op replaces the
# masked bits by the matching bits of `value` (0 for SET0/ZERO, the mask for SET1).
FLIP, SET0, SET1, RANDOM, ZERO = 0, 1, 2, 3, 4
OPS = ("flip", "set0", "set1", "random", "zero")

_PATTERN = re.compile(r"(bitflip|burst)(\d+)")
# The most bits one fault can touch: no element or metadata code is wider than 32 bits.
MAX_FAULT_BITS = 32


@dataclass(frozen=True)
class FaultModel:
    """A parsed fault-model name: `kind` in flip/burst/stuck0/stuck1/random/zero, `k` bits."""

    name: str
    kind: str
    k: int

    @property
    def whole_value(self) -> bool:
        """True for random and zero, which replace all the allowed bits of a value at once."""
        return self.kind in ("random", "zero")

    @property
    def op(self) -> int:
        return {"flip": FLIP, "burst": FLIP, "stuck0": SET0, "stuck1": SET1,
                "random": RANDOM, "zero": ZERO}[self.kind]


def parse(name: str) -> FaultModel:
    """Parse 'bitflip', 'bitflipK' (K distinct random bits), 'burstK' (K adjacent bits),
    'stuck0', 'stuck1', 'random' or 'zero', K from 1 to MAX_FAULT_BITS; the name comes
    back in its one spelling (lower case, 'bitflip1' and 'burst1' are 'bitflip'), which
    plans store. This is the one check of fault-model names: plans and the CLI call it."""
    key = str(name).strip().lower()
    if key == "bitflip":
        return FaultModel(key, "flip", 1)
    if key in ("stuck0", "stuck1", "random", "zero"):
        return FaultModel(key, key, 1)
    match = _PATTERN.fullmatch(key)
    if match and not 1 <= int(match[2]) <= MAX_FAULT_BITS:
        raise UnknownNameError(
            f"unknown fault model {str(name)!r}: {match[1]}K takes K from 1 to "
            f"{MAX_FAULT_BITS} (the widest code has {MAX_FAULT_BITS} bits); choose e.g. {match[1]}2")
    if match:
        k = int(match[2])
        if k == 1:
            return FaultModel("bitflip", "flip", 1)
        return FaultModel(f"{match[1]}{k}", "flip" if match[1] == "bitflip" else "burst", k)
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


def _tops(model: FaultModel, allowed: list[int], top) -> list[tuple[int, int, int]]:
    """(bit, rank, count) for every allowed bit that can be a fault's highest bit and lies
    in `top` (a set of bits): its rank among the allowed bits and how many faults of
    `model` it tops (1 for one bit, C(rank, K-1) for K bits, 1 or 0 for a K-bit run)."""
    allowed_set = set(allowed)
    out = []
    for rank, bit in enumerate(allowed):
        if bit not in top:
            continue
        if model.kind == "burst":
            count = int(all(bit - j in allowed_set for j in range(model.k)))
        else:
            count = math.comb(rank, model.k - 1)
        if count:
            out.append((bit, rank, count))
    return out


def _check_top(model: FaultModel, fmt, top, meta: bool) -> set[int] | None:
    if top is None:
        return None
    if model.whole_value:
        raise ConfigError(
            f"{model.name} replaces whole values, so its faults have no highest bit; "
            f"restrict its bits with field, not top")
    return set(positions(fmt, top, meta))


def stratum_size(fault_model: str, fmt, top=None, meta: bool = False) -> int:
    """How many distinct faults of `fault_model` one element (or metadata code) has whose
    highest bit lies in field(s) `top` (None: any bit) -- the size per element of the
    stratum named by that field.

    Campaigns stratify every bit fault by the field of its highest bit, so a burst that
    crosses from the mantissa into the exponent counts in the exponent stratum. random
    and zero replace a whole value: one fault per element, in one stratum ('value').
    """
    model = parse(fault_model)
    if model.whole_value:
        _check_top(model, fmt, top, meta)  # raises if top is given
        return 1
    allowed = positions(fmt, None, meta)
    chosen = set(allowed) if top is None else _check_top(model, fmt, top, meta)
    return sum(count for _, _, count in _tops(model, allowed, chosen))


def _no_fault_in(model: FaultModel, fmt, top, meta: bool) -> ConfigError:
    return ConfigError(
        f"no {model.name} fault of {fmt.name}{' metadata' if meta else ''} has its highest "
        f"bit in field {top!r}; choose another field or a fault model with fewer bits")


def _complete(model: FaultModel, mask: torch.Tensor, allowed: list[int],
              generator: torch.Generator | None) -> Draw:
    """The Draw for fault masks of `model`: its op code and the replacement value bits."""
    n = mask.numel()
    op = torch.full((n,), model.op, dtype=torch.int64)
    if model.kind == "random":
        hi = max(allowed) + 1
        value = torch.randint(0, 2**hi, (n,), generator=generator, dtype=torch.int64) & mask
    elif model.kind == "stuck1":
        value = mask.clone()
    else:
        value = torch.zeros(n, dtype=torch.int64)
    return Draw(mask, op, value)


def draw(fault_model: str, fmt, n: int, field=None, generator: torch.Generator | None = None,
         meta: bool = False, top=None) -> Draw:
    """Draw n faults of `fault_model` on the bits of `fmt` (element codes, or the metadata
    codes if meta), restricted to `field`; randomness comes only from `generator`, so a
    seed gives the same faults on every machine.

    `top` (field name(s)) draws from one stratum instead: faults whose highest bit lies in
    `top`, uniformly among them, with their other bits anywhere in `field` (see
    stratum_size). For one-bit models top and field restrict alike.
    """
    model = parse(fault_model)
    allowed = positions(fmt, field, meta)
    if n < 0:
        raise ConfigError(f"number of faults must be >= 0, got {n}")
    top_bits = _check_top(model, fmt, top, meta)
    if top_bits is not None and model.k == 1:
        allowed = [p for p in allowed if p in top_bits]
        if not allowed:
            raise _no_fault_in(model, fmt, top, meta)
        top_bits = None
    pos = torch.tensor(allowed, dtype=torch.int64)
    width = len(allowed)
    if model.k > width:
        raise ConfigError(
            f"{model.name} needs {model.k} bits but only {width} "
            f"{'is' if width == 1 else 'are'} allowed in {fmt.name}"
            f"{' metadata' if meta else ''} (field {field!r}); choose at most {width} "
            f"bit{'' if width == 1 else 's'}")
    one = torch.ones((), dtype=torch.int64)
    if top_bits is not None:
        tops = _tops(model, allowed, top_bits)
        if not tops:
            raise _no_fault_in(model, fmt, top, meta)
        bit, rank, count = (torch.tensor(col, dtype=torch.int64) for col in zip(*tops))
        if model.kind == "burst":
            chosen = torch.randint(len(tops), (n,), generator=generator)
            mask = ((1 << model.k) - 1) << (bit[chosen] - (model.k - 1))
        else:
            # The highest bit with probability proportional to the faults it tops (exact
            # integer arithmetic, so any machine picks alike), then K-1 distinct bits
            # uniformly among the allowed bits below it.
            cum = count.cumsum(0)
            chosen = torch.searchsorted(cum, torch.randint(int(cum[-1]), (n,), generator=generator),
                                        right=True)
            keys = torch.rand(n, width, generator=generator)
            keys = torch.where(torch.arange(width) < rank[chosen][:, None], keys, 2.0)
            below = keys.argsort(dim=1, stable=True)[:, : model.k - 1]
            mask = (one << bit[chosen]) + (one << pos[below]).sum(1)
        return _complete(model, mask, allowed, generator)
    if model.kind == "flip" and model.k == 1 or model.kind in ("stuck0", "stuck1"):
        chosen = pos[torch.randint(width, (n,), generator=generator)]
        mask = torch.ones(n, dtype=torch.int64) << chosen
    elif model.kind == "flip":
        # k distinct bits per fault: the first k of a random permutation of the positions.
        order = torch.rand(n, width, generator=generator).argsort(dim=1)[:, : model.k]
        mask = (one << pos[order]).sum(1)
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
        full = int((one << pos).sum())
        mask = torch.full((n,), full, dtype=torch.int64)
    return _complete(model, mask, allowed, generator)


def every_fault(fault_model: str, fmt, numel: int, top=None,
                generator: torch.Generator | None = None,
                meta: bool = False) -> tuple[torch.Tensor, Draw]:
    """Every fault of one stratum once: element indices and their Draw, element-major.

    Each of `numel` elements gets every distinct mask of `fault_model` whose highest bit
    lies in `top` (None: any bit), so the list has numel * stratum_size(...) faults, in
    ascending order of the highest bit, then of the lower bits. random and zero (top
    None) hit every element once; random's replacement bits come from `generator`, like
    the image a fault lands on, so they are a sample, not an enumeration.
    """
    model = parse(fault_model)
    allowed = positions(fmt, None, meta)
    if model.whole_value:
        _check_top(model, fmt, top, meta)
        masks = [sum(1 << p for p in allowed)]
    else:
        chosen = set(allowed) if top is None else _check_top(model, fmt, top, meta)
        masks = []
        for bit, rank, _ in _tops(model, allowed, chosen):
            if model.kind == "burst":
                masks.append(((1 << model.k) - 1) << (bit - (model.k - 1)))
            else:
                masks += [(1 << bit) + sum(1 << p for p in lower)
                          for lower in itertools.combinations(allowed[:rank], model.k - 1)]
    per = torch.tensor(masks, dtype=torch.int64)
    index = torch.arange(numel, dtype=torch.int64).repeat_interleave(per.numel())
    return index, _complete(model, per.repeat(numel), allowed, generator)


def apply(codes: torch.Tensor, mask: torch.Tensor, op: torch.Tensor,
          value: torch.Tensor | None = None) -> torch.Tensor:
    """Faulty codes: element i of `codes` (int32 or int64) under fault (mask, op, value)[i]."""
    op = op.to(codes.device)
    if value is None:
        value = torch.zeros_like(mask)
    # SET0/SET1/ZERO are defined by the op alone, so hand-built fault sets need no value.
    value = torch.where(op == SET1, mask, torch.where((op == SET0) | (op == ZERO), 0, value))
    return write_bits(codes, mask, op == FLIP, value)


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
