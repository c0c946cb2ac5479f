"""Injections and seconds to a stated precision, fixed vs adaptive sampling, in one run.

For each trained digits model (all Conv/Linear layers, activations, fp32, bitflip) both
designs run to +-MARGIN at CONFIDENCE per layer: `fixed` (Leveugle's worst-case n per layer)
and `adaptive` (pilot, then a Neyman stage 2; campaign.adaptive). Printed per model: the
injections and seconds of each, their ratio, the precision each reached, and the ratio of
the adaptive campaign to an oracle Neyman design computed from the fixed campaign's own
stratum rates (normal approximation, no pilot: the least any stratified design needs).
With `--hf`, adaptive campaigns on the Hugging Face ResNet-18-sized (64 px) and ViT (32 px)
models of benchmarks/engine.py (random weights, built offline; the fixed design is planned,
not run: hours on 2 cores). With `--r50`, the plan of a ResNet-50-sized Hugging Face model:
fixed injections and the adaptive pilot plus its projected stage 2.
Last line: one JSON object.

    python benchmarks/precision.py [--epochs 15] [--margin 0.01] [--hf] [--r50]
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


def _hf_case(model, name: str, side: int, classes: int, images: int, root: Path):
    """Save an HF classifier and random images for it; its target and dataset specs."""
    import torch
    from safetensors.torch import save_file

    model.eval().save_pretrained(root / name)
    gen = torch.Generator().manual_seed(0)
    save_file({"images": torch.rand(images, 3, side, side, generator=gen),
               "labels": torch.randint(classes, (images,), generator=gen)},
              root / f"{name}.safetensors")
    return f"hf:{root / name}", f"tensors:{root / f'{name}.safetensors'}"


def hf_adaptive(margin: float, confidence: float, root: Path) -> list[dict]:
    """The benchmark's HF ResNet-18-sized (64 px) and ViT (32 px) models, random weights:
    the fixed plan's injections (not run: hours here) and an adaptive campaign run to the
    margin, with the precision it reached."""
    from engine import hf_models

    out = []
    for key, what, wrapped, side in hf_models():
        spec, data = _hf_case(wrapped.model, key, side, 10, 64, root)
        fixed = make_plan(spec, dataset=data, images="all", margin=margin,
                          confidence=confidence, sampling="fixed")
        planned = prepare(fixed).total
        plan = make_plan(spec, dataset=data, images="all", margin=margin,
                         confidence=confidence, sampling="adaptive")
        started = time.perf_counter()
        run_campaign(plan, root / f"{key}-adaptive", show_progress=False)
        seconds = time.perf_counter() - started
        results = load_results(root / f"{key}-adaptive")
        out.append({"model": what, "layers": len(results.by_layer.groups),
                    "fixed_planned_injections": planned, "adaptive": {
                        "injections": int(results.n), "seconds": round(seconds, 1),
                        "widest_half_width": _widest(results)},
                    "adaptive_vs_fixed_injections": planned / int(results.n)})
    return out


def r50_plan(margin: float, confidence: float, root: Path) -> dict:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                          layer_type="bottleneck", num_labels=1000)
    model = ResNetForImageClassification(config)
    spec, data = _hf_case(model, "r50", 224, 1000, 4, root)
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
    ap.add_argument("--hf", action="store_true",
                    help="also run adaptive campaigns on the HF ResNet-18-sized and ViT models "
                         "of benchmarks/engine.py (fixed: planned only)")
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
        if args.hf:
            report["hf"] = hf_adaptive(args.margin, args.confidence, root)
            for r in report["hf"]:
                a = r["adaptive"]
                print(f"{r['model']}, {r['layers']} layers: fixed plans "
                      f"{r['fixed_planned_injections']:,} injections; adaptive spent "
                      f"{a['injections']:,} in {a['seconds']:.0f} s (widest "
                      f"+-{a['widest_half_width']:.3%}); "
                      f"{r['adaptive_vs_fixed_injections']:.1f}x fewer", flush=True)
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
