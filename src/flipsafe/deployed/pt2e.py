"""torchao PT2E programs: their quantize/dequantize patterns as stored codes.

`convert_pt2e` leaves a graph of `quantized_decomposed` calls around float ATen ops:
`dequantize_per_channel(int8 weight codes, scales, zero points)` feeding a conv/linear,
and `quantize_per_tensor` -> `dequantize_per_tensor` pairs on activations. `patterns`
finds both, so campaign.lift turns them into layers with stored formats
(deployed.modules); the arithmetic stays the program's own.
"""

from __future__ import annotations

import contextlib
import logging
import zipfile

import torch
from torch import fx

from flipsafe.errors import ModelError
from flipsafe.formats import AffineFormat

NAMESPACE = "quantized_decomposed"
_DEQUANT = {"dequantize_per_tensor", "dequantize_per_channel"}
_QUANT = "quantize_per_tensor"
EXTRA = "deployed"  # the pip extra holding torchao, onnx and onnxruntime


def missing(package: str) -> ModelError:
    """The one error for a deployed-model package that is not installed."""
    return ModelError(f"this needs {package}, which is not installed; install the extra: "
                      f"pip install 'flipsafe[{EXTRA}]'")


def register_ops() -> None:
    """Register the `quantized_decomposed` ops a saved PT2E program calls (torchao's
    import does it), without torchao's import-time chatter about GPU kernels."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(None):
            import torchao.quantization.pt2e  # noqa: F401 - registers the ops
    except ImportError:
        raise missing("torchao") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def mentions_ops(path) -> bool:
    """Whether a saved program (a zip archive) calls quantized_decomposed ops."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(NAMESPACE.encode() in archive.read(info)
                       for info in archive.infolist() if info.filename.endswith(".json"))
    except (OSError, zipfile.BadZipFile):
        return False  # torch.export.load says what is wrong with the file


def _op(node: fx.Node) -> str | None:
    """The quantized_decomposed op a node calls ('dequantize_per_channel'), or None."""
    target = node.target
    if node.op != "call_function" or getattr(target, "namespace", None) != NAMESPACE:
        return None
    return target.name().split("::", 1)[1]


def _value(root, arg):
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj = root
        for part in arg.target.split("."):
            obj = getattr(obj, part)
        return obj
    return arg


def _args(node: fx.Node, root) -> list:
    return [_value(root, a) for a in node.args]


def _format(op: str, args: list) -> AffineFormat:
    """The stored format of a (de)quantize call's arguments."""
    if op == "dequantize_per_channel":
        _, scales, zero_points, axis, qmin, qmax, dtype = args[:7]
        if axis != 0:
            raise ModelError(f"per-channel quantisation along axis {axis} is not supported; "
                             f"flipsafe reads weights quantized per output channel (axis 0)")
        return AffineFormat(dtype, scales, zero_points, qmin, qmax)
    _, scale, zero_point, qmin, qmax, dtype = args[:6]
    return AffineFormat(dtype, scale, zero_point, qmin, qmax)


def patterns(gm: fx.GraphModule) -> tuple[dict, dict]:
    """(weights, pairs) of a PT2E graph.

    weights: {dequantize node of stored codes: (its float value, AffineFormat)} - the
    value computed by the program's own op. pairs: {dequantize node: (its quantize node,
    AffineFormat)} for each activation quantize whose readers all dequantize it with its
    own parameters (one stored code tensor, read once or more)."""
    weights, pairs = {}, {}
    for node in gm.graph.nodes:
        op = _op(node)
        if op not in _DEQUANT or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src, args = node.args[0], _args(node, gm)
        if src.op == "get_attr":
            with torch.no_grad():
                value = node.target(*args, **node.kwargs)
            weights[node] = (value, _format(op, args))
        elif _op(src) == _QUANT and op == "dequantize_per_tensor" and all(
                _op(u) == op and _same(_args(u, gm)[1:6], _args(src, gm)[1:6])
                for u in src.users):
            pairs[node] = (src, _format(op, args))  # every reader dequantizes alike
    return weights, pairs


def _same(a: list, b: list) -> bool:
    """Equal quantisation arguments (scales compared as numbers)."""
    norm = [[float(v) if isinstance(v, (int, float)) else v for v in x] for x in (a, b)]
    return norm[0] == norm[1]


def is_quantized_graph(gm: fx.GraphModule) -> bool:
    return any(_op(n) is not None for n in gm.graph.nodes)
