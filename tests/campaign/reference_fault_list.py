"""Reference only: the campaign fault list as flipsafe built it before faults.Sampler
(verbatim from campaign/work.py at commit 32cf76e: _stratum_seed, _strata_sizes,
fault_list, _ENGINE_PARAM; `Prepared` and `CampaignPlan` left as plain annotations).
tests/campaign/test_sampler_pin.py checks that today's campaign builds the very same
stratum sizes and fault lists, so stored campaigns resume on the faults they started."""

from __future__ import annotations

import hashlib

import torch

from flipsafe.errors import CampaignError

Prepared = CampaignPlan = object


def _stratum_seed(seed: int, layer: str, field: str) -> int:
    """A seed per stratum that depends on nothing but the plan, so any worker agrees."""
    digest = hashlib.sha256(f"{seed}\x00{layer}\x00{field}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _strata_sizes(plan: CampaignPlan, layers, n_images: int, fmt) -> dict[tuple[str, str], int]:
    """Fault-space size of each (layer, field) stratum.

    A bit fault belongs to the field of its highest bit (a burst2 on the top mantissa
    and lowest exponent bits is an exponent fault); random and zero act on whole values,
    one 'value' stratum per layer. A fault is a (fault, element, image) triple, so
    sampled plans size the population with the images included. `--n all` enumerates
    every fault of every element once, each on a seeded random image, so there the
    images are left out.
    """
    from flipsafe.faults import parse, stratum_size

    per_image = 1 if plan.n == "all" else n_images
    meta = plan.site == "metadata"
    whole_value = parse(plan.fault).whole_value
    sizes = {}
    for info in layers:
        if whole_value:
            sizes[(info.name, "value")] = info.numel * per_image
            continue
        for field in info.fields:
            per_element = stratum_size(plan.fault, fmt, field, meta)
            sizes[(info.name, field)] = info.numel * per_element * per_image
    return sizes


def fault_list(prep: Prepared):
    """The plan's whole fault list (a FaultSet) and each fault's stratum field, in order.

    Each stratum draws from its own generator seeded by (seed, layer, field), so the list
    is the same on any machine and however the work is later split. A stratum holds the
    faults whose highest bit lies in its field; `--n all` lists each of them once per
    element (random and zero: each element once).
    """
    from flipsafe.faults import FaultSet, draw, every_fault

    plan, engine = prep.plan, prep.engine
    numel = {info.name: info.numel for info in prep.layers}
    names = [info.name for info in prep.layers]
    meta = plan.site == "metadata"
    sets, fields = [], []
    for s in prep.strata:
        if s.n == 0:
            continue
        gen = torch.Generator().manual_seed(_stratum_seed(plan.seed, s.layer, s.field))
        top = None if s.field == "value" else s.field
        if plan.n == "all":
            index, d = every_fault(plan.fault, engine.fmt, numel[s.layer], top, gen, meta=meta)
            if len(index) != s.n:
                raise CampaignError(  # the stratum sizes and the enumeration disagree
                    f"internal error: {s.layer} {s.field} lists {len(index)} faults, not {s.n}")
        else:
            index = torch.randint(numel[s.layer], (s.n,), generator=gen)
            d = draw(plan.fault, engine.fmt, s.n, None, gen, meta=meta, top=top)
        image = prep.image_ids[torch.randint(prep.image_ids.numel(), (s.n,), generator=gen)]
        sets.append(FaultSet(names, layer=torch.full((s.n,), names.index(s.layer)), index=index,
                             mask=d.mask, op=d.op, value=d.value, image=image,
                             param=_ENGINE_PARAM[plan.site]))
        fields += [s.field] * s.n
    if not sets:
        raise CampaignError("the plan allocates no faults; raise --n or lower the confidence")
    return FaultSet.cat(sets), fields


_ENGINE_PARAM = {"activations": "output", "weights": "weight", "metadata": "meta"}


