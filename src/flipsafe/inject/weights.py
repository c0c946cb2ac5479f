"""Layer outputs under per-image parameter faults, without copying the model."""

# Conv2d and Linear weights: a fault confined to one output channel adds the exact output
# change of that channel (dW_o convolved with, or multiplied by, the layer input) to the
# golden raw output. With one corrupted weight the change is one rounded product per
# output position, so the result differs from recomputing the layer only in float
# summation order (outcomes match; losses match to rounding). Biases add their change,
# eval-mode BatchNorm reruns its kernel on the faulty channels, and any other module is
# recomputed per image with torch.func.vmap.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from flipsafe.compat import BatchNorm, conv_padding


def _rows(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


def dense_change(shape, pos: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-image parameter changes [n, *shape] with delta [n, G] at flat positions pos."""
    n = pos.shape[0]
    d = torch.zeros(n, *shape, device=delta.device, dtype=delta.dtype).view(n, -1)
    d.scatter_(1, pos, delta)
    return d.view(n, *shape)


def single_row(pos: torch.Tensor, row_size: int):
    """The output channel each fault touches, or None if some fault spans channels."""
    rows = pos // row_size
    if bool((rows == rows[:, :1]).all()):
        return rows[:, 0]
    return None


def conv2d_output(mod: nn.Conv2d, x, raw, pos, new, old):
    """Faulty raw output of a Conv2d [n, O, Ho, Wo] for weight faults at flat pos [n, G]."""
    n = x.shape[0]
    w = mod.weight
    out_ch, in_g = w.shape[0], w.shape[1]
    row_size = w[0].numel()
    row = single_row(pos, row_size)
    if mod.padding_mode != "zeros":
        x = F.pad(x, conv_padding(mod), mode=mod.padding_mode)
        padding = 0
    else:
        padding = mod.padding
    if row is None:
        weights = w.unsqueeze(0) + dense_change(w.shape, pos, new - old)
        bias = None if mod.bias is None else mod.bias.repeat(n)
        groups = mod.groups * n
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weights.reshape(-1, *w.shape[1:]), bias,
                     mod.stride, padding, mod.dilation, groups)
        return y.reshape(n, out_ch, *y.shape[2:])
    if pos.shape[1] <= 64 and mod.padding_mode == "zeros":
        delta = _conv2d_row_delta(mod, x, raw.shape[2:], row, pos - (row * row_size)[:, None],
                                  new - old)
    else:
        group = row // (out_ch // mod.groups)
        channels = (group * in_g)[:, None] + torch.arange(in_g, device=x.device)
        xg = x[_rows(n, x.device)[:, None], channels]  # [n, in_g, H, W]
        kernel = dense_change((row_size,), pos - (row * row_size)[:, None], new - old)
        delta = F.conv2d(xg.reshape(1, n * in_g, *xg.shape[2:]),
                         kernel.reshape(n, *w.shape[1:]), None, mod.stride, padding,
                         mod.dilation, n)[0]
    out = raw.clone()
    rows = _rows(n, x.device)
    out[rows, row] = raw[rows, row] + delta
    return out


def _same_padding(mod: nn.Conv2d) -> tuple[int, int]:
    if mod.padding == "valid":
        return 0, 0
    if mod.padding == "same":  # PyTorch puts the odd pixel at the end
        return tuple(d * (k - 1) // 2 for d, k in zip(mod.dilation, mod.kernel_size))
    return mod.padding


def _conv2d_row_delta(mod: nn.Conv2d, x, out_hw, row, offset, dw):
    """Output change of channel `row` [n, Ho, Wo] from weight changes dw [n, G] at flat
    offsets within that channel's kernel: each is dw times a strided input slice (zero
    where it falls in the padding), read straight from x."""
    n, g = offset.shape
    if g > 1:  # a partial block repeats its last position: count it once
        repeat = torch.zeros_like(offset, dtype=torch.bool)
        repeat[:, 1:] = offset[:, 1:] == offset[:, :-1]
        dw = torch.where(repeat, 0.0, dw)
    _, in_g, kh_n, kw_n = mod.weight.shape
    ho, wo = out_hw
    (sh, sw), (dh, dw_), (ph, pw) = mod.stride, mod.dilation, _same_padding(mod)
    c = offset // (kh_n * kw_n)
    kh = offset % (kh_n * kw_n) // kw_n
    kw = offset % kw_n
    c = c + (row // (mod.out_channels // mod.groups) * in_g)[:, None]
    ih = (kh * dh - ph)[..., None] + sh * torch.arange(ho, device=x.device)  # [n, G, Ho]
    iw = (kw * dw_ - pw)[..., None] + sw * torch.arange(wo, device=x.device)  # [n, G, Wo]
    ok = ((ih >= 0) & (ih < x.shape[2]))[..., :, None] & ((iw >= 0) & (iw < x.shape[3]))[
        ..., None, :]
    vals = x[_rows(n, x.device)[:, None, None, None], c[..., None, None],
             ih.clamp(0, x.shape[2] - 1)[..., :, None], iw.clamp(0, x.shape[3] - 1)[..., None, :]]
    prod = dw[..., None, None] * torch.where(ok, vals, 0.0)
    return prod[:, 0] if g == 1 else prod.sum(1)


def linear_output(mod: nn.Linear, x, raw, pos, new, old):
    """Faulty raw output of a Linear [n, ..., O] for weight faults at flat pos [n, G]."""
    n = x.shape[0]
    w = mod.weight
    row = single_row(pos, w.shape[1])
    xf = x.reshape(n, -1, w.shape[1])
    if row is None:
        weights = w.unsqueeze(0) + dense_change(w.shape, pos, new - old)
        y = torch.bmm(xf, weights.transpose(1, 2))
        if mod.bias is not None:
            y = y + mod.bias
        return y.reshape(raw.shape)
    dw = dense_change((w.shape[1],), pos - (row * w.shape[1])[:, None], new - old)
    delta = torch.bmm(xf, dw.unsqueeze(2))[..., 0]  # [n, tokens]
    out = raw.clone().reshape(n, -1, w.shape[0])
    rows = _rows(n, x.device)
    out[rows, :, row] = out[rows, :, row] + delta
    return out.reshape(raw.shape)


def bias_output(mod: nn.Module, raw, pos, new, old):
    """Conv/Linear outputs with a changed bias: add the change along the channel dim."""
    n = raw.shape[0]
    db = dense_change(mod.bias.shape, pos, new - old)
    if isinstance(mod, nn.Linear):
        return raw + db.reshape(n, *([1] * (raw.dim() - 2)), -1)
    return raw + db.reshape(n, -1, *([1] * (raw.dim() - 2)))


def batchnorm_output(mod: BatchNorm, pname, x, raw, pos, new):
    """Eval-mode BatchNorm with one corrupted channel per image: the real kernel runs on
    those channels only, laid side by side as channels of one batch element, so every
    value is computed exactly as in a full run with the faulty parameter."""
    n = x.shape[0]
    c = pos[:, 0]
    rows = _rows(n, x.device)
    xc = x[rows, c].unsqueeze(0)  # [1, n, *spatial]
    weight = mod.weight[c] if mod.weight is not None else None
    bias = mod.bias[c] if mod.bias is not None else None
    if pname == "weight":
        weight = new[:, 0]
    else:
        bias = new[:, 0]
    y = F.batch_norm(xc, mod.running_mean[c], mod.running_var[c], weight, bias, False, 0.0,
                     mod.eps)
    out = raw.clone()
    out[rows, c] = y[0]
    return out


def functional_output(mod: nn.Module, pname: str, args, kwargs, pos, new):
    """Outputs [n, ...] of mod run separately per image with its own corrupted parameter."""
    p = getattr(mod, pname)
    n = pos.shape[0]
    params = p.detach().unsqueeze(0).repeat(n, *([1] * p.dim())).view(n, -1)
    params.scatter_(1, pos, new)
    params = params.view(n, *p.shape)

    def one(param, *xs):
        out = functional_call(mod, {pname: param}, tuple(t.unsqueeze(0) for t in xs), kwargs)
        return out[0]
    try:
        return vmap(one)(params, *args)
    except (RuntimeError, NotImplementedError):
        # Modules without vmap rules run image by image (rare: exotic parameterised layers).
        return torch.stack([one(params[i], *(a[i] for a in args)) for i in range(n)])


def faulty_raw_output(mod: nn.Module, pname: str, args, kwargs, raw, pos, new, old):
    """The raw (pre-emulation) output of mod for parameter faults, one per image."""
    if pname == "weight" and type(mod) is nn.Conv2d and len(args) == 1 and not kwargs:
        return conv2d_output(mod, args[0], raw, pos, new, old)
    if pname == "weight" and type(mod) is nn.Linear and len(args) == 1 and not kwargs:
        return linear_output(mod, args[0], raw, pos, new, old)
    if pname == "bias" and type(mod) in (nn.Conv2d, nn.Linear) and len(args) == 1:
        return bias_output(mod, raw, pos, new, old)
    if (isinstance(mod, BatchNorm) and not mod.training
            and mod.running_mean is not None and pos.shape[1] == 1 and len(args) == 1):
        return batchnorm_output(mod, pname, args[0], raw, pos, new)
    return functional_output(mod, pname, args, kwargs, pos, new)
