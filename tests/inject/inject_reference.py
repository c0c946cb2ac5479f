"""Slow reference for the engine: deep-copy the model, set the faulty value by hand, run alone."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from flipsafe import formats
from flipsafe.formats import Encoded, flip_bits, force_bits

EMULATED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d,
                  nn.LayerNorm, nn.GroupNorm)
OPS = ("flip", "set0", "set1", "random", "zero")


class TinyNet(nn.Module):
    """Conv/BN/ReLU, a residual add, a grouped strided conv, two Linears."""

    def __init__(self, classes=10, in_ch=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 8, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(12, classes)
        g = torch.Generator().manual_seed(5)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(8, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(8, generator=g) * 0.1)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)) + y)
        y = self.relu3(self.conv3(y))
        y = torch.flatten(self.pool(y), 1)
        return self.fc(self.relu4(self.fc1(y)))


class TinyAttention(nn.Module):
    """Patch conv, LayerNorm, q/k/v/proj Linears on tokens, GELU MLP, mean-pooled head."""

    def __init__(self, classes=5, dim=8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.fc = nn.Linear(dim, classes)
        g = torch.Generator().manual_seed(6)
        for n in (self.norm1, self.norm2):
            n.weight.data.copy_(torch.rand(dim, generator=g) + 0.5)
            n.bias.data.copy_(torch.randn(dim, generator=g) * 0.1)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        h = self.norm1(t)
        a = self.softmax(torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * 0.5)
        t = t + self.proj(torch.matmul(a, self.v(h)))
        t = t + self.mlp(self.norm2(t))
        return self.fc(t.mean(1))


class Untraceable(TinyNet):
    """TinyNet whose forward branches on a tensor value, so torch.fx cannot trace it."""

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        if y.sum() > -1e30:  # always true; data-dependent control flow stops fx
            y = self.relu2(self.bn2(self.conv2(y)) + y)
        y = self.relu3(self.conv3(y))
        y = torch.flatten(self.pool(y), 1)
        return self.fc(self.relu4(self.fc1(y)))


def scaled(fmt) -> bool:
    return fmt.calibrate(1.0) is not fmt


def param_view(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(p.shape[0], -1) if p.dim() > 2 else p


def param_format(fmt, p: torch.Tensor):
    """The format a parameter is held in: scale from its own largest |value|."""
    if not scaled(fmt):
        return fmt
    v = param_view(p).abs()
    if getattr(fmt, "per_channel", False) and v.dim() > 1:
        amax = torch.stack([row.max() for row in v])
        amax = torch.where(amax > 0, amax, 1.0)
    else:
        amax = v.max() if float(v.max()) > 0 else torch.tensor(1.0)
    return fmt.calibrate(amax)


def output_format(fmt, name, ranges):
    return fmt.calibrate(ranges[name]) if scaled(fmt) else fmt


class Reference:
    """The model emulated in `fmt` by plain means: quantised parameters, quantised outputs."""

    def __init__(self, model: nn.Module, fmt_name: str, ranges=None, clamp="none"):
        self.fmt = formats.get(fmt_name)
        self.original = copy.deepcopy(model).eval()
        self.model = copy.deepcopy(model).eval()
        self.ranges = ranges or {}
        self.clamp = clamp
        self.emulate = fmt_name != "fp32"
        mods = dict(self.model.named_modules())
        self.param_formats = {}
        with torch.no_grad():
            for name, mod in mods.items():
                if list(mod.children()) or not name:
                    continue
                for pname, p in mod.named_parameters(recurse=False):
                    pf = param_format(self.fmt, p)
                    self.param_formats[(name, pname)] = pf
                    p.copy_(pf.quantize(param_view(p)).reshape(p.shape))
        self.emulated = [n for n, m in mods.items() if isinstance(m, EMULATED_TYPES)]

    def _limit(self, value):
        return torch.tensor(float(value))

    def _clamp(self, new, old, limit):
        """Clamp the values that changed, by hand, like GoldenEye's range detector."""
        changed = new.view(torch.int32) != old.view(torch.int32)
        nonfinite = bool((~torch.isfinite(new[changed])).any())
        if self.clamp == "none":
            return new, nonfinite
        out = new.clone()
        flat_new, flat_out, flat_ch = new.reshape(-1), out.reshape(-1), changed.reshape(-1)
        for i in flat_ch.nonzero().reshape(-1).tolist():
            v = float(flat_new[i])
            if math.isnan(v) or math.isinf(v) or abs(v) > float(limit):
                if self.clamp == "goldeneye":
                    flat_out[i] = -float(limit) if v < 0 else float(limit)
                else:
                    neg = bool(flat_new[i:i + 1].view(torch.int32) < 0)
                    flat_out[i] = -float(limit) if neg else float(limit)
        return out, nonfinite

    def _fault_codes(self, enc: Encoded, is_meta, index, mask, op, value):
        """Apply one fault with the formats package's own bit primitives."""
        if is_meta:
            key = next(iter(enc.meta))
            meta = dict(enc.meta)
            meta[key] = self._fault_tensor(enc.meta[key], index, mask, op, value)
            return Encoded(enc.codes, meta)
        return Encoded(self._fault_tensor(enc.codes, index, mask, op, value), enc.meta)

    @staticmethod
    def _fault_tensor(t, index, mask, op, value):
        if OPS[op] == "flip":
            return flip_bits(t, [index], [mask])
        if OPS[op] in ("set0", "zero"):
            return force_bits(t, [index], [mask], 0)
        if OPS[op] == "set1":
            return force_bits(t, [index], [mask], 1)
        ones = force_bits(t, [index], [mask & value], 1)
        return force_bits(ones, [index], [mask & ~value], 0)

    def logits(self, image, fault=None):
        """Logits of one image [1, ...], with `fault` (a dict) injected, plus whether the
        corrupted value was NaN/Inf before clamping."""
        model = copy.deepcopy(self.model)
        mods = dict(model.named_modules())
        state = {"nonfinite": False}
        hooks = []
        kind = fault["param"] if fault else None
        if fault and kind in ("weight", "bias", "weight_meta"):
            pname = "weight" if kind == "weight_meta" else kind
            mod = mods[fault["layer"]]
            orig = getattr(dict(self.original.named_modules())[fault["layer"]], pname)
            pf = self.param_formats[(fault["layer"], pname)]
            enc = pf.encode(param_view(orig.detach()))
            enc = self._fault_codes(enc, kind == "weight_meta", fault["index"], fault["mask"],
                                    fault["op"], fault["value"])
            new = pf.decode(enc).reshape(orig.shape)
            old = getattr(mod, pname).detach()
            limit = old.abs().max()
            new, state["nonfinite"] = self._clamp(new, old, limit)
            with torch.no_grad():
                getattr(mod, pname).copy_(new)
        for name in self.emulated:
            if name not in mods:
                continue
            target = fault is not None and kind in ("output", "meta") and name == fault["layer"]
            hooks.append(mods[name].register_forward_hook(self._hook(name, target, fault,
                                                                     state)))
        if fault and kind in ("output", "meta") and fault["layer"] not in self.emulated:
            hooks.append(mods[fault["layer"]].register_forward_hook(
                self._hook(fault["layer"], True, fault, state, quantize=False)))
        with torch.no_grad():
            out = model(image)
        for h in hooks:
            h.remove()
        return out, state["nonfinite"]

    def _hook(self, name, target, fault, state, quantize=True):
        def hook(mod, inp, out):
            fmt = output_format(self.fmt, name, self.ranges) if self.emulate else self.fmt
            q = fmt.quantize(out) if (self.emulate and quantize) else out
            if not target:
                return q
            enc = fmt.encode(out[0])
            enc = self._fault_codes(enc, fault["param"] == "meta", fault["index"],
                                    fault["mask"], fault["op"], fault["value"])
            new = fmt.decode(enc).reshape(q[0].shape)
            if not quantize:  # only the corrupted element leaves the format
                changed = torch.zeros(new.numel(), dtype=torch.bool)
                changed[fault["index"]] = True
                new = torch.where(changed.view(new.shape), new, q[0])
            limit = self.ranges.get(name, float("inf"))
            new, state["nonfinite"] = self._clamp(new, q[0], self._limit(limit))
            return new.unsqueeze(0)
        return hook


def outcome(logits: torch.Tensor, label: int) -> dict:
    """Outcome of one row of logits, computed plainly."""
    row = logits[0].tolist()
    finite = [v for v in row if not math.isnan(v)]
    top = row.index(max(finite)) if finite else 0
    loss = float(F.cross_entropy(logits, torch.tensor([label]), reduction="none")[0])
    if all(math.isfinite(v) for v in row):
        p = sorted(torch.softmax(logits[0].double(), 0).tolist(), reverse=True)
        diff = (p[0] - p[1]) * 100
    else:
        diff = float("nan")
    return {"top1": top, "loss": loss, "top2diff": diff,
            "due": not all(math.isfinite(v) for v in row)}


def reference_outcomes(ref: Reference, images, labels, faults) -> list[dict]:
    """Outcomes of every fault of a FaultSet, one deep copy and one image at a time."""
    out = []
    golden = {}
    for i in range(len(faults)):
        img = int(faults.image[i])
        if img not in golden:
            golden[img] = outcome(ref.logits(images[img:img + 1])[0], int(labels[img]))
        fault = {"layer": faults.layers[int(faults.layer[i])],
                 "param": faults.param_names[i], "index": int(faults.index[i]),
                 "mask": int(faults.mask[i]), "op": int(faults.op[i]),
                 "value": int(faults.value[i])}
        logits, nonfinite = ref.logits(images[img:img + 1], fault)
        o = outcome(logits, int(labels[img]))
        g = golden[img]
        out.append({"golden_top1": g["top1"], "faulty_top1": o["top1"], "due": o["due"],
                    "sdc": (o["top1"] != g["top1"]) and not o["due"],
                    "golden_loss": g["loss"], "faulty_loss": o["loss"],
                    "faulty_top2diff": o["top2diff"], "nonfinite": nonfinite})
    return out
