"""ONNX files (float and QDQ-quantized) read into a torch.fx graph flipsafe can inject into.

flipsafe reads ONNX itself rather than through a converter package: it needs the graph in
the ATen form campaign.lift lifts (aten.conv2d / aten.linear on constant weights), the
QuantizeLinear / DequantizeLinear pairs as calls it can find (the ONNX dialect of
deployed.patterns), ONNX Runtime's arithmetic for them (x / scale, ties to even, plus the
zero point, saturated; (q - zero point) * scale), the initializer names kept so
`flipsafe verify` can find each layer's codes in the file again, and one clear error for
what it cannot read. The ops read are those of image classifiers (SUPPORTED); anything
else is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from flipsafe.errors import ModelError
from flipsafe.formats import AffineFormat
from flipsafe.formats.stored import STORED_DTYPES

A = torch.ops.aten


def quantize_linear(x, scale, zero_point, axis: int = 1):
    """ONNX QuantizeLinear as ONNX Runtime computes it (per tensor)."""
    zp = torch.as_tensor(zero_point)
    lo, hi = STORED_DTYPES[zp.dtype]
    q = torch.div(x, torch.as_tensor(scale, dtype=torch.float32)).round() + zp.to(torch.float32)
    return q.clamp(lo, hi).to(zp.dtype)


def dequantize_linear(codes, scale, zero_point, axis: int = 1):
    """ONNX DequantizeLinear: (codes - zero point) * scale, per tensor or along `axis`."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    zp = torch.as_tensor(zero_point)
    if scale.dim() == 1 and scale.numel() > 1:
        shape = [1] * codes.dim()
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (codes.to(torch.float32) - zp.to(torch.float32)) * scale


class ONNX:
    """The ONNX dialect of quantize/dequantize calls (see deployed.patterns)."""

    @staticmethod
    def role(node: fx.Node) -> str | None:
        if node.op != "call_function":
            return None
        return {quantize_linear: "quantize", dequantize_linear: "dequantize"}.get(node.target)

    @staticmethod
    def params(node: fx.Node, args: list) -> list:
        return list(args[1:])

    @staticmethod
    def source(node: fx.Node, dequantize: fx.Node) -> dict:
        """The ONNX names of the codes and their scale (recorded by the reader)."""
        return dict(node.meta.get("source", {}))

    @staticmethod
    def format(node: fx.Node, args: list) -> AffineFormat | None:
        _, scale, zero_point, axis = (list(args) + [1])[:4]
        zp = torch.as_tensor(zero_point)
        if zp.dtype not in STORED_DTYPES:
            return None  # int32 biases: a fixed float value, not 8-bit stored codes
        scale = torch.as_tensor(scale)
        if scale.numel() > 1 and axis != 0:
            raise ModelError(f"per-channel quantisation along axis {axis} is not supported; "
                             "flipsafe reads weights quantized per output channel (axis 0)")
        return AffineFormat(zp.dtype, scale.reshape(-1) if scale.numel() > 1 else scale,
                            zp.reshape(-1), divide=True)


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        from flipsafe.deployed.pt2e import missing

        raise missing("onnx") from None
    return onnx, numpy_helper


def load_proto(path: Path):
    """The ModelProto of an ONNX file, or one line saying why it is not one."""
    onnx, _ = _onnx()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure: not an ONNX file
        raise ModelError(f"{path} is not an ONNX model ({type(exc).__name__}); save one "
                         "with torch.onnx.export") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX model with a graph (it has no nodes)")
    return model


def input_shape(model) -> tuple:
    """(batch, C, H, W) of the one graph input: ints where static, None where dynamic."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"the ONNX model has {len(inputs)} inputs; flipsafe reads image "
                         "classifiers with one input")
    dims = inputs[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def is_quantized(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _attr_name(name: str) -> str:
    """An ONNX tensor name as a dotted attribute path ('conv1.weight' stays itself)."""
    parts = [re.sub(r"\W", "_", p) for p in name.split(".")]
    parts = [p if p and not p[0].isdigit() or p.isdigit() else f"t{p}" for p in parts if p]
    return ".".join(parts) or "t"


def _path(onnx_name: str) -> str:
    """The module path an exporter wrote into a node name ('/layer1/conv1/Conv' ->
    'layer1.conv1'); '' for a node at the top."""
    parts = [p for p in onnx_name.split("/") if p]
    return ".".join(parts[:-1])


@dataclass
class _Reader:
    """One ONNX graph read into an fx.Graph of ATen calls on named constants."""

    model: object
    graph: fx.Graph = field(default_factory=fx.Graph)
    env: dict = field(default_factory=dict)  # ONNX value name -> fx node
    consts: dict = field(default_factory=dict)  # ONNX value name -> tensor
    attrs: dict = field(default_factory=dict)  # attribute path -> tensor

    def __post_init__(self):
        _, self.numpy_helper = _onnx()
        for t in self.model.graph.initializer:
            self.consts[t.name] = torch.from_numpy(self.numpy_helper.to_array(t).copy())

    def const_node(self, name: str) -> fx.Node:
        """A get_attr node for constant `name` (the attribute path keeps the ONNX name)."""
        if name not in self.env:
            path = _attr_name(name)
            while path in self.attrs and self.attrs[path] is not self.consts[name]:
                path += "_"
            self.attrs[path] = self.consts[name]
            self.env[name] = self.graph.get_attr(path)
        return self.env[name]

    def value(self, name: str):
        """An fx node for ONNX value `name` (a constant becomes a get_attr)."""
        if name in self.env:
            return self.env[name]
        if name in self.consts:
            return self.const_node(name)
        raise ModelError(f"the ONNX graph reads {name!r} before any node computes it")

    def scalar(self, name: str):
        """A per-tensor scale or zero point as a number, a per-channel one as a node."""
        t = self.consts.get(name)
        if t is None:
            raise ModelError(f"quantisation parameter {name!r} is computed at run time; "
                             "flipsafe reads constant scales and zero points")
        return self.const_node(name) if t.numel() > 1 else t.reshape(())

    def call(self, target, args, onnx_node) -> fx.Node:
        node = self.graph.call_function(target, tuple(args))
        # names layers (campaign.lift): the exporter's module path, else the op ('add')
        path = _path(onnx_node.name) or onnx_node.op_type.lower()
        node.meta["nn_module_stack"] = {"onnx": (path, onnx_node.op_type)}
        return node


def _attrs(onnx, node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: dict, dims: int, what: str) -> list:
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"{what} with auto_pad is not supported; export with explicit pads")
    if pads[:dims] != pads[dims:]:
        raise ModelError(f"{what} pads its sides unequally ({pads}); flipsafe reads "
                         "symmetric padding")
    return pads[:dims]


def _quantize(r, node, a, ins, x):
    out = r.call(quantize_linear, [x, r.scalar(ins[1]), r.scalar(ins[2]), a.get("axis", 1)],
                 node)
    out.meta["source"] = {"codes": node.output[0], "scale": ins[1], "node": node.name,
                          "zero_point": ins[2] if len(ins) > 2 and ins[2] else None}
    return out


def _dequantize(r, node, a, ins, x):
    src = r.const_node(ins[0]) if ins[0] in r.consts else x
    zp = r.scalar(ins[2]) if len(ins) > 2 and ins[2] else torch.tensor(0, dtype=torch.uint8)
    out = r.call(dequantize_linear, [src, r.scalar(ins[1]), zp, a.get("axis", 1)], node)
    if ins[0] in r.consts:
        out.meta["source"] = {"codes": ins[0], "scale": ins[1],
                              "zero_point": ins[2] if len(ins) > 2 and ins[2] else None}
    return out


def _conv(r, node, a, ins, x):
    dims = len(a.get("kernel_shape", [])) or 2
    if dims not in (1, 2, 3):
        raise ModelError(f"Conv {node.name} has {dims} spatial dims")
    conv = {1: A.conv1d.default, 2: A.conv2d.default, 3: A.conv3d.default}[dims]
    b = r.value(ins[2]) if len(ins) > 2 and ins[2] else None
    return r.call(conv, [x, r.value(ins[1]), b, list(a.get("strides", [1] * dims)),
                         _pads(a, dims, f"Conv {node.name}"),
                         list(a.get("dilations", [1] * dims)), a.get("group", 1)], node)


def _linear(r, node, a, ins, x):
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        raise ModelError(f"Gemm {node.name} with transA/alpha/beta is not supported")
    trans = a.get("transB", 0) if node.op_type == "Gemm" else 0
    w = _linear_weight(r, ins[1], trans, node)
    b = r.value(ins[2]) if len(ins) > 2 and ins[2] else None
    return r.call(A.linear.default, [x, w, b], node)


def _binary(fn):
    return lambda r, node, a, ins, x: r.call(fn, [r.value(ins[0]), r.value(ins[1])], node)


def _unary(fn, *extra):
    return lambda r, node, a, ins, x: r.call(
        fn, [x, *(a.get(k, d) for k, d in extra)], node)


def _clip(r, node, a, ins, x):
    lo = float(r.consts[ins[1]]) if len(ins) > 1 and ins[1] else a.get("min")
    hi = float(r.consts[ins[2]]) if len(ins) > 2 and ins[2] else a.get("max")
    return r.call(A.clamp.default, [x, lo, hi], node)


def _pool(r, node, a, ins, x):
    k = list(a["kernel_shape"])
    if len(k) != 2:
        raise ModelError(f"{node.op_type} {node.name} over {len(k)} dims; flipsafe reads 2-D "
                         "pools")
    pads = _pads(a, 2, f"{node.op_type} {node.name}")
    strides, ceil = list(a.get("strides", k)), bool(a.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        return r.call(A.max_pool2d.default,
                      [x, k, strides, pads, list(a.get("dilations", [1, 1])), ceil], node)
    return r.call(A.avg_pool2d.default,
                  [x, k, strides, pads, ceil, bool(a.get("count_include_pad", 0))], node)


def _flatten(r, node, a, ins, x):
    if a.get("axis", 1) != 1:
        raise ModelError(f"Flatten {node.name} on axis {a.get('axis')}; flipsafe reads axis 1 "
                         "(the batch kept)")
    return r.call(A.flatten.using_ints, [x, 1, -1], node)


def _reshape(r, node, a, ins, x):
    if ins[1] not in r.consts:
        raise ModelError(f"Reshape {node.name} to a shape computed at run time is not "
                         "supported; export with a constant shape (e.g. torch.flatten)")
    rest = [int(v) for v in r.consts[ins[1]].tolist()][1:]
    if 0 in rest:
        raise ModelError(f"Reshape {node.name} copies a non-batch dim (0); not supported")
    batch = r.call(A.sym_size.int, [x, 0], node) if -1 in rest else -1
    return r.call(A.reshape.default, [x, [batch, *rest]], node)


def _batch_norm(r, node, a, ins, x):
    w, b, mean, var = (r.value(i) for i in ins[1:5])
    return r.call(A.batch_norm.default,
                  [x, w, b, mean, var, False, 0.1, a.get("epsilon", 1e-5), True], node)


_OPS = {
    "Identity": lambda r, node, a, ins, x: r.value(ins[0]),
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "Conv": _conv,
    "Gemm": _linear, "MatMul": _linear, "Clip": _clip, "MaxPool": _pool, "AveragePool": _pool,
    "Flatten": _flatten, "Reshape": _reshape, "BatchNormalization": _batch_norm,
    "Add": _binary(A.add.Tensor), "Sub": _binary(A.sub.Tensor), "Mul": _binary(A.mul.Tensor),
    "Div": _binary(A.div.Tensor), "Relu": _unary(A.relu.default),
    "Sigmoid": _unary(A.sigmoid.default), "Tanh": _unary(A.tanh.default),
    "LeakyRelu": _unary(A.leaky_relu.default, ("alpha", 0.01)),
    "Softmax": _unary(A.softmax.int, ("axis", -1)),
    "Transpose": lambda r, node, a, ins, x: r.call(A.permute.default, [x, list(a["perm"])], node),
    "GlobalAveragePool": lambda r, node, a, ins, x: r.call(A.mean.dim, [x, [-2, -1], True], node),
    "Concat": lambda r, node, a, ins, x: r.call(
        A.cat.default, [[r.value(i) for i in ins], a["axis"]], node),
}
_OPS["Dropout"] = _OPS["Identity"]
SUPPORTED = tuple(sorted([*_OPS, "Constant"]))


def _convert_node(r: _Reader, onnx, node) -> None:
    a, ins = _attrs(onnx, node), list(node.input)
    if node.op_type == "Constant":
        r.consts[node.output[0]] = torch.from_numpy(r.numpy_helper.to_array(a["value"]).copy())
        return
    x = r.value(ins[0]) if ins and ins[0] and ins[0] not in r.consts else None
    r.env[node.output[0]] = _OPS[node.op_type](r, node, a, ins, x)


def _linear_weight(r: _Reader, name: str, trans: int, node):
    """The [out, in] weight of a Gemm/MatMul: a constant, or stored codes dequantized."""
    if name in r.consts:
        w = r.consts[name]
        if not trans:
            r.consts[name + ".T"] = w.t().contiguous()
            return r.const_node(name + ".T")
        return r.const_node(name)
    src = r.env.get(name)
    if not trans and src is not None and ONNX.role(src) == "dequantize":
        codes, scale = src.args[0], src.args[1]
        if isinstance(scale, fx.Node):
            raise ModelError(f"{node.op_type} {node.name} reads per-channel codes as "
                             "[in, out]; export with transB=1 (torch.onnx.export does)")
        key = f"{codes.target}.T"
        r.consts[key] = r.attrs[codes.target].t().contiguous()
        out = r.call(dequantize_linear, [r.const_node(key), *src.args[1:]], node)
        out.meta["source"] = {**src.meta.get("source", {}), "transposed": True}
        return out
    if src is None or not trans:
        raise ModelError(f"{node.op_type} {node.name} multiplies by a value computed at run "
                         "time; flipsafe reads layers with constant weights")
    return src


def to_graph(path: Path) -> fx.GraphModule:
    """The ONNX file at `path` as an fx.GraphModule of ATen calls (see the module doc)."""
    from flipsafe.campaign.lift import attrs_root

    model = load_proto(path)
    onnx, _ = _onnx()
    unknown = sorted({n.op_type for n in model.graph.node if n.op_type not in SUPPORTED})
    if unknown:
        raise ModelError(f"{path} uses ONNX ops flipsafe cannot read: {', '.join(unknown)} "
                         f"(it reads {', '.join(SUPPORTED)})")
    shape = input_shape(model)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ModelError(f"{path}: the input must be [batch, channels, height, width] with "
                         f"fixed channels and size; its shape is "
                         f"{['?' if d is None else d for d in shape]}")
    r = _Reader(model)
    inits = {t.name for t in model.graph.initializer}
    name = next(i.name for i in model.graph.input if i.name not in inits)
    r.env[name] = r.graph.placeholder("input")
    for node in model.graph.node:
        try:
            _convert_node(r, onnx, node)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read {node.op_type} node {node.name!r} "
                             f"({type(exc).__name__}: {exc})") from None
    outputs = [o.name for o in model.graph.output]
    if len(outputs) != 1:
        raise ModelError(f"the ONNX model has {len(outputs)} outputs; flipsafe reads one "
                         "(the class scores)")
    r.graph.output(r.value(outputs[0]))
    return attrs_root(r.attrs, r.graph)
