"""Vectorised bit faults on code tensors: flip, or force to 0/1, given bits of given elements.

``write_bits`` is the one bit primitive; ``flip_bits``, ``force_bits`` and
``flipsafe.faults.apply`` are built on it."""

from __future__ import annotations

import torch

from flipsafe.errors import ConfigError
from flipsafe.formats.base import CODE_DTYPES


def bit_mask(positions) -> torch.Tensor:
    """Masks 1 << p (int64) for bit positions p in [0, 63].

    For example ``bit_mask(fmt.fields["sign"])``; bit 63 gives -2**63 (its int64 pattern).
    """
    p = torch.as_tensor(positions, dtype=torch.int64)
    if p.numel() and not bool(((p >= 0) & (p <= 63)).all()):
        raise ConfigError(f"bit positions must be in 0..63, got {positions}")
    return torch.ones_like(p) << p


def write_bits(codes: torch.Tensor, mask, flip, value=0) -> torch.Tensor:
    """Elementwise, broadcasting: ``codes`` with the bits of ``mask`` flipped where
    ``flip`` is true, and elsewhere replaced by the same bits of ``value``.

    ``flip``: a bool or a bool tensor. ``mask`` and ``value`` are integer bit patterns,
    converted to codes' dtype first (an int64 mask on int32 codes wraps bit 31 onto the
    sign bit, as the codes hold it). Returns a new tensor.
    """
    m = torch.as_tensor(mask, device=codes.device).to(codes.dtype)
    flipped = codes ^ m
    if flip is True:
        return flipped
    v = torch.as_tensor(value, device=codes.device).to(codes.dtype)
    replaced = (codes & ~m) | (v & m)
    if flip is False:
        return replaced
    return torch.where(torch.as_tensor(flip, device=codes.device), flipped, replaced)


def _prepare(codes, index, mask, who):
    if not isinstance(codes, torch.Tensor) or codes.dtype not in CODE_DTYPES.values():
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ConfigError(f"{who}: codes must be an integer code tensor, got {got}; choose one "
                          f"of: {', '.join(CODE_DTYPES)}")
    flat = codes.reshape(-1)
    n, width = flat.numel(), 32 if codes.dtype == torch.int32 else 64
    mask = torch.as_tensor(mask, device=flat.device)
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dtype == torch.bool:
        raise ConfigError(f"{who}: mask must be an integer tensor, got {mask.dtype}; choose one "
                          "of: int32, int64")
    if width == 64 and mask.dtype != torch.int64:
        mask = mask.to(torch.int64) & 0xFFFFFFFF  # an int32 mask means its 32-bit pattern
    if width == 32 and mask.dtype == torch.int64 and mask.numel():
        lo, hi = torch.aminmax(mask)
        if int(lo) < 0 or int(hi) >= 2**32:
            raise ConfigError(f"{who}: masks for int32 codes must be in [0, 2**32)")
    if index is None:
        if mask.numel() not in (1, n):
            raise ConfigError(f"{who}: with index=None, mask needs 1 or {n} entries, "
                              f"got {mask.numel()}")
        return flat, None, mask.reshape(-1).expand(n).to(flat.dtype)
    index = torch.as_tensor(index, device=flat.device)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ConfigError(f"{who}: index must be an integer tensor of flat positions, got "
                          f"{index.dtype}; choose one of: int32, int64")
    index = index.reshape(-1).to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ConfigError(f"{who}: index out of range for {n} codes; choose 0..{n - 1}")
    try:
        mask = torch.broadcast_to(mask.reshape(-1) if mask.dim() else mask, index.shape)
    except RuntimeError:
        raise ConfigError(f"{who}: mask has {mask.numel()} entries but index has "
                          f"{index.numel()}; give one mask or one per index") from None
    # int64 masks wrap to int32 (bit 31 -> the sign bit) before the bitwise operations.
    return flat, index, mask.to(flat.dtype)


def _rounds(index: torch.Tensor):
    """Split pair positions into rounds in which every index occurs at most once, earliest
    occurrence first, so scattering round by round equals applying pairs in order.
    Yields None for "all pairs at once" when no index repeats."""
    k = index.numel()
    if k < 2:
        yield None
        return
    pos = torch.arange(k, device=index.device)
    # One scatter finds out whether any index repeats: every written slot is read back by
    # the pair that wrote it, so a pair that reads another's position is a duplicate.
    slot = torch.empty(int(index.max()) + 1, dtype=torch.int64, device=index.device)
    slot.scatter_(0, index, pos)
    if bool((slot[index] == pos).all()):
        yield None
        return
    while pos.numel():
        first = torch.full_like(slot, k).scatter_reduce_(0, index[pos], pos, "amin")
        take = first[index[pos]] == pos
        yield pos[take]
        pos = pos[~take]


def flip_bits(codes: torch.Tensor, index, mask) -> torch.Tensor:
    """XOR ``mask[i]`` into element ``index[i]`` of the flattened ``codes``; returns a new
    tensor of codes' shape and dtype.

    ``index``: integer tensor of flat positions (or None: ``mask`` applies to every
    element in order, one mask or one per element). ``mask``: integer bit masks, one per
    index or one for all (use :func:`bit_mask` to build them from bit positions). Pairs with
    the same index compose as if applied one after another, so flipping a bit twice
    restores it. Works on element codes and metadata tensors alike, on any device.
    """
    flat, index, mask = _prepare(codes, index, mask, "flip_bits")
    if index is None:
        return write_bits(flat, mask, True).view(codes.shape)
    flat = flat.clone()
    for take in _rounds(index):
        i, m = (index, mask) if take is None else (index[take], mask[take])
        flat[i] = write_bits(flat[i], m, True)
    return flat.view(codes.shape)


def force_bits(codes: torch.Tensor, index, mask, value) -> torch.Tensor:
    """Set the bits of ``mask[i]`` in element ``index[i]`` of the flattened ``codes`` to
    ``value[i]`` (0 or 1; stuck-at faults); returns a new tensor.

    Arguments as for :func:`flip_bits`; ``value`` is 0/1 (or False/True), one for all
    pairs or one per pair. Pairs with the same index apply in order, so a later pair wins
    on bits both touch.
    """
    flat, index, mask = _prepare(codes, index, mask, "force_bits")
    v = torch.as_tensor(value, device=flat.device)
    if v.dtype.is_floating_point or v.dtype.is_complex or (
            v.numel() and not bool(((v == 0) | (v == 1)).all())):
        raise ConfigError(f"force_bits: value must be 0 or 1, got {value}; choose one of: 0, 1")
    v = v.reshape(-1) if v.dim() else v
    try:
        v = torch.broadcast_to(v.to(torch.bool), mask.shape)
    except RuntimeError:
        raise ConfigError(f"force_bits: value has {v.numel()} entries but there are "
                          f"{mask.numel()} masks; give one value or one per mask") from None
    ones = v.to(flat.dtype).neg_()  # all bits set where the value is 1
    if index is None:
        return write_bits(flat, mask, False, ones).view(codes.shape)
    flat = flat.clone()
    for take in _rounds(index):
        i, m, b = (index, mask, ones) if take is None else (index[take], mask[take], ones[take])
        flat[i] = write_bits(flat[i], m, False, b)
    return flat.view(codes.shape)
