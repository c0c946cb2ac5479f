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
  multiplies it by every w[k, n] (every n);
- mma (a GPU tensor core's m16n8 tile, MMA_LANES): lane 4 g + t accumulates the outputs
  of rows g, g + 8 and columns 2t, 2t + 1 of every 16 x 8 output tile, over every k.

A PE fault is permanent (stuck0 / stuck1: one bit of one unit held at 0 or 1 for the
whole layer) or transient (bitflip, bitflipK, burstK: one event at one time step of the
PE, see `events`), in one of the PE's units, held in float32: its `product` (multiplier
output), its `weight` or `input` operand register, or (os only) its `accumulator`, the
output register y[m, n] holds before the bias is added (os and mma). Every output the PE computes is
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

DATAFLOWS = ("ws", "os", "is", "mma")
UNITS = ("product", "weight", "input", "accumulator")
DEFAULT = "ws:16x16:product"
PERMANENT = ("stuck0", "stuck1")  # a bit of a unit held for the whole layer; flips: transient
# The GEMM dims each dataflow holds on the array's (rows, columns)
_STATIONARY = {"ws": ("k", "n"), "os": ("m", "n"), "is": ("k", "m"), "mma": ("m", "n")}
# A GPU tensor core's m16n8 MMA tile (PTX mma.m16n8k16, float32 accumulators): lane
# l = 4 g + t of the 32 holds outputs (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1) of
# every 16 x 8 output tile - an output-stationary grid of 8 x 4 lanes whose columns are
# pairs of outputs.
MMA_LANES = (8, 4)
_COLUMN_BLOCK = {"mma": 2}


@dataclass(frozen=True)
class Accelerator:
    """An R x C array with a dataflow, and the PE unit faults hit."""

    dataflow: str = "ws"
    rows: int = 16
    cols: int = 16
    unit: str = "product"
    transient: bool = False  # one event at a time step (see events), else the whole layer

    @property
    def spec(self) -> str:
        """The canonical string plans record, e.g. 'ws:16x16:product' ('...:transient')."""
        return (f"{self.dataflow}:{self.rows}x{self.cols}:{self.unit}"
                + (":transient" if self.transient else ""))

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def pe(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of flat PE indices (row-major)."""
        return index // self.cols, index % self.cols


def parse(spec) -> Accelerator:
    """An Accelerator from 'dataflow:RxC:unit[:transient]' (any part may be left out: ws,
    16x16, product, permanent), or the Accelerator given; one line naming the choices for
    anything else."""
    if isinstance(spec, Accelerator):
        return spec
    parts = [p.strip().lower() for p in str(spec or DEFAULT).split(":")]
    dataflow, array, unit, transient = "ws", "16x16", "product", False
    for part in parts:
        if part in ("transient", "permanent"):
            transient = part == "transient"
        elif part in DATAFLOWS:
            dataflow = part
        elif part in UNITS:
            unit = part
        elif re.fullmatch(r"\d+x\d+", part):
            array = part
        else:
            raise ConfigError(f"accelerator {spec!r}: {part!r} is neither a dataflow "
                              f"({', '.join(DATAFLOWS)}), an array RxC (e.g. 16x16), a PE "
                              f"unit ({', '.join(UNITS)}) nor transient/permanent")
    if dataflow == "mma":
        if array not in ("16x16", "8x4"):
            raise ConfigError("mma is the m16n8 tile of a tensor core: 32 lanes as 8 x 4; "
                              "leave --array out")
        array = "8x4"
    rows, cols = (int(v) for v in array.split("x"))
    if not (1 <= rows <= 4096 and 1 <= cols <= 4096):
        raise ConfigError(f"accelerator array {array}: rows and columns from 1 to 4096")
    if unit == "accumulator" and dataflow not in ("os", "mma"):
        raise ConfigError("an accumulator holds one output only in the output-stationary "
                          "dataflow; use --dataflow os, or a product/weight/input unit")
    return Accelerator(dataflow, rows, cols, unit, transient)


def codes(acc: Accelerator, fmt):
    """What a PE fault flips bits of, shaped as a format: float32's bits on a float model;
    on a quantized one (format native), the int32 two's complement of products and
    accumulators, or the 8-bit codes of the weight and input registers."""
    from flipsafe import formats

    if fmt.native and acc.unit in ("product", "accumulator"):
        return formats.get("fixed_q32.0")
    return fmt


def gemm_operands(mod, x: torch.Tensor, weight: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(X [B, M, K], W [K, N]) of a Conv2d (im2col) or Linear layer on inputs `x`, with
    `weight` in place of the layer's own (int8 codes, say)."""
    w = mod.weight if weight is None else weight
    if isinstance(mod, torch.nn.Linear):
        xs = x.reshape(x.shape[0], -1, x.shape[-1])
        return xs, w.t()
    cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    return cols.transpose(1, 2), w.reshape(w.shape[0], -1).t()


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


def _select(n: int, residue: torch.Tensor, period: int, block: int = 1) -> torch.Tensor:
    """[F, width] indices i < n whose block of `block` consecutive indices is `residue`
    (mod period): i // block = residue (mod period); padded by -1."""
    width = -(-n // (period * block)) * block
    j = torch.arange(width, device=residue.device)
    idx = (residue[:, None] + period * (j // block)) * block + j % block
    return torch.where(idx < n, idx, -1)


def selections(acc: Accelerator, dims: dict, pe: torch.Tensor) -> dict:
    """{dim: [F, width] indices} of the GEMM dims the PE of each fault works on (the two
    stationary dims: its residues, padded by -1; the streamed dim: all of it)."""
    r, c = acc.pe(pe)
    a, b = _STATIONARY[acc.dataflow]
    sel = {a: _select(dims[a], r, acc.rows),
           b: _select(dims[b], c, acc.cols, _COLUMN_BLOCK.get(acc.dataflow, 1))}
    for d in "mkn":
        if d not in sel:
            sel[d] = torch.arange(dims[d], device=pe.device).expand(len(pe), dims[d])
    return sel


def events(acc: Accelerator) -> tuple[str, ...]:
    """The dims one transient event takes a single index of, in the order its time step
    counts them; it lasts over the others. A stationary register (ws weight, is input)
    holds one value for a whole tile pass; streamed registers and the multiplier hold one
    value for one product; the os accumulator holds one output's partial sum at one step."""
    if acc.unit == "weight" and acc.dataflow == "ws":
        return ("k", "n")
    if acc.unit == "input" and acc.dataflow == "is":
        return ("k", "m")
    if acc.unit == "accumulator":
        return ("m", "n", "k")
    return ("m", "k", "n")


def time_steps(acc: Accelerator, M: int, K: int, N: int) -> int:
    """Transient faults: events per PE (the busiest PE's; others idle at the rest)."""
    sel = selections(acc, {"m": M, "k": K, "n": N}, torch.zeros(1, dtype=torch.int64))
    out = 1
    for d in events(acc):
        out *= sel[d].shape[1]
    return out


def _narrow(acc: Accelerator, sel: dict, step: torch.Tensor) -> dict:
    """The selections with each event dim cut to the one index of time `step` (-1 where
    the PE is idle then)."""
    out = dict(sel)
    rest = step.clone()
    for d in reversed(events(acc)):
        width = sel[d].shape[1]
        pick = sel[d].gather(1, (rest % width)[:, None])
        out[d] = pick
        rest = rest // width
    idle = torch.zeros_like(step, dtype=torch.bool)
    for d in events(acc):
        idle |= out[d][:, 0] < 0
    for d in events(acc):
        out[d] = torch.where(idle[:, None], -1, out[d])
    return out


class Float32:
    """A float32 PE: operands, products and sums are float32, a fault hits their bits."""

    dtype = torch.float32

    def hold(self, t: torch.Tensor, role: str, mask, op, value) -> torch.Tensor:
        shape = t.shape
        bits = t.contiguous().view(torch.int32).reshape(shape[0], -1).to(torch.int64)
        out = apply(bits, mask[:, None], op[:, None], value[:, None])
        return out.to(torch.int32).view(torch.float32).reshape(shape)


@dataclass(frozen=True)
class Int8:
    """An int8 PE of a quantized model: it multiplies the input code minus its zero point
    (`input_zero`) by the int8 weight code, and products and the accumulator are int32.
    Values are held as float64 integers (exact); a fault hits the weight's int8 code, the
    input's 8-bit code, or the int32 two's complement of a product or partial sum."""

    input_zero: int = 0
    input_signed: bool = False
    dtype = torch.float64

    def hold(self, t: torch.Tensor, role: str, mask, op, value) -> torch.Tensor:
        shape = t.shape
        v = t.reshape(shape[0], -1).round().to(torch.int64)
        if role == "input":
            v = v + self.input_zero  # the stored code
        width = 32 if role in ("product", "accumulator") else 8
        out = apply(v & ((1 << width) - 1), mask[:, None], op[:, None], value[:, None])
        out = out & ((1 << width) - 1)
        signed = role != "input" or self.input_signed
        if signed:
            out = torch.where(out >= 1 << (width - 1), out - (1 << width), out)
        if role == "input":
            out = out - self.input_zero
        return out.to(torch.float64).reshape(shape)


FLOAT32 = Float32()


def output_change(acc: Accelerator, X: torch.Tensor, W: torch.Tensor, pe: torch.Tensor,
                  mask: torch.Tensor, op: torch.Tensor, value: torch.Tensor,
                  golden: torch.Tensor | None = None, step: torch.Tensor | None = None,
                  arith=FLOAT32):
    """Per fault f (on image row X[f], PE pe[f], bits mask/op/value): (m [F, G], n [F, G],
    delta [F, G]) - the outputs y[m, n] the faulty PE changes and by how much (float32).
    Padding entries have m = -1. `step` [F] makes the faults transient: one event at that
    time step (see events), instead of the unit held for the whole layer. `golden`
    [F, M, N] (the GEMM without bias) is needed for the permanent accumulator, whose value
    is replaced rather than changed by a sum. `arith` is the PE's number system (FLOAT32,
    or Int8 with X and W the integer operands, when delta is the accumulator's change)."""
    M, K, N = X.shape[1], X.shape[2], W.shape[1]
    sel = selections(acc, {"m": M, "k": K, "n": N}, pe)
    if step is not None:
        sel = _narrow(acc, sel, step)
    m, k, n = sel["m"], sel["k"], sel["n"]
    rows = torch.arange(len(pe), device=X.device)[:, None]
    x = X[rows[:, :, None], m.clamp(min=0)[:, :, None], k.clamp(min=0)[:, None, :]]  # F,m,k
    w = W[k.clamp(min=0)[:, :, None], n.clamp(min=0)[:, None, :]]  # F,k,n
    ok = (m >= 0)[:, :, None, None] & (k >= 0)[:, None, :, None] & (n >= 0)[:, None, None, :]

    def stuck(t: torch.Tensor, role: str) -> torch.Tensor:
        return arith.hold(t, role, mask, op, value)

    valid = (m >= 0)[:, :, None] & (n >= 0)[:, None, :]
    if acc.unit == "accumulator" and step is not None:
        # the partial sum of y[m, n] after products k' <= k, in the array's order
        ks = torch.arange(K, device=X.device)
        row = X[rows[:, :, None], m.clamp(min=0)[:, :, None], ks[None, None, :]]  # F,1,K
        col = W[ks[None, :, None], n.clamp(min=0)[:, None, :]]  # F,K,1
        prefix = (row[:, 0, :] * col[:, :, 0]).cumsum(1)
        part = prefix.gather(1, k.clamp(min=0))[:, :, None]  # F,1,1
        delta = torch.where(valid, stuck(part, "accumulator") - part, 0.0)
    elif acc.unit == "accumulator":
        if golden is None:
            raise InjectionError("accumulator faults need the layer's clean GEMM values")
        y = golden[rows[:, :, None], m.clamp(min=0)[:, :, None], n.clamp(min=0)[:, None, :]]
        delta = stuck(y, "accumulator") - y
    else:
        p = x[:, :, :, None] * w[:, None, :, :]  # F, m, k, n products at the PE
        if acc.unit == "product":
            faulty = stuck(p, "product")
        elif acc.unit == "weight":
            faulty = x[:, :, :, None] * stuck(w, "weight")[:, None, :, :]
        else:
            faulty = stuck(x, "input")[:, :, :, None] * w[:, None, :, :]
        delta = torch.where(ok, faulty - p, 0.0).sum(2)
    mm = torch.where(valid, m[:, :, None].expand_as(delta), -1)
    nn = n[:, None, :].expand_as(delta)
    return mm.reshape(len(pe), -1), nn.reshape(len(pe), -1), delta.reshape(len(pe), -1)
