"""What each protection costs on a model: extra FLOPs counted from the model, extra stored bits,
and the latency and accuracy of clean inference with and without it, measured here on the CPU.

A *selection* says where each protection acts: ``{protection name: {layer name: None (the
whole layer) or a list of output channels}}`` (layer names as ``model.named_modules()``
gives them; output channels along dim 1 of a Conv's output and the last dim of a Linear's).
`measure` (or `for_plan`, what a campaign calls) returns a `CostReport`; its `to_json()` is
what a results folder records (`store.write_cost`, manifest key ``"cost"``).

FLOPs are counted on one image with forward hooks and a function mode: Conv 2*Cin/groups*
prod(kernel) per output value, ConvTranspose 2*Cout/groups*prod(kernel) per input value,
Linear 2*in_features per output value, BatchNorm 2 per value (a folded scale and shift),
LayerNorm/GroupNorm/InstanceNorm 8 per value, F.normalize 3 per value, nn.MultiheadAttention
its four projections and two attention products, and matmul / bmm / F.linear /
scaled_dot_product_attention called outside those modules (a hand-written attention's
products). Bias additions, element-wise activations and pooling are not counted, as in the
usual counters. Extra FLOPs of a protection per image:

- ranger, clip: 2 comparisons per protected output value;
- abft (Conv/Linear only): one convolution (or product) with the filters summed over the
  protected output channels, the protected channels' outputs summed per output position, and
  one comparison per position and group;
- dup: the protected layers' (or channels') FLOPs again and one comparison per value;
- tmr: the protected FLOPs twice and a 3-comparison majority vote per value;
- ecc, parity: none in the model (decoders in the memory hardware).

Extra memory, as a fraction of the model's parameter bits: ecc 8 check bits and parity 1 per
64-bit word of the protected layers' stored weights (words packed per tensor, as
`flipsafe.protect.ecc` packs them); abft the summed filters and summed biases at the weights'
width; ranger and clip two 32-bit bounds per protected layer (or per channel with per=channel
or a channel list); dup and tmr none (every copy reads the same stored weights).

Latency and accuracy come from real PyTorch implementations (forward hooks on a deep copy:
clamp, clip, checksum convolution and comparison, recomputation and comparison, two
recomputations and a median vote) timed against the clean copy on the same batch, repeats
interleaved, a few seconds in all, the fastest repeat of each kept: CPU emulation figures on
this machine, not accelerator figures.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from flipsafe.compat import BatchNorm, ConvNd, InstanceNorm
from flipsafe.errors import ConfigError
from flipsafe.protect.registry import get as get_protection
from flipsafe.protect.registry import registered
from flipsafe.protect.spec import Protection, parse

LABEL = "CPU emulation figures on this machine, not accelerator figures"
# Operations per value: a clamp or a clip compares with both bounds, dup compares once, a
# majority vote of three compares pairwise.
GUARD_FLOPS = 2
COMPARE_FLOPS = 1
VOTE_FLOPS = 3
BATCHNORM_FLOPS = 2
NORM_FLOPS = 8  # mean 1, variance 3, normalise 2, affine 2
NORMALIZE_FLOPS = 3  # square, sum, divide
BOUND_BITS = 32
ECC_BITS, PARITY_BITS, WORD_BITS = 8, 1, 64
# Relative tolerance of a comparison between two computations of the same values (dup, and
# abft's checksum): far above fp32 reassociation error, far below a flipped exponent bit.
RTOL = 1e-4

_BATCHNORMS = (BatchNorm,)
_NORMS = (nn.LayerNorm, nn.GroupNorm, InstanceNorm)
_COUNTED = (ConvNd, nn.Linear, nn.MultiheadAttention) + _BATCHNORMS + _NORMS

Selection = dict[str, dict[str, "list[int] | None"]]


# -- FLOPs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one image through a model: `total`, and per module name (every module,
    inner ones included) its own and its descendants' FLOPs and the shape of its output."""

    total: int
    layers: dict[str, int]
    shapes: dict[str, tuple[int, ...]]

    def of(self, name: str) -> int:
        return self.layers.get(name, 0)


def module_flops(mod: nn.Module, inputs: tuple, out) -> int:
    """FLOPs of one call of a Conv, ConvTranspose, Linear, norm or nn.MultiheadAttention
    (see the module doc), counted from its inputs and output; 0 for other modules."""
    if isinstance(mod, ConvNd):
        k = math.prod(mod.kernel_size)
        if mod.transposed:
            return 2 * inputs[0].numel() * (mod.out_channels // mod.groups) * k
        return 2 * _first(out).numel() * (mod.in_channels // mod.groups) * k
    if isinstance(mod, nn.Linear):
        return 2 * _first(out).numel() * mod.in_features
    if isinstance(mod, _BATCHNORMS):
        return BATCHNORM_FLOPS * _first(out).numel()
    if isinstance(mod, _NORMS):
        return NORM_FLOPS * _first(out).numel()
    if isinstance(mod, nn.MultiheadAttention):
        q, k_ = inputs[:2]
        e = mod.embed_dim
        lq, lk = q.numel() // e, k_.numel() // mod.kdim
        batch = 1 if q.dim() == 2 else q.shape[0 if mod.batch_first else 1]
        projections = 2 * e * (lq * e + lk * mod.kdim + lk * mod.vdim + lq * e)
        attention = 2 * 2 * (lq * lk // max(batch, 1)) * e  # scores and weighted sum
        return projections + attention
    return 0


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _matmul_flops(func, args, kwargs, result) -> int:
    if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                torch.bmm, torch.Tensor.mm, torch.Tensor.bmm):
        a = args[0]
        return 2 * result.numel() * a.shape[-1] if isinstance(result, torch.Tensor) else 0
    if func is F.linear:
        return 2 * result.numel() * args[0].shape[-1]
    if func is F.scaled_dot_product_attention:
        q, k, v = args[:3]
        scores = q.numel() // q.shape[-1] * k.shape[-2]
        return 2 * scores * q.shape[-1] + 2 * scores * v.shape[-1]
    if func is F.normalize:
        return NORMALIZE_FLOPS * args[0].numel()
    return 0


class _Products(TorchFunctionMode):
    """Counts matrix products (and F.normalize) called outside the modules counted by
    formula, onto the innermost module running."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.counter.inside_counted == 0 and self.counter.stack:
            n = _matmul_flops(func, args, kwargs or {}, result)
            if n:
                self.counter.own[self.counter.stack[-1]] += n
        return result


class _Counter:
    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.own = {n: 0 for n in self.names.values()}
        self.shapes: dict[str, tuple] = {}
        self.stack: list[str] = []
        self.inside_counted = 0

    def pre(self, mod, inputs):
        self.stack.append(self.names[mod])
        if isinstance(mod, _COUNTED):
            self.inside_counted += 1

    def post(self, mod, inputs, out):
        name = self.stack.pop()
        if isinstance(mod, _COUNTED):
            self.inside_counted -= 1
            if self.inside_counted == 0:
                self.own[name] += module_flops(mod, inputs, out)
        o = _first(out)
        if isinstance(o, torch.Tensor) and o.dim():
            self.shapes[name] = tuple(o.shape[1:])


def count_flops(model: nn.Module, example: torch.Tensor) -> FlopCount:
    """FLOPs of one image (`example[:1]`) through `model` (see the module doc)."""
    counter = _Counter(model)
    handles = []
    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(counter.pre))
        handles.append(mod.register_forward_hook(counter.post))
    try:
        with torch.no_grad(), _Products(counter):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    inclusive = {}
    for name in counter.own:
        prefix = name + "."
        inclusive[name] = sum(v for n, v in counter.own.items()
                              if n == name or not name or n.startswith(prefix))
    return FlopCount(int(inclusive[""]), inclusive, counter.shapes)


# -- where each protection acts ---------------------------------------------------------------

def channel_dim(mod: nn.Module) -> int:
    """The output dimension holding channels: the last for Linear and attention, else 1."""
    return -1 if isinstance(mod, (nn.Linear, nn.MultiheadAttention)) else 1


def channels_of(mod: nn.Module, shape: tuple[int, ...]) -> int:
    """Output channels of a layer whose per-image output shape is `shape`."""
    if not shape:
        return 1
    d = channel_dim(mod)
    return shape[-1] if d == -1 else shape[0]


def share(mod: nn.Module, shape: tuple[int, ...], channels) -> tuple[int, float]:
    """(output values per image, the fraction of them `channels` hold: 1 for None)."""
    values = math.prod(shape) if shape else 0
    return values, 1.0 if channels is None else len(channels) / max(channels_of(mod, shape), 1)


def _modules(model: nn.Module, selection: Selection) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for name, layers in selection.items():
        get_protection(name)
        for layer in layers:
            if layer not in modules:
                raise ConfigError(f"{name}: the model has no layer {layer!r}")
    return modules


def protection_flops(name: str, model: nn.Module, layers: dict, counts: FlopCount) -> int:
    """Extra FLOPs per image of protection `name` on `layers` ({layer: None or channels})."""
    kind = get_protection(name)
    modules = dict(model.named_modules())
    total = 0.0
    for layer, channels in layers.items():
        total += kind.flops(modules[layer], counts.shapes.get(layer, ()), channels,
                            counts.of(layer))
    return round(total)


def abft_flops(mod, shape, channels) -> int:
    """abft's FLOPs per image on a layer (see the module doc)."""
    if not isinstance(mod, (nn.Linear, ConvNd)) or not shape:
        return 0
    c_out = channels_of(mod, shape)
    positions = math.prod(shape) // c_out
    kept = c_out if channels is None else len(channels)
    if isinstance(mod, nn.Linear):
        groups, per_position = 1, 2 * mod.in_features
    elif mod.transposed:
        return 0
    else:
        groups = mod.groups
        per_position = 2 * mod.in_channels * math.prod(mod.kernel_size)
    return positions * (per_position + kept + groups * COMPARE_FLOPS)


def abft_guardable(mod: nn.Module) -> bool:
    """Whether abft can check `mod`: a Linear or a (not transposed) Conv."""
    return isinstance(mod, nn.Linear) or (isinstance(mod, ConvNd)
                                          and not mod.transposed)


def protection_bits(name: str, model: nn.Module, layers: dict, counts: FlopCount,
                    weight_bits: int, per_channel: bool = False) -> int:
    """Extra stored bits of protection `name` on `layers` (see the module doc)."""
    kind = get_protection(name)
    modules = dict(model.named_modules())
    return sum(kind.bits(modules[layer], counts.shapes.get(layer, ()), channels, weight_bits,
                         per_channel) for layer, channels in layers.items())


def abft_bits(mod: nn.Module, weight_bits: int) -> int:
    """abft's stored checksum vector of a Linear or Conv: summed filters and biases."""
    k = math.prod(mod.kernel_size) if not isinstance(mod, nn.Linear) else 1
    c_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
    groups = 1 if isinstance(mod, nn.Linear) else mod.groups
    bias = groups if getattr(mod, "bias", None) is not None else 0
    return weight_bits * (c_in * k + bias)


# -- protections as PyTorch hooks -------------------------------------------------------------

class Monitor:
    """Which images of the last forward runs some protection flagged (detected)."""

    def __init__(self):
        self.flags: torch.Tensor | None = None

    def reset(self):
        self.flags = None

    def flag(self, per_image: torch.Tensor):
        f = per_image.detach().reshape(-1).to(torch.bool).cpu()
        self.flags = f if self.flags is None or self.flags.shape != f.shape else self.flags | f

    @property
    def count(self) -> int:
        return 0 if self.flags is None else int(self.flags.sum())


def _index(out: torch.Tensor, dim: int, channels) -> torch.Tensor:
    if channels is None:
        return out
    return out.index_select(dim, torch.as_tensor(channels, device=out.device))


def _put(out: torch.Tensor, dim: int, channels, values: torch.Tensor) -> torch.Tensor:
    if channels is None:
        return values
    return out.index_copy(dim, torch.as_tensor(channels, device=out.device), values)


def _per_image(mask: torch.Tensor) -> torch.Tensor:
    """Per image (dim 0), whether any value of `mask` is set."""
    return mask.reshape(mask.shape[0], -1).any(dim=1) if mask.dim() else mask.reshape(1)


def _bound_shape(bound: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    if bound.dim() == 0:
        return bound
    shape = [1] * out.dim()
    shape[dim] = -1
    return bound.reshape(shape)


def bound_hook(make, lo: torch.Tensor, hi: torch.Tensor, dim: int = 1, channels=None):
    """A forward hook holding the output (its `channels` along `dim`, or all of it) within
    [lo, hi] (scalars, or one per kept channel) with the campaign's guard `make(lo, hi)`
    (protect.ranger: ranger_guard clamps, clip_guard sets values outside to 0)."""
    def hook(mod, inputs, out):
        if not isinstance(out, torch.Tensor):
            return None
        part = _index(out, dim, channels)
        low, high = (_bound_shape(b.to(out.device, out.dtype), part, dim) for b in (lo, hi))
        return _put(out, dim, channels, make(low, high)(part))
    return hook


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two computations of the same values differ by more than rounding."""
    return ~((a - b).abs() <= RTOL * (a.abs() + b.abs()) + torch.finfo(a.dtype).tiny)


def recompute(mod: nn.Module, inputs: tuple, channels=None) -> torch.Tensor:
    """The output of `mod` on `inputs` computed again (its `channels` only where the layer
    allows a slice: a Linear, an ungrouped zero-padded Conv), without running its hooks."""
    if channels is not None and isinstance(mod, nn.Linear):
        idx = torch.as_tensor(channels, device=mod.weight.device)
        bias = None if mod.bias is None else mod.bias[idx]
        return F.linear(inputs[0], mod.weight[idx], bias)
    if (channels is not None and isinstance(mod, ConvNd) and not mod.transposed
            and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)):
        idx = torch.as_tensor(channels, device=mod.weight.device)
        bias = None if mod.bias is None else mod.bias[idx]
        conv = (F.conv1d, F.conv2d, F.conv3d)[mod.weight.dim() - 3]
        return conv(inputs[0], mod.weight[idx], bias, mod.stride, mod.padding, mod.dilation)
    out = _first(mod.forward(*inputs))
    return _index(out, channel_dim(mod), channels)


def dup_hook(monitor: Monitor, channels=None):
    """A forward hook recomputing the output (or its channels) and flagging each image where
    the two differ beyond rounding; the output is handed on unchanged."""
    def hook(mod, inputs, out):
        dim = channel_dim(mod)
        again = recompute(mod, inputs, channels)
        monitor.flag(_per_image(_mismatch(_index(out, dim, channels), again)))
    return hook


def median3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The element-wise median of three tensors: the majority value when two agree."""
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def tmr_hook(channels=None):
    """A forward hook computing the output (or its channels) twice more and handing on the
    element-wise median of the three: one faulty copy is outvoted."""
    def hook(mod, inputs, out):
        dim = channel_dim(mod)
        first, second = recompute(mod, inputs, channels), recompute(mod, inputs, channels)
        return _put(out, dim, channels, median3(_index(out, dim, channels), first, second))
    return hook


def summed_filters(mod: nn.Module, channels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """abft's checksum weights of a Linear or Conv: the weights summed over the protected
    output channels (per group for a grouped Conv: [groups, Cin/groups, *kernel]), and the
    biases summed likewise (None without bias)."""
    w = mod.weight.detach()
    keep = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    if channels is not None:
        keep = torch.zeros_like(keep)
        keep[torch.as_tensor(channels, device=w.device)] = 1
    masked = w * keep.reshape(-1, *([1] * (w.dim() - 1)))
    b = None if mod.bias is None else mod.bias.detach() * keep
    if isinstance(mod, nn.Linear):
        return masked.sum(0, keepdim=True), None if b is None else b.sum().reshape(1)
    g = mod.groups
    ws = masked.reshape(g, w.shape[0] // g, *w.shape[1:]).sum(1)
    bs = None if b is None else b.reshape(g, -1).sum(1)
    return ws, bs


def abft_flags(mod: nn.Module, x: torch.Tensor, out: torch.Tensor, filters, channels=None
               ) -> torch.Tensor:
    """Per image, whether the protected channels of `out` summed per output position differ
    from `x` convolved with the summed `filters` (summed_filters) beyond rounding."""
    ws, bs = filters
    keep = torch.ones(out.shape[channel_dim(mod)], dtype=out.dtype, device=out.device)
    if channels is not None:
        keep = torch.zeros_like(keep)
        keep[torch.as_tensor(channels, device=out.device)] = 1
    if isinstance(mod, nn.Linear):
        check = F.linear(x, ws, bs)[..., 0]
        total = (out * keep).sum(-1)
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[mod.weight.dim() - 3]
        padding = mod.padding if mod.padding_mode == "zeros" else 0
        if mod.padding_mode != "zeros":
            pad = [p for p in reversed(mod.padding) for _ in range(2)]
            x = F.pad(x, pad, mode=mod.padding_mode)
        check = conv(x, ws, bs, mod.stride, padding, mod.dilation, mod.groups)
        shaped = keep.reshape(1, -1, *([1] * (out.dim() - 2)))
        total = (out * shaped).reshape(out.shape[0], mod.groups, -1, *out.shape[2:]).sum(2)
    return _per_image(_mismatch(total, check))


def abft_hook(monitor: Monitor, filters, channels=None):
    """A forward hook flagging each image whose checksum (abft_flags) fails; the output is
    handed on unchanged."""
    def hook(mod, inputs, out):
        monitor.flag(abft_flags(mod, inputs[0], out, filters, channels))
    return hook


@dataclass
class Guarded:
    """A deep copy of a model with protections as forward hooks, and the monitor of what
    they detected."""

    model: nn.Module
    monitor: Monitor


def guard(model: nn.Module, selection: Selection, bounds: dict | None = None,
          per_channel: Iterable[str] = ()) -> Guarded:
    """A deep copy of `model` (the model given is never changed) running the in-model
    protections of `selection`. `bounds` maps a layer to its ranger/clip bound: a number
    (max |output|), or one per channel; `per_channel` names the protections using per-channel
    bounds. Layers abft cannot check are left unguarded by it."""
    _modules(model, selection)
    guarded = copy.deepcopy(model).eval()
    modules = dict(guarded.named_modules())
    monitor = Monitor()
    bounds = bounds or {}
    per_channel = set(per_channel)
    for name, kind in registered().items():
        if name not in selection or kind.in_memory:
            continue
        for layer, channels in selection[name].items():
            mod = modules[layer]
            hook = kind.hook(mod, layer, channels, monitor, bounds, name in per_channel)
            if hook is not None:
                mod.register_forward_hook(hook)
    return Guarded(guarded, monitor)


def lo_hi(bound, channels, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of a ranger/clip bound: a (lo, hi) pair as the campaign profiles it, or a
    max |output| (a number, or one per channel) standing for [-max, max]."""
    if isinstance(bound, (tuple, list)):
        lo, hi = (torch.as_tensor(b, dtype=torch.float32) for b in bound)
        if channels is not None and lo.dim():
            idx = torch.as_tensor(channels)
            lo, hi = lo.reshape(-1)[idx], hi.reshape(-1)[idx]
        return lo, hi
    b = torch.as_tensor(bound, dtype=torch.float32)
    if b.dim() == 1 and channels is not None:
        b = b[torch.as_tensor(channels)]
    elif b.dim() == 1 and not per_channel:
        b = b.max()
    return -b, b


def profile_bounds(model: nn.Module, layers: Iterable[str], images: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """Per layer, the max |output| of each output channel on `images` (finite values)."""
    wanted = set(layers)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if name in wanted:
            def hook(m, inputs, out, name=name):
                o = _first(out).detach()
                d = channel_dim(m) % o.dim()
                a = torch.nan_to_num(o.abs(), nan=0.0, posinf=0.0).movedim(d, 0)
                m_ = a.reshape(a.shape[0], -1).amax(1)
                seen[name] = m_ if name not in seen else torch.maximum(seen[name], m_)
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


# -- the measurement --------------------------------------------------------------------------

@dataclass(frozen=True)
class ProtectionCost:
    """What one protection (or, as `total`, all of them together) adds to clean inference.

    Overheads are fractions of the unprotected model's figures (0.1 = +10 %); latency and
    accuracy are None where not measured (ecc/parity act in the memory hardware: their
    latency overhead is 0 in the model)."""

    flops: int
    flops_overhead: float
    memory_bits: int
    memory_overhead: float
    latency_s: float | None = None
    latency_overhead: float | None = None
    accuracy: float | None = None
    accuracy_change: float | None = None
    detected_clean: int = 0


@dataclass(frozen=True)
class CostReport:
    """Costs of the protections of a selection on one model (see the module doc); `total`
    is all of them together, as a campaign runs them."""

    model_flops: int
    param_bits: int
    weight_bits: int
    images: int
    repeats: int
    clean_latency_s: float | None
    clean_accuracy: float | None
    protections: dict[str, ProtectionCost]
    total: ProtectionCost
    skipped: list[str] = field(default_factory=list)
    protect: str | None = None
    label: str = LABEL
    machine: str = ""

    def to_json(self) -> dict:
        """A JSON-able dict (numbers, strings, lists, dicts only)."""
        out = asdict(self)
        return _jsonable(out)

    @classmethod
    def from_json(cls, data: dict) -> CostReport:
        d = dict(data)
        d["protections"] = {k: ProtectionCost(**v) for k, v in d["protections"].items()}
        d["total"] = ProtectionCost(**d["total"])
        return cls(**d)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _predict(model, images) -> torch.Tensor:
    with torch.no_grad():
        out = model(images)
    # Class scores: a tensor, the first of a tuple, or a model output's logits.
    return _first(getattr(out, "logits", out))


def _time(models: dict[str, nn.Module], images, seconds: float, min_repeats: int = 3,
          max_repeats: int = 50) -> tuple[dict[str, float], int]:
    """Fastest seconds per batch of each model, repeats interleaved (the order rotated each
    round, so no model always runs first), at least `min_repeats`, within `seconds`. The
    fastest repeat is the one other work on a shared machine disturbed least, so the ratio
    of two of them moves least with load (a median follows the load)."""
    names = list(models)
    for m in models.values():
        _predict(m, images)  # warm-up
    times = {n: [] for n in names}
    deadline = time.perf_counter() + seconds
    r = 0
    while r < min_repeats or (r < max_repeats and time.perf_counter() < deadline):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            _predict(models[n], images)
            times[n].append(time.perf_counter() - t0)
        r += 1
    return {n: min(t) for n, t in times.items()}, r


def _accuracy(model, images, labels) -> tuple[float | None, torch.Tensor]:
    logits = _predict(model, images)
    top = logits.argmax(-1)
    acc = None if labels is None else float((top.cpu() == labels.cpu()).float().mean())
    return acc, top


def measure(model: nn.Module, selection: Selection, images: torch.Tensor,
            labels: torch.Tensor | None = None, *, protections: Iterable[Protection] = (),
            ranges: dict | None = None, bounds: dict | None = None, weight_bits: int = 32,
            seconds: float = 2.0) -> CostReport:
    """The cost of each protection of `selection` on `model` and of all together: FLOPs and
    memory counted, latency and top-1 accuracy on `images` (against `labels`, when given)
    measured with and without. `ranges` (layer -> max |output| profiled on training data, as
    Engine.profile gives) bound ranger and clip to [-max, max]; `bounds` ({layer: (lo, hi)},
    as the campaign profiles them: protect.ranger.profile_bounds) take precedence; layers
    neither has are profiled on `images`.
    `protections` (parsed specification items) say which use per-channel bounds. The model
    given is never changed."""
    model = model.eval()
    _modules(model, selection)
    counts = count_flops(model, images)
    param_bits = weight_bits * sum(p.numel() for p in model.parameters())
    base = max(counts.total, 1)
    per_channel = {p.name for p in protections if p.per_channel}
    guarded_layers = {layer for n, layers in selection.items()
                      if get_protection(n).needs_bounds for layer in layers}
    given = bounds
    bounds = profile_bounds(model, guarded_layers, images) if guarded_layers else {}
    for layer, value in (ranges or {}).items():
        if layer in bounds and not (isinstance(value, (int, float)) and not math.isfinite(value)):
            value = torch.as_tensor(value, dtype=torch.float32)
            bounds[layer] = value if value.dim() else value.expand_as(bounds[layer]).clone()
    bounds.update({layer: pair for layer, pair in (given or {}).items() if layer in bounds})
    modules = dict(model.named_modules())
    skipped = [f"{n}: {layer} {get_protection(n).skip_reason}" for n, layers in selection.items()
               for layer in layers if not get_protection(n).acts_on(modules[layer])]

    flops, bits = {}, {}
    for name, layers in selection.items():
        flops[name] = protection_flops(name, model, layers, counts)
        bits[name] = protection_bits(name, model, layers, counts, weight_bits,
                                     name in per_channel)
    in_model = [n for n in selection if not get_protection(n).in_memory]
    copies = {n: guard(model, {n: selection[n]}, bounds, per_channel) for n in in_model}
    if len(in_model) > 1:
        copies["total"] = guard(model, {n: selection[n] for n in in_model}, bounds, per_channel)
    clean = copy.deepcopy(model)
    if copies:
        latency, repeats = _time({"none": clean, **{k: g.model for k, g in copies.items()}},
                                 images, seconds)
    else:  # nothing runs in the model: nothing to time
        latency, repeats = {"none": None}, 0
    clean_acc, _ = _accuracy(clean, images, labels)

    def entry(keys, copy_key):
        f, b = sum(flops[k] for k in keys), sum(bits[k] for k in keys)
        lat = acc = None
        detected = 0
        if copy_key is not None:
            lat = latency[copy_key]
            g = copies[copy_key]
            g.monitor.reset()
            acc, _ = _accuracy(g.model, images, labels)
            detected = g.monitor.count
        else:
            lat, acc = latency["none"], clean_acc
        return ProtectionCost(
            flops=f, flops_overhead=f / base, memory_bits=b,
            memory_overhead=b / param_bits if param_bits else 0.0,
            latency_s=lat, latency_overhead=0.0 if lat is None else lat / latency["none"] - 1,
            accuracy=acc,
            accuracy_change=None if acc is None or clean_acc is None else acc - clean_acc,
            detected_clean=detected)

    per = {n: entry([n], n if n in copies else None) for n in selection}
    key = "total" if "total" in copies else (in_model[0] if in_model else None)
    total = entry(list(selection), key)
    return CostReport(
        model_flops=counts.total, param_bits=param_bits, weight_bits=weight_bits,
        images=int(images.shape[0]), repeats=repeats, clean_latency_s=latency["none"],
        clean_accuracy=clean_acc, protections=per, total=total, skipped=skipped,
        machine=_machine())


def layer_selection(engine, protections: Iterable[Protection], site: str) -> Selection:
    """Whole layers each protection guards, as `engine` (flipsafe.inject.Engine) resolves its
    `layers` option at `site` (ecc and parity at the weights). Channels that dup/tmr choose
    under a budget come from a vulnerability map: the campaign passes those instead."""
    out: Selection = {}
    for p in protections:
        kind = get_protection(p.name)
        where = kind.sites[0] if kind.in_memory else site
        out[p.name] = {info.name: None for info in engine.layers(where, p.layers)}
    return out


def for_plan(model: nn.Module, protections, selection: Selection, images: torch.Tensor,
             labels: torch.Tensor | None = None, *, ranges: dict | None = None,
             bounds: dict | None = None,
             format: str = "fp32", seconds: float = 2.0) -> dict:
    """What a campaign records as its results folder's cost (manifest key "cost", see
    `flipsafe.campaign.store.ResultsStore.write_cost`): `measure(...).to_json()` for
    `protections` (a specification string or parsed items, None for none) on `model` (the
    engine's copy) with their resolved `selection`, on a batch of example `images`, weights
    stored in `format` (its bit width sizes ecc words and checksum vectors)."""
    from flipsafe.formats import get as get_format

    items = parse(protections) if protections is None or isinstance(protections, str) \
        else tuple(protections)
    names = {p.name for p in items}
    missing = names - set(selection)
    if missing:
        raise ConfigError(f"no resolved selection for {', '.join(sorted(missing))}")
    selection = {n: selection[n] for n in registered() if n in selection and n in names}
    report = measure(model, selection, images, labels, protections=items, ranges=ranges,
                     bounds=bounds,
                     weight_bits=get_format(format).bits, seconds=seconds)
    return replace(report, protect=",".join(str(p) for p in items) or None).to_json()
