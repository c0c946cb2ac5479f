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
_SOURCE = "flipsafe_source"  # {parameter name or 'output': where the codes are in the file}


class QuantDequant(nn.Module):
    """Activations stored as 8-bit codes between a quantize and a dequantize: the output
    is dequantize(quantize(x)) in the model's own arithmetic (formats.AffineFormat)."""

    flipsafe_leaf = True  # inject.graph traces it as one node, like a torch.nn module
    flipsafe_pointwise = True  # one element in, one element out

    def __init__(self, fmt: AffineFormat, source: dict | None = None):
        super().__init__()
        attach(self, "output", fmt, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stored_format(self, "output").quantize(x)

    def extra_repr(self) -> str:
        fmt = stored_format(self, "output")
        return f"{fmt.name}, scale={float(fmt.scale):.6g}, zero_point={int(fmt.zero_point)}"


def attach(mod: nn.Module, what: str, fmt: AffineFormat, source: dict | None = None) -> None:
    """Record that `mod`'s `what` (a parameter name, or 'output') is stored as `fmt`, and
    where in the model file (`source`: names the deployed.verify replay reads)."""
    for attr, value in ((_STORED, fmt), (_SOURCE, dict(source or {}))):
        table = dict(getattr(mod, attr, {}))
        table[what] = value
        setattr(mod, attr, table)


def sources(model: nn.Module) -> dict:
    """{(layer, parameter name or 'output'): source} of every stored code tensor."""
    return {(n, what): src for n, m in model.named_modules()
            for what, src in getattr(m, _SOURCE, {}).items()}


def stored_format(mod: nn.Module, what: str) -> AffineFormat | None:
    """The format `mod` stores `what` in (a parameter name or 'output'); None if float."""
    return getattr(mod, _STORED, {}).get(what)


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of `model` stores codes of its own."""
    return any(getattr(m, _STORED, None) for m in model.modules())


def stored_layers(model: nn.Module) -> list[str]:
    """Names of the modules storing codes."""
    return [n for n, m in model.named_modules() if getattr(m, _STORED, None)]
