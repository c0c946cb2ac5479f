"""PE faults of an int8 array (int32 products and accumulator) on a PT2E-quantized model
equal an integer loop-nest simulator fed the program's own stored codes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deployed_models import images
from inject_reference import outcome
from test_inject_reference import check

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "accel"))
from test_pe_faults import event

from flipsafe import accel
from flipsafe.campaign.targets import resolve
from flipsafe.deployed.modules import sources
from flipsafe.inject import Engine

pytest.importorskip("torchao")


def hold(v: np.ndarray, width: int, bit: int, stuck, flip: bool, signed: bool):
    """Integers v with `bit` of their `width`-bit two's complement pattern held / flipped."""
    u = v.astype(np.int64) & ((1 << width) - 1)
    u = u ^ (1 << bit) if flip else (u | (1 << bit) if stuck else u & ~(1 << bit))
    return np.where(signed & (u >= 1 << (width - 1)), u - (1 << width), u)


def simulate(mod, x, codes_w, acc, pe, bit, stuck, step):
    """The layer's output from integer MACs: (x code - zero point) * w code, int32 sums."""
    fin, fw = mod.flipsafe_stored["input"], mod.flipsafe_stored["weight"]
    s_in, zp = float(fin.scale), int(fin.zero_point)
    xq = torch.round(x.double() / s_in).long() + zp  # on the grid: the stored codes
    if isinstance(mod, torch.nn.Conv2d):
        cols = F.unfold((xq - zp).double(), mod.kernel_size, mod.dilation, mod.padding,
                        mod.stride)[0].t().numpy().astype(np.int64)
    else:
        cols = (xq - zp).reshape(1, -1).numpy()
    W = codes_w.reshape(codes_w.shape[0], -1).T.astype(np.int64)  # K, N
    M, K, N = cols.shape[0], cols.shape[1], W.shape[1]
    r, c = divmod(pe, acc.cols)
    m, k, n = np.meshgrid(np.arange(M), np.arange(K), np.arange(N), indexing="ij")
    dims = {"m": m, "k": k, "n": n}
    a, b = {"ws": ("k", "n"), "os": ("m", "n"), "is": ("k", "m")}[acc.dataflow]
    at = (dims[a] % acc.rows == r) & (dims[b] % acc.cols == c)
    flip = step is not None
    ev = event(acc, M, K, N, r, c, step) if flip else None
    if flip:
        at = at & np.all([dims[d] == ev[d] for d in ev], axis=0) if ev else at & False
    xs, ws = cols[m, k], W[k, n]
    if acc.unit == "product":
        P = np.where(at, hold(xs * ws, 32, bit, stuck, flip, True), xs * ws)
    elif acc.unit == "weight":
        P = xs * np.where(at, hold(ws, 8, bit, stuck, flip, True), ws)
    elif acc.unit == "input":
        held = hold(xs + zp, 8, bit, stuck, flip, fin.dtype == torch.int8) - zp
        P = np.where(at, held, xs) * ws
    else:
        P = xs * ws
    Y = P.sum(1)
    if acc.unit == "accumulator" and flip and ev:
        part = 0
        for kk in range(K):
            part += int(P[ev["m"], kk, ev["n"]])
            if kk == ev["k"]:
                part = int(hold(np.array(part), 32, bit, stuck, True, True))
        Y[ev["m"], ev["n"]] = part
    elif acc.unit == "accumulator":
        own = (np.arange(M)[:, None] % acc.rows == r) & (np.arange(N)[None] % acc.cols == c)
        Y = np.where(own, hold(Y, 32, bit, stuck, False, True), Y)
    scale = s_in * fw.scale.double().numpy().reshape(-1)
    out = torch.from_numpy(Y * scale).float() + mod.bias
    if isinstance(mod, torch.nn.Conv2d):
        h = (x.shape[2] + 2 * mod.padding[0] - mod.kernel_size[0]) // mod.stride[0] + 1
        return out.t().reshape(1, N, h, -1)
    return out.reshape(1, N)


@pytest.mark.parametrize("spec", ["ws:3x2:product", "os:2x3:accumulator", "is:3x3:input",
                                  "ws:2x2:weight", "os:2x2:product:transient",
                                  "ws:3x3:weight:transient", "os:3x2:accumulator:transient"])
def test_int8_pe_faults_equal_the_integer_simulator(pt2e_file, spec):
    target = resolve(f"export:{pt2e_file}")
    model = target.load()
    program = target.program.module()
    acc = accel.parse(spec)
    engine = Engine(model, "native", accelerator=acc, chunk=8, input_shape=(1, 8, 8))
    kind = "bitflip" if acc.transient else "stuck1"
    faults = engine.sample(8, "pe", "all", kind, images=6,
                           generator=torch.Generator().manual_seed(5))
    x, y = images(6, seed=2)
    got = engine.run(faults, x, y)
    steps = {i.name: i.numel // acc.pes for i in engine.layers("pe")}
    mods = dict(model.named_modules())
    src = sources(model)
    expected = []
    for i in range(len(faults)):
        img, layer = int(faults.image[i]), faults.layers[int(faults.layer[i])]
        bit = int(faults.mask[i]).bit_length() - 1
        pe, step = divmod(int(faults.index[i]), steps[layer])
        codes_w = getattr(program, src[(layer, "weight")]["codes"]).numpy()
        seen = {}

        def hook(m, inp, out, pe=pe, step=step, bit=bit, codes_w=codes_w, seen=seen):
            seen["out"] = simulate(m, inp[0], codes_w, acc, pe, bit, 1,
                                   step if acc.transient else None)
            return seen["out"]
        handle = mods[layer].register_forward_hook(hook)
        with torch.no_grad():
            logits = model(x[img:img + 1])
        handle.remove()
        with torch.no_grad():
            g = outcome(model(x[img:img + 1]), int(y[img]))
        o = outcome(logits, int(y[img]))
        expected.append({"golden_top1": g["top1"], "faulty_top1": o["top1"], "due": o["due"],
                         "sdc": (o["top1"] != g["top1"]) and not o["due"],
                         "golden_loss": g["loss"], "faulty_loss": o["loss"],
                         "faulty_top2diff": o["top2diff"],
                         "nonfinite": not bool(torch.isfinite(seen["out"]).all())})
    check(got, expected, "int8")
    assert (got.delta_loss > 1e-4).sum() >= 2
