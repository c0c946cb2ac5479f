"""Every (weight, bit) fault of the classifier Linear on every image, from cached features."""

# A fault in weight (o, i) changes only class score o, by dw * x_i. When the format is
# element-wise and what follows the Linear acts on each class score alone (nothing, or a
# scale multiply as in text-guided heads), all faults of an image are evaluated at once
# as columns and their outcomes follow in closed form from the golden scores of the other
# classes. Otherwise every faulty score row is built and run through the rest of the graph.

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flipsafe.errors import ConfigError, InjectionError
from flipsafe.faults import parse, positions
from flipsafe.inject import emulate
from flipsafe.inject.graph import POINTWISE_FUNCS
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


def _columnwise(engine, node, g) -> bool | None:
    """True if the nodes after the classifier treat each class score alone; None if unknown
    (no traced graph)."""
    prog = engine.program
    if prog is None:
        return None
    plan = prog.plan(node)
    if plan.gathered:
        return False
    out_dim = engine.leaves[node.target].out_features
    for n, _ in plan.steps:
        if n.op == "output":
            continue
        if n.op != "call_function" or n.target not in POINTWISE_FUNCS:
            return False
        for a in n.all_input_nodes:
            if a in plan.constants:
                v = g.nodes.get(a)
                if not isinstance(v, torch.Tensor):
                    continue
                if v.numel() != 1 and (v.dim() == 0 or v.shape[-1] != out_dim
                                       or v.numel() != out_dim):
                    return False
    return True


def _post(engine, node, g, values: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
    """Run what follows the classifier on score rows [m, C] (rows of images img)."""
    prog = engine.program
    if prog is None:
        return values
    plan = prog.plan(node)
    env = prog.gather(g.nodes, plan.gathered, img) if plan.gathered else {}
    for c in plan.constants:
        env[c] = g.nodes[c]
    return prog.run_suffix(plan, values, env)


def exhaustive(engine, images, labels, fault_model="bitflip", bits=None, golden=None):
    model = parse(fault_model)
    if model.kind not in ("flip", "stuck0", "stuck1") or model.k != 1:
        raise ConfigError(f"exhaustive injection covers single-bit fault models; choose one "
                          f"of: bitflip, stuck0, stuck1 (got {fault_model!r})")
    if engine.guards:
        raise ConfigError("exhaustive injection computes the classifier's outcomes in closed "
                          "form and takes no guards (ranger, clip); run sampled faults instead")
    images, labels = engine.prepare(images, labels)
    name = engine.classifier()
    mod = engine.leaves.get(name)
    if not isinstance(mod, nn.Linear) or name not in engine.sites("weights"):
        raise InjectionError(f"the classifier layer {name!r} must be an nn.Linear that runs "
                             f"once per forward; got {type(mod).__name__}")
    if golden is None:
        golden = engine.golden(images, labels, layers={name})
    else:
        engine.cache(golden, {name})
    fmt = engine.fmt
    allowed = positions(fmt)
    bits = allowed if bits is None else [int(b) for b in bits]
    bad = [b for b in bits if b not in allowed]
    if bad:
        raise ConfigError(f"bits {bad} are not bits of {fmt.name}; choose from {allowed}")
    x = golden.inputs[name][0]
    if x.dim() != 2:
        raise InjectionError(f"the classifier {name!r} must take one feature vector per image "
                             f"([batch, features]), got input shape {tuple(x.shape)}")
    raw = golden.raw[name]
    out_dim, in_dim = mod.weight.shape
    codes = engine.params[(name, "weight")]
    dev = engine.device
    with torch.no_grad():
        n_w = out_dim * in_dim
        idx = torch.arange(n_w, device=dev)
        new = []
        for b in bits:
            mask = torch.full((n_w,), 1 << b, dtype=torch.int64, device=dev)
            op = torch.full((n_w,), model.op, dtype=torch.int64, device=dev)
            new.append(codes.corrupt(idx, False, mask, op, mask)[1][:, 0])
        new = torch.stack(new)  # [k, n_w]
        old = codes.values.reshape(-1)
        nonfinite = ~torch.isfinite(new)
        if engine.clamp != "none":
            new = emulate.clamp(new, engine.clamp_limit(name, "weight"), engine.clamp)
        dw = (new - old).reshape(len(bits), out_dim, in_dim)
        node = engine.program.module_nodes[name][0] if engine.program is not None else None
        columnwise = _columnwise(engine, node, golden) if node is not None else None
        if columnwise is None:
            # Without a graph, the scores must be the logits themselves.
            q = engine.quantize_output(name, raw)
            if not bool(emulate.same_bits(q, golden.logits).all()):
                raise InjectionError(
                    f"the model has no captured graph (torch.fx or torch.export) and its "
                    f"logits are not the output of {name!r}; exhaustive classifier faults "
                    f"need one of the two")
            columnwise = True
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
                v = engine.quantize_output(name, scores)
                v = _post(engine, node, golden, v.reshape(-1, out_dim), None)
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
                rows = engine.quantize_output(name, rows.reshape(-1, out_dim))
                row_img = img.repeat_interleave(k * in_dim * out_dim)
                logits = _post(engine, node, golden, rows, row_img)
                part = compute_outcomes(golden.outcomes.select(row_img), logits,
                                        labels[row_img])
                for f, parts in cols.items():
                    t = getattr(part, f).reshape(b, k, in_dim, out_dim).transpose(2, 3)
                    parts.append(t.reshape(b, k, n_w))
        out = {f: torch.cat(v) for f, v in cols.items()}
        gold = golden.outcomes
        out["golden_top1"] = gold.top1[:, None, None]
        out["golden_loss"] = gold.loss[:, None, None]
        out["golden_top2diff"] = gold.top2diff[:, None, None]
        out["nonfinite"] = nonfinite[None]
    return Exhaustive(name, torch.arange(n_img, device=dev),
                      torch.tensor(bits, dtype=torch.int64, device=dev),
                      torch.arange(n_w, device=dev), Outcomes(**{f: out[f] for f in FIELDS}))
