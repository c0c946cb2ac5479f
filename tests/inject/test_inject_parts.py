"""The engine's parts on their own: emulated model, executors, site registry, the two peers."""

import copy

import pytest
import torch
from inject_reference import TinyNet
from test_inject_engine import FP32_REASSOCIATION, data

from flipsafe import formats
from flipsafe.faults import PARAMS, FaultSet
from flipsafe.inject import Engine
from flipsafe.inject.emulated import EmulatedModel
from flipsafe.inject.executors import GraphExecutor, HookExecutor, choose_executor
from flipsafe.inject.exhaustive import ExhaustiveLastLayer
from flipsafe.inject.injector import Injector
from flipsafe.inject.sites import SITE_TYPES, SITES
from flipsafe.metrics.outcomes import FIELDS


def assert_identical(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if x.dtype.is_floating_point:
            assert torch.equal(torch.isnan(x), torch.isnan(y)), f
            x, y = x[~torch.isnan(x)], y[~torch.isnan(y)]
        assert torch.equal(x, y), f


def test_the_emulated_model_is_complete_when_constructed():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, _ = data(2)
    bf16 = formats.get("bf16")
    em = EmulatedModel(copy.deepcopy(model), bf16, x, "cpu")
    # Parameters are the format's values of the model's own, held by the copy.
    assert torch.equal(em.model.conv1.weight, bf16.quantize(model.conv1.weight.detach()))
    assert em.params[("conv1", "weight")].values is em.model.conv1.weight
    assert em.shapes["conv1"] == (8, 8, 8) and em.shapes["fc"] == (10,)
    assert all(em.calls[n] == 1 for n in em.leaves)
    assert set(em.quant) == {n for n, k in em.kinds.items() if k in ("conv", "linear", "norm")}
    raw = torch.randn(2, 8, 8, 8)
    assert torch.equal(em.quantize_output("conv1", raw), bf16.quantize(raw))
    assert torch.equal(em.quantize_output("relu1", raw), raw)  # not held in the format
    em.emulate({}, {"conv1": lambda v: v.clamp(-1, 1)})
    assert torch.equal(em.held_output("conv1", raw), bf16.quantize(raw).clamp(-1, 1))


def test_every_fault_parameter_has_one_site_class_and_its_user_name():
    assert tuple(SITE_TYPES) == PARAMS
    assert {cls.name: p for p, cls in SITE_TYPES.items()} == {
        "activations": "output", "weights": "weight", "biases": "bias", "metadata": "meta",
        "weight_metadata": "weight_meta", "pe": "pe", "weight_words": "weight_word",
        "zero_points": "zero_point", "weight_zero_points": "weight_zero_point"}
    assert all(SITES[p] == p and SITES[cls.name] == p for p, cls in SITE_TYPES.items())


def test_both_executors_give_the_logits_of_the_model_with_a_layer_replaced_by_hand():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = data(4)
    em = EmulatedModel(copy.deepcopy(model), formats.get("fp32"), x, "cpu")
    graph, error = choose_executor(em, suffix=True)
    assert isinstance(graph, GraphExecutor) and error is None
    hooks = HookExecutor(em)
    img = torch.tensor([2, 0, 2])
    for ex in (graph, hooks):
        g = ex.golden(x, y, {"conv2"})
        value = g.raw["conv2"][img] * 1.5 - 0.25
        ref = copy.deepcopy(model)
        ref.conv2.register_forward_hook(lambda mod, inp, out, v=value: v)
        with torch.no_grad():
            want = ref(x[img])
            got = ex.logits_after("conv2", value, img, g)
        assert torch.allclose(got, want, rtol=FP32_REASSOCIATION, atol=FP32_REASSOCIATION)
        assert torch.allclose(g.logits, model(x), rtol=FP32_REASSOCIATION,
                              atol=FP32_REASSOCIATION)


@pytest.mark.parametrize("suffix", [True, False])
def test_the_peers_on_the_parts_give_the_engines_outcomes(suffix):
    """Injector and ExhaustiveLastLayer need only the parts' public API: built from an
    EmulatedModel and its executor, they give what the Engine facade gives."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, y = data(6)
    engine = Engine(model, "bf16", suffix=suffix)
    ranges = engine.profile(x)
    gen = torch.Generator().manual_seed(4)
    faults = FaultSet.cat([engine.sample(30, s, images=6, generator=gen)
                           for s in ("activations", "weights", "biases")])
    em = EmulatedModel(copy.deepcopy(model), formats.get("bf16"), x, "cpu", ranges)
    ex, _ = choose_executor(em, suffix)
    assert ex.suffix == engine.suffix == suffix
    assert_identical(Injector(em, ex).run(faults, x, y), engine.run(faults, x, y))
    assert_identical(ExhaustiveLastLayer(em, ex).run(x, y, bits=[3, 7, 14]).outcomes,
                     engine.exhaustive_last_layer(x, y, bits=[3, 7, 14]).outcomes)


RUNS: dict = {}  # forward runs of the _Counted layers, by name


class _Counted(torch.nn.Linear):
    def __init__(self, name, *args):
        super().__init__(*args)
        self.tag = name

    def forward(self, x):
        RUNS[self.tag] = RUNS.get(self.tag, 0) + 1
        return super().forward(x)


class _Pair(torch.nn.Module):
    """A block handing on a tuple (as transformers' layers do)."""

    def __init__(self):
        super().__init__()
        self.fc = _Counted("pair.fc", 6, 6)

    def forward(self, x):
        return self.fc(x).relu(), None


class _Blocks(torch.nn.Module):
    """Blocks before the faulty layer: one hands on a tuple, one's output is changed in
    place by the parent, one runs twice, one hands on a dict."""

    def __init__(self):
        super().__init__()
        self.pair = _Pair()
        self.mutated = torch.nn.Sequential(_Counted("mutated.0", 6, 6), torch.nn.Tanh())
        self.twice = _Counted("twice", 6, 6)
        self.keyed = _Counted("keyed", 6, 6)
        self.late = _Counted("late", 6, 6)
        self.head = _Counted("head", 6, 3)

    def forward(self, x):
        h, _ = self.pair(x)
        h = self.mutated(h)
        h += 0.5  # would change a cached output, were it not a copy
        h = self.twice(self.twice(h))
        h = {"v": self.keyed(h)}["v"]
        return self.head(self.late(h).relu())


def test_hook_runs_take_the_modules_that_finish_before_the_layer_from_the_golden_run():
    torch.manual_seed(0)
    model = _Blocks().eval()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    em = EmulatedModel(copy.deepcopy(model), formats.get("fp32"), x, "cpu")
    hooks = HookExecutor(em)
    # Outermost modules that run once with a batch-first output: not the one run twice
    # (nor its parent-less twin calls), dicts are fine only as the parent's own values.
    assert hooks.before("late") == ["keyed", "mutated", "pair"]
    assert hooks.before("pair.fc") == [] and hooks.before("mutated.1") == ["mutated.0", "pair"]
    g = hooks.golden(x, y, {"late"})
    img = torch.tensor([4, 1, 1])
    value = g.raw["late"][img] * -2.0 + 0.125
    ref = copy.deepcopy(model)
    ref.late.register_forward_hook(lambda mod, inp, out: value)
    with torch.no_grad():
        want = ref(x[img])
        RUNS.clear()
        got = hooks.logits_after("late", value, img, g)
    assert torch.equal(got, want)
    # The prefix blocks did not run; the twice-run one did, and forward is the class's again.
    assert RUNS == {"twice": 2, "late": 1, "head": 1}
    assert "forward" not in em.model.pair.__dict__
    with torch.no_grad():
        assert torch.equal(em.model(x), model(x))


def test_a_child_module_named_inplace_is_left_alone():
    model = torch.nn.Sequential()
    model.add_module("inplace", torch.nn.ReLU(inplace=True))
    model.add_module("fc", torch.nn.Linear(4, 2))
    em = EmulatedModel(model, formats.get("fp32"), torch.randn(2, 4), "cpu")
    assert isinstance(em.model.inplace, torch.nn.ReLU) and em.model.inplace.inplace is False


def test_the_engine_computes_without_tf32_and_restores_the_flags(monkeypatch):
    """On recent GPUs TF32 would round fp32 convolutions and matmuls to 10 mantissa bits:
    the engine turns it off while it computes (the flags act on CPU runs as well)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    matmul = torch.backends.cuda.matmul.allow_tf32  # not an attribute monkeypatch can undo
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        torch.manual_seed(0)
        seen = []
        engine = Engine(TinyNet().eval(), "fp32", guards={"fc": lambda v: seen.append(
            (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)) or v})
        x, y = data(4)
        engine.golden(x, y)
        engine.run(engine.sample(5, "weights", images=4), x, y)
        assert seen and set(seen) == {(False, False)}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
