"""The GPU check, in one short script (a few minutes on one GPU): CUDA tests, then the same
activation and weight faults on the GPU and on the CPU, compared row by row, and each
device's throughput over its own clean inference.

    python benchmarks/gpu.py [--faults 4096] [--weight-faults 64] [--threads 2]

Exit 0: every row agrees, or each difference is a near-tie (the two top classes of the
golden or the faulty logits within float rounding of each other, where the devices'
different summation orders may pick either); exit 1 otherwise; exit 2 without a GPU.
The last line is one JSON object with the figures, for the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from flipsafe import models
from flipsafe.inject import Engine

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_cuda.py", "tests/formats/test_formats_registry.py::test_cuda_matches_cpu"]
# Two top logits closer than this are a near-tie (the model's logits are of order 1): fp32
# sums of a few thousand terms in another order differ by a few units in the last place.
NEAR_TIE = 1e-4


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def clean_rate(model, images, device, batch=64):
    model = model.to(device)
    x = images.to(device)

    def run():
        with torch.no_grad():
            for s in range(0, x.shape[0], batch):
                model(x[s:s + batch])
    run()
    return x.shape[0] / min(timed(run, device)[1] for _ in range(3))


def campaign(model, faults, images, labels, device):
    """Outcomes (on the CPU) and faults/s of `faults` on `device`."""
    engine = Engine(model, "fp32", device=device, input_shape=tuple(images.shape[1:]))
    engine.run(faults.select(slice(0, 64)), images, labels)  # warm-up: capture, kernels
    out, secs = timed(lambda: engine.run(faults, images, labels), torch.device(device))
    return out.to("cpu"), len(faults) / secs


def compare(cpu, gpu) -> dict:
    """Rows whose outcome columns differ, and how many of them are near-ties."""
    differ = (cpu.sdc != gpu.sdc) | (cpu.due != gpu.due) | (cpu.faulty_top1 != gpu.faulty_top1)
    tie = ((cpu.faulty_top2diff.abs() < NEAR_TIE) | (gpu.faulty_top2diff.abs() < NEAR_TIE)
           | (cpu.golden_top2diff.abs() < NEAR_TIE))
    rows = differ.nonzero().reshape(-1).tolist()
    return {"rows": len(cpu.sdc), "differ": len(rows),
            "near_ties": int((differ & tie).sum()), "unexplained": rows[:20] if
            int((differ & ~tie).sum()) else [],
            "sdc_cpu": int(cpu.sdc.sum()), "sdc_gpu": int(gpu.sdc.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=4096, help="activation faults")
    ap.add_argument("--weight-faults", type=int, default=64, help="weight faults, each on "
                                                                  "32 images")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the CPU side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu.py: torch sees no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    card = torch.cuda.get_device_name(0)
    print(f"{card}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    result = {"card": card, "torch": torch.__version__}
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", *CUDA_TESTS], cwd=ROOT,
                               check=False)
        result["cuda_tests"] = "passed" if tests.returncode == 0 else "FAILED"
    torch.manual_seed(args.seed)
    model = models.build("resnet18", 10).eval()
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, 32, 32, generator=gen)
    labels = torch.randint(10, (args.images,), generator=gen)
    probe = Engine(model, "fp32", input_shape=(3, 32, 32))
    act = probe.sample(args.faults, "activations", "Conv2d|Linear", "bitflip",
                       images=torch.arange(args.faults) % args.images, generator=gen)
    act = act.select(torch.argsort(act.layer, stable=True))
    per = 32
    base = probe.sample(args.weight_faults, "weights", "Conv2d|Linear", "bitflip",
                        images=torch.zeros(args.weight_faults, dtype=torch.long),
                        generator=gen)
    wts = base.select(torch.arange(len(base)).repeat_interleave(per)).with_image(
        torch.arange(per).repeat(len(base)))
    ok = result.get("cuda_tests", "passed") == "passed"
    for name, faults in (("activations", act), ("weights", wts)):
        rates = {}
        outs = {}
        for dev in ("cpu", "cuda"):
            outs[dev], rates[dev] = campaign(model, faults, images, labels, dev)
            rates[dev] /= clean_rate(model, images, torch.device(dev))
        agree = compare(outs["cpu"], outs["cuda"])
        ok = ok and not agree["unexplained"]
        result[name] = {"vs_clean_cpu": round(rates["cpu"], 2),
                        "vs_clean_gpu": round(rates["cuda"], 2), **agree}
        print(f"{name}: {agree['rows']} rows, {agree['differ']} differ "
              f"({agree['near_ties']} near-ties); SDC cpu {agree['sdc_cpu']}, gpu "
              f"{agree['sdc_gpu']}; throughput / clean: cpu {rates['cpu']:.2f}x, "
              f"gpu {rates['cuda']:.2f}x")
        if agree["unexplained"]:
            print(f"  rows differing without a near-tie (first 20): {agree['unexplained']}")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
