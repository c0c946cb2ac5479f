"""Hardening that wraps an emulated model, each protection with its cost; the user's model
is never changed.

Each protection is one class in the registry (`registry`; the built-in ones in `kinds`).
Weight protections (`ecc`, `parity`) are pure functions of the stored weight codes: given
the original and the faulty codes they say, per fault, whether the code corrected it or
detected it. Protections of layer outputs: `ranger`/`clip` (guards within the profiled
range), `abft` (checksums), `redundancy` (dup, tmr); `apply.Protector` builds a campaign's
protections on its engine; `spec` parses specifications.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import flipsafe.protect.kinds  # noqa: F401  (registers the built-in protections, in order)
from flipsafe.errors import ConfigError
from flipsafe.protect.registry import get, registered
from flipsafe.protect.spec import canonical


@dataclass(frozen=True)
class Cost:
    """What a protection costs: extra stored bits per `word_bits` data bits, and extra
    floating-point operations per inference (0 when it computes nothing in the model)."""

    name: str
    extra_bits: int
    word_bits: int
    extra_flops: int = 0

    @property
    def memory_overhead(self) -> float:
        """Extra storage as a fraction of the protected data (ecc: 8/64 = 0.125)."""
        return self.extra_bits / self.word_bits if self.word_bits else 0.0


def word_cost(name: str) -> Cost:
    """The storage cost per word of protection `name` (ConfigError for an unknown one); what
    a protection costs on a given model, FLOPs and latency included: flipsafe.protect.cost.
    (Not called `cost`: that name is the module.)"""
    check_protection(name)
    kind = get(name)
    return Cost(kind.name, *kind.word)  # the FLOPs it computes: flipsafe.protect.cost


def check_protection(spec, site: str | None = None) -> str | None:
    """The canonical spelling of protection specification `spec` (flipsafe.protect.spec;
    None passes) if every protection in it can guard faults at `site`; else ConfigError
    with one line."""
    return canonical(spec, site)


@dataclass(frozen=True)
class WeightVerdicts:
    """What a weight protection did to each element fault (numpy arrays, one per fault).

    corrected: the stored word was restored exactly; detected: the protection flagged it;
    reread: a miscorrection handed back a code of the faulted element other than the
    injected one, whose outcome must be recomputed with the element's bits `flip` (a
    mask turning the original code into the code read; meaningful where reread); spill:
    the miscorrection also changed another element of the word (not replayed)."""

    corrected: np.ndarray
    detected: np.ndarray
    reread: np.ndarray
    flip: np.ndarray
    spill: np.ndarray


def weight_verdicts(name: str, codes, bits: int, index, mask, op, value) -> WeightVerdicts:
    """WeightVerdicts of element faults (mask, op, value as flipsafe.faults.apply takes them)
    on flat element `index` of a weight tensor whose stored element codes are `codes` (flat
    int32, the low `bits` bits used), under weight protection `name` (ecc, parity: a
    protection whose class guards stored codes)."""
    import torch

    from flipsafe.faults import apply

    kind = get(name)
    if not kind.in_memory:
        raise ConfigError(f"{name} is not a weight protection; choose one of: "
                          f"{', '.join(n for n, k in registered().items() if k.in_memory)}")
    codes = codes.reshape(-1).cpu()
    index = torch.as_tensor(index).reshape(-1)
    faulty = apply(codes[index], mask, op, value)
    lane = (1 << bits) - 1
    original = codes[index].to(torch.int64).numpy() & lane
    injected = faulty.to(torch.int64).numpy() & lane
    corrected, detected, read, spill = kind.read(codes, index, faulty, bits)
    read = injected if read is None else read
    spill = np.zeros_like(detected) if spill is None else spill
    reread = ~corrected & ~detected & (read != injected)
    return WeightVerdicts(corrected, detected, reread, original ^ read, spill)


def word_verdicts(name: str, codes, bits: int, word_bits: int, index, mask, op,
                  value) -> WeightVerdicts:
    """WeightVerdicts of memory-word faults (site weight_words: `index` a word of
    `word_bits` bits holding the `bits`-bit element codes `codes`, `mask` over the word)
    under weight protection `name`. The code's words are the 64-bit words of
    formats.words and protect.ecc alike, so a word fault is decoded as it is; `flip` is
    the word's bits wrong after decoding (a miscorrection's, replayed as a word fault)."""
    import torch

    from flipsafe.faults import apply
    from flipsafe.protect import ecc

    kind = get(name)
    if not kind.in_memory:
        raise ConfigError(f"{name} is not a weight protection; choose one of: "
                          f"{', '.join(n for n, k in registered().items() if k.in_memory)}")
    if word_bits != ecc.WORD:
        raise ConfigError(f"{name} guards {ecc.WORD}-bit words; run --site weight_words with "
                          f"--word-bits {ecc.WORD} so a fault's word is the code's word")
    words = ecc.pack(codes.reshape(-1).cpu(), bits)
    index = torch.as_tensor(index).reshape(-1).cpu().numpy()
    old = words[index]
    new = apply(torch.from_numpy(old.view(np.int64).copy()), mask, op,
                value).numpy().view(np.uint64)
    _, decoded, detected = kind.memory(old, new)
    decoded = np.asarray(decoded, dtype=np.uint64)
    detected = np.asarray(detected, dtype=bool)
    corrected = (decoded == old) & (new != old)
    reread = ~corrected & ~detected & (decoded != new)
    return WeightVerdicts(corrected, detected, reread, (old ^ decoded).view(np.int64),
                          np.zeros(len(index), dtype=bool))
