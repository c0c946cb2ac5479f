"""Batched engine outcomes equal a slow deep-copy reference, fault by fault."""

import math

import pytest
import torch
from inject_reference import Reference, TinyAttention, TinyNet, Untraceable, reference_outcomes

from flipsafe.faults import FaultSet
from flipsafe.inject import Engine

FORMATS = ["fp32", "bf16", "fp8_e4m3", "int8", "mxfp8_e4m3", "fp16", "int8_channel"]
MODELS = ["bitflip", "bitflip2", "burst2", "stuck0", "stuck1", "random", "zero"]


def data(n=6, seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(10, (n,), generator=g)


def close(a, b, rtol, atol):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def check(outcomes, expected, fmt):
    """Top-1, SDC, DUE and the NaN/Inf flag exactly; losses and top2diff to rounding.

    The reference runs each image alone and recomputes whole layers; the engine runs
    images batched and adds the exact change of the faulty weight, so float sums differ
    in order (observed: 2e-7 relative and 2e-6 absolute on near-zero losses typically, up
    to 1.2e-4 relative where exponent faults push values to 1e32 and sums cancel).
    Emulated formats round those sums again, and a sum straddling a rounding boundary would
    move a value by one unit of the format."""
    rtol, atol = (1e-3, 1e-4) if fmt == "fp32" else (1e-3, 1e-3)
    bad = []
    for i, e in enumerate(expected):
        got = {k: getattr(outcomes, k)[i].item() for k in e}
        for k in ("golden_top1", "faulty_top1", "sdc", "due", "nonfinite"):
            if got[k] != e[k]:
                bad.append((i, k, got[k], e[k]))
        for k in ("golden_loss", "faulty_loss", "faulty_top2diff"):
            if not close(got[k], e[k], rtol, atol * (100 if k == "faulty_top2diff" else 1)):
                bad.append((i, k, got[k], e[k]))
    assert not bad, bad[:10]


def sample_all_models(engine, site, n_each, images, gen, select="all", field=None):
    sets = [engine.sample(n_each, site, select, m, images=images, generator=gen, field=field)
            for m in MODELS]
    return FaultSet.cat(sets)


@pytest.mark.parametrize("fmt", FORMATS)
def test_activation_and_weight_faults_match_reference(fmt):
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data()
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    ref = Reference(model, fmt, ranges)
    gen = torch.Generator().manual_seed(1)
    sites = ["activations", "weights", "biases"]
    if engine.fmt.meta_fields:
        sites += ["metadata", "weight_metadata"]
    sets = [sample_all_models(engine, s, 3, x.shape[0], gen) for s in sites]
    faults = FaultSet.cat(sets)
    golden = engine.golden(x, y)
    out = engine.run(faults, x, y, golden=golden)
    expected = reference_outcomes(ref, x, y, faults)
    check(out, expected, fmt)
    # The check is not vacuous: faults changed losses, and the outcomes are in input order.
    assert (out.delta_loss > 1e-6).sum() >= len(faults) // 4
    assert out.golden_top1.tolist() == golden.outcomes.top1[faults.image].tolist()


def test_exponent_faults_give_sdc_and_due_like_reference():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(8)
    engine = Engine(model, "fp32", input_shape=(3, 8, 8))
    ref = Reference(model, "fp32")
    gen = torch.Generator().manual_seed(3)
    # Conv, Linear and BatchNorm layers ('all' adds no BatchNorm): the same faults as ever.
    faults = FaultSet.cat([
        engine.sample(40, "activations", "conv|linear|norm", "bitflip", images=8,
                      generator=gen, field="exponent"),
        engine.sample(40, "weights", "conv|linear|norm", "bitflip", images=8, generator=gen,
                      field="exponent")])
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(ref, x, y, faults), "fp32")
    assert out.sdc.any() and out.due.any() and out.nonfinite.any()


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_attention_model_matches_reference(fmt):
    """Linear on tokens (weight deltas per token), LayerNorm parameters (per-image
    functional recompute), attention projections and GELU."""
    torch.manual_seed(0)
    model = TinyAttention()
    x, y = data(5)
    y = y % 5
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    ref = Reference(model, fmt, ranges)
    gen = torch.Generator().manual_seed(2)
    faults = FaultSet.cat([
        engine.sample(12, "activations", "linear|norm", "bitflip", images=5, generator=gen),
        engine.sample(12, "weights", "all", "bitflip", images=5, generator=gen),
        engine.sample(8, "biases", "norm", "bitflip", images=5, generator=gen),
        engine.sample(8, "weights", "norm", "random", images=5, generator=gen)])
    assert engine.suffix
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(ref, x, y, faults), fmt)


@pytest.mark.parametrize("clamp", ["profiled", "goldeneye"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_clamping_matches_reference(clamp, fmt):
    """Exponent faults make NaN/Inf of both signs and huge values; each clamp mode maps
    them as the reference does by hand, and the NaN/Inf flag survives clamping."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(6)
    engine = Engine(model, fmt, clamp=clamp)
    ranges = engine.profile(x)
    ref = Reference(model, fmt, ranges, clamp=clamp)
    gen = torch.Generator().manual_seed(4)
    every_exponent_bit = sum(1 << b for b in engine.fmt.fields["exponent"])
    # All exponent bits stuck at 1: +-Inf, or NaN of either sign.
    all_ones = [engine.sample(24, site, "all", "stuck1", images=6, generator=gen)
                .replace(mask=every_exponent_bit) for site in ("activations", "weights")]
    faults = FaultSet.cat([*all_ones, engine.sample(
        24, "activations", "all", "bitflip2", images=6, generator=gen, field="exponent")])
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(ref, x, y, faults), fmt)
    assert out.nonfinite.any()
    assert not out.due.any()  # clamped values are finite, so no NaN reaches the logits


def test_clamp_modes_differ_on_negative_nan():
    """A negative NaN goes to -max when profiled, to +max under GoldenEye's check."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(2)
    base = Engine(model, "fp32")
    ranges = base.profile(x)
    # conv1 output element 0 of image 0, sign bit set, then every exponent bit set:
    # a negative value with a nonzero mantissa becomes a negative NaN.
    raw = base.golden(x, y).raw["conv1"][0].reshape(-1)
    idx = int(((raw < 0) & (raw.view(torch.int32) & 0x7FFFFF != 0)).nonzero()[0])
    faults = FaultSet(["conv1"], layer=0, index=idx, mask=0x7F800000, op=2, image=0)
    got = {}
    for clamp in ("profiled", "goldeneye"):
        engine = Engine(model, "fp32", clamp=clamp, ranges=ranges)
        got[clamp] = engine.run(faults, x, y)
        ref = Reference(model, "fp32", ranges, clamp=clamp)
        check(got[clamp], reference_outcomes(ref, x, y, faults), "fp32")
        assert bool(got[clamp].nonfinite[0])
    assert got["profiled"].faulty_loss[0] != got["goldeneye"].faulty_loss[0]


@pytest.mark.parametrize("fmt", ["fp32", "mxfp8_e4m3"])
def test_untraceable_model_uses_hooks_and_matches_reference(fmt):
    torch.manual_seed(0)
    model = Untraceable()
    x, y = data(4)
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    assert not engine.suffix and engine.trace_error
    ref = Reference(model, fmt, ranges)
    gen = torch.Generator().manual_seed(7)
    faults = FaultSet.cat([engine.sample(10, "activations", "all", "bitflip", images=4,
                                         generator=gen),
                           engine.sample(10, "weights", "all", "bitflip", images=4,
                                         generator=gen)])
    check(engine.run(faults, x, y), reference_outcomes(ref, x, y, faults), fmt)


def test_non_emulated_site_matches_reference():
    """Faults on a ReLU output (selected by type) in an emulated format."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data(4)
    engine = Engine(model, "bf16")
    ranges = engine.profile(x)
    ref = Reference(model, "bf16", ranges)
    faults = engine.sample(20, "activations", "ReLU", "bitflip", images=4,
                           generator=torch.Generator().manual_seed(8))
    assert set(faults.layers) == {"relu1", "relu2", "relu3", "relu4"}
    check(engine.run(faults, x, y), reference_outcomes(ref, x, y, faults), "bf16")


class OddConvs(torch.nn.Module):
    """Convolutions the weight-delta path must index right: dilation, 'same' padding,
    rectangular kernels and strides, reflect padding, groups."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.a = nn.Conv2d(3, 6, 3, padding="same", dilation=2)
        self.b = nn.Conv2d(6, 6, (3, 5), stride=(2, 1), padding=(1, 2), groups=3)
        self.c = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.d = nn.Conv2d(4, 4, 2, stride=2, dilation=1, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 2 * 4, 10)

    def forward(self, x):
        y = self.act(self.b(self.act(self.a(x))))
        y = self.d(self.act(self.c(y)))
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("fmt", ["fp32", "mxfp8_e4m3"])
def test_convolution_geometries_match_reference(fmt):
    torch.manual_seed(0)
    model = OddConvs()
    x, y = data(4)
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    ref = Reference(model, fmt, ranges)
    gen = torch.Generator().manual_seed(11)
    sites = ["weights", "activations"] + (["weight_metadata"] if fmt != "fp32" else [])
    faults = FaultSet.cat([engine.sample(40, s, "Conv2d", "bitflip", images=4, generator=gen,
                                         by="element", field=None if "meta" in s else "exponent")
                           for s in sites])
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(ref, x, y, faults), fmt)
    assert (out.delta_loss > 1e-3).sum() > len(faults) // 4


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_text_guided_model_matches_reference(fmt):
    """Faults anywhere in a text-guided classifier, head.fc included: the suffix runs
    F.normalize and the exp(logit_scale) multiply after it."""
    from flipsafe.textguided.head import make_text_guided

    torch.manual_seed(0)
    emb = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    model = make_text_guided(TinyNet(classes=4), emb)
    x, y = data(5)
    y = y % 4
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    assert engine.suffix and engine.classifier() == "head.fc"
    ref = Reference(model, fmt, ranges)
    gen = torch.Generator().manual_seed(12)
    faults = FaultSet.cat([
        engine.sample(20, "activations", "all", "bitflip", images=5, generator=gen),
        engine.sample(10, "activations", "last", "bitflip", images=5, generator=gen),
        engine.sample(20, "weights", "all", "bitflip", images=5, generator=gen),
        engine.sample(10, "weights", "last", "random", images=5, generator=gen)])
    out = engine.run(faults, x, y)
    check(out, reference_outcomes(ref, x, y, faults), fmt)
    assert out.sdc.any()


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_faults_decided_without_a_forward_pass_leave_the_reference_logits_golden(fmt):
    """Outcomes marked ran=False (the stored code did not change, or the change cannot
    reach the logits) are exact: the slow reference, which runs every fault, gets the
    golden loss bit for bit on each of them; and both kinds occur."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = data()
    engine = Engine(model, fmt)
    ref = Reference(model, fmt, engine.profile(x))
    gen = torch.Generator().manual_seed(2)
    faults = FaultSet.cat([sample_all_models(engine, s, 4, x.shape[0], gen)
                           for s in ("activations", "weights")])
    out = engine.run(faults, x, y)
    decided = (~out.ran).nonzero().reshape(-1).tolist()
    assert decided and out.ran.any()
    expected = reference_outcomes(ref, x, y, faults.select(torch.tensor(decided)))
    for i, e in zip(decided, expected):
        assert e["faulty_loss"] == e["golden_loss"] or (
            math.isnan(e["faulty_loss"]) and math.isnan(e["golden_loss"])), i
        assert not out.sdc[i] and out.faulty_top1[i] == out.golden_top1[i]
