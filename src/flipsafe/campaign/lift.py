"""Give graph-only models (torch.export programs, TorchScript) back their layers.

A module loaded from a `torch.export` program or converted from TorchScript is an
aten-level fx graph: its convolutions and matrix products are function calls on tensor
attributes, not nn.Conv2d / nn.Linear modules, so there is no layer for the engine to
hook. `lift_layers` rewrites each aten conv / linear call whose weight is an attribute
into a call of a real nn.Conv*d / nn.Linear module holding those same tensors, named
after the weight ("features.0.weight" gives layer "features.0"), so layer names match
the model the file was made from. The computation is the same op with the same tensors.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from flipsafe.compat import is_aten_op, overload_name
from flipsafe.deployed.modules import QuantDequant, attach
from flipsafe.errors import ModelError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _aten(name: str):
    return getattr(torch.ops.aten, name).default


def _conv_ops() -> dict:
    return {_aten("conv1d"): 1, _aten("conv2d"): 2, _aten("conv3d"): 3}


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(root)


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _module_name(weight_target: str, taken: set) -> str:
    base = weight_target.removesuffix(".weight")
    base = base.replace(".", "_") if not base else base
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _tensor_arg(root, node):
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = _attr(root, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return False  # computed at run time: not a fixed parameter


def _set_params(mod: nn.Module, weight, bias) -> None:
    if weight is not None:
        mod.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def _conv(dims: int, weight, bias, node) -> nn.Module:
    stride = _arg(node, 3, "stride", 1)
    padding = _arg(node, 4, "padding", 0)
    dilation = _arg(node, 5, "dilation", 1)
    groups = _arg(node, 6, "groups", 1)
    mod = _CONV[dims](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                      stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=bias is not None)
    return mod


# torch.nn's own classes: the engine's tracer keeps only those as layers (a subclass
# defined here would be traced through and lose its format emulation).
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _layer_norm(node, weight, bias) -> nn.Module:
    shape = _arg(node, 1, "normalized_shape", None)
    eps = _arg(node, 4, "eps", 1e-5)
    mod = nn.LayerNorm(tuple(shape), eps=eps, elementwise_affine=weight is not None,
                       bias=bias is not None)
    return mod


def _batch_norm(gm, node, weight, bias):
    """An eval-mode nn.BatchNorm*d for an aten.batch_norm call on fixed statistics and an
    input of known rank, or None."""
    mean = _tensor_arg(gm, _arg(node, 3, "running_mean", None))
    var = _tensor_arg(gm, _arg(node, 4, "running_var", None))
    training = _arg(node, 5, "training", False)
    if training or not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    kind = _BATCH_NORMS.get(val.dim()) if isinstance(val, torch.Tensor) else None
    if kind is None:
        return None
    mod = kind(mean.numel(), eps=_arg(node, 7, "eps", 1e-5),
               momentum=_arg(node, 6, "momentum", 0.1), affine=weight is not None)
    with torch.no_grad():
        mod.running_mean.copy_(mean)
        mod.running_var.copy_(var)
    return mod


def export_and_lift(model: nn.Module, sample: torch.Tensor) -> fx.GraphModule | None:
    """`model` exported with torch.export (dynamic batch) and lifted, when that gives the
    same logits as `model` on `sample`; None when it cannot be exported or differs.
    The graph lets the engine run only the part after a faulty layer (its fast path)."""
    try:
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},),
                                      strict=False)
        lifted = lift_layers(program.module()).eval()
        with torch.no_grad():
            want, got = model(sample), lifted(sample)
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape
                and torch.allclose(got, want, rtol=1e-5, atol=1e-6)):
            return None
    except Exception:  # noqa: BLE001 - any failure keeps the model as it is
        return None
    return lifted


def _path_name(node: fx.Node, suffix: str, taken: set) -> str:
    """A layer name for what `node` computes: the module path it ran in (a placeholder:
    'input') with `suffix`, e.g. 'features.1_q'."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else v for v in stack.values()]
    base = "input" if node.op == "placeholder" else next(
        (p for p in reversed(paths) if p), node.name)
    return _module_name(f"{base}{suffix}", taken)


class _Lifting:
    """One pass of lift_layers: the new graph, its attributes and the lifted layers."""

    def __init__(self, gm: fx.GraphModule, weights: dict, pairs: dict):
        self.gm, self.weights, self.pairs = gm, weights, pairs
        self.quantizes = {q for q, _, _ in pairs.values()}
        self.graph, self.env, self.attrs, self.taken = fx.Graph(), {}, {}, set()
        # the ATen ops lifted into layers, looked up once per pass
        self.convs, self.linear = _conv_ops(), _aten("linear")
        self.norms = (_aten("layer_norm"), _aten("batch_norm"))
        self.lifted = 0

    def fixed(self, node):
        """The fixed tensor behind a weight/bias argument; None if absent, False if
        computed at run time."""
        if isinstance(node, fx.Node) and node in self.weights:
            return self.weights[node][0]
        return _tensor_arg(self.gm, node)

    def emit(self, node: fx.Node, name: str, mod: nn.Module, source: fx.Node) -> None:
        self.taken.add(name)
        self.attrs[name] = mod
        self.env[node] = self.graph.call_module(name, (self.env[source],))
        self.env[node].meta = dict(node.meta)
        self.lifted += 1

    def norm(self, node: fx.Node, is_layer_norm: bool) -> bool:
        w_node = _arg(node, 2 if is_layer_norm else 1, "weight", None)
        weight = self.fixed(w_node)
        bias = self.fixed(_arg(node, 3 if is_layer_norm else 2, "bias", None))
        if weight is False or bias is False:
            return False
        mod = (_layer_norm(node, weight, bias) if is_layer_norm
               else _batch_norm(self.gm, node, weight, bias))
        if mod is None:
            return False
        _set_params(mod, weight, bias)
        name = _module_name(w_node.target if w_node is not None else f"norm{self.lifted}",
                            self.taken)
        self.emit(node, name, mod.eval(), node.args[0])
        return True

    def matmul(self, node: fx.Node, dims: int | None) -> bool:
        w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        weight, bias = self.fixed(w_node), self.fixed(_arg(node, 2, "bias", None))
        if not isinstance(weight, torch.Tensor) or bias is False:
            return False
        if dims is None:
            mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            mod = _conv(dims, weight, bias, node)
        _set_params(mod, weight, bias)
        if node.args[0] in self.pairs:  # it reads stored activation codes (an int8 PE's input)
            _, fmt, source = self.pairs[node.args[0]]
            attach(mod, "input", fmt, source)
        if w_node in self.weights:  # stored codes: named after the layer that runs them
            for pname, arg in (("weight", w_node), ("bias", _arg(node, 2, "bias", None))):
                if arg in self.weights and self.weights[arg][1] is not None:
                    attach(mod, pname, *self.weights[arg][1:])
            name = _path_name(node, "", self.taken)
        else:
            name = _module_name(w_node.target, self.taken)
        self.emit(node, name, mod, node.args[0])
        return True

    def copy(self, node: fx.Node) -> None:
        if node.op == "output":
            result = node.args[0]
            if isinstance(result, (tuple, list)) and len(result) == 1:
                result = result[0]
            self.graph.output(fx.node.map_arg(result, lambda n: self.env[n]))
            return
        if node.op in ("get_attr", "call_module"):
            self.attrs[node.target] = _attr(self.gm, node.target)
        self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])

    def step(self, node: fx.Node) -> None:
        if node.op == "call_module" and "guards" in str(node.target):
            return  # torch.export's shape guards would pin the batch size
        if node in self.quantizes:
            return  # lifted with its dequantize
        if node in self.pairs:
            quantize, fmt, source = self.pairs[node]
            if quantize in self.env:  # one code tensor read twice: one layer
                self.env[node] = self.env[quantize]
                return
            x = quantize.args[0]
            self.emit(node, _path_name(x, "_q", self.taken), QuantDequant(fmt, source), x)
            self.env[quantize] = self.env[node]
            return
        target = node.target if node.op == "call_function" else None
        conv = self.convs.get(target)
        if target in self.norms:
            if self.norm(node, target is self.norms[0]):
                return
        elif (conv or target is self.linear) and self.matmul(node, conv):
            return
        self.copy(node)


def lift_layers(gm: fx.GraphModule, stored: tuple[dict, dict] | None = None) -> fx.GraphModule:
    """A GraphModule computing what `gm` computes, with its aten conv/linear calls on fixed
    weights turned into nn.Conv*d / nn.Linear modules (see the module docstring).

    `stored` = (weights, pairs) from deployed.pt2e.patterns: dequantized weight codes
    become the weights of layers that keep their stored format, and activation
    quantize -> dequantize pairs become QuantDequant layers (deployed.modules)."""
    weights, pairs = stored or ({}, {})
    # Plain positional calling convention (export's pytree one does not deepcopy cleanly);
    # a single output is returned as itself rather than as a 1-tuple.
    run = _Lifting(gm, weights, pairs)
    for node in gm.graph.nodes:
        run.step(node)
    graph = run.graph
    dequantized = {run.env[n] for n in weights if n in run.env}
    for node in reversed(list(graph.nodes)):
        if (node.op == "get_attr" or node in dequantized) and not node.users:
            graph.erase_node(node)  # the weights now held by lifted modules
    _batch_from_nearest_tensor(graph)
    _out_of_place(graph)
    used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    root = {k: v for k, v in run.attrs.items() if k in used}
    if not run.lifted:
        raise ModelError("the model's graph has no convolution or linear layer with fixed "
                         "weights to inject into")
    return attrs_root(root, graph)


def _batch_from_nearest_tensor(graph: fx.Graph) -> None:
    """Take each `x.size(0)` of the input from the latest batch-first tensor before it is
    used instead (e.g. the patch embeddings that a ViT's class token is expanded to), so
    the graph after any layer reads no model input: a run that starts mid-graph has no
    input, only the values of earlier nodes."""
    sym_size = torch.ops.aten.sym_size.int
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is sym_size and node.users
                and node.args[0].op == "placeholder" and node.args[1] == 0):
            continue
        batch = _batch_dim(node.args[0])
        first_use = min(node.users, key=order.get)
        found = None
        for cand in graph.nodes:
            if order[cand] >= order[first_use]:
                break
            if cand.op != "placeholder" and _batch_dim(cand) is not None \
                    and str(_batch_dim(cand)) == str(batch):
                found = cand
        if found is None:
            continue
        with graph.inserting_before(first_use):
            size = graph.call_function(sym_size, (found, 0))
        size.meta = dict(node.meta)
        node.replace_all_uses_with(size)
        graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}


def _out_of_place(graph: fx.Graph) -> None:
    """Rewrite in-place aten ops on computed values (`h += residual` is aten.add_) as their
    out-of-place forms, later readers of the value reading the result: a value cached
    from a clean run must not change when the graph runs again from a faulty layer."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        op = node.target
        if node.op != "call_function" or not is_aten_op(op):
            continue
        name = op.overloadpacket.__name__
        if not name.endswith("_") or name.startswith("_") or not node.args:
            continue
        target = node.args[0]
        if not isinstance(target, fx.Node) or target.op in ("placeholder", "get_attr"):
            continue
        functional = getattr(getattr(torch.ops.aten, name[:-1], None), overload_name(op), None)
        if functional is None:
            continue
        node.target = functional
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)


def _batch_dim(node: fx.Node):
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() >= 1:
        return val.shape[0]
    return None


def attrs_root(attrs: dict, graph: fx.Graph) -> fx.GraphModule:
    """An fx.GraphModule over `graph` with `attrs` (dotted names) as its submodules and
    attributes; tensors become buffers so .to(device) moves them."""
    root = nn.Module()
    for target, value in attrs.items():
        *path, last = target.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, nn.Module):
            owner.add_module(last, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(last, nn.Parameter(value.detach(), requires_grad=False))
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(last, value)
        else:
            setattr(owner, last, value)
    gm = fx.GraphModule(root, graph)
    gm.eval()
    return gm
