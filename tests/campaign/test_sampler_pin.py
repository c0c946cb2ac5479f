"""Campaign fault lists come from faults.Sampler, unchanged from before it existed, and the
campaign and Engine.sample agree on which layers 'all' selects."""

import pytest
import reference_fault_list as old
import torch
from torch import nn

from flipsafe.campaign.plan import plan_strata
from flipsafe.campaign.runner import fault_list, make_plan, prepare
from flipsafe.campaign.targets import resolve
from flipsafe.models import build

PLANS = [
    {},
    {"site": "weights", "fault": "bitflip2", "n": 40, "allocation": "equal"},
    {"fault": "random", "n": 30, "images": "all"},
    {"fault": "burst2", "n": 25, "seed": 11},
    {"layers": "last", "n": "all", "fault": "burst2"},
    {"layers": "last", "n": "all", "fault": "zero"},
    {"site": "metadata", "format": "mxfp8_e4m3", "n": 20},
    {"site": "weights", "format": "bf16", "fault": "stuck1", "n": 15,
     "layers": r"features\.3|fc"},
]


@pytest.mark.parametrize("changes", PLANS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                  c.items()) or "default")
def test_fault_list_is_the_one_campaigns_stored_before(mlp_checkpoint, changes):
    kw = {"n": 60, "seed": 5, "part_size": 50, **changes}
    plan = make_plan(mlp_checkpoint, **kw)
    prep = prepare(plan)
    # The layers the old prepare chose: "all" was "conv|linear", anything else as given.
    select = "conv|linear" if plan.layers == "all" else plan.layers
    layers = prep.engine.layers(plan.site, select)
    assert [i.name for i in prep.layers] == [i.name for i in layers]
    sizes = old._strata_sizes(prep.plan, layers, int(prep.image_ids.numel()), prep.engine.fmt)
    expect = plan_strata(prep.plan, sizes)
    assert [(s.layer, s.field, s.size, s.n) for s in prep.strata] == \
        [(s.layer, s.field, s.size, s.n) for s in expect]

    was, was_fields = old.fault_list(prep)
    now = fault_list(prep)
    assert now.layers == was.layers and len(now) == len(was) == prep.total
    for col in ("layer", "param", "index", "mask", "op", "value", "image"):
        assert torch.equal(getattr(now, col), getattr(was, col)), col
    assert now.stratum_names == was_fields


@pytest.mark.parametrize("site", ["activations", "weights", "metadata"])
def test_campaign_and_engine_sample_agree_on_all(site):
    """'all' is one selection, the Conv and Linear layers, for a campaign and for
    Engine.sample (before, Engine.sample's 'all' added the BatchNorm layers)."""
    torch.manual_seed(0)
    model = build("resnet20", 10, in_channels=1, image_size=8).eval()
    fmt = "mxfp8_e4m3" if site == "metadata" else "fp32"
    target = resolve(model)
    prep = prepare(make_plan(target, dataset="digits", n=3, site=site, images="all",
                             format=fmt), target=target)
    engine = prep.engine
    chosen = [i.name for i in prep.layers]
    convs_and_linears = [name for name, mod in model.named_modules()
                         if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert chosen == convs_and_linears
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    sampled = engine.sample(300, site, "all", generator=torch.Generator().manual_seed(0))
    assert sampled.layers == chosen == fault_list(prep).layers
    assert [i.name for i in engine.layers(site, "all")] == chosen
