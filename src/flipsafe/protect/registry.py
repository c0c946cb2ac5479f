"""The protection registry: one class per protection, looked up by name.

A protection is a `Kind` subclass that owns everything about it: its name, the sites it can
guard, its options, what it does (one line), which protections it excludes, how a campaign
builds it on an engine (`build`), its verdict on each fault (`verdicts` for layer outputs,
`read` for stored weight codes), and what it costs (`flops`, `bits`, `hook`). Everyone else
looks protections up here (`get`, `registered`, `names`) and calls those methods; nobody compares
protection names.

Adding a protection is one class: subclass `Kind`, fill in what it does, `register(Cls())`.
The built-in ones live in `flipsafe.protect.kinds`, which the package imports first, so
they register in the canonical order of a specification (ecc, parity, abft, dup, tmr,
ranger, clip); protections registered later follow them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flipsafe.errors import ConfigError


@dataclass(frozen=True)
class BuildContext:
    """What a campaign hands a protection's `build`: its engine and site, bound_batches()
    (image batches to profile bounds on, or None) named `bound_source` in notes,
    channel_rates(item) (a vulnerability map's ChannelRates and a warning, for budgets)
    and the layers the campaign injects faults into (None: not said)."""

    engine: Any
    site: str
    bound_batches: Callable | None = None
    bound_source: str = "training"
    channel_rates: Callable | None = None
    fault_layers: tuple[str, ...] | None = None


class Kind:
    """A protection: class attributes say what it is, methods what it does (defaults: it
    builds nothing, flags nothing and costs nothing)."""

    name: str = ""
    sites: tuple[str, ...] = ()
    options: tuple[str, ...] = ("layers",)
    does: str = ""
    # Protections of one group act on the same values in the same way: one per spec.
    group: str | None = None
    # Decoded in the memory hardware: no FLOPs or latency in the model, guards stored codes.
    in_memory: bool = False
    # Check bits per data bits of one stored word (ecc: 8 per 64); (0, 0): none.
    word: tuple[int, int] = (0, 0)
    # Acts only on the outputs of faulted layers (refused when none of them gets faults).
    on_faulted_layers: bool = False
    # Needs bounds profiled on clean images (ranger, clip).
    needs_bounds: bool = False
    # Why it cannot guard another site, and what to do instead (None: the defaults).
    site_why: str | None = None
    site_hint: str | None = None
    # What `acts_on` refusing a layer means, as cost reports name it.
    skip_reason: str = "is not a layer it can guard"

    # -- what it is ----------------------------------------------------------------------

    def site_error(self, site: str) -> str:
        """Why it cannot guard a campaign at `site` (one line)."""
        why = self.site_why or "it guards " + " and ".join(self.sites)
        hint = self.site_hint or f"use --site {self.sites[0]}"
        return f"{self.name} cannot guard a campaign on the {site} site: {why}; {hint}"

    # -- in a campaign -------------------------------------------------------------------

    def build(self, item, ctx: BuildContext, protector) -> None:
        """Resolve `item` (a spec.Protection of this kind) on ctx.engine and record what it
        needs on `protector` (apply.Protector): its layers, guards, verdict state, notes."""

    def verdicts(self, state, sv):
        """(detected, corrected) numpy bool arrays for the faulty values `sv` (an engine
        SiteValues of one layer this protection checks), `state` being what `build` kept
        for that layer; None when it says nothing about them."""

    def read(self, codes, index, faulty, bits: int):
        """For a protection of stored codes: (corrected, detected, read, spill) of element
        faults turning codes[index] into `faulty` (see protect.WeightVerdicts; read and
        spill may be None: the faulty code is read and nothing spills)."""
        raise ConfigError(f"{self.name} does not guard stored weight codes")

    def memory(self, old_words, new_words):
        """For a code over stored 64-bit weight words (protect.ecc's packing): (check bits
        an attacker must flip too so that each new word reads back silently, what the
        memory hands back for each new word read with the old word's check bits: the
        decoded words, and which it flags as detected), numpy arrays."""
        raise ConfigError(f"{self.name} does not guard stored weight codes")

    # -- its cost ------------------------------------------------------------------------

    def acts_on(self, mod) -> bool:
        """Whether it can guard module `mod` (layers it cannot are left unguarded)."""
        return True

    def flops(self, mod, shape: tuple, channels, layer_flops: int) -> float:
        """Extra FLOPs per image on one layer whose per-image output `shape` has `channels`
        protected (None: all) and whose own FLOPs per image are `layer_flops`."""
        return 0.0

    def bits(self, mod, shape: tuple, channels, weight_bits: int, per_channel: bool) -> int:
        """Extra stored bits on one layer (per-image output `shape`)."""
        return 0

    def hook(self, mod, layer: str, channels, monitor, bounds: dict, per_channel: bool):
        """A forward hook running it on `mod` in a plain PyTorch copy (for latency and
        accuracy), or None when it runs nothing in the model."""


_REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add protection `kind` (a Kind instance with a new lower-case name); returns it."""
    if not isinstance(kind, Kind) or not kind.name or kind.name != kind.name.lower():
        raise ConfigError("a protection is a Kind instance with a lower-case name")
    if not kind.sites:
        raise ConfigError(f"protection {kind.name} names no site it can guard")
    if kind.name in _REGISTRY:
        raise ConfigError(f"a protection named {kind.name} is registered already")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove protection `name` (tests that register their own)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Kind]:
    """Every registered protection by name, in canonical order."""
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    return tuple(registered())


def get(name: str) -> Kind:
    """The protection called `name`; ConfigError with the choices for an unknown one."""
    found = registered().get(name) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(f"unknown protection {name!r}; choose from: {', '.join(_REGISTRY)} "
                          f"(options after ':', e.g. abft:layers=last, dup:budget=10%)")
    return found

