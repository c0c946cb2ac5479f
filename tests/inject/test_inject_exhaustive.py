"""Exhaustive classifier faults equal brute force over every (weight, bit) of a small head."""

import math

import pytest
import torch
from inject_reference import Reference, TinyNet, outcome

from flipsafe.faults import FLIP, SET0, SET1
from flipsafe.inject import Engine
from flipsafe.textguided.head import make_text_guided


def data(n=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(classes, (n,), generator=g)


def text_guided():
    torch.manual_seed(0)
    emb = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    return make_text_guided(TinyNet(classes=4), emb)


def brute_force(model, fmt, ranges, layer, images, labels, bits, op, clamp="none"):
    """Deep copy per (weight, bit), set the weight by hand, run every image."""
    ref = Reference(model, fmt, ranges, clamp=clamp)
    weight = dict(ref.model.named_modules())[layer].weight
    rows = []
    for b in bits:
        for w in range(weight.numel()):
            fault = {"layer": layer, "param": "weight", "index": w, "mask": 1 << b,
                     "op": op, "value": 0}
            logits, nonfinite = ref.logits(images, fault)
            rows.append([(outcome(logits[i:i + 1], int(labels[i])), nonfinite)
                         for i in range(images.shape[0])])
    return rows  # [bit * weight][image]


def compare(ex, rows, n_img, tol):
    k, n_w = ex.bits.numel(), ex.weight.numel()
    out = ex.outcomes
    assert out.sdc.shape == (n_img, k, n_w)
    bad = 0
    for bi in range(k):
        for w in range(n_w):
            for i in range(n_img):
                e, nonfinite = rows[bi * n_w + w][i]
                g = {f: getattr(out, f)[i, bi, w].item() for f in
                     ("faulty_top1", "due", "faulty_loss", "faulty_top2diff")}
                assert g["faulty_top1"] == e["top1"], (bi, w, i)
                assert g["due"] == e["due"], (bi, w, i)
                assert out.nonfinite[0, bi, w].item() == nonfinite
                for a, b_ in ((g["faulty_loss"], e["loss"]),
                              (g["faulty_top2diff"], e["top2diff"])):
                    if math.isnan(a) or math.isnan(b_):
                        assert math.isnan(a) and math.isnan(b_), (bi, w, i, a, b_)
                    elif math.isinf(a) or math.isinf(b_):
                        assert a == b_
                    else:
                        bad += abs(a - b_) > tol * (1 + abs(b_))
    assert bad == 0


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "mxfp8_e4m3"])
def test_exhaustive_plain_head_equals_brute_force(fmt):
    torch.manual_seed(0)
    model = TinyNet(classes=4)
    x, y = data()
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    ex = engine.exhaustive_last_layer(x, y)
    assert ex.layer == "fc"
    bits = ex.bits.tolist()
    assert bits == list(range(engine.fmt.bits))
    rows = brute_force(model, fmt, ranges, "fc", x, y, bits, FLIP)
    compare(ex, rows, x.shape[0], 1e-4 if fmt == "fp32" else 1e-3)
    assert (ex.outcomes.delta_loss > 1e-3).any()
    assert ex.outcomes.sdc.any() or fmt in ("int8", "mxfp8_e4m3")  # 8-bit flips stay small
    assert len(ex) == 3 * len(bits) * 48


@pytest.mark.parametrize("fmt", ["fp32", "fp8_e4m3"])
def test_exhaustive_text_guided_head_equals_brute_force(fmt):
    """logits = exp(s) * head.fc(normalize(features)): the scale multiply follows."""
    model = text_guided()
    x, y = data()
    engine = Engine(model, fmt)
    ranges = engine.profile(x)
    ex = engine.exhaustive_last_layer(x, y)
    assert ex.layer == "head.fc"
    rows = brute_force(model, fmt, ranges, "head.fc", x, y, ex.bits.tolist(), FLIP)
    compare(ex, rows, x.shape[0], 1e-4 if fmt == "fp32" else 1e-3)
    assert ex.outcomes.sdc.any()


@pytest.mark.parametrize("model_name,op", [("stuck0", SET0), ("stuck1", SET1)])
def test_exhaustive_stuck_at_with_clamping(model_name, op):
    torch.manual_seed(0)
    model = TinyNet(classes=4)
    x, y = data()
    engine = Engine(model, "fp32", clamp="profiled")
    ranges = engine.profile(x)
    bits = [31, 30, 29, 22, 0]
    ex = engine.exhaustive_last_layer(x, y, fault_model=model_name, bits=bits)
    rows = brute_force(model, "fp32", ranges, "fc", x, y, bits, op, clamp="profiled")
    compare(ex, rows, x.shape[0], 1e-4)
    assert (ex.outcomes.delta_loss > 1e-3).any()


def test_exhaustive_flat_layout_and_errors():
    torch.manual_seed(0)
    model = TinyNet(classes=4)
    x, y = data()
    engine = Engine(model, "fp32")
    ex = engine.exhaustive_last_layer(x, y, bits=[30, 3])
    cols, flat = ex.flat()
    assert len(flat) == len(ex) == 3 * 2 * 48
    j = 1 * 2 * 48 + 1 * 48 + 7  # image 1, bit 3, weight 7
    assert (cols["image"][j], cols["bit"][j], cols["weight"][j]) == (1, 3, 7)
    assert flat.faulty_loss[j] == ex.outcomes.faulty_loss[1, 1, 7]
    with pytest.raises(Exception, match="single-bit"):
        engine.exhaustive_last_layer(x, y, fault_model="random")
    with pytest.raises(Exception, match="not bits of fp32"):
        engine.exhaustive_last_layer(x, y, bits=[32])
