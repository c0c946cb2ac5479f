"""Injections and seconds to a stated precision, fixed vs adaptive sampling, in one run.

For each trained digits model (all Conv/Linear layers, activations, fp32, bitflip) both
designs run to +-MARGIN at CONFIDENCE per layer: `fixed` (Leveugle's worst-case n per layer)
and `adaptive` (pilot, then a Neyman stage 2; campaign.adaptive). Printed per model: the
injections and seconds of each, their ratio, the precision each reached, and the ratio of
the adaptive campaign to an oracle Neyman design computed from the fixed campaign's own
stratum rates (normal approximation, no pilot: the least any stratified design needs).
Then the plan of a ResNet-50-sized Hugging Face model (random weights, built offline;
`--r50`, slow to build): fixed injections and the adaptive pilot plus its projected stage 2.
Last line: one JSON object.

    python benchmarks/precision.py [--epochs 15] [--margin 0.01] [--r50]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flipsafe.campaign import adaptive
from flipsafe.campaign.runner import make_plan, prepare, run_campaign
from flipsafe.metrics.stats import z_value
from flipsafe.report import load_results
from flipsafe.train import TrainConfig
from flipsafe.workflow import train_classifier


def _widest(results) -> float:
    return max(max((g.sdc.high - g.sdc.low) / 2, (g.due.high - g.due.low) / 2)
               for g in results.by_layer.groups.values())


def _oracle(results, margin: float, confidence: float) -> int:
    """Per layer, (z sum_h W_h S_h / margin)^2 with the fixed campaign's stratum rates."""
    z = z_value(confidence)
    total = 0
    layers = {s.layer for s in results.strata}
    for layer in layers:
        strata = [s for s in results.strata if s.layer == layer]
        size = sum(s.size for s in strata)
        spread = 0.0
        for s in strata:
            g = results.by_field.groups[(s.layer, s.field)]
            p = max(g.sdc.rate, g.due.rate)
            spread += s.size / size * math.sqrt(p * (1 - p))
        total += math.ceil((z * spread / margin) ** 2)
    return total


def digits(arch: str, epochs: int, margin: float, confidence: float, root: Path) -> dict:
    ckpt = root / arch
    train_classifier("digits", arch=arch, head="linear", out=ckpt,
                     config=TrainConfig(epochs=epochs), show_progress=False)
    out = {}
    for sampling in ("fixed", "adaptive"):
        plan = make_plan(ckpt, margin=margin, confidence=confidence, sampling=sampling)
        started = time.perf_counter()
        run_campaign(plan, root / f"{arch}-{sampling}", show_progress=False)
        seconds = time.perf_counter() - started
        results = load_results(root / f"{arch}-{sampling}")
        out[sampling] = {"injections": int(results.n), "seconds": round(seconds, 2),
                         "widest_half_width": _widest(results), "results": results}
    oracle = _oracle(out["fixed"]["results"], margin, confidence)
    for v in out.values():
        del v["results"]
    return {
        "model": f"digits {arch} ({epochs} epochs)", **out,
        "adaptive_vs_fixed_injections": out["fixed"]["injections"] / out["adaptive"]["injections"],
        "adaptive_vs_fixed_seconds": out["fixed"]["seconds"] / out["adaptive"]["seconds"],
        "oracle_neyman_injections": oracle,
        "adaptive_vs_oracle": out["adaptive"]["injections"] / oracle,
    }


def r50_plan(margin: float, confidence: float, root: Path) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                          layer_type="bottleneck", num_labels=1000)
    model = ResNetForImageClassification(config).eval()
    model.save_pretrained(root / "r50")
    gen = torch.Generator().manual_seed(0)
    save_file({"images": torch.rand(4, 3, 224, 224, generator=gen),
               "labels": torch.randint(1000, (4,), generator=gen)}, root / "data.safetensors")
    spec, data = f"hf:{root / 'r50'}", f"tensors:{root / 'data.safetensors'}"
    plan = make_plan(spec, dataset=data, images="all", margin=margin, confidence=confidence,
                     sampling="adaptive")
    prep = prepare(plan)
    fixed_plan = make_plan(spec, dataset=data, images="all", margin=margin,
                           confidence=confidence, sampling="fixed")
    fixed = sum(s.n for s in prepare(fixed_plan).strata)
    pilot = prep.total
    projected = {label: pilot + sum(per.values()) for label, per in
                 adaptive.projection(prep.strata, margin, confidence).items()}
    return {"model": "hf resnet-50 sized (random weights, 224 px)", "parameters":
            sum(p.numel() for p in model.parameters()), "layers": len(prep.layers),
            "fixed_injections": fixed, "adaptive_pilot": pilot,
            "adaptive_projected_total": projected}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--margin", type=float, default=0.01)
    ap.add_argument("--confidence", type=float, default=0.99)
    ap.add_argument("--archs", default="lenet,mlp")
    ap.add_argument("--r50", action="store_true", help="also plan a ResNet-50-sized HF model")
    args = ap.parse_args()
    report = {"margin": args.margin, "confidence": args.confidence, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in filter(None, args.archs.split(",")):
            r = digits(arch, args.epochs, args.margin, args.confidence, root)
            report["models"].append(r)
            f, a = r["fixed"], r["adaptive"]
            print(f"{r['model']}: fixed {f['injections']:,} injections {f['seconds']:.1f} s "
                  f"(widest +-{f['widest_half_width']:.3%}); adaptive {a['injections']:,} "
                  f"{a['seconds']:.1f} s (widest +-{a['widest_half_width']:.3%}); "
                  f"{r['adaptive_vs_fixed_injections']:.1f}x fewer injections, "
                  f"{r['adaptive_vs_fixed_seconds']:.1f}x less time; oracle Neyman "
                  f"{r['oracle_neyman_injections']:,} (adaptive {r['adaptive_vs_oracle']:.2f}x it)",
                  flush=True)
        if args.r50:
            r = r50_plan(args.margin, args.confidence, root)
            report["r50_plan"] = r
            print(f"{r['model']}, {r['parameters']:,} parameters, {r['layers']} layers: fixed "
                  f"{r['fixed_injections']:,} injections; adaptive pilot {r['adaptive_pilot']:,}, "
                  f"projected total {r['adaptive_projected_total']}", flush=True)
    print(json.dumps(report, default=lambda x: float(x) if isinstance(x, np.floating) else x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
