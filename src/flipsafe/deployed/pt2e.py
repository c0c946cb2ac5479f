"""torchao PT2E programs: their quantize/dequantize patterns as stored codes.

`convert_pt2e` leaves a graph of `quantized_decomposed` calls around float ATen ops:
`dequantize_per_channel(int8 weight codes, scales, zero points)` feeding a conv/linear,
and `quantize_per_tensor` -> `dequantize_per_tensor` pairs on activations. `patterns`
finds both, so campaign.lift turns them into layers with stored formats
(deployed.modules); the arithmetic stays the program's own.
"""

from __future__ import annotations

import zipfile

from torch import fx

from flipsafe.compat import quiet_imports
from flipsafe.deployed.patterns import find
from flipsafe.errors import ModelError
from flipsafe.formats import AffineFormat

NAMESPACE = "quantized_decomposed"
EXTRA = "deployed"  # the pip extra holding torchao, onnx and onnxruntime


def missing(package: str) -> ModelError:
    """The one error for a deployed-model package that is not installed."""
    return ModelError(f"this needs {package}, which is not installed; install the extra: "
                      f"pip install 'flipsafe[{EXTRA}]'")


def register_ops() -> None:
    """Register the `quantized_decomposed` ops a saved PT2E program calls (torchao's
    import does it), without torchao's import-time chatter about GPU kernels."""
    try:
        with quiet_imports():
            import torchao.quantization.pt2e  # noqa: F401 - registers the ops
    except ImportError:
        raise missing("torchao") from None


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


class PT2E:
    """The PT2E dialect of quantize/dequantize calls (see deployed.patterns)."""

    @staticmethod
    def role(node: fx.Node) -> str | None:
        op = _op(node)
        if op in ("dequantize_per_tensor", "dequantize_per_channel"):
            return "dequantize"
        return "quantize" if op == "quantize_per_tensor" else None

    @staticmethod
    def params(node: fx.Node, args: list) -> list:
        """The quantisation arguments after the input (compared between calls)."""
        return args[1:7] if _op(node) == "dequantize_per_channel" else args[1:6]

    @staticmethod
    def format(node: fx.Node, args: list) -> AffineFormat:
        if _op(node) == "dequantize_per_channel":
            _, scales, zero_points, axis, qmin, qmax, dtype = args[:7]
            if axis != 0:
                raise ModelError(f"per-channel quantisation along axis {axis} is not "
                                 f"supported; flipsafe reads weights quantized per output "
                                 f"channel (axis 0)")
            return AffineFormat(dtype, scales, zero_points, qmin, qmax)
        _, scale, zero_point, qmin, qmax, dtype = args[:6]
        return AffineFormat(dtype, scale, zero_point, qmin, qmax)


    @staticmethod
    def source(node: fx.Node, dequantize: fx.Node) -> dict:
        """Weights: the program's attributes holding the codes and scales; activations:
        the quantize node (its scale is an argument of its dequantizes)."""
        if node is dequantize:
            scale, zero_point = node.args[1], node.args[2]
            return {"codes": node.args[0].target,
                    "scale": scale.target if isinstance(scale, fx.Node) else None,
                    "zero_point": (zero_point.target if isinstance(zero_point, fx.Node)
                                   else None)}
        return {"node": node.name}


def patterns(gm: fx.GraphModule) -> tuple[dict, dict]:
    """The stored codes of a PT2E graph (deployed.patterns.find)."""
    return find(gm, PT2E)


def is_quantized_graph(gm: fx.GraphModule) -> bool:
    return any(_op(n) is not None for n in gm.graph.nodes)
