"""Hardening that wraps an emulated model, each protection with its cost; the user's model
is never changed.

Weight protections (`ecc`, `parity`) are pure functions of the stored weight codes: given
the original and the faulty codes they say, per fault, whether the code corrected it or
detected it. Protections of layer outputs: `ranger`/`clip` (guards within the profiled
range), `abft` (checksums), `redundancy` (dup, tmr); `apply.Protector` builds a campaign's
protections on its engine; `spec` parses specifications.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flipsafe.errors import ConfigError
from flipsafe.protect.spec import KINDS, canonical

# Protections for the weights site (stored codes) and for activations (layer outputs).
WEIGHT_PROTECTIONS = tuple(n for n, k in KINDS.items() if k.sites == ("weights",))
PROTECTIONS = tuple(KINDS)


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
    if name == "ecc":
        return Cost("ecc", 8, 64)
    if name == "parity":
        return Cost("parity", 1, 64)
    return Cost("ranger", 0, 0)  # the FLOPs of a clamp per output value: see ranger.flops


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
    int32, the low `bits` bits used), under weight protection `name` ("ecc" or "parity")."""
    import torch

    from flipsafe.faults import apply
    from flipsafe.protect.ecc import CLASSIFIERS, ecc_read

    if name not in CLASSIFIERS:
        raise ConfigError(f"{name} is not a weight protection; choose one of: "
                          f"{', '.join(WEIGHT_PROTECTIONS)}")
    codes = codes.reshape(-1).cpu()
    index = torch.as_tensor(index).reshape(-1)
    faulty = apply(codes[index], mask, op, value)
    lane = (1 << bits) - 1
    original = codes[index].to(torch.int64).numpy() & lane
    injected = faulty.to(torch.int64).numpy() & lane
    if name == "ecc":
        corrected, detected, read, spill = ecc_read(codes, index, faulty, bits)
    else:
        corrected, detected = CLASSIFIERS[name](codes, index, faulty, bits)
        read, spill = injected, np.zeros_like(detected)
    reread = ~corrected & ~detected & (read != injected)
    return WeightVerdicts(corrected, detected, reread, original ^ read, spill)
