"""protect.cost: FLOPs and bits against hand calculations, the hook implementations of each
protection against what they must do, and a JSON-able measurement."""

import json
import math

import pytest
import torch
from torch import nn

from flipsafe.errors import ConfigError
from flipsafe.protect import cost


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),          # 0: [4, 6, 6] from [2, 8, 8]
        nn.BatchNorm2d(4),           # 1
        nn.ReLU(),                   # 2
        nn.Conv2d(4, 4, 3, groups=2, padding=1),  # 3: [4, 6, 6], grouped
        nn.Flatten(),                # 4
        nn.Linear(4 * 6 * 6, 5),     # 5
    ).eval()


X = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(1))
# Hand counts per image: Conv 2*Cin/groups*k*k per output value, BN 2 per value, Linear
# 2*in per output.
CONV0 = 2 * 2 * 9 * (4 * 6 * 6)
BN = 2 * (4 * 6 * 6)
CONV3 = 2 * (4 // 2) * 9 * (4 * 6 * 6)
FC = 2 * 144 * 5


def test_flops_of_a_tiny_conv_net_match_a_hand_count():
    counts = cost.count_flops(_net(), X)
    assert counts.of("0") == CONV0 and counts.of("1") == BN and counts.of("3") == CONV3
    assert counts.of("5") == FC and counts.of("2") == 0
    assert counts.total == CONV0 + BN + CONV3 + FC
    assert counts.shapes["0"] == (4, 6, 6) and counts.shapes["5"] == (5,)


class _Attention(nn.Module):
    """A hand-written attention: its two products are counted from the matmul calls."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6)

    def forward(self, x):  # x [N, T, 6]
        q = self.q(x)
        w = torch.softmax(q @ x.transpose(-2, -1), -1)   # [N, T, T]: 2*T*T*6
        return torch.matmul(w, x)                         # [N, T, 6]: 2*T*6*T


def test_attention_products_and_norms_are_counted():
    t = 5
    counts = cost.count_flops(_Attention(), torch.randn(3, t, 6))
    assert counts.total == 2 * t * 6 * 6 + 2 * t * t * 6 + 2 * t * 6 * t
    ln = cost.count_flops(nn.LayerNorm(6), torch.randn(1, t, 6))
    assert ln.total == cost.NORM_FLOPS * t * 6
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = mha

        def forward(self, x):
            return self.a(x, x, x)[0]

    # Four projections (2*T*E*E each) and two products (2*T*T*E each).
    assert cost.count_flops(Self(), torch.randn(1, t, 8)).total == 4 * 2 * t * 64 + 2 * 2 * t * t * 8


def test_protection_flops_and_bits_match_a_hand_count():
    model = _net()
    counts = cost.count_flops(model, X)
    values0 = 4 * 6 * 6
    assert cost.protection_flops("ranger", model, {"0": None}, counts) == 2 * values0
    assert cost.protection_flops("clip", model, {"0": [1, 3]}, counts) == 2 * values0 // 2
    assert cost.protection_flops("dup", model, {"0": None}, counts) == CONV0 + values0
    assert cost.protection_flops("tmr", model, {"5": [0]}, counts) == 2 * FC // 5 + 3 * 1
    # abft on conv 0: a 1-output conv with the summed filter (2*Cin*9 per position), 4 adds
    # and a compare per position; on the grouped conv one summed filter per group.
    assert cost.protection_flops("abft", model, {"0": None}, counts) == 36 * (2 * 2 * 9 + 4 + 1)
    assert cost.protection_flops("abft", model, {"3": None}, counts) == 36 * (2 * 4 * 9 + 4 + 2)
    assert cost.protection_flops("abft", model, {"5": [0, 1]}, counts) == 2 * 144 + 2 + 1
    assert cost.protection_flops("ecc", model, {"5": None}, counts) == 0
    # ecc: 8 check bits per 64-bit word of each fp32 tensor (weight 720, bias 5 values).
    assert cost.protection_bits("ecc", model, {"5": None}, counts, 32) == 8 * (360 + 3)
    assert cost.protection_bits("parity", model, {"5": None}, counts, 8) == 90 + 1
    # abft: the summed filter (Cin*k*k values) and the summed bias, one per group.
    assert cost.protection_bits("abft", model, {"3": None}, counts, 32) == 32 * (4 * 9 + 2)
    assert cost.protection_bits("ranger", model, {"0": None}, counts, 32) == 64
    assert cost.protection_bits("ranger", model, {"0": None}, counts, 32, per_channel=True) == 64 * 4
    assert cost.protection_bits("clip", model, {"0": [2]}, counts, 32) == 64
    assert cost.protection_bits("tmr", model, {"0": None}, counts, 32) == 0


def _corrupting(layer, image, where, value):
    """A forward hook (to run before the protections') writing `value` into one output."""
    def hook(mod, inputs, out):
        out = out.clone()
        out[(image, *where)] = value
        return out
    return hook


def _run(guarded, x):
    guarded.monitor.reset()
    with torch.no_grad():
        return guarded.model(x)


@pytest.mark.parametrize("channels", [None, [0, 2]])
def test_dup_and_tmr_leave_a_clean_model_unchanged_and_dup_flags_nothing(channels):
    model = _net()
    with torch.no_grad():
        clean = model(X)
    for name in ("dup", "tmr"):
        g = cost.guard(model, {name: {"0": channels, "5": channels}})
        torch.testing.assert_close(_run(g, X), clean)
        assert g.monitor.count == 0
    assert all(not m._forward_hooks for m in model.modules())  # the model given is untouched


@pytest.mark.parametrize("channels", [None, [1, 3]])
def test_dup_flags_exactly_the_corrupted_image_and_tmr_outvotes_it(channels):
    model = _net()
    with torch.no_grad():
        clean = model(X)
    dup = cost.guard(model, {"dup": {"0": channels}})
    dict(dup.model.named_modules())["0"].register_forward_hook(
        _corrupting("0", 5, (3, 2, 2), 1e3), prepend=True)
    _run(dup, X)
    assert dup.monitor.flags.tolist() == [i == 5 for i in range(8)]
    tmr = cost.guard(model, {"tmr": {"0": channels}})
    dict(tmr.model.named_modules())["0"].register_forward_hook(
        _corrupting("0", 5, (3, 2, 2), 1e3), prepend=True)
    torch.testing.assert_close(_run(tmr, X), clean)


def test_median3_is_the_majority_value():
    a, b, c = torch.tensor([1.0, 5.0, 2.0]), torch.tensor([1.0, 7.0, 9.0]), torch.tensor([8.0, 7.0, 2.0])
    assert cost.median3(a, b, c).tolist() == [1.0, 7.0, 2.0]


@pytest.mark.parametrize("layer,where", [("0", (1, 4, 4)), ("3", (2, 0, 5)), ("5", (4,))])
def test_abft_flags_a_corrupted_output_and_not_a_clean_one(layer, where):
    model = _net()
    g = cost.guard(model, {"abft": {"0": None, "3": None, "5": None}})
    _run(g, X)
    assert g.monitor.count == 0
    dict(g.model.named_modules())[layer].register_forward_hook(
        _corrupting(layer, 2, where, 50.0), prepend=True)
    _run(g, X)
    assert g.monitor.flags.tolist() == [i == 2 for i in range(8)]


def test_abft_checksum_is_the_output_summed_over_channels():
    conv = _net()[3]
    x = torch.randn(2, 4, 6, 6)
    ws, bs = cost.summed_filters(conv)
    with torch.no_grad():
        out = conv(x)
        check = torch.nn.functional.conv2d(x, ws, bs, 1, 1, 1, 2)
    torch.testing.assert_close(check, out.reshape(2, 2, 2, 6, 6).sum(2))
    # A channel outside the protected ones is not checked.
    bad = out.clone()
    bad[0, 0] += 100
    filters = cost.summed_filters(conv, [1, 2, 3])
    assert cost.abft_flags(conv, x, bad, filters, [1, 2, 3]).tolist() == [False, False]
    assert cost.abft_flags(conv, x, bad, cost.summed_filters(conv)).tolist() == [True, False]


def test_ranger_and_clip_hooks_bound_their_channels():
    model = _net()
    bounds = cost.profile_bounds(model, ["0"], X)
    with torch.no_grad():
        ref = nn.Sequential(*list(model)[:1])(X)
    torch.testing.assert_close(bounds["0"], ref.abs().amax(dim=(0, 2, 3)))
    for name in ("ranger", "clip"):
        g = cost.guard(model, {name: {"0": None}}, {"0": bounds["0"]}, per_channel=[name])
        seen = {}
        first = dict(g.model.named_modules())["0"]
        first.register_forward_hook(_corrupting("0", 0, (1, 0, 0), 1e4), prepend=True)
        first.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("out", o))
        _run(g, X)
        out = seen["out"]
        assert (out.abs() <= bounds["0"].reshape(1, 4, 1, 1)).all()
        expected = bounds["0"][1] if name == "ranger" else 0.0
        assert float(out[0, 1, 0, 0]) == pytest.approx(float(expected))


def test_measure_is_json_able_with_overheads_against_the_model():
    model = _net()
    labels = torch.arange(8) % 5
    sel = {"ecc": {"5": None}, "abft": {"0": None}, "dup": {"5": None}, "ranger": {"0": None}}
    data = cost.for_plan(model, "ranger,dup,abft,ecc", sel, X, labels, seconds=0.2)
    json.dumps(data, allow_nan=False)
    report = cost.CostReport.from_json(json.loads(json.dumps(data)))
    counts = cost.count_flops(model, X)
    params = sum(p.numel() for p in model.parameters())
    assert report.model_flops == counts.total and report.param_bits == 32 * params
    assert report.protect == "ecc,abft,dup,ranger" and report.label == cost.LABEL
    with torch.no_grad():
        acc = float((model(X).argmax(1) == labels).float().mean())
    assert report.clean_accuracy == acc
    dup = report.protections["dup"]
    assert dup.flops == FC + 5 and dup.flops_overhead == pytest.approx(dup.flops / counts.total)
    assert dup.accuracy_change == 0 and dup.detected_clean == 0
    ecc = report.protections["ecc"]
    assert ecc.memory_overhead == pytest.approx(8 * (360 + 3) / (32 * params))
    assert ecc.latency_overhead == 0 and ecc.flops == 0
    total = report.total
    assert total.flops == sum(p.flops for p in report.protections.values())
    assert total.memory_bits == sum(p.memory_bits for p in report.protections.values())
    assert total.latency_s > 0 and math.isfinite(total.latency_overhead)
    # Ranger with bounds profiled on these very images changes no clean output.
    assert total.accuracy_change == 0


def test_ranges_from_training_data_can_change_clean_accuracy():
    model = _net()
    labels = torch.arange(8) % 5
    report = cost.measure(model, {"clip": {"5": None}}, X, labels, ranges={"5": 0.0},
                          seconds=0.1)
    with torch.no_grad():
        clipped = torch.zeros(8, 5).argmax(1)  # every logit clipped to 0: argmax 0
    assert report.total.accuracy == float((clipped == labels).float().mean())


def test_a_layer_the_model_lacks_or_an_unknown_protection_is_one_line():
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        cost.measure(_net(), {"dup": {"nope": None}}, X, seconds=0.1)
    with pytest.raises(ConfigError, match="unknown protection"):
        cost.measure(_net(), {"bogus": {"0": None}}, X, seconds=0.1)
    with pytest.raises(ConfigError, match="no resolved selection for tmr"):
        cost.for_plan(_net(), "tmr", {}, X)


@pytest.mark.parametrize("name", ["ranger", "clip"])
def test_campaign_bounds_are_held_as_the_campaign_guards_hold_them(name):
    from flipsafe.protect.ranger import clip_guard, ranger_guard

    model = _net()
    lo, hi = torch.tensor(0.05), torch.tensor(0.2)  # asymmetric, as profiled [lo, hi]
    g = cost.guard(model, {name: {"0": None}}, {"0": (lo, hi)})
    seen = {}
    first = dict(g.model.named_modules())["0"]
    first.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    _run(g, X)
    with torch.no_grad():
        raw = nn.Sequential(*list(model)[:1])(X)
    make = ranger_guard if name == "ranger" else clip_guard
    assert torch.equal(seen["out"], make(lo, hi)(raw))
    assert not torch.equal(seen["out"], raw)
