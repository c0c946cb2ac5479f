"""The exhaustive last-layer run against an earlier commit, paired in one run on one machine."""

# Every (weight, bit) fault of the classifier on the same images, timed in alternating
# subprocesses: one imports flipsafe from this checkout, the other from `--ref` (default
# 32cf76e, the commit before the engine was rebuilt), unpacked with `git archive` into a
# temporary folder. Both must find the same SDC and DUE counts (exit 1 otherwise); the
# ratio printed is the median over rounds of this checkout's pairs/s over the reference's.
#
#     python benchmarks/last_layer.py [--ref 32cf76e] [--rounds 5] [--threads 2] [--images 64]

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess with PYTHONPATH set to one tree's src: the API both trees share.
WORKER = r"""
import json, sys, time, torch
from flipsafe import models
from flipsafe.inject import Engine
arch, n_img, threads, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(seed)
model = models.build(arch, 10).eval()
gen = torch.Generator().manual_seed(seed)
images = torch.randn(n_img, 3, 32, 32, generator=gen)
labels = torch.randint(10, (n_img,), generator=gen)
engine = Engine(model, "fp32")
engine.exhaustive_last_layer(images[:2], labels[:2])  # warm-up: capture, first kernels
start = time.perf_counter()
ex = engine.exhaustive_last_layer(images, labels)
secs = time.perf_counter() - start
out = ex.outcomes
print(json.dumps({"pairs": int(out.sdc.numel()), "secs": secs,
                  "sdc": int(out.sdc.sum()), "due": int(out.due.sum())}))
"""


def unpack(rev: str, into: Path) -> Path:
    """`git archive` of rev's src into `into`; returns the src folder."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True,
                          capture_output=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def measure(src: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", WORKER, args.arch, str(args.images),
                           str(args.threads), str(args.seed)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ref", default="32cf76e", help="the commit to compare with")
    ap.add_argument("--arch", default="resnet18", help="a flipsafe architecture")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"ref": unpack(args.ref, Path(tmp)), "head": ROOT / "src"}
        runs = {"ref": [], "head": []}
        for r in range(args.rounds):
            for name in (("ref", "head") if r % 2 == 0 else ("head", "ref")):
                runs[name].append(measure(trees[name], args))
    counts = {k: {(m["pairs"], m["sdc"], m["due"]) for m in v} for k, v in runs.items()}
    rate = {k: [m["pairs"] / m["secs"] for m in v] for k, v in runs.items()}
    ratio = statistics.median(h / r for h, r in zip(rate["head"], rate["ref"]))
    (pairs, sdc, due), = counts["head"]
    print(f"exhaustive last layer, {args.arch}, {args.images} images, {pairs:,} pairs, "
          f"{args.threads} threads")
    for k in ("ref", "head"):
        label = args.ref if k == "ref" else "this checkout"
        print(f"  {label:<14} {statistics.median(rate[k]):12,.0f} pairs/s  "
              f"(SDC {min(counts[k])[1]}, DUE {min(counts[k])[2]})")
    same = counts["ref"] == counts["head"]
    print(f"  ratio {ratio:.2f}x; outcome counts {'identical' if same else 'DIFFER'}")
    print(json.dumps({"last_layer_vs_ref": round(ratio, 3), "ref": args.ref,
                      "same_outcomes": same, "pairs": pairs, "sdc": sdc, "due": due}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
