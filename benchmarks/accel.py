"""PE faults of a systolic array against clean inference, measured in the same run.

    python benchmarks/accel.py [--threads 2] [--faults 512] [--arrays ws:16x16:product,...]

Models (random weights, nothing downloaded): the built-in CIFAR resnet18 (32 px) and the
HF ResNet-18-sized classifier of benchmarks/engine.py (64 px). For each array spec, PE
faults/s (stuck1, or bitflip for a transient spec, in every Conv/Linear; the engine's
suffix runs) over clean images/s of
the same model on the same batch of 64; the ratio is the target (>= 1x). Prints a table
and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARRAYS = ("ws:16x16:product,os:16x16:accumulator,is:16x16:input,ws:16x16:product:transient,"
          "os:16x16:accumulator:transient")


def best_rate(fn, items: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def cases():
    from engine import hf_models

    from flipsafe import models

    torch.manual_seed(0)
    yield "resnet18 (CIFAR, 32 px)", models.build("resnet18", 10).eval(), 32
    _, what, model, side = next(m for m in hf_models() if m[0] == "hf_resnet")
    yield what, model, side


def run(arrays: list[str], n_faults: int, rounds: int) -> list[dict]:
    from flipsafe.inject import Engine

    out = []
    for what, model, side in cases():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 3, side, side, generator=g)
        y = torch.randint(10, (64,), generator=g)
        with torch.no_grad():
            clean = best_rate(lambda m=model, x=x: m(x), len(x), rounds)
        for spec in arrays:
            engine = Engine(model, "fp32", accelerator=spec, chunk=64)
            golden = engine.golden(x, y)
            model_ = "bitflip" if spec.endswith(":transient") else "stuck1"
            faults = engine.sample(n_faults, "pe", "all", model_, images=len(x),
                                   generator=torch.Generator().manual_seed(2))
            engine.run(faults.select(torch.arange(32)), x, y, golden)  # warm-up
            fps = best_rate(lambda e=engine, f=faults, gd=golden, x=x, y=y: e.run(f, x, y, gd),
                            len(faults), max(1, rounds - 1))
            out.append({"model": what, "array": spec, "clean_img_s": clean,
                        "pe_faults_s": fps, "ratio": fps / clean})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--faults", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arrays", default=ARRAYS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.arrays.split(","), args.faults, args.rounds)
    print(f"{'model':<28} {'array':<30} {'clean img/s':>12} {'PE faults/s':>12} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:<28} {r['array']:<30} {r['clean_img_s']:>12.1f} "
              f"{r['pe_faults_s']:>12.1f} {r['ratio']:>6.2f}x")
    print(json.dumps({"threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
