"""A campaign's protections built on its engine: guards (ranger, clip) set on the engine,
and per-fault verdicts (ecc, parity, abft, dup, tmr) combined in one place.

`Protector.build(...)` resolves every protection's layer selection and precomputes what
it needs (bounds, checksum filters, duplicated channels); `Protector.verdicts(...)` says,
for a FaultSet, which faults a protection corrected and which it detected. A corrected
fault has the golden outcome; a detected one is no SDC; corrected overrides detected (a
corrected fault leaves nothing for a detector to see).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flipsafe.errors import ConfigError, FlipsafeError
from flipsafe.protect.spec import Protection, parse

# What a protection's layers=all means: the campaigns' 'all' (GoldenEye: Conv and Linear).
ALL = "conv|linear"


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
    """The protections of a campaign, ready on one engine.

    guards: {layer: fn} set on the engine (ranger, clip); bounds: {layer: (lo, hi)};
    checksums: {layer: abft.Checksum}; copies: {'dup'|'tmr': {layer: mask over one image's
    output}}; weight: {'ecc'|'parity': set of layers or None for all}; notes: lines a plan
    and the results folder record (what was profiled on what, layers skipped, warnings);
    warnings: the notes a user must see; layers: {protection: [layers]}."""

    items: tuple[Protection, ...]
    guards: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)
    copies: dict = field(default_factory=dict)
    weight: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    channels: dict = field(default_factory=dict)  # dup/tmr under a budget: {layer: [channel]}

    @property
    def spec(self) -> str | None:
        return ",".join(str(p) for p in self.items) or None

    @classmethod
    def build(cls, spec, engine, site: str, bound_batches=None, bound_source: str = "training",
              channel_rates=None, fault_layers=None) -> Protector:
        """Protections `spec` of a campaign at `site` on `engine` (guards unset, emulation
        and ranges ready). bound_batches() gives image batches to profile ranger/clip bounds
        on (`bound_source` names them in the notes); channel_rates(protection) gives the
        ChannelRate list of a dup/tmr map (with any warning as a second item);
        fault_layers names the layers the campaign injects faults into: abft, dup and tmr
        guarding none of them is refused (they would change nothing), guarding some of
        them gives a note naming the rest (ranger and clip act downstream, so not them)."""
        from flipsafe.protect import abft, ranger, redundancy

        items = parse(spec, site)
        p = cls(items)
        for item in items:
            if item.name in ("ecc", "parity"):
                chosen = None if item.layers == "all" else _resolve(engine, item, "weights")
                p.weight[item.name] = None if chosen is None else set(chosen)
                p.layers[item.name] = chosen or ["all"]
            elif item.name in ("ranger", "clip"):
                names = _resolve(engine, item, "activations")
                if bound_batches is None:
                    raise ConfigError(f"{item.name} needs images to profile its bounds on")
                p.bounds = ranger.profile_bounds(engine, names, bound_batches(),
                                                 per_channel=item.per_channel)
                p.guards = ranger.guards(p.bounds, item.name, device=engine.device)
                p.layers[item.name] = names
                per = "channel" if item.per_channel else "layer"
                p.notes.append(f"{item.name}: bounds per {per} profiled on the {bound_source} "
                               f"images' held outputs of {len(names)} layer(s)")
            elif item.name == "abft":
                names = _resolve(engine, item, "activations")
                kept = [n for n in names if isinstance(engine.leaves[n], abft.TYPES)]
                skipped = [n for n in names if n not in kept]
                if not kept:
                    able = [i.name for i in engine.layers("activations", ALL)
                            if isinstance(engine.leaves[i.name], abft.TYPES)]
                    raise ConfigError(f"abft checks Conv and Linear layers; abft:layers="
                                      f"{item.layers} selects none of them (choose from: "
                                      f"{', '.join(able) or 'none in this model'})")
                for n in kept:
                    p.checksums[n] = abft.Checksum(engine.leaves[n], engine.fmt, engine.device)
                p.layers["abft"] = kept
                if skipped:
                    p.notes.append(f"abft: skips {', '.join(skipped)} (not Conv/Linear)")
            else:  # dup, tmr
                infos = _infos(engine, item)
                if item.budget is None:
                    masks = {i.name: torch.ones(i.output_shape, dtype=torch.bool) for i in infos}
                    p.layers[item.name] = [i.name for i in infos]
                else:
                    masks = p._channels(item, engine, infos, channel_rates, redundancy)
                p.copies[item.name] = masks
            if item.name in ("abft", "dup", "tmr") and fault_layers is not None:
                p._check_faulted(item, list(fault_layers))
        return p

    def _check_faulted(self, item, fault_layers: list) -> None:
        """Refuse `item` (abft, dup, tmr) when none of its layers receives faults; note the
        ones that receive none."""
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

    def _channels(self, item, engine, infos, channel_rates, redundancy) -> dict:
        if item.get("map") is None:
            raise ConfigError(f"{item.name}:budget chooses channels from a vulnerability map; "
                              f"add {item.name}:map=RESULTS (an activation campaign's folder)")
        rates, warning = channel_rates(item)
        total = sum(redundancy.layer_flops(i) for i in engine.layers("activations", ALL)
                    if i.weight_shape is not None)
        budget = item.budget * total
        info = {i.name: i for i in infos if i.kind in ("conv", "linear")
                and i.weight_shape is not None}
        cands = [redundancy.Candidate(r.layer, r.channel, r.rate,
                                      redundancy.channel_flops(info[r.layer]), r.low)
                 for r in rates if r.layer in info]
        chosen = redundancy.choose_channels(cands, budget)
        if not chosen:
            raise ConfigError(_none_chosen(item, cands, budget))
        spent = sum(redundancy.channel_flops(info[n]) * len(c) for n, c in chosen.items())
        self.layers[item.name] = sorted(chosen)
        self.channels[item.name] = chosen
        count = sum(len(c) for c in chosen.values())
        self.notes.append(f"{item.name}: {count} channel(s) of {len(chosen)} layer(s) from "
                          f"{item.get('map')}, {spent:,} of a {budget:,.0f}-FLOP budget "
                          f"({item.budget:.0%} of {total:,} Conv/Linear FLOPs per image)")
        if warning:
            self.notes.append(f"warning: {warning}")
            self.warnings.append(warning)
        return {n: redundancy.channel_mask(info[n].output_shape, info[n].kind == "conv", c)
                for n, c in chosen.items()}

    def set_on(self, engine) -> None:
        """Set the guards on `engine` (none: the engine's guards are removed)."""
        engine.set_guards(self.guards)

    @property
    def checks(self) -> set:
        """Layers whose faulty outputs a verdict needs (abft, dup, tmr)."""
        out = set(self.checksums)
        for masks in self.copies.values():
            out |= set(masks)
        return out

    def output_verdicts(self, engine, faults, golden) -> tuple[np.ndarray, np.ndarray]:
        """(corrected, detected) of abft, dup and tmr for `faults` whose images index
        `golden` (an engine Golden)."""
        from flipsafe.protect import redundancy

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
            check = self.checksums.get(sv.layer)
            if check is not None:
                detected[at] |= check.detected(sv.inputs[0], sv.faulty)
            for kind, masks in self.copies.items():
                if sv.param != "output" or sv.layer not in masks:
                    continue
                d, c = redundancy.verdicts(sv.golden, sv.faulty, masks[sv.layer], kind)
                detected[at] |= d
                corrected[at] |= c
        return corrected, detected

    def to_dict(self) -> dict:
        """What a results folder records about the protections that ran."""
        out = {"spec": self.spec, "layers": self.layers, "notes": list(self.notes)}
        if self.channels:
            out["channels"] = self.channels
        return out


def _none_chosen(item: Protection, cands, budget: float) -> str:
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


def _resolve(engine, item: Protection, site: str) -> list[str]:
    return [i.name for i in _infos(engine, item, site)]


def _infos(engine, item: Protection, site: str = "activations"):
    """The layers `item`'s layers= selects at `site`, as --layers resolves them."""
    try:
        return engine.layers(site, _select(item))
    except FlipsafeError as exc:
        raise ConfigError(f"{item.name}:layers={item.layers}: {exc}") from None
