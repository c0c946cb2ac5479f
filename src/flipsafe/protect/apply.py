"""A campaign's protections built on its engine: guards (ranger, clip) set on the engine,
and per-fault verdicts (ecc, parity, abft, dup, tmr) combined in one place.

`Protector.build(...)` has each protection's class (flipsafe.protect.kinds) resolve its
layer selection and precompute what it needs (bounds, checksum filters, duplicated
channels); `Protector.output_verdicts(...)` says,
for a FaultSet, which faults a protection corrected and which it detected. A corrected
fault has the golden outcome; a detected one is no SDC; corrected overrides detected (a
corrected fault leaves nothing for a detector to see).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flipsafe.errors import ConfigError, FlipsafeError
from flipsafe.protect.registry import BuildContext, get
from flipsafe.protect.spec import Protection, parse

# What a protection's layers=all means: the campaigns' 'all' (GoldenEye: Conv and Linear;
# a quantized model's stored activation codes too: inject.emulated.ALL).
ALL = "all"


@dataclass(frozen=True)
class ChannelRate:
    """The SDC rate of one output channel and its Wilson lower bound, from a vulnerability
    map."""

    layer: str
    channel: int
    rate: float
    low: float


@dataclass
class Protector:
    """The protections of a campaign, ready on one engine (each protection's class fills
    in its part in `build`: flipsafe.protect.kinds).

    guards: {layer: fn} set on the engine (ranger, clip); bounds: {layer: (lo, hi)};
    checked: {protection: {layer: what its verdict needs}} for protections that judge
    faulty layer outputs (abft's checksums, dup/tmr's masks over one image's output);
    weight: {protection: set of layers or None for all} for those of stored codes (ecc,
    parity); notes: lines a plan and the results folder record (what was profiled on
    what, layers skipped, warnings); warnings: the notes a user must see; layers:
    {protection: [layers]}; channels: dup/tmr under a budget: {layer: [channel]}."""

    items: tuple[Protection, ...]
    guards: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    checked: dict = field(default_factory=dict)
    weight: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    channels: dict = field(default_factory=dict)

    @property
    def spec(self) -> str | None:
        return ",".join(str(p) for p in self.items) or None

    @classmethod
    def build(cls, spec, engine, site: str, bound_batches=None, bound_source: str = "training",
              channel_rates=None, fault_layers=None) -> Protector:
        """Protections `spec` (a string or parsed items) of a campaign at `site` on `engine`
        (guards unset, emulation and ranges ready). bound_batches() gives image batches to
        profile ranger/clip bounds on (`bound_source` names them in the notes);
        channel_rates(protection) gives the ChannelRate list of a dup/tmr map (with any
        warning as a second item); fault_layers names the layers the campaign injects
        faults into: a protection acting on faulted outputs (abft, dup, tmr) guarding none
        of them is refused (it would change nothing), guarding some of them gives a note
        naming the rest (ranger and clip act downstream, so not them)."""
        items = parse(spec, site)
        ctx = BuildContext(engine, site, bound_batches, bound_source, channel_rates,
                           None if fault_layers is None else tuple(fault_layers))
        p = cls(items)
        for item in items:
            kind = get(item.name)
            kind.build(item, ctx, p)
            if kind.on_faulted_layers and ctx.fault_layers is not None:
                p._check_faulted(item, list(ctx.fault_layers))
        return p

    def _check_faulted(self, item, fault_layers: list) -> None:
        """Refuse `item` when none of its layers receives faults; note the ones that
        receive none."""
        guarded = self.layers[item.name]
        idle = [n for n in guarded if n not in fault_layers]
        if len(idle) == len(guarded):
            raise ConfigError(f"{item.name} would change nothing: it guards "
                              f"{', '.join(guarded)}, but the campaign injects faults only "
                              f"into {', '.join(fault_layers)}; choose {item.name}:layers= "
                              f"among those")
        if idle:
            self.notes.append(f"{item.name}: {', '.join(idle)} receive(s) no faults in this "
                              f"campaign (it injects into {', '.join(fault_layers)})")

    def set_on(self, engine) -> None:
        """Set the guards on `engine` (none: the engine's guards are removed)."""
        engine.set_guards(self.guards)

    @property
    def checks(self) -> set:
        """Layers whose faulty outputs a verdict needs (abft, dup, tmr)."""
        out = set()
        for per_layer in self.checked.values():
            out |= set(per_layer)
        return out

    def output_verdicts(self, engine, faults, golden) -> tuple[np.ndarray, np.ndarray]:
        """(corrected, detected) of the protections judging layer outputs (abft, dup, tmr)
        for `faults` whose images index `golden` (an engine Golden)."""
        n = len(faults)
        corrected, detected = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        checked = self.checks
        if not checked or not n:
            return corrected, detected
        names = np.array(faults.layer_names, dtype=object)
        rows = np.nonzero(np.isin(names, list(checked)))[0]
        if not rows.size:
            return corrected, detected
        sub = faults.select(torch.from_numpy(rows))
        for sv in engine.site_values(sub, golden):
            at = rows[sv.rows.cpu().numpy()]
            for name, per_layer in self.checked.items():
                if sv.layer not in per_layer:
                    continue
                verdict = get(name).verdicts(per_layer[sv.layer], sv)
                if verdict is not None:
                    d, c = verdict
                    detected[at] |= d
                    corrected[at] |= c
        return corrected, detected

    def cost_selection(self) -> dict:
        """{protection: {layer: None or channels}} of what each in-model protection chose
        (abft's Conv/Linear layers, dup/tmr's budgeted channels), as protect.cost takes it."""
        out = {}
        for name, layers in self.layers.items():
            if name in self.channels:
                out[name] = {layer: list(ch) for layer, ch in self.channels[name].items()}
            elif not get(name).in_memory:
                out[name] = {layer: None for layer in layers}
        return out

    def to_dict(self) -> dict:
        """What a results folder records about the protections that ran."""
        out = {"spec": self.spec, "layers": self.layers, "notes": list(self.notes)}
        if self.channels:
            out["channels"] = self.channels
        return out


def none_chosen(item: Protection, cands, budget: float) -> str:
    """Why `item`'s budget chooses no channel from its map (one line)."""
    where = (f"{item.name}:budget={item.get('budget')}:map={item.get('map')} chooses no "
             "channel")
    sdc = [c for c in cands if c.rate > 0]
    if not sdc:
        return (f"{where}: the map has no SDC in the layers {item.name} may copy, and only "
                "channels with an SDC are copied; map a campaign with more faults")
    cheapest = min(c.flops for c in sdc)
    return (f"{where}: its cheapest channel with an SDC costs {cheapest:,} FLOPs, over the "
            f"{budget:,.0f}-FLOP budget; raise the budget")


def _select(item: Protection) -> str:
    return ALL if item.layers == "all" else item.layers


def resolve(engine, item: Protection, site: str) -> list[str]:
    """Names of the layers `item`'s layers= selects at `site`."""
    return [i.name for i in infos(engine, item, site)]


def infos(engine, item: Protection, site: str = "activations"):
    """The layers `item`'s layers= selects at `site`, as --layers resolves them."""
    try:
        return engine.layers(site, _select(item))
    except FlipsafeError as exc:
        raise ConfigError(f"{item.name}:layers={item.layers}: {exc}") from None
