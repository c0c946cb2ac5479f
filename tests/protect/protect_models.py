"""A tiny Conv/Linear model, data it classifies, and campaign helpers for protection tests."""

import copy

import torch
from torch import nn

from flipsafe import Campaign
from flipsafe.campaign import ResultsStore
from flipsafe.campaign.plan import FaultPlan

# Columns that say which fault ran where: a protection must leave them all as they were.
FAULT_COLUMNS = ("fault_id", "layer", "field", "site", "param", "index", "bits",
                 "fault_model", "format", "image_id", "golden_top1")


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4)).eval()


def data(model, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def rows(model, xy, folder, protect=None, **plan):
    plan = {"images": "all", "seed": 5, **plan}
    Campaign(model, data=xy, plan=FaultPlan(**plan), out=folder, protect=protect).run()
    store = ResultsStore(folder)
    store.open()
    return store.read()


def flip(value: torch.Tensor, bits) -> torch.Tensor:
    """fp32 `value` (a 0-d tensor) with `bits` flipped."""
    code = value.reshape(1).view(torch.int32).clone()
    for b in bits:
        code ^= torch.tensor([1 << b], dtype=torch.int64).to(torch.int32)
    return code.view(torch.float32)[0]


def hooked(model, hooks):
    """A copy of `model` with forward hooks {layer: fn(output) -> output}."""
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    for name, fn in hooks.items():
        mods[name].register_forward_hook(lambda mod, i, o, fn=fn: fn(o))
    return m
