"""Every (weight, bit) fault of the classifier Linear on every image, from cached features."""

# A fault in weight (o, i) changes only class score o, by dw * x_i. When the format is
# element-wise and what follows the Linear acts on each class score alone (nothing, or a
# scale multiply as in text-guided heads), all faults of an image are evaluated at once
# as columns and their outcomes follow in closed form from the golden scores of the other
# classes (metrics.outcomes.column_outcomes). Otherwise every faulty score row is built and
# run through the rest of the graph (Executor.logits_after).

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flipsafe.errors import ConfigError, InjectionError
from flipsafe.faults import parse, positions
from flipsafe.inject import emulate
from flipsafe.inject.emulated import EmulatedModel
from flipsafe.inject.executors import GOLDEN_BATCH, Executor, Golden
from flipsafe.inject.sites import WeightSite
from flipsafe.metrics.outcomes import FIELDS, Outcomes, column_outcomes, compute_outcomes

_BUDGET = 1 << 22  # float elements per image chunk


@dataclass
class Exhaustive:
    """Outcomes of every (image, bit, weight) fault of the classifier layer.

    `outcomes` columns have shape [n_images, n_bits, n_weights] (golden columns broadcast
    from [n_images, 1, 1]); `weight` holds flat weight indices, `bits` bit positions,
    `image` image positions; `.flat()` gives one row per fault.
    """

    layer: str
    image: torch.Tensor
    bits: torch.Tensor
    weight: torch.Tensor
    outcomes: Outcomes

    def __len__(self) -> int:
        return self.image.numel() * self.bits.numel() * self.weight.numel()

    def flat(self) -> tuple[dict, Outcomes]:
        """Per-fault columns (image, bit, weight) and flattened outcomes, image-major."""
        i, b, w = torch.meshgrid(self.image, self.bits, self.weight, indexing="ij")
        return ({"image": i.reshape(-1), "bit": b.reshape(-1), "weight": w.reshape(-1)},
                self.outcomes.flatten())


class ExhaustiveLastLayer:
    """Every single-bit fault of the classifier Linear's weights on every image: `run`
    gives their outcomes, computed analytically from the cached features.

    em, ex: the emulated model and its executor; clamp: the clamp mode of faulty weights;
    batch: images per slice of a golden forward.
    """

    def __init__(self, em: EmulatedModel, ex: Executor, clamp: str = "none",
                 batch: int = GOLDEN_BATCH):
        self.em, self.ex, self.clamp, self.batch = em, ex, clamp, batch

    def run(self, images: torch.Tensor, labels: torch.Tensor, fault_model: str = "bitflip",
            bits=None, golden: Golden | None = None) -> Exhaustive:
        """Outcomes of every (image, bit, weight) fault; images and labels on the model's
        device; `bits` defaults to every bit of the format."""
        em, ex = self.em, self.ex
        model = parse(fault_model)
        if model.kind not in ("flip", "stuck0", "stuck1") or model.k != 1:
            raise ConfigError(f"exhaustive injection covers single-bit fault models; choose "
                              f"one of: bitflip, stuck0, stuck1 (got {fault_model!r})")
        if em.guards:
            raise ConfigError("exhaustive injection computes the classifier's outcomes in "
                              "closed form and takes no guards (ranger, clip); run sampled "
                              "faults instead")
        name = em.classifier()
        mod = em.leaves.get(name)
        weights = WeightSite(em, ex)
        if not isinstance(mod, nn.Linear) or not weights.has(name):
            raise InjectionError(f"the classifier layer {name!r} must be an nn.Linear that "
                                 f"runs once per forward; got {type(mod).__name__}")
        if golden is None:
            golden = ex.golden(images, labels, {name}, self.batch)
        else:
            ex.cache(golden, {name}, self.batch)
        limit = weights.limit(name, self.clamp)
        return self._outcomes(name, mod, model, images, labels, bits, golden, limit)

    def _faulty_weights(self, name, mod, model, bits, limit):
        """(bits, dw [k, O, I]: each weight's change under each bit's fault, after the
        clamp, nonfinite [k, O*I]: the faulty code was NaN/Inf before it)."""
        em, fmt = self.em, self.em.fmt
        allowed = positions(fmt)
        bits = allowed if bits is None else [int(b) for b in bits]
        bad = [b for b in bits if b not in allowed]
        if bad:
            raise ConfigError(f"bits {bad} are not bits of {fmt.name}; choose from {allowed}")
        out_dim, in_dim = mod.weight.shape
        codes = em.params[(name, "weight")]
        n_w, dev = out_dim * in_dim, em.device
        idx = torch.arange(n_w, device=dev)
        new = []
        for b in bits:
            mask = torch.full((n_w,), 1 << b, dtype=torch.int64, device=dev)
            op = torch.full((n_w,), model.op, dtype=torch.int64, device=dev)
            new.append(codes.corrupt(idx, False, mask, op, mask)[1][:, 0])
        new = torch.stack(new)  # [k, n_w]
        old = codes.values.reshape(-1)
        nonfinite = ~torch.isfinite(new)
        if self.clamp != "none":
            new = emulate.clamp(new, limit, self.clamp)
        return bits, (new - old).reshape(len(bits), out_dim, in_dim), nonfinite

    def _after(self, name, golden, raw, out_dim):
        """(post: what follows the classifier on score rows [m, C], whether it treats each
        score alone); without a graph the scores must be the logits themselves."""
        em, ex = self.em, self.ex
        columnwise = ex.elementwise_after(name, golden, out_dim)
        if columnwise is not None:
            return (lambda values, img: ex.logits_after(name, values, img, golden)), columnwise
        q = em.quantize_output(name, raw)
        if not bool(emulate.same_bits(q, golden.logits).all()):
            raise InjectionError(
                f"the model has no captured graph (torch.fx or torch.export) and its "
                f"logits are not the output of {name!r}; exhaustive classifier faults "
                f"need one of the two")
        return (lambda values, img: values), True

    def _outcomes(self, name, mod, model, images, labels, bits, golden, limit):
        em, fmt = self.em, self.em.fmt
        x = golden.inputs[name][0]
        if x.dim() != 2:
            raise InjectionError(f"the classifier {name!r} must take one feature vector per image "
                                 f"([batch, features]), got input shape {tuple(x.shape)}")
        raw = golden.raw[name]
        out_dim, in_dim = mod.weight.shape
        dev = em.device
        with torch.no_grad():
            n_w = out_dim * in_dim
            bits, dw, nonfinite = self._faulty_weights(name, mod, model, bits, limit)
            post, columnwise = self._after(name, golden, raw, out_dim)
            elementwise = fmt.block_size is None
            n_img = images.shape[0]
            k = len(bits)
            cols = {f: [] for f in ("faulty_top1", "sdc", "due", "faulty_loss", "delta_loss",
                                    "faulty_top2diff")}
            per_image = k * n_w * (1 if columnwise and elementwise else out_dim)
            step = max(1, _BUDGET // max(1, per_image))
            dwt = dw.permute(0, 2, 1)  # [k, I, O]: class scores last
            for s in range(0, n_img, step):
                img = torch.arange(s, min(n_img, s + step), device=dev)
                b = img.numel()
                scores = raw[img][:, None, None, :] + dwt[None] * x[img][:, None, :, None]
                if columnwise and elementwise:
                    v = em.quantize_output(name, scores)
                    v = post(v.reshape(-1, out_dim), None)
                    v = v.reshape(b, k * in_dim, out_dim)
                    res = column_outcomes(v, golden.logits[img], labels[img],
                                          golden.outcomes.select(img))
                    for f, t in res.items():
                        t = t.reshape(b, k, in_dim, out_dim).transpose(2, 3)
                        cols[f].append(t.reshape(b, k, n_w))
                else:
                    rows = raw[img][:, None, None, None, :].expand(b, k, in_dim, out_dim, out_dim)
                    rows = rows.clone()
                    diag = torch.arange(out_dim, device=dev)
                    rows[..., diag, diag] = scores
                    rows = em.quantize_output(name, rows.reshape(-1, out_dim))
                    row_img = img.repeat_interleave(k * in_dim * out_dim)
                    logits = post(rows, row_img)
                    part = compute_outcomes(golden.outcomes.select(row_img), logits,
                                            labels[row_img])
                    for f, parts in cols.items():
                        t = getattr(part, f).reshape(b, k, in_dim, out_dim).transpose(2, 3)
                        parts.append(t.reshape(b, k, n_w))
            out = {f: torch.cat(v) for f, v in cols.items()}
            gold = golden.outcomes
            out.update({f"golden_{k}": getattr(gold, k)[:, None, None]
                        for k in ("top1", "loss", "top2diff")})
            out["nonfinite"] = nonfinite[None]
            out["ran"] = torch.full_like(out["sdc"], not (columnwise and elementwise))  # post
        return Exhaustive(name, torch.arange(n_img, device=dev),
                          torch.tensor(bits, dtype=torch.int64, device=dev),
                          torch.arange(n_w, device=dev), Outcomes(**{f: out[f] for f in FIELDS}))
