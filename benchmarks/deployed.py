"""Deployed int8 models: campaign speed against the same model's clean inference, and
`verify` agreement with the runtime, on a PT2E program and its ONNX (QDQ) twin.

    python benchmarks/deployed.py [--arch resnet18] [--faults 2000] [--threads 2]
                                  [--verify-only] [--speed-only]

Speed: a CIFAR-size model (default the built-in resnet18, random weights, 3x32x32), PT2E
quantized with torchao's X86 Inductor quantizer and ONNX-quantized with ONNX Runtime's
quantize_static (QDQ, per-channel int8 weights, uint8 activations). For each, clean
inference of the deployed runtime (the saved program's module in torch; an ONNX Runtime
session) in images/s on batches of 64, and flipsafe's activation-code faults/s
(format native, suffix runs), measured in the same run; the ratio is faults/s over
clean images/s. Verify: the tests' tiny CNN, one campaign per site, every row replayed
in ONNX Runtime with and without its graph optimizations, and on the PT2E program.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deployed"))


def quantize_both(model, x, folder: Path):
    """(PT2E .pt2, QDQ .onnx) of `model`, calibrated on `x` (the tests' two flows)."""
    from deployed_models import onnx_files, pt2e_program

    pt2 = folder / "model_int8.pt2"
    torch.export.save(pt2e_program(model, [x]), str(pt2))
    return pt2, onnx_files(folder, model, [x])[1]


def rate(fn, items: int, rounds: int = 3) -> float:
    """Best of `rounds` of items/s."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def speed(arch: str, n_faults: int) -> list[dict]:
    import onnxruntime as ort

    from flipsafe import models
    from flipsafe.campaign.targets import resolve
    from flipsafe.inject import Engine

    torch.manual_seed(0)
    model = models.build(arch, 10, in_channels=3, image_size=32).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.randint(10, (64,), generator=g)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        pt2, onnx_file = quantize_both(model, x, Path(tmp))
        for spec in (f"export:{pt2}", f"onnx:{onnx_file}"):
            target = resolve(spec)
            if target.kind == "onnx":
                session = ort.InferenceSession(str(onnx_file),
                                               providers=["CPUExecutionProvider"])
                clean = rate(lambda s=session: s.run(None, {"input": x.numpy()}), len(x))
                runtime = "onnxruntime"
            else:
                module = target.program.module()
                with torch.no_grad():
                    clean = rate(lambda m=module: m(x), len(x))
                runtime = "torch (PT2E program)"
            engine = Engine(target.load(), "native", chunk=64, input_shape=(3, 32, 32))
            golden = engine.golden(x, y)
            faults = engine.sample(n_faults, "activations", "all", "bitflip", images=len(x),
                                   generator=torch.Generator().manual_seed(2))
            engine.run(faults.select(torch.arange(64)), x, y, golden)  # warm-up
            fps = rate(lambda e=engine, f=faults, g=golden: e.run(f, x, y, g), len(faults),
                       rounds=2)
            out.append({"model": f"{arch} int8 {target.kind}", "runtime": runtime,
                        "clean_img_s": clean, "faults_s": fps, "ratio": fps / clean})
    return out


def agreement() -> list[dict]:
    from deployed_models import onnx_files, pt2e_program

    from flipsafe.cli import main
    from flipsafe.deployed import verify

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, onnx_int8 = onnx_files(tmp)
        pt2 = tmp / "tiny.pt2"
        torch.export.save(pt2e_program(), str(pt2))
        for spec, runs in ((f"onnx:{onnx_int8}", (True, False)), (f"export:{pt2}", (True,))):
            for site in ("weights", "weight_metadata", "weight_zero_points", "activations",
                         "metadata", "zero_points"):
                res = tmp / f"{spec[:4]}-{site}"
                with contextlib.redirect_stdout(io.StringIO()):
                    main(["campaign", spec, "--dataset", "digits", "--site", site, "--n",
                          "100", "--out", str(res), "--seed", "3", "--quiet"])
                for optimize in runs:
                    v = verify.run(res, n=None, optimize=optimize)
                    out.append({"model": spec.split(":")[0], "site": site, "runtime": v.runtime,
                                "rows": v.rows,
                                **{c: v.agree[c] / v.rows for c in verify.COLUMNS}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--faults", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--verify-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads}
    if not args.verify_only:
        result["speed"] = speed(args.arch, args.faults)
        print(f"{'model':<24} {'runtime':<22} {'clean img/s':>12} {'faults/s':>10} {'ratio':>7}")
        for r in result["speed"]:
            print(f"{r['model']:<24} {r['runtime']:<22} {r['clean_img_s']:>12.1f} "
                  f"{r['faults_s']:>10.1f} {r['ratio']:>6.2f}x")
    if not args.speed_only:
        result["verify"] = agreement()
        print(f"\n{'model':<7} {'site':<19} {'rows':>5} {'sdc':>7} {'top1':>7} {'loss':>7}  runtime")
        for r in result["verify"]:
            print(f"{r['model']:<7} {r['site']:<19} {r['rows']:>5} {100 * r['sdc']:>6.1f}% "
                  f"{100 * r['faulty_top1']:>6.1f}% {100 * r['faulty_loss']:>6.1f}%  "
                  f"{r['runtime']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
