"""torch.export capture of models torch.fx cannot trace, with leaf modules as call_module nodes."""

# torch.export records every operation as an ATen call. The engine emulates formats and
# injects faults at leaf modules (module hooks capture their inputs and raw outputs), so
# each leaf module's run of ATen nodes - found through the node's nn_module_stack - is
# folded back into one call_module node that calls the model's own module. A leaf whose
# ATen nodes do not form one tensor-in, tensor-out region makes the capture fail, and so
# does data-dependent control flow: the engine then uses hooks.

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator

import torch
from torch import fx, nn

from flipsafe.compat import is_aten_op, is_mutable, overload_name, returns_view
from flipsafe.inject.rows import POINTWISE_FUNCS

# Nodes torch.export adds to check its shape assumptions at run time: the suffix runs feed
# batches of any size (one faulty row included), so the checks are dropped.
_CHECKS = {"_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range_for_size",
           "_assert_async", "sym_constrain_range"}


class CaptureError(Exception):
    """The model cannot be captured with torch.export as a graph of its leaf modules."""


def _leaf_call(node: fx.Node, leaves: dict):
    """(call key, leaf name) of the outermost leaf module whose forward made `node`."""
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        path = value[0] if isinstance(value, tuple) else value
        if path in leaves:
            return key, path
    return None


def _one_tensor_argument(mod: nn.Module) -> bool:
    try:
        params = inspect.signature(mod.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _fold_leaf(graph: fx.Graph, name: str, nodes: list, mod: nn.Module):
    region = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes
              if a not in region and a.op != "get_attr"}
    tensors = [a for a in inputs if _is_tensor(a)]
    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    if len(tensors) != 1 or len(outputs) != 1 or not _is_tensor(outputs[0]):
        raise CaptureError(f"module {name} ({type(mod).__name__}) is not one tensor in, one "
                           f"tensor out in the exported graph")
    if not _one_tensor_argument(mod):
        raise CaptureError(f"module {name} ({type(mod).__name__}) takes more than one input")
    # Run as a module, it would write into its input: a value the golden run caches.
    if any(_writes(n) and n.args[0] not in region for n in nodes):
        raise CaptureError(f"module {name} ({type(mod).__name__}) changes its input in place")
    out = outputs[0]
    with graph.inserting_after(out):
        call = graph.call_module(name, (tensors[0],))
    call.meta = {"val": out.meta.get("val"), "nn_module_stack": out.meta.get("nn_module_stack"),
                 # element-wise modules of their own (transformers' GELUActivation): a
                 # suffix run may compute them on one row of their input (Program.tail)
                 "pointwise": all(n.target in POINTWISE_FUNCS for n in nodes)}
    out.replace_all_uses_with(call)
    for n in reversed(nodes):
        graph.erase_node(n)


def _out_of_place(graph: fx.Graph):
    """Make in-place ATen ops out-of-place, so values cached by a golden run are never
    overwritten by later nodes."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        op = node.target
        if node.op != "call_function" or not is_aten_op(op):
            continue
        if not is_mutable(op):
            continue
        packet = op.overloadpacket.__name__
        twin = getattr(getattr(torch.ops.aten, packet[:-1], None), overload_name(op), None) \
            if packet.endswith("_") and not packet.startswith("_") else None
        target = node.args[0] if node.args else None
        if twin is None or not isinstance(target, fx.Node):
            raise CaptureError(f"in-place operation {op} has no out-of-place twin")
        # Readers of the mutated value after the op would see the old value once the op is
        # out-of-place; so would readers of a tensor the value is a view of, or of a view
        # of the value.
        later = [u for u in target.users if u is not node and order[u] > order[node]]
        views = [u for u in target.users if u is not node and _is_view(u)]
        if later or views or _is_view(target) or target.op in ("placeholder", "get_attr"):
            raise CaptureError(f"in-place operation {op} changes a value read elsewhere")
        node.target = twin


def _writes(node: fx.Node) -> bool:
    """Whether the node's op changes its first argument in place."""
    op = node.target
    return (node.op == "call_function" and is_aten_op(op)
            and is_mutable(op) and bool(node.args) and isinstance(node.args[0], fx.Node))


def _is_view(node: fx.Node) -> bool:
    op = node.target
    return (node.op == "call_function" and is_aten_op(op)
            and returns_view(op))


def _drop_unused(graph: fx.Graph):
    """Erase attributes and side-effect-free operations nothing reads (the parameters of
    folded modules, size computations only they used)."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op not in ("get_attr", "call_function"):
            continue
        op = node.target
        pure = node.op == "get_attr" or op is operator.getitem or (
            is_aten_op(op) and not is_mutable(op)
            and op.overloadpacket.__name__ not in _CHECKS)
        if pure:
            graph.erase_node(node)


def _resolve(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def export_graph(model: nn.Module, example: torch.Tensor, leaves: dict) -> tuple[fx.Graph, dict]:
    """Capture `model` with torch.export for a batch of any size; returns the graph, with
    each leaf module run as one call_module node, and {get_attr target: value} for the
    attributes that are not the model's own (constants torch.export lifted)."""
    # torch.export logs and prints the graph it got so far when it gives up; the engine
    # reports the failure itself (trace_error) and goes on with hooks.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            batch = torch.export.Dim("batch")
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},),
                                          strict=False)
        gm = program.module()
    except Exception as exc:  # any export failure means "use hooks instead"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CaptureError(f"torch.export cannot capture {type(model).__name__}: "
                           f"{type(exc).__name__}: {first}") from exc
    finally:
        logging.disable(previous)
    # A graph of its own: its call_module nodes name modules of `model`, not of `gm`.
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    if isinstance(out, (tuple, list)) and len(out) == 1:  # outputs come as a flat list
        out = out[0]
    graph.output(out)
    for node in list(graph.nodes):
        checker = node.op == "call_module" and node.target not in leaves
        check = node.op == "call_function" and getattr(
            getattr(node.target, "overloadpacket", None), "__name__", "") in _CHECKS
        if (checker or check) and not node.users:
            graph.erase_node(node)
        elif node.op == "call_module":
            raise CaptureError(f"unexpected module call {node.target} in the exported graph")
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_function":
            key = _leaf_call(node, leaves)
            if key is not None:
                calls.setdefault(key, []).append(node)
    for (_, name), nodes in calls.items():
        _fold_leaf(graph, name, nodes, leaves[name])
    _out_of_place(graph)
    _drop_unused(graph)
    first = next(iter(graph.nodes))
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        first.prepend(node)  # programs read their inputs first
    attrs = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                _resolve(model, node.target)
            except AttributeError:
                attrs[node.target] = _resolve(gm, node.target)
    graph.lint()
    return graph, attrs
