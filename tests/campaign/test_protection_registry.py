"""A protection is one class: a toy one, registered here only, runs in a campaign, is
costed, named in specs and refused where it cannot guard, without touching flipsafe."""

import math

import numpy as np
import pytest
import torch

from flipsafe.campaign import ResultsStore
from flipsafe.campaign.runner import make_plan, run_campaign
from flipsafe.campaign.store import read_cost
from flipsafe.errors import ConfigError
from flipsafe.protect import registry
from flipsafe.protect.apply import resolve
from flipsafe.protect.spec import canonical, parse


class Watch(registry.Kind):
    """Flags every fault that changes any bit of a guarded layer's output: what dup
    concludes over whole layers, by another route (compares with the golden run)."""

    name = "watch"
    sites = ("activations",)
    does = "flags a layer output that differs from the clean run (a toy)"
    on_faulted_layers = True

    def build(self, item, ctx, protector):
        names = resolve(ctx.engine, item, "activations")
        protector.checked[self.name] = {n: None for n in names}
        protector.layers[self.name] = names

    def verdicts(self, state, sv):
        n = sv.faulty.shape[0]
        bits = lambda t: t.contiguous().view(torch.int32).reshape(n, -1)
        changed = (bits(sv.faulty) != bits(sv.golden)).any(1).cpu().numpy()
        return changed, np.zeros(n, dtype=bool)

    def flops(self, mod, shape, channels, layer_flops):
        return 5 * math.prod(shape)


@pytest.fixture
def watch():
    kind = registry.register(Watch())
    yield kind
    registry.unregister(kind.name)


def _rows(plan, folder):
    run_campaign(plan, folder, show_progress=False)
    store = ResultsStore(folder)
    store.open()
    return store.read()


def test_a_protection_registered_outside_flipsafe_runs_in_a_campaign(watch, mlp_checkpoint,
                                                                     tmp_path):
    plan = {"site": "activations", "layers": "all", "n": 80, "seed": 5, "part_size": 4096}
    dup = _rows(make_plan(mlp_checkpoint, protect="dup", **plan), tmp_path / "dup")
    mine = make_plan(mlp_checkpoint, protect="watch", **plan)
    assert mine.protect == "watch"
    rows = _rows(mine, tmp_path / "watch")
    # Same faults; the toy's verdict is dup's over whole layers, and what it flags is no SDC.
    for name in ("fault_id", "layer", "index", "bits", "image_id", "golden_top1"):
        assert rows.column(name).equals(dup.column(name)), name
    detected = rows.column("detected").to_numpy()
    assert detected.any()
    np.testing.assert_array_equal(detected, dup.column("detected").to_numpy())
    assert not rows.column("sdc").to_numpy()[detected].any()
    # Its cost hook is what the folder records: 5 FLOPs per output value of its layers.
    cost = read_cost(tmp_path / "watch")
    assert cost["protections"]["watch"]["flops"] > 0
    assert cost["total"]["flops"] == cost["protections"]["watch"]["flops"]


def test_a_registered_protection_is_parsed_ordered_and_refused_like_the_built_in_ones(watch):
    assert canonical("watch:layers=last,ecc") == "ecc,watch:layers=last"
    assert parse("watch")[0].layers == "all"
    with pytest.raises(ConfigError, match="watch cannot guard a campaign on the weights site"):
        parse("watch", "weights")
    with pytest.raises(ConfigError, match="watch takes no option 'budget'"):
        parse("watch:budget=10%")
    with pytest.raises(ConfigError, match="registered already"):
        registry.register(Watch())


def test_an_unregistered_protection_is_unknown():
    with pytest.raises(ConfigError, match="unknown protection 'watch'; choose from: ecc"):
        parse("watch")


def test_plans_take_typed_protections_and_hand_them_back(mlp_checkpoint):
    from flipsafe.protect.spec import Protection

    typed = make_plan(mlp_checkpoint, site="activations", n=10,
                      protect=(Protection("dup", (("layers", "last"),)), Protection("abft")))
    text = make_plan(mlp_checkpoint, site="activations", n=10, protect="dup:layers=last,abft")
    assert typed.protect == text.protect == "abft,dup:layers=last"  # what plan.json stores
    assert typed.fingerprint() == text.fingerprint()
    assert [p.name for p in typed.protections] == ["abft", "dup"]
    assert typed.protections[1].layers == "last"
    with pytest.raises(ConfigError, match="ecc cannot guard a campaign on the activations"):
        make_plan(mlp_checkpoint, site="activations", n=10, protect=(Protection("ecc"),))
