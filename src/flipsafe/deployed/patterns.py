"""Stored codes in a quantized graph: weights dequantized from constant codes, and
activations quantized then dequantized with one quantisation.

A dialect (deployed.pt2e.PT2E, deployed.onnx_model.ONNX) says which calls quantize and
dequantize (`role`), which of their arguments are the quantisation (`params`), the
stored format they mean (`format`) and where the codes live in the model file
(`source`, a dict `flipsafe verify` finds them again by); `find` is the same for every dialect, and
campaign.lift turns what it finds into layers (deployed.modules).
"""

from __future__ import annotations

import operator

import torch
from torch import fx


def _value(root, arg):
    """A get_attr argument's value (a dotted attribute of root), other arguments as given."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return operator.attrgetter(arg.target)(root)
    return arg


def _args(node: fx.Node, root) -> list:
    return [_value(root, a) for a in node.args]


def _same(a: list, b: list) -> bool:
    """Equal quantisation arguments (numbers compared as numbers, tensors by value)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if float(x) != float(y):
                return False
        elif x != y:
            return False
    return True


def find(gm: fx.GraphModule, dialect) -> tuple[dict, dict]:
    """(weights, pairs) of a quantized graph in `dialect`.

    weights: {dequantize node of constant codes: (its float value, AffineFormat or None
    for codes that are not 8-bit, source)}, the value computed by the graph's own call.
    pairs: {dequantize node: (its quantize node, AffineFormat, source)} for each
    activation quantize whose readers all dequantize it with its own quantisation (one
    stored code tensor, read once or more)."""
    weights, pairs = {}, {}
    for node in gm.graph.nodes:
        if dialect.role(node) != "dequantize" or not node.args \
                or not isinstance(node.args[0], fx.Node):
            continue
        src, args = node.args[0], _args(node, gm)
        if src.op == "get_attr":
            with torch.no_grad():
                value = node.target(*args, **node.kwargs)
            # fmt None: codes flipsafe does not corrupt (int32 biases), a fixed float value
            weights[node] = (value, dialect.format(node, args), dialect.source(node, node))
        elif dialect.role(src) == "quantize":
            qparams = dialect.params(src, _args(src, gm))
            if all(dialect.role(u) == "dequantize"
                   and _same(dialect.params(u, _args(u, gm)), qparams) for u in src.users):
                pairs[node] = (src, dialect.format(node, args), dialect.source(src, node))
    return weights, pairs
