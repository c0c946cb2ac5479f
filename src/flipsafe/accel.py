"""Accelerator faults: which processing element (PE) of a systolic array computes what.

A Conv2d (as its im2col GEMM) or a Linear is the product Y[M, N] = X[M, K] @ W[K, N]
for one image: M output positions (pixels, tokens), K the fan-in, N output channels. An
R x C array computes it in tiles; the dataflow says which two GEMM dims are held still
on the array's rows and columns, and so which products x[m, k] * w[k, n] one PE computes:

- ws (weight-stationary): PE (r, c) holds w[k, n] with k = r (mod R), n = c (mod C), and
  multiplies it by every x[m, k] streamed past (every m);
- os (output-stationary): PE (r, c) accumulates y[m, n] with m = r (mod R), n = c (mod C)
  over every k;
- is (input-stationary): PE (r, c) holds x[m, k] with k = r (mod R), m = c (mod C), and
  multiplies it by every w[k, n] (every n).

A PE fault is permanent (stuck0 / stuck1: one bit of one unit held at 0 or 1 for the
whole layer) in one of the PE's units, held in float32: its `product` (multiplier
output), its `weight` or `input` operand register, or (os only) its `accumulator`, the
output register y[m, n] holds before the bias is added. Every output the PE computes is
then changed: the engine computes the change of each (as a structured perturbation of the
layer's output, batched, without simulating the array) and runs the rest of the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flipsafe.errors import ConfigError, InjectionError
from flipsafe.faults import apply

DATAFLOWS = ("ws", "os", "is")
UNITS = ("product", "weight", "input", "accumulator")
DEFAULT = "ws:16x16:product"
FAULT_MODELS = ("stuck0", "stuck1")  # permanent: a bit of a unit held for the whole layer
# The GEMM dims each dataflow holds on the array's (rows, columns)
_STATIONARY = {"ws": ("k", "n"), "os": ("m", "n"), "is": ("k", "m")}


@dataclass(frozen=True)
class Accelerator:
    """An R x C array with a dataflow, and the PE unit faults hit."""

    dataflow: str = "ws"
    rows: int = 16
    cols: int = 16
    unit: str = "product"

    @property
    def spec(self) -> str:
        """The canonical string plans record, e.g. 'ws:16x16:product'."""
        return f"{self.dataflow}:{self.rows}x{self.cols}:{self.unit}"

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def pe(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of flat PE indices (row-major)."""
        return index // self.cols, index % self.cols


def parse(spec: str | None) -> Accelerator:
    """An Accelerator from 'dataflow:RxC:unit' (any part may be left out: ws, 16x16,
    product); one line naming the choices for anything else."""
    parts = [p.strip().lower() for p in str(spec or DEFAULT).split(":")]
    dataflow, array, unit = "ws", "16x16", "product"
    for part in parts:
        if part in DATAFLOWS:
            dataflow = part
        elif part in UNITS:
            unit = part
        elif re.fullmatch(r"\d+x\d+", part):
            array = part
        else:
            raise ConfigError(f"accelerator {spec!r}: {part!r} is neither a dataflow "
                              f"({', '.join(DATAFLOWS)}), an array RxC (e.g. 16x16) nor a PE "
                              f"unit ({', '.join(UNITS)})")
    rows, cols = (int(v) for v in array.split("x"))
    if not (1 <= rows <= 4096 and 1 <= cols <= 4096):
        raise ConfigError(f"accelerator array {array}: rows and columns from 1 to 4096")
    if unit == "accumulator" and dataflow != "os":
        raise ConfigError("an accumulator holds one output only in the output-stationary "
                          "dataflow; use --dataflow os, or a product/weight/input unit")
    return Accelerator(dataflow, rows, cols, unit)


def gemm_operands(mod, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X [B, M, K], W [K, N]) of a Conv2d (im2col) or Linear layer on inputs `x`."""
    if isinstance(mod, torch.nn.Linear):
        xs = x.reshape(x.shape[0], -1, x.shape[-1])
        return xs, mod.weight.t()
    cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    return cols.transpose(1, 2), mod.weight.reshape(mod.weight.shape[0], -1).t()


def supports(mod) -> str | None:
    """Why a layer is not a GEMM the array computes (None when it is)."""
    if isinstance(mod, torch.nn.Linear):
        return None
    if isinstance(mod, torch.nn.Conv2d):
        if mod.groups != 1:
            return "it is a grouped convolution (only groups=1 maps onto one GEMM here)"
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return "it pads otherwise than with explicit zeros"
        return None
    return "it is not a Conv2d or Linear layer"


def _select(n: int, residue: torch.Tensor, period: int) -> torch.Tensor:
    """[F, ceil(n / period)] indices i < n with i = residue (mod period), padded by -1."""
    width = -(-n // period)
    idx = residue[:, None] + period * torch.arange(width, device=residue.device)
    return torch.where(idx < n, idx, -1)


def _gather(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """t indexed along `dim` by idx (>= 0); padding (-1) reads index 0 (masked later)."""
    return t.index_select(dim, idx.clamp(min=0).reshape(-1)).unflatten(dim, idx.shape)


def output_change(acc: Accelerator, X: torch.Tensor, W: torch.Tensor, pe: torch.Tensor,
                  mask: torch.Tensor, op: torch.Tensor, value: torch.Tensor,
                  golden: torch.Tensor | None = None):
    """Per fault f (on image row X[f], PE pe[f], bits mask/op/value): (m [F, G], n [F, G],
    delta [F, G]) - the outputs y[m, n] the faulty PE changes and by how much (float32).
    Padding entries have m = -1. `golden` [F, M, N] (the GEMM without bias) is needed for
    the accumulator unit, whose value is replaced rather than changed by a sum."""
    M, K, N = X.shape[1], X.shape[2], W.shape[1]
    r, c = acc.pe(pe)
    dims = {"m": M, "k": K, "n": N}
    a, b = _STATIONARY[acc.dataflow]
    sel = {a: _select(dims[a], r, acc.rows), b: _select(dims[b], c, acc.cols)}
    for d in "mkn":  # the streamed dim: all of it
        if d not in sel:
            sel[d] = torch.arange(dims[d], device=X.device).expand(len(pe), dims[d])
    m, k, n = sel["m"], sel["k"], sel["n"]
    rows = torch.arange(len(pe), device=X.device)[:, None]
    x = X[rows[:, :, None], m.clamp(min=0)[:, :, None], k.clamp(min=0)[:, None, :]]  # F,m,k
    w = W[k.clamp(min=0)[:, :, None], n.clamp(min=0)[:, None, :]]  # F,k,n
    ok = (m >= 0)[:, :, None, None] & (k >= 0)[:, None, :, None] & (n >= 0)[:, None, None, :]

    def stuck(t: torch.Tensor) -> torch.Tensor:
        shape = t.shape
        bits = t.contiguous().view(torch.int32).reshape(shape[0], -1).to(torch.int64)
        out = apply(bits, mask[:, None], op[:, None], value[:, None])
        return out.to(torch.int32).view(torch.float32).reshape(shape)

    if acc.unit == "accumulator":
        if golden is None:
            raise InjectionError("accumulator faults need the layer's clean GEMM values")
        y = golden[rows[:, :, None], m.clamp(min=0)[:, :, None], n.clamp(min=0)[:, None, :]]
        delta = stuck(y) - y
        valid = (m >= 0)[:, :, None] & (n >= 0)[:, None, :]
    else:
        p = x[:, :, :, None] * w[:, None, :, :]  # F, m, k, n products at the PE
        if acc.unit == "product":
            faulty = stuck(p)
        elif acc.unit == "weight":
            faulty = x[:, :, :, None] * stuck(w)[:, None, :, :]
        else:
            faulty = stuck(x)[:, :, :, None] * w[:, None, :, :]
        delta = torch.where(ok, faulty - p, 0.0).sum(2)
        valid = (m >= 0)[:, :, None] & (n >= 0)[:, None, :]
    mm = torch.where(valid, m[:, :, None].expand_as(delta), -1)
    nn = n[:, None, :].expand_as(delta)
    return mm.reshape(len(pe), -1), nn.reshape(len(pe), -1), delta.reshape(len(pe), -1)
