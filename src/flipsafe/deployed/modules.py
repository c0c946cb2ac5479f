"""The layer forms of a deployed quantized model: what the engine corrupts in it.

A quantized graph is lifted (campaign.lift) into ordinary layers: each Conv/Linear whose
weight the model stores as integer codes becomes an nn.Conv*d / nn.Linear holding the
dequantized weight, bit for bit what the runtime computes, with the weight's
`formats.AffineFormat` attached; each quantize -> dequantize pair on activations becomes a
QuantDequant module whose output format is the pair's. `--format native` corrupts these
stored codes and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from flipsafe.formats import AffineFormat

_STORED = "flipsafe_stored"  # the attribute holding {parameter name or 'output': format}


class QuantDequant(nn.Module):
    """Activations stored as 8-bit codes between a quantize and a dequantize: the output
    is dequantize(quantize(x)) in the model's own arithmetic (formats.AffineFormat)."""

    flipsafe_leaf = True  # inject.graph traces it as one node, like a torch.nn module
    flipsafe_pointwise = True  # one element in, one element out

    def __init__(self, fmt: AffineFormat):
        super().__init__()
        setattr(self, _STORED, {"output": fmt})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stored_format(self, "output").quantize(x)

    def extra_repr(self) -> str:
        fmt = stored_format(self, "output")
        return f"{fmt.name}, scale={float(fmt.scale):.6g}, zero_point={int(fmt.zero_point)}"


def attach(mod: nn.Module, what: str, fmt: AffineFormat) -> None:
    """Record that `mod`'s `what` (a parameter name, or 'output') is stored as `fmt`."""
    stored = dict(getattr(mod, _STORED, {}))
    stored[what] = fmt
    setattr(mod, _STORED, stored)


def stored_format(mod: nn.Module, what: str) -> AffineFormat | None:
    """The format `mod` stores `what` in (a parameter name or 'output'); None if float."""
    return getattr(mod, _STORED, {}).get(what)


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of `model` stores codes of its own."""
    return any(getattr(m, _STORED, None) for m in model.modules())


def stored_layers(model: nn.Module) -> list[str]:
    """Names of the modules storing codes."""
    return [n for n, m in model.named_modules() if getattr(m, _STORED, None)]
