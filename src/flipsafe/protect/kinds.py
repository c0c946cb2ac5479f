"""The built-in protections, one class each (see flipsafe.protect.registry): what each is,
how a campaign builds it, its verdict on a fault and its cost. The numerics they call live
beside them: SECDED and parity codes in `ecc`, bounds and guards in `ranger`, checksums in
`abft`, channel choice and vote verdicts in `redundancy`, FLOP counting and the PyTorch
hooks in `cost`. The order of registration here is the canonical order of a spec.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flipsafe.errors import ConfigError
from flipsafe.protect import abft, cost, ecc, ranger, redundancy
from flipsafe.protect.apply import ALL, infos, none_chosen, resolve
from flipsafe.protect.registry import Kind, register


class _StoredCode(Kind):
    """A code over stored weight words, decoded in the memory hardware."""

    sites = ("weights", "weight_words")
    group = "memory code"
    in_memory = True
    site_why = "it protects stored weights"

    def build(self, item, ctx, protector) -> None:
        chosen = None if item.layers == "all" else resolve(ctx.engine, item, "weights")
        protector.weight[item.name] = None if chosen is None else set(chosen)
        protector.layers[item.name] = chosen or ["all"]

    def bits(self, mod, shape, channels, weight_bits, per_channel) -> int:
        total = 0
        for p in mod.parameters(recurse=True):
            n = p.numel() if channels is None else p.numel() * len(channels) // max(
                p.shape[0], 1)
            total += self.word[0] * math.ceil(n * weight_bits / cost.WORD_BITS)
        return total


class ECC(_StoredCode):
    name = "ecc"
    does = "SECDED (72,64) over stored weight words: corrects 1 bit, detects 2"
    word = (cost.ECC_BITS, cost.WORD_BITS)

    def read(self, codes, index, faulty, bits):
        return ecc.ecc_read(codes, index, faulty, bits)

    def memory(self, old_words, new_words):
        return ecc.ecc_memory(old_words, new_words)


class Parity(_StoredCode):
    name = "parity"
    does = "one parity bit per 64-bit weight word: detects odd flips"
    word = (cost.PARITY_BITS, cost.WORD_BITS)

    def read(self, codes, index, faulty, bits):
        corrected, detected = ecc.parity_classify(codes, index, faulty, bits)
        return corrected, detected, None, None

    def memory(self, old_words, new_words):
        return ecc.parity_memory(old_words, new_words)


class ABFT(Kind):
    name = "abft"
    sites = ("activations", "weights")
    does = "checksums on Conv/Linear outputs: detects"
    on_faulted_layers = True
    skip_reason = "is no Conv/Linear (left unchecked)"

    def build(self, item, ctx, protector) -> None:
        engine = ctx.engine
        names = resolve(engine, item, "activations")
        kept = [n for n in names if isinstance(engine.leaves[n], abft.TYPES)]
        skipped = [n for n in names if n not in kept]
        if not kept:
            able = [i.name for i in engine.layers("activations", ALL)
                    if isinstance(engine.leaves[i.name], abft.TYPES)]
            raise ConfigError(f"abft checks Conv and Linear layers; abft:layers="
                              f"{item.layers} selects none of them (choose from: "
                              f"{', '.join(able) or 'none in this model'})")
        protector.checked[self.name] = {
            n: abft.Checksum(engine.leaves[n], engine.fmt, engine.device) for n in kept}
        protector.layers[self.name] = kept
        if skipped:
            protector.notes.append(f"abft: skips {', '.join(skipped)} (not Conv/Linear)")

    def verdicts(self, check, sv):
        detected = check.detected(sv.inputs[0], sv.faulty)
        return detected, np.zeros_like(detected)

    def acts_on(self, mod) -> bool:
        return cost.abft_guardable(mod)

    def flops(self, mod, shape, channels, layer_flops) -> float:
        return cost.abft_flops(mod, shape, channels)

    def bits(self, mod, shape, channels, weight_bits, per_channel) -> int:
        return cost.abft_bits(mod, weight_bits) if self.acts_on(mod) else 0

    def hook(self, mod, layer, channels, monitor, bounds, per_channel):
        if not self.acts_on(mod):
            return None
        return cost.abft_hook(monitor, cost.summed_filters(mod, channels), channels)


class _Copies(Kind):
    """Computation repeated on whole layers or, under a FLOP budget, on the channels a
    vulnerability map ranks most vulnerable."""

    sites = ("activations",)
    options = ("layers", "budget", "map")
    group = "copies"
    on_faulted_layers = True
    site_why = "it repeats computation, and every copy reads the same stored weights"
    site_hint = "use ecc to protect weights, or --site activations"
    extra_copies = 1  # copies computed besides the original
    compare_flops = cost.COMPARE_FLOPS  # per protected value
    corrects = False  # a vote corrects; a comparison detects

    def build(self, item, ctx, protector) -> None:
        layers = infos(ctx.engine, item)
        if item.budget is None:
            masks = {i.name: torch.ones(i.output_shape, dtype=torch.bool) for i in layers}
            protector.layers[item.name] = [i.name for i in layers]
        else:
            masks = self._channels(item, ctx, protector, layers)
        protector.checked[item.name] = masks

    def _channels(self, item, ctx, protector, layers) -> dict:
        engine = ctx.engine
        if item.get("map") is None:
            raise ConfigError(f"{item.name}:budget chooses channels from a vulnerability map; "
                              f"add {item.name}:map=RESULTS (an activation campaign's folder)")
        rates, warning = ctx.channel_rates(item)
        total = sum(redundancy.layer_flops(i) for i in engine.layers("activations", ALL)
                    if i.weight_shape is not None)
        budget = item.budget * total
        info = {i.name: i for i in layers if i.kind in ("conv", "linear")
                and i.weight_shape is not None}
        cands = [redundancy.Candidate(r.layer, r.channel, r.rate,
                                      redundancy.channel_flops(info[r.layer]), r.low)
                 for r in rates if r.layer in info]
        chosen = redundancy.choose_channels(cands, budget)
        if not chosen:
            raise ConfigError(none_chosen(item, cands, budget))
        spent = sum(redundancy.channel_flops(info[n]) * len(c) for n, c in chosen.items())
        protector.layers[item.name] = sorted(chosen)
        protector.channels[item.name] = chosen
        count = sum(len(c) for c in chosen.values())
        protector.notes.append(
            f"{item.name}: {count} channel(s) of {len(chosen)} layer(s) from {item.get('map')}, "
            f"{spent:,} of a {budget:,.0f}-FLOP budget ({item.budget:.0%} of {total:,} "
            f"Conv/Linear FLOPs per image)")
        if warning:
            protector.notes.append(f"warning: {warning}")
            protector.warnings.append(warning)
        return {n: redundancy.channel_mask(info[n].output_shape, info[n].kind == "conv", c)
                for n, c in chosen.items()}

    def verdicts(self, mask, sv):
        if sv.param != "output":  # a copy recomputes outputs from the same stored weights
            return None
        return redundancy.verdicts(sv.golden, sv.faulty, mask, corrects=self.corrects)

    def flops(self, mod, shape, channels, layer_flops) -> float:
        values, fraction = cost.share(mod, shape, channels)
        return self.extra_copies * layer_flops * fraction + self.compare_flops * values * fraction


class Dup(_Copies):
    name = "dup"
    does = "duplication with comparison (layers or vulnerable channels): detects"

    def hook(self, mod, layer, channels, monitor, bounds, per_channel):
        return cost.dup_hook(monitor, channels)


class TMR(_Copies):
    name = "tmr"
    does = "triplication with a majority vote (layers or vulnerable channels): corrects"
    extra_copies = 2
    compare_flops = cost.VOTE_FLOPS
    corrects = True

    def hook(self, mod, layer, channels, monitor, bounds, per_channel):
        return cost.tmr_hook(channels)


class _Bound(Kind):
    """Outputs held within the range profiled on clean images, by a guard on the engine."""

    sites = ("activations", "weights")
    options = ("layers", "per")
    group = "bounds"
    needs_bounds = True
    make_guard = staticmethod(ranger.ranger_guard)

    def build(self, item, ctx, protector) -> None:
        engine = ctx.engine
        names = resolve(engine, item, "activations")
        if ctx.bound_batches is None:
            raise ConfigError(f"{item.name} needs images to profile its bounds on")
        protector.bounds = ranger.profile_bounds(engine, names, ctx.bound_batches(),
                                                 per_channel=item.per_channel)
        protector.guards = ranger.guards(protector.bounds, self.make_guard,
                                         device=engine.device)
        protector.layers[item.name] = names
        per = "channel" if item.per_channel else "layer"
        protector.notes.append(f"{item.name}: bounds per {per} profiled on the "
                               f"{ctx.bound_source} images' held outputs of {len(names)} "
                               f"layer(s)")

    def flops(self, mod, shape, channels, layer_flops) -> float:
        values, fraction = cost.share(mod, shape, channels)
        return cost.GUARD_FLOPS * values * fraction

    def bits(self, mod, shape, channels, weight_bits, per_channel) -> int:
        n = (len(channels) if channels is not None
             else cost.channels_of(mod, shape) if per_channel else 1)
        return 2 * cost.BOUND_BITS * n

    def hook(self, mod, layer, channels, monitor, bounds, per_channel):
        if layer not in bounds:
            raise ConfigError(f"{self.name}: no profiled bound for layer {layer!r}")
        lo, hi = cost.lo_hi(bounds[layer], channels, per_channel)
        return cost.bound_hook(self.make_guard, lo, hi, cost.channel_dim(mod), channels)


class Ranger(_Bound):
    name = "ranger"
    does = "outputs clamped to the range profiled on training data"


class Clip(_Bound):
    name = "clip"
    does = "outputs beyond the profiled range set to 0 (FT-ClipAct)"
    make_guard = staticmethod(ranger.clip_guard)


for _kind in (ECC, Parity, ABFT, Dup, TMR, Ranger, Clip):
    register(_kind())
