"""Models torch.fx cannot trace run as torch.export graphs: suffix runs equal full runs and
the deep-copy reference, on Hugging Face image classifiers and on plain modules."""

import pytest
import torch
from inject_reference import Reference, TinyNet, reference_outcomes
from test_inject_engine import assert_same_outcomes, format_tolerance
from test_inject_reference import check

from flipsafe.errors import InjectionError
from flipsafe.faults import FaultSet
from flipsafe.inject import Engine


class Logits(torch.nn.Module):
    """A Hugging Face classifier as users wrap it: forward(x) returns the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def hf_model(name: str):
    """(model, image side): tiny random-init configs, nothing downloaded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=10)
        return Logits(transformers.ViTForImageClassification(cfg)).eval(), 16
    if name == "resnet":
        cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                        num_labels=10)
        return Logits(transformers.ResNetForImageClassification(cfg)).eval(), 16
    cfg = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_labels=10)
    return Logits(transformers.ConvNextForImageClassification(cfg)).eval(), 16


def data(n, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(10, (n,), generator=g)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["vit", "resnet", "convnext"])
def test_hf_classifiers_run_as_exported_graphs_and_match_the_references(name, fmt):
    model, side = hf_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(6, side)
    fast = Engine(model, fmt, chunk=16)
    ranges = fast.profile(x)
    # torch.fx rejects these models; the graph comes from torch.export.
    assert fast.suffix and "torch.fx" in fast.trace_error
    full = Engine(model, fmt, ranges=ranges, suffix=False)
    assert not full.suffix
    gen = torch.Generator().manual_seed(1)
    faults = FaultSet.cat([fast.sample(16, s, "all", m, images=6, generator=gen)
                           for s in ("activations", "weights") for m in ("bitflip", "random")])
    a, b = fast.run(faults, x, y), full.run(faults, x, y)
    assert_same_outcomes(a, b, tol=format_tolerance(fast.fmt))
    assert (a.delta_loss.abs() > 1e-6).sum() >= len(faults) // 4
    # Fault sites keep their named_modules() names.
    names = {n for n, _ in model.named_modules()}
    assert set(faults.layers) <= names
    # A few faults, one deep copy each, as the slow reference computes them.
    few = FaultSet.cat([fast.sample(4, s, "all", "bitflip", images=6, generator=gen)
                        for s in ("activations", "weights")])
    check(fast.run(few, x, y), reference_outcomes(Reference(model, fmt, ranges), x, y, few), fmt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in fast.model.modules())


def test_layers_torch_export_records_no_operation_for_are_not_sites():
    """HF ResNet's shortcut is an nn.Identity: the exported graph has no node to restart
    from, so it is not an activation site (hooks would see it; the layers around it stay)."""
    model, side = hf_model("resnet")
    engine = Engine(model, "fp32", input_shape=(3, side, side))
    assert engine.suffix
    identity = "model.resnet.encoder.stages.0.layers.0.shortcut"
    assert isinstance(dict(model.named_modules())[identity], torch.nn.Identity)
    with pytest.raises(InjectionError, match="no operation"):
        engine.layers("activations", identity)
    hooks = Engine(model, "fp32", input_shape=(3, side, side), suffix=False)
    assert [i.name for i in engine.layers("activations")] == \
        [i.name for i in hooks.layers("activations")]
    assert [i.name for i in engine.layers("weights")] == \
        [i.name for i in hooks.layers("weights")]


class Gated(torch.nn.Module):
    """Branches on a shape (torch.fx: 'symbolically traced variables cannot be used as
    inputs to control flow'), adds in place to a BatchNorm output, runs a module twice."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.act = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 10)
        g = torch.Generator().manual_seed(5)
        for bn in (self.bn, self.bn2):
            bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        if a.shape[-1] > 1:
            b = torch.sigmoid(b)
        y = self.act(self.bn(a)) * b
        z = self.bn2(self.conv2(y))
        z += y  # in place on a cached layer output
        return self.fc(self.act(z).mean((2, 3)))


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_plain_module_fx_cannot_trace_is_exported_and_matches_reference(fmt):
    torch.manual_seed(0)
    model = Gated().eval()
    x, y = data(4, 8)
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    assert engine.suffix and "control flow" in engine.trace_error
    gen = torch.Generator().manual_seed(2)
    faults = FaultSet.cat([engine.sample(12, s, "all", "bitflip", images=4, generator=gen)
                           for s in ("activations", "weights", "biases")])
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(Reference(model, fmt, ranges), x, y, faults), fmt)
    assert (out.delta_loss.abs() > 1e-6).sum() >= len(faults) // 4
    with pytest.raises(InjectionError, match="runs 2 times"):
        engine.layers("activations", "act")


class InPlaceResidual(TinyNet):
    """TinyNet whose residual add writes into the BatchNorm output (as HF ResNet does)."""

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z += y
        y = self.relu3(self.conv3(self.relu2(z)))
        y = torch.flatten(self.pool(y), 1)
        return self.fc(self.relu4(self.fc1(y)))


@pytest.mark.parametrize("suffix", [True, False])
def test_in_place_model_code_does_not_overwrite_cached_outputs(suffix):
    """The hook path once cached bn2's output and let `z += y` overwrite it, so faults in
    conv2 and bn2 started from a wrong golden value."""
    torch.manual_seed(0)
    model = InPlaceResidual()
    x, y = data(4, 8)
    engine = Engine(model, "fp32", suffix=suffix, input_shape=(3, 8, 8))
    gen = torch.Generator().manual_seed(3)
    faults = FaultSet.cat([engine.sample(16, s, "bn2|conv2", "bitflip", images=4,
                                         generator=gen) for s in ("activations", "weights")])
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(Reference(model, "fp32"), x, y, faults), "fp32")


@pytest.mark.parametrize("head", ["linear", "text"])
def test_exhaustive_last_layer_on_an_exported_graph_equals_brute_force(head):
    """The closed form reads the classifier's cached input from the exported graph's golden
    run; a text-guided head runs its normalise-and-scale ATen nodes after the faulty scores."""
    from test_inject_exhaustive import brute_force, compare

    from flipsafe.textguided.head import make_text_guided

    model, side = hf_model("convnext")
    if head == "text":
        emb = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
        model = make_text_guided(model, emb)
    x, y = data(3, side)
    engine = Engine(model, "fp32", input_shape=(3, side, side))
    assert engine.suffix
    layer = engine.classifier()
    bits = [30, 23, 12]
    ex = engine.exhaustive_last_layer(x, y, "bitflip", bits=bits)
    assert ex.layer == layer
    compare(ex, brute_force(model, "fp32", {}, layer, x, y, bits, 0), 3, 1e-4)


def test_a_graph_that_computes_other_logits_than_the_model_is_not_used():
    """A forward with Python state: the captured graph froze the counter's value."""

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x.flatten(1)) * self.calls

    engine = Engine(Counting(), input_shape=(3, 8, 8))
    assert not engine.suffix and "other logits" in engine.trace_error


class Windows(torch.nn.Module):
    """A Linear on windows that mix the batch (as Swin's attention does): [B * 4, ...]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.proj = torch.nn.Linear(4, 4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.conv(x)  # [B, 4, 8, 8]
        b = y.shape[0]
        w = y.reshape(b, 4, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, 16, 4)
        w = self.proj(w)
        y = w.reshape(b, 2, 2, 4, 4, 4).permute(0, 5, 1, 3, 2, 4).reshape(b, -1)
        return self.fc(y)


@pytest.mark.parametrize("suffix", [True, False])
def test_layers_whose_output_mixes_images_have_no_parameter_sites(suffix):
    """Their weight faults cannot be followed image by image (this once crashed the hook
    path inside the model's own reshape)."""
    engine = Engine(Windows(), input_shape=(3, 8, 8), suffix=suffix)
    assert [i.name for i in engine.layers("weights")] == ["conv", "fc"]
    assert [i.name for i in engine.layers("biases")] == ["conv", "fc"]
    with pytest.raises(InjectionError, match="not a single batch-first tensor.*image by image"):
        engine.layers("weights", "proj")
    x, y = data(3, 8)
    faults = FaultSet(["proj"], layer=0, index=0, mask=1 << 30, param="weight")
    with pytest.raises(InjectionError, match="no weights site"):
        engine.run(faults, x, y)


class ViewWrite(torch.nn.Module):
    """Adds in place to a layer output a slice of which (a view) is read later."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        y = self.act(self.conv(x))
        v = y[:, :2]
        if y.shape[-1] > 1:  # torch.fx cannot trace this
            y.add_(1)  # v sees the change too
        return self.fc(torch.cat([y, v], 1).flatten(1))


def test_in_place_writes_through_views_are_not_made_out_of_place():
    """Made out-of-place, the add would not reach the slice: such a model is not captured,
    and the hooks give the reference outcomes."""
    torch.manual_seed(0)
    hooks_give_the_reference(ViewWrite(), "in-place", "all", seed=4)


class Doubler(torch.nn.Module):
    """A leaf module that changes its input in place."""

    def forward(self, x):
        return x.mul_(2)


class WithDoubler(ViewWrite):
    def __init__(self):
        super().__init__()
        self.doubler = Doubler()
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.act(self.conv(x))
        if y.shape[-1] > 1:  # torch.fx cannot trace this
            y = self.doubler(y)
        return self.fc(y.flatten(1))


def test_leaf_modules_that_change_their_input_in_place_are_not_captured():
    torch.manual_seed(0)
    hooks_give_the_reference(WithDoubler(), "changes its input in place", "Conv2d|Linear",
                             seed=5)


def hooks_give_the_reference(model, why: str, select: str, seed: int):
    """`model` is not captured (its trace error says `why`), and hook runs of activation
    and weight faults in `select` give the slow reference's outcomes."""
    x, y = data(4, 8)
    engine = Engine(model, "fp32", input_shape=(3, 8, 8))
    assert not engine.suffix and why in engine.trace_error
    faults = FaultSet.cat([engine.sample(12, s, select, "bitflip", images=4,
                                         generator=torch.Generator().manual_seed(seed))
                           for s in ("activations", "weights")])
    check(engine.run(faults, x, y), reference_outcomes(Reference(model, "fp32"), x, y, faults),
          "fp32")
