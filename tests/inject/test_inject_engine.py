"""Engine behaviour: suffix runs equal full runs, bad requests, untouched models, profiling."""

import math

import pytest
import torch
from inject_reference import TinyNet

from flipsafe import models
from flipsafe.errors import FlipsafeError, InjectionError, UnknownNameError
from flipsafe.faults import FaultSet
from flipsafe.inject import Engine
from flipsafe.metrics.outcomes import FIELDS


def data(n=6, side=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(classes, (n,), generator=g)


# fp32 kernels may sum in another order for another batch shape (oneDNN picks its algorithm
# by shape and CPU): a few hundred terms per output, so a relative error of ~1e3 * 2^-24.
FP32_REASSOCIATION = 1e-4


def format_tolerance(fmt) -> float:
    """Relative tolerance for outcomes of two runs that compute the same model in `fmt`.

    Reassociated fp32 sums can land on either side of a rounding boundary of the emulated
    format, which then moves one value by one unit in the last place (2 u, u = 2^-(p+1) for
    p stored mantissa or magnitude bits); allow 4 such steps along the network, never less
    than fp32 reassociation alone.
    """
    if fmt is None:
        return FP32_REASSOCIATION
    fields = fmt.fields
    p = len(fields.get("mantissa", fields.get("magnitude", ())))
    return max(FP32_REASSOCIATION, 8 * 2.0 ** -(p + 1))


def assert_same_outcomes(a, b, tol=FP32_REASSOCIATION):
    """Two runs of the same faults agree: values within `tol` (relative; absolute near 0;
    top2diff is in percentage points, so 100 * tol there), and top-1 / SDC wherever both runs
    see a top-1/top-2 margin wider than that tolerance (inside it a rounding may pick either
    class). Non-finite outcomes must agree exactly."""
    for f in ("due", "nonfinite"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    margin = 100 * tol
    for top1, diff in (("golden_top1", "golden_top2diff"), ("faulty_top1", "faulty_top2diff")):
        wide = ~((getattr(a, diff) <= margin) | (getattr(b, diff) <= margin))
        assert torch.equal(getattr(a, top1)[wide], getattr(b, top1)[wide]), top1
        if top1 == "faulty_top1":
            assert torch.equal(a.sdc[wide], b.sdc[wide]), "sdc"
    for f in ("golden_loss", "faulty_loss", "delta_loss", "golden_top2diff", "faulty_top2diff"):
        x, y = getattr(a, f), getattr(b, f)
        assert torch.equal(torch.isnan(x), torch.isnan(y)), f
        ok = ~torch.isnan(x)
        scale = 100 * tol if f.endswith("top2diff") else tol
        assert torch.allclose(x[ok], y[ok], rtol=tol, atol=scale), f


def test_format_tolerance_follows_the_formats_precision():
    from flipsafe import formats

    assert format_tolerance(formats.get("fp32")) == FP32_REASSOCIATION
    assert format_tolerance(formats.get("bf16")) == 8 * 2.0 ** -8
    assert format_tolerance(formats.get("fp16")) == 8 * 2.0 ** -11
    assert format_tolerance(formats.get("int8")) == 8 * 2.0 ** -8


@pytest.mark.parametrize("arch,fmt", [("resnet20", "fp32"), ("mobilenetv2", "fp32"),
                                      ("vit_tiny", "fp32"), ("resnet20", "bf16"),
                                      ("vgg11_bn", "mxfp8_e4m3"), ("mlp", "int8"),
                                      ("lenet", "fp8_e4m3")])
def test_suffix_path_equals_full_forward_path(arch, fmt):
    torch.manual_seed(0)
    model = models.build(arch, 10, image_size=8).eval()
    x, y = data()
    fast = Engine(model, fmt, chunk=16)
    ranges = fast.profile(x)
    full = Engine(model, fmt, ranges=ranges, suffix=False)
    assert fast.suffix and not full.suffix
    gen = torch.Generator().manual_seed(1)
    sites = ["activations", "weights", "biases"] + (
        ["metadata", "weight_metadata"] if fast.fmt.meta_fields else [])
    faults = FaultSet.cat([fast.sample(24, s, "all", m, images=6, generator=gen)
                           for s in sites for m in ("bitflip", "random")])
    a = fast.run(faults, x, y)
    b = full.run(faults, x, y)
    # The suffix runs convolutions on other batch shapes than the full run, so fp32 sums
    # may reassociate; bit-identity is not promised, agreement within the format's precision is.
    assert_same_outcomes(a, b, tol=format_tolerance(fast.fmt))
    assert (a.delta_loss > 1e-6).any()


def test_outcomes_do_not_depend_on_chunking_or_order():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data()
    e1 = Engine(model, "fp32", chunk=1, input_shape=(3, 8, 8))
    e2 = Engine(model, "fp32", chunk=64, input_shape=(3, 8, 8))
    gen = torch.Generator().manual_seed(2)
    faults = FaultSet.cat([e1.sample(30, "activations", generator=gen, images=6),
                           e1.sample(30, "weights", generator=gen, images=6)])
    perm = torch.randperm(len(faults), generator=gen)
    a = e1.run(faults, x, y)
    b = e2.run(faults.select(perm), x, y)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    assert_same_outcomes(a, b.select(inv))


def test_injection_leaves_models_unchanged():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, "int8")
    engine.profile(x)
    golden = engine.golden(x, y)
    gen = torch.Generator().manual_seed(3)
    faults = FaultSet.cat([engine.sample(20, s, generator=gen, images=6)
                           for s in ("activations", "weights", "biases", "metadata",
                                     "weight_metadata")])
    engine.run(faults, x, y, golden=golden)
    engine.exhaustive_last_layer(x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in engine.model.modules())
    again = engine.golden(x, y)
    assert torch.equal(again.logits, golden.logits)  # the engine's own copy is intact too


def test_profile_records_max_abs_output_of_every_layer():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x, _ = data(8)
    engine = Engine(model, "fp32")
    ranges = engine.profile([x[:4], (x[4:], None)])
    seen = {}
    hooks = [m.register_forward_hook(
        lambda mod, i, o, name=name: seen.__setitem__(name, max(seen.get(name, 0.0),
                                                                float(o.abs().max()))))
        for name, m in model.named_modules() if name and not list(m.children())]
    with torch.no_grad():
        model(x[:4])
        model(x[4:])
    for h in hooks:
        h.remove()
    assert ranges.keys() == seen.keys()
    assert all(math.isclose(ranges[k], seen[k], rel_tol=0, abs_tol=0) for k in seen)


def test_layer_selection():
    torch.manual_seed(0)
    engine = Engine(TinyNet(), "mxfp8_e4m3", input_shape=(3, 8, 8))
    names = lambda site, sel: [i.name for i in engine.layers(site, sel)]
    # 'all' is the Conv and Linear layers at every site (as a campaign's --layers all).
    assert names("activations", "all") == ["conv1", "conv2", "conv3", "fc1", "fc"]
    assert names("weights", "all") == names("metadata", "all") == names("activations", "all")
    assert names("activations", "last") == ["fc"]
    assert names("activations", "Conv2d|Linear") == ["conv1", "conv2", "conv3", "fc1", "fc"]
    assert names("activations", "norm") == ["bn1", "bn2"]
    assert names("activations", r"conv\d") == ["conv1", "conv2", "conv3"]
    assert names("activations", "relu1") == ["relu1"]
    assert names("biases", "all") == ["conv1", "conv3", "fc1", "fc"]  # conv2 has none
    assert names("biases", "norm") == ["bn1", "bn2"]
    info = {i.name: i for i in engine.layers("activations", "all")}
    assert info["conv3"].output_shape == (16, 4, 4) and info["conv3"].numel == 256
    w = {i.name: i for i in engine.layers("weights", "all")}
    assert w["conv3"].numel == 16 * 4 * 3 * 3 and w["conv3"].weight_shape == (16, 4, 3, 3)
    meta = {i.name: i for i in engine.layers("metadata", "all")}
    assert meta["conv1"].numel == 8 * 8 * 1  # one 32-wide block per 8-long row
    wmeta = {i.name: i for i in engine.layers("weight_metadata", "all")}
    assert wmeta["conv3"].numel == 16 * 2  # rows of 36 weights: two blocks each
    assert meta["conv1"].fields == {"scale": 8}


def test_sample_is_reproducible_and_weights_elements_equally():
    engine = Engine(TinyNet(), "fp32", input_shape=(3, 8, 8))
    a = engine.sample(500, "weights", generator=torch.Generator().manual_seed(9), images=4)
    b = engine.sample(500, "weights", generator=torch.Generator().manual_seed(9), images=4)
    assert all(torch.equal(getattr(a, c), getattr(b, c)) for c in ("layer", "index", "mask",
                                                                   "image"))
    big = engine.sample(20000, "weights", by="element",
                        generator=torch.Generator().manual_seed(1))
    infos = engine.layers("weights")
    share = torch.bincount(big.layer, minlength=len(infos)).double() / 20000
    expect = torch.tensor([i.numel for i in infos], dtype=torch.double)
    expect /= expect.sum()
    assert torch.allclose(share, expect, atol=0.015)
    assert bool((big.index < torch.tensor([i.numel for i in infos])[big.layer]).all())


def test_bad_requests_raise_flipsafe_errors_listing_choices():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(2)
    engine = Engine(model, "fp32", input_shape=(3, 8, 8))
    with pytest.raises(InjectionError, match="no layer with an output site matches .*conv1, bn1"):
        engine.layers("activations", "nothing_like_this")
    with pytest.raises(InjectionError, match="no layer with a weight site matches"):
        engine.layers("weights", "nothing_like_this")
    with pytest.raises(UnknownNameError, match="activations"):
        engine.layers("gradients")
    with pytest.raises(UnknownNameError, match="conv1"):
        engine.run(FaultSet(["missing"], layer=0, index=0, mask=1), x, y)
    with pytest.raises(InjectionError, match="0..255"):
        engine.run(FaultSet(["conv3"], layer=0, index=256, mask=1), x, y)
    with pytest.raises(InjectionError, match="no biases site .*no floating-point bias.*; its sites: "
                       "activations, weights, pe, weight_words$"):
        engine.run(FaultSet(["conv2"], layer=0, index=0, mask=1, param="bias"), x, y)
    with pytest.raises(InjectionError, match="no metadata"):
        engine.layers("metadata")
    with pytest.raises(InjectionError, match="0..1"):
        engine.run(FaultSet(["conv1"], layer=0, index=0, mask=1, image=2), x, y)
    with pytest.raises(UnknownNameError, match="profiled"):
        Engine(model, clamp="sometimes")
    with pytest.raises(InjectionError, match="profile"):
        Engine(model, "int8").golden(x, y)
    with pytest.raises(InjectionError, match="profile"):
        Engine(model, "fp32", clamp="profiled").run(
            FaultSet(["conv1"], layer=0, index=0, mask=1 << 30), x, y)
    with pytest.raises(InjectionError, match="input_shape"):
        Engine(model).layers()
    with pytest.raises(UnknownNameError, match="bf16"):
        Engine(model, "fp99")


def test_models_without_logits_or_classifier_are_refused():
    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 8)

        def forward(self, x):
            return self.conv(x).flatten(1)

    x, y = data(2, classes=4)
    engine = Engine(NoLinear())
    with pytest.raises(InjectionError, match="classifier"):
        engine.exhaustive_last_layer(x, y)

    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 64, 4)

        def forward(self, x):
            return {"logits": self.fc(x.flatten(1))}
    with pytest.raises(InjectionError, match="batch, classes"):
        Engine(Dict()).golden(x, y)
    assert issubclass(InjectionError, FlipsafeError)


def test_unchanged_faults_report_golden_outcomes():
    """A stuck-at fault on a bit that already has that value changes nothing."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(3)
    engine = Engine(model)
    g = engine.golden(x, y)
    raw = g.raw["conv2"][1].reshape(-1)
    sign_set = (raw < 0).nonzero().reshape(-1)[:5]
    faults = FaultSet(["conv2"], layer=0, index=sign_set, mask=1 << 31, op=2, image=1)
    out = engine.run(faults, x, y, golden=g)
    for f in FIELDS:
        if f.startswith("faulty_"):
            assert torch.equal(getattr(out, f), getattr(out, f.replace("faulty", "golden")))
    assert not out.sdc.any() and bool((out.delta_loss == 0).all())


@pytest.mark.parametrize("suffix", [True, False])
def test_image_blocks_and_sliced_golden_runs_give_the_same_outcomes(monkeypatch, suffix):
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(24)
    whole = Engine(model, "bf16", suffix=suffix)
    ranges = whole.profile(x)
    gen = torch.Generator().manual_seed(5)
    faults = FaultSet.cat([whole.sample(60, s, images=24, generator=gen)
                           for s in ("activations", "weights")])
    expected = whole.run(faults, x, y, golden=whole.golden(x, y))
    import flipsafe.inject.engine as engine_module
    monkeypatch.setattr(engine_module, "GOLDEN_BATCH", 5)
    small = Engine(model, "bf16", ranges=ranges, suffix=suffix, memory=1)  # 8-image blocks
    assert_same_outcomes(small.run(faults, x, y), expected)
    assert small._image_block(faults) == 8
    g = small.golden(x, y)
    assert torch.equal(g.logits, whole.golden(x, y).logits)


def test_layers_without_a_site_say_why():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(192, 8)
            self.act = torch.nn.ReLU()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            t = self.act(self.act(self.proj(x.flatten(1)))).unsqueeze(1)
            return self.fc(self.attn(t, t, t)[0][:, 0])

    engine = Engine(Shared(), input_shape=(3, 8, 8))
    with pytest.raises(InjectionError, match="runs 2 times"):
        engine.layers("activations", "act")
    with pytest.raises(InjectionError, match="not a single batch-first tensor"):
        engine.layers("activations", "attn")
    with pytest.raises(InjectionError, match="never runs as a module"):
        engine.layers("weights", "attn.out_proj")
    with pytest.raises(InjectionError, match="no floating-point weight parameter"):
        engine.layers("weights", "attn")  # it holds in_proj_weight instead
    assert [i.name for i in engine.layers("weights")] == ["proj", "fc"]


@pytest.mark.parametrize("fmt,clamp", [("fp32", "none"), ("bf16", "none"), ("fp32", "profiled"),
                                       ("bf16", "goldeneye"), ("int8", "none"),
                                       ("mxfp8_e4m3", "none")])
def test_needs_ranges_says_whether_running_without_ranges_fails(fmt, clamp):
    torch.manual_seed(0)
    model = models.build("mlp", 10, image_size=8).eval()
    x, y = data()
    engine = Engine(model, fmt, clamp=clamp, input_shape=(3, 8, 8))
    faults = engine.sample(24, "activations", "all", "bitflip", images=6,
                           generator=torch.Generator().manual_seed(3))
    if engine.needs_ranges:
        with pytest.raises(InjectionError, match="activation range"):
            engine.run(faults, x, y)
    else:
        engine.run(faults, x, y)
    # With profiled ranges every combination runs.
    engine.profile(x)
    engine.run(faults, x, y)


@pytest.mark.parametrize("arch", ["resnet20", "lenet"])
def test_channels_last_images_give_the_same_outcomes_as_contiguous_ones(arch):
    # The image-folder loader once returned channels-last tensors, and a .view on the
    # conv outputs they produce crashed every activation campaign.
    torch.manual_seed(0)
    model = models.build(arch, 10, image_size=8).eval()
    x, y = data()
    xl = x.contiguous(memory_format=torch.channels_last)
    assert not xl.is_contiguous()
    engine = Engine(model, "fp32", chunk=16, input_shape=(3, 8, 8))
    other = Engine(model, "fp32", chunk=16, input_shape=(3, 8, 8))
    gen = torch.Generator().manual_seed(3)
    faults = FaultSet.cat([engine.sample(48, s, "all", m, images=6, generator=gen)
                           for s in ("activations", "weights") for m in ("bitflip", "random")])
    a, b = engine.run(faults, x, y), other.run(faults, xl, y)
    # channels-last convolutions run other kernels: agreement within fp32 reassociation.
    assert_same_outcomes(a, b, tol=format_tolerance(engine.fmt))
    assert (a.delta_loss > 1e-6).any()
