"""The one fault sampler: seeded uniform samples and stratified fault lists over layers."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from flipsafe.errors import ConfigError, unknown
from flipsafe.faults.faultset import FaultSet
from flipsafe.faults.models import draw, every_fault, parse, positions, stratum_size

# The one stratum of a layer under faults that replace whole values (random, zero).
VALUE = "value"
# How `Sampler.uniform` weights layers: each layer alike, or each element alike.
WEIGHTINGS = ("layer", "element")
_META = ("meta", "weight_meta")


class Layer(Protocol):
    """What the sampler needs of a layer (inject.LayerInfo has it): its name, how many
    codes a fault may hit at the site (`numel`) and the bit fields of those codes."""

    name: str
    numel: int
    fields: Mapping


def stratum_seed(seed: int, layer: str, field: str) -> int:
    """A generator seed per stratum that depends on nothing but the plan's seed and the
    stratum, so every worker, and any split of the work, draws the same faults."""
    digest = hashlib.sha256(f"{seed}\x00{layer}\x00{field}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Sampler:
    """Faults of `fault_model` on the `fmt` codes of `layers` at FaultSet param `param`.

    The fault space is split into strata, one per (layer, field): a bit fault belongs to
    the field of its highest bit (a burst2 on the top mantissa and lowest exponent bits is
    an exponent fault); random and zero replace whole values, one VALUE stratum per layer.
    Every FaultSet the sampler returns holds each fault's field in its `stratum` column.
    Which layers to give is the caller's choice (inject.Engine.layers selects them; its
    'all' is the one meaning of 'all' for samples and campaigns alike).
    """

    def __init__(self, layers: Sequence[Layer], fault_model: str, fmt, param: str = "output"):
        self.layers = list(layers)
        if not self.layers:
            raise ConfigError("no layers to draw faults from")
        self.fault_model, self.fmt, self.param = fault_model, fmt, param
        self.model = parse(fault_model)
        self.meta = param in _META
        self.names = [info.name for info in self.layers]

    def fields(self, info: Layer) -> list[str]:
        """The strata fields of one layer, in order."""
        return [VALUE] if self.model.whole_value else list(info.fields)

    def sizes(self, images: int = 1) -> dict[tuple[str, str], int]:
        """Fault-space size of every (layer, field) stratum, in layer then field order:
        elements x faults per element whose highest bit lies in the field x `images`
        (a fault is a (fault, element, image) triple; 1 counts (fault, element) pairs)."""
        sizes = {}
        for info in self.layers:
            for field in self.fields(info):
                top = None if field == VALUE else field
                sizes[(info.name, field)] = (
                    info.numel * stratum_size(self.fault_model, self.fmt, top, self.meta) * images)
        return sizes

    def stratified(self, counts: Mapping[tuple[str, str], int], seed: int,
                   images: torch.Tensor, every: bool = False) -> FaultSet:
        """counts[(layer, field)] faults of each stratum, strata in the order of `counts`.

        Each stratum draws from its own generator seeded by stratum_seed(seed, layer,
        field): elements uniformly, then the fault's bits (draw with top=field), then its
        image uniformly from `images` (image ids). `every` lists each fault of the stratum
        once per element instead (every_fault; counts must then be the stratum sizes of
        sizes(images=1)), each on a seeded random image.
        """
        images = torch.as_tensor(images, dtype=torch.int64).reshape(-1)
        numel = {info.name: info.numel for info in self.layers}
        empty = torch.zeros(0, dtype=torch.int64)
        sets = [FaultSet(self.names, layer=empty, index=empty, mask=empty, param=self.param)]
        for (layer, field), n in counts.items():
            if layer not in numel:
                raise unknown("layer", str(layer), self.names)
            if field not in self.fields(self.layers[self.names.index(layer)]):
                raise unknown(f"stratum of {layer}", str(field),
                              self.fields(self.layers[self.names.index(layer)]))
            if n == 0:
                continue
            gen = torch.Generator().manual_seed(stratum_seed(seed, layer, field))
            top = None if field == VALUE else field
            if every:
                index, d = every_fault(self.fault_model, self.fmt, numel[layer], top, gen,
                                       meta=self.meta)
                if len(index) != n:
                    raise ConfigError(f"stratum ({layer}, {field}) holds {len(index)} faults "
                                      f"per image, not {n}; give the sizes of sizes(images=1)")
            else:
                index = torch.randint(numel[layer], (n,), generator=gen)
                d = draw(self.fault_model, self.fmt, n, None, gen, meta=self.meta, top=top)
            if images.numel() == 0:
                raise ConfigError("no images to put faults on")
            image = images[torch.randint(images.numel(), (n,), generator=gen)]
            sets.append(FaultSet(self.names, layer=self.names.index(layer), index=index,
                                 mask=d.mask, op=d.op, value=d.value, image=image,
                                 param=self.param, strata=[field], stratum=0))
        return FaultSet.cat(sets)

    def uniform(self, n: int, images: int | torch.Tensor = 1, field=None,
                generator: torch.Generator | None = None, by: str = "layer") -> FaultSet:
        """n faults drawn at random from one generator: layers uniformly (by='layer') or
        every element equally likely (by='element'), elements uniformly within a layer,
        bits from the fault model restricted to `field`, and images uniformly from
        range(images) (or, given a tensor, in that order). Each fault's stratum is the
        field of its highest bit."""
        if by not in WEIGHTINGS:
            raise unknown("layer weighting", str(by), list(WEIGHTINGS))
        numel = torch.tensor([i.numel for i in self.layers], dtype=torch.float64)
        weights = torch.ones_like(numel) if by == "layer" else numel
        layer = torch.multinomial(weights, n, replacement=True, generator=generator)
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        index = (u * numel[layer]).floor().long().clamp_(max=(numel[layer] - 1).long())
        d = draw(self.fault_model, self.fmt, n, field, generator, meta=self.meta)
        if isinstance(images, torch.Tensor):
            image = images.long().reshape(-1)
        else:
            image = torch.randint(int(images), (n,), generator=generator)
        strata, stratum = self._strata_of(layer, d.mask)
        return FaultSet(self.names, layer=layer, index=index, mask=d.mask, op=d.op,
                        value=d.value, image=image, param=self.param, strata=strata,
                        stratum=stratum)

    def _strata_of(self, layer: torch.Tensor, mask: torch.Tensor):
        """(field names, per-fault index into them): the field of each mask's highest bit."""
        if self.model.whole_value:
            return [VALUE], 0
        strata: list[str] = []
        stratum = torch.zeros(mask.numel(), dtype=torch.int64)
        shifts = torch.arange(63, -1, -1, dtype=torch.int64)
        top = 63 - ((mask[:, None] >> shifts) & 1).argmax(1)
        for k in torch.unique(layer).tolist():
            rows = layer == k
            of_bit = torch.full((64,), -1, dtype=torch.int64)
            for field in self.fields(self.layers[k]):
                if field not in strata:
                    strata.append(field)
                of_bit[positions(self.fmt, field, self.meta)] = strata.index(field)
            stratum[rows] = of_bit[top[rows]]
        return strata or [VALUE], stratum
