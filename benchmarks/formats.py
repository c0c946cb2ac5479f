"""Throughput of encode + one random bit flip per element + decode, against the per-scalar way."""

from __future__ import annotations

import argparse
import os
import struct
import time

import numpy as np
import torch

from flipsafe import formats

FORMATS = [
    "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "float_e3m2fin", "int8", "int4",
    "int8_channel", "fixed_q8.8", "bfp8", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3",
    "mxfp6_e3m2", "mxfp4_e2m1", "mxint8",
]


def vectorised(fmt, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    enc = fmt.encode(x)
    enc.codes = formats.flip_bits(enc.codes, None, mask)
    return fmt.decode(enc)


def tensorfi2_bitflip(f: float, pos: int) -> float:
    """TensorFI 2's single bit flip of a 32-bit float, through struct and its four bytes."""
    b = list(struct.unpack("BBBB", struct.pack("f", f)))
    q, r = divmod(pos, 8)
    b[q] ^= 1 << r
    return struct.unpack("f", struct.pack("BBBB", *b))[0]


def torchei_bitflip(f: float, pos: int) -> float:
    """TorchEI's single bit flip: struct to a '0'/'1' string, swap one character, back."""
    bits = bin(struct.unpack("!I", struct.pack("!f", f))[0])[2:].zfill(32)
    bits = bits[:pos] + ("0" if bits[pos] == "1" else "1") + bits[pos + 1:]
    return struct.unpack("!f", struct.pack("!I", int(bits, 2)))[0]


def per_scalar_tensorfi2(x: torch.Tensor, index: np.ndarray, bits: np.ndarray) -> torch.Tensor:
    """Each chosen element read from the array, flipped, written back, one at a time."""
    a = x.numpy().copy()
    flat = a.reshape(-1)
    for i, b in zip(index.tolist(), bits.tolist()):
        flat[i] = tensorfi2_bitflip(float(flat[i]), b)
    return torch.from_numpy(a)


def per_scalar_torchei(x: torch.Tensor, index: np.ndarray, bits: np.ndarray) -> torch.Tensor:
    """TorchEI's loop: element .item(), flip, assign back into the tensor."""
    w = x.clone().reshape(-1)
    for i, b in zip(index.tolist(), bits.tolist()):
        w[i] = torchei_bitflip(w[i].item(), b)
    return w.reshape(x.shape)


def interleaved_best(jobs: dict, rounds: int) -> dict:
    """Fastest of `rounds` timings of each job, the jobs taking turns round by round, so
    that a burst of load from other processes slows every job once rather than wiping out
    one job's timings."""
    best = dict.fromkeys(jobs, float("inf"))
    for fn in jobs.values():
        fn()  # warm-up (lookup tables, allocator)
    for _ in range(rounds):
        for key, fn in jobs.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--elements", type=int, default=4 * 2**20)
    ap.add_argument("--scalar-sample", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--scalar-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="*", default=FORMATS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.elements // 1024, 1024, generator=g) * 4.0
    n = x.numel()
    sample = torch.randperm(n, generator=g)[: args.scalar_sample].numpy()
    # PyTorch's switch for huge-page tensor allocations; with 4 KiB pages, first-touch page
    # faults on the fresh 16 MiB outputs are a large part of the vectorised time.
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(f"{n:,} random float32 elements, shape {tuple(x.shape)}, {args.threads} threads, "
          f"THP_MEM_ALLOC_ENABLE={thp}; vectorised: encode + flip_bits + decode, fastest of "
          f"{args.repeats} rounds.")
    print(f"Per-scalar ways (TensorFI 2's struct bitflip; TorchEI's struct-string flip) timed "
          f"on {len(sample):,} of the same elements with the same bits, fastest of "
          f"{args.scalar_repeats} rounds, extrapolated per element; they flip the fp32 "
          "pattern and do no format conversion, so they are a lower bound on their cost in "
          "other formats.")
    vec, tfi, tei = {}, {}, {}
    for name in args.formats:
        fmt = formats.get(name)
        bits = torch.randint(0, fmt.bits, (n,), generator=g)
        # One random bit per element; the per-scalar ways get their bit positions ready too.
        mask = formats.bit_mask(bits).to(torch.int32)
        vec[name] = lambda fmt=fmt, mask=mask: vectorised(fmt, x, mask)
        pos = np.minimum(bits.numpy()[sample], 31)
        tfi[name] = lambda pos=pos: per_scalar_tensorfi2(x, sample, pos)
        # (TorchEI's string counts bits from the most significant end.)
        tei[name] = lambda pos=pos: per_scalar_torchei(x, sample, 31 - pos)
    load = os.getloadavg()[0]
    t_vec = interleaved_best(vec, args.repeats)
    t_tfi = interleaved_best(tfi, args.scalar_repeats)
    t_tei = interleaved_best(tei, args.scalar_repeats)
    head = f"{'format':<15}{'Melem/s':>9}{'struct elem/s':>15}{'ratio':>8}"
    print(f"{head}{'TorchEI elem/s':>16}{'ratio':>8}")
    for name in args.formats:
        rate = n / t_vec[name]
        r_tfi, r_tei = len(sample) / t_tfi[name], len(sample) / t_tei[name]
        print(f"{name:<15}{rate / 1e6:>9.1f}{r_tfi:>15,.0f}{rate / r_tfi:>7.0f}x"
              f"{r_tei:>16,.0f}{rate / r_tei:>7.0f}x")
    # Other processes on the same cores slow both ways; the load tells how quiet it was.
    print(f"1-minute load average: {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
