"""PE faults of a systolic array: the engine's outcomes equal a brute-force loop-nest
simulator of each dataflow, unit and stuck-at value on small Conv and Linear layers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inject"))
from inject_reference import outcome
from test_inject_reference import check

from flipsafe import accel
from flipsafe.errors import ConfigError
from flipsafe.faults import FaultSet
from flipsafe.inject import Engine


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2)
        self.fc1 = nn.Linear(6 * 2 * 2, 7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        y = self.conv2(self.relu(self.conv1(x)))
        return self.fc2(self.relu(self.fc1(y.flatten(1))))


def event(acc, M, K, N, r, c, step):
    """{dim: index} of transient time `step` at PE (r, c), or None when it is idle: the
    PE's indices of each event dim (its residues for the two stationary dims, all for the
    streamed one) counted in the event dims' order, the last fastest."""
    a, b = {"ws": ("k", "n"), "os": ("m", "n"), "is": ("k", "m"),
            "mma": ("m", "n")}[acc.dataflow]
    size = {"m": M, "k": K, "n": N}
    own = {a: (r, acc.rows), b: (c, acc.cols)}
    order = {("weight", "ws"): "kn", ("input", "is"): "km"}.get(
        (acc.unit, acc.dataflow), "mnk" if acc.unit == "accumulator" else "mkn")
    widths = {d: -(-size[d] // own[d][1]) if d in own else size[d] for d in order}
    if acc.dataflow == "mma":  # a lane's columns come in pairs 2t, 2t + 1 of each 8
        widths["n"] = -(-N // 8) * 2
    out = {}
    for d in reversed(order):
        i, step = step % widths[d], step // widths[d]
        if acc.dataflow == "mma" and d == "n":
            out[d] = 8 * (i // 2) + 2 * c + i % 2
        else:
            out[d] = own[d][0] + i * own[d][1] if d in own else i
        if out[d] >= size[d]:
            return None
    return out


def simulate(mod, x, acc: accel.Accelerator, pe: int, bit: int, stuck: int, step=None,
             flip=False):
    """The layer's output, computed product by product as the array would, with one PE's
    unit stuck (or, at time `step`, flipped once): every product P[m, k, n] =
    x[m, k] * w[k, n] (float32) summed over k in order."""
    if isinstance(mod, nn.Conv2d):  # im2col: X [M out pixels, K = Cin*kh*kw]
        X = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)[0].t()
        W = mod.weight.reshape(mod.weight.shape[0], -1).t()
    else:
        X, W = x.reshape(1, -1), mod.weight.t()
    M, K, N = X.shape[0], X.shape[1], W.shape[1]
    r, c = divmod(pe, acc.cols)
    m, k, n = torch.meshgrid(torch.arange(M), torch.arange(K), torch.arange(N), indexing="ij")
    dims = {"m": m, "k": k, "n": n}
    if acc.dataflow == "mma":  # PTX m16n8 accumulator fragment: lane 4g + t
        g, t = divmod(pe, 4)
        at = ((m % 16 == g) | (m % 16 == g + 8)) & ((n % 8 == 2 * t) | (n % 8 == 2 * t + 1))
    else:
        a, b = {"ws": ("k", "n"), "os": ("m", "n"), "is": ("k", "m")}[acc.dataflow]
        at = (dims[a] % acc.rows == r) & (dims[b] % acc.cols == c)

    def hold(t):  # the float32 bit pattern with `bit` held at `stuck` (or flipped)
        u = t.detach().contiguous().numpy().view(np.uint32)
        if flip:
            u = u ^ np.uint32(1 << bit)
        else:
            u = (u | np.uint32(1 << bit)) if stuck else (u & ~np.uint32(1 << bit))
        return torch.from_numpy(u.view(np.float32).copy())

    if step is not None:  # one event: at those indices only
        ev = event(acc, M, K, N, r, c, step)
        at = torch.zeros_like(at) if ev is None else at & torch.stack(
            [dims[d] == ev[d] for d in ev]).all(0)
        if acc.unit == "accumulator":
            at = at & (k == (ev or {}).get("k", -1))

    xs, ws = X[m, k], W[k, n]
    if acc.unit == "product":
        P = torch.where(at, hold(xs * ws), xs * ws)
    elif acc.unit == "weight":
        P = xs * torch.where(at, hold(ws), ws)
    elif acc.unit == "input":
        P = torch.where(at, hold(xs), xs) * ws
    else:
        P = xs * ws
    Y = P.sum(1)
    if acc.unit == "accumulator" and step is not None:
        ev = event(acc, M, K, N, r, c, step)
        if ev is not None:  # the partial sum after product k, flipped, then the rest
            acc_ = torch.zeros(())
            for kk in range(K):
                acc_ = acc_ + P[ev["m"], kk, ev["n"]]
                if kk == ev["k"]:
                    acc_ = hold(acc_.reshape(1))[0]
            Y = Y.clone()
            Y[ev["m"], ev["n"]] = acc_
    elif acc.unit == "accumulator":
        own = at.any(1)  # the outputs this PE (lane) accumulates: [M, N]
        Y = torch.where(own, hold(Y), Y)
    if mod.bias is not None:
        Y = Y + mod.bias
    if isinstance(mod, nn.Conv2d):
        h = (x.shape[2] + 2 * mod.padding[0] - mod.kernel_size[0]) // mod.stride[0] + 1
        return Y.t().reshape(1, N, h, -1)
    return Y.reshape(1, N)


def reference(model, layer, x1, acc, pe, bit, stuck, step=None):
    """(logits, whether the layer's simulated output holds a NaN or Inf)."""
    mod = dict(model.named_modules())[layer]
    seen = {}

    def hook(m, inp, out):
        seen["out"] = simulate(m, inp[0], acc, pe, bit, stuck, step, flip=step is not None)
        return seen["out"]
    handle = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x1), not bool(torch.isfinite(seen["out"]).all())
    finally:
        handle.remove()


SPECS = ["ws:3x2:product", "ws:4x4:weight", "ws:2x3:input", "os:3x2:product",
         "os:2x2:weight", "os:4x3:accumulator", "is:3x3:product", "is:2x4:input",
         "mma:accumulator", "mma:product"]


@pytest.mark.parametrize("transient", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_pe_faults_equal_the_loop_nest_simulator(spec, transient):
    torch.manual_seed(0)
    model = Small().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 2, 6, 6, generator=g), torch.randint(4, (5,), generator=g)
    acc = accel.parse(spec + (":transient" if transient else ""))
    engine = Engine(model, "fp32", accelerator=acc, chunk=8, input_shape=(2, 6, 6))
    kinds = ("bitflip",) if transient else ("stuck0", "stuck1")
    # one product flipped moves little: transients are drawn in the exponent, to matter
    faults = FaultSet.cat([engine.sample(48 // len(kinds), "pe", "all", m, images=5,
                                         field="exponent" if transient else None,
                                         generator=torch.Generator().manual_seed(2))
                           for m in kinds])
    steps = {i.name: i.numel // acc.pes for i in engine.layers("pe")}
    got = engine.run(faults, x, y)
    expected = []
    golden = {}
    for i in range(len(faults)):
        img, bit = int(faults.image[i]), int(faults.mask[i]).bit_length() - 1
        stuck = int(faults.value[i] != 0)
        if img not in golden:
            with torch.no_grad():
                golden[img] = outcome(model(x[img:img + 1]), int(y[img]))
        layer = faults.layers[int(faults.layer[i])]
        pe, step = divmod(int(faults.index[i]), steps[layer])
        logits, nonfinite = reference(model, layer, x[img:img + 1], acc, pe, bit, stuck,
                                      step if transient else None)
        o, gd = outcome(logits, int(y[img])), golden[img]
        expected.append({"golden_top1": gd["top1"], "faulty_top1": o["top1"], "due": o["due"],
                         "sdc": (o["top1"] != gd["top1"]) and not o["due"],
                         "golden_loss": gd["loss"], "faulty_loss": o["loss"],
                         "faulty_top2diff": o["top2diff"], "nonfinite": nonfinite})
    check(got, expected, "fp32")
    assert (got.delta_loss > 1e-4).sum() >= 3  # some of the faults did something


def test_pe_sites_and_their_refusals():
    engine = Engine(Small().eval(), "fp32", accelerator="os:8x8:accumulator",
                    input_shape=(2, 6, 6))
    layers = engine.layers("pe")
    assert [i.name for i in layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert {i.numel for i in layers} == {64}
    with pytest.raises(Exception, match="float32"):
        Engine(Small().eval(), "fp16", input_shape=(2, 6, 6)).layers("pe")
    for bad, words in (("ws:8x8:accumulator", "output-stationary"), ("xs", "dataflow"),
                       ("ws:0x4", "rows and columns")):
        with pytest.raises(ConfigError, match=words):
            accel.parse(bad)
