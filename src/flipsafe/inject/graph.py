"""torch.fx programs: golden runs that cache node values, and suffix runs after one node."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from flipsafe.inject.rows import HEAD, ROWS, RowPlanning

_INPLACE_FUNCS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
}

class TraceError(Exception):
    """The model cannot run as a suffix program (the engine falls back to hooks)."""


def _tensors_in(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


def gather_rows(value, idx, every: bool = False):
    """value's rows idx; `every`: idx is 0..B-1 of a B-row value, whose contiguous tensors
    are then used as they are (suffix runs never write into their inputs, as golden runs
    do not: the cache holds the golden run's own tensors)."""
    if isinstance(value, torch.Tensor):
        if every and value.shape[0] == idx.numel() and value.is_contiguous():
            return value
        return value.index_select(0, idx)
    if isinstance(value, (tuple, list)):
        return type(value)(gather_rows(v, idx, every) for v in value)
    return value


class _Gathered(dict):
    """A suffix run's env whose cached values are gathered on first read."""

    def __init__(self, cache: dict, nodes: set, idx):
        super().__init__()
        self.cache, self.nodes, self.idx = cache, nodes, idx
        self.every = None  # idx is 0..n-1 (a weight fault on every image of the batch)

    def __missing__(self, node):
        if node not in self.nodes:
            raise KeyError(node)
        if self.every is None:
            n = self.idx.numel()
            self.every = bool(torch.equal(self.idx, torch.arange(n, device=self.idx.device)))
        value = self[node] = gather_rows(self.cache[node], self.idx, self.every)
        return value


def _last_uses(steps: list, output: fx.Node) -> list:
    """For each step, the values (its inputs) that no later step reads."""
    last = {}
    for i, n in enumerate(steps):
        for a in n.all_input_nodes:
            last[a] = i
    frees = [[] for _ in steps]
    for a, i in last.items():
        if a is not output:
            frees[i].append(a)
    return frees


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with flipsafe's own layer modules (`flipsafe_leaf`) kept as
    leaves like those of torch.nn."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "flipsafe_leaf", False) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """Trace model (modules of torch.nn stay leaves) with in-place ops made out-of-place,
    so cached values are never overwritten later in the same run."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # any tracing failure means "use hooks instead"
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
    for node in graph.nodes:
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
        if node.op == "call_function":
            if node.target in _INPLACE_FUNCS:
                node.target = _INPLACE_FUNCS[node.target]
            name = getattr(node.target, "__name__", "")
            if name.endswith("_") and not name.startswith("_"):
                twin = getattr(torch, name[:-1], None) or getattr(F, name[:-1], None)
                if twin is None:
                    raise TraceError(f"in-place function {name} has no out-of-place twin")
                node.target = twin
        elif node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.startswith("_"):
                if not hasattr(torch.Tensor, name[:-1]):
                    raise TraceError(f"in-place method {name} has no out-of-place twin")
                node.target = name[:-1]
    return graph


@dataclass
class Plan:
    """What a run starting after `start` executes and which cached values it reads."""

    start: fx.Node
    steps: list  # (node, callable(env)) in graph order
    gathered: list  # batch-dependent values read from the golden cache, gathered per image
    constants: list  # values that do not depend on the images
    dead: bool  # the output does not depend on the start node
    chain: list = field(default_factory=list)  # pointwise nodes right after start
    frees: list = field(default_factory=list)  # per step: values no later step reads
    full_steps: list = field(default_factory=list)  # steps without the one-row tail
    rows: bool = False  # some steps run on the one row the output reads (Program.tail)
    head_steps: list = field(default_factory=list)  # steps following one changed row
    head_dim: int = 0  # the dim of start whose one row a fault changes (0: none)


class Program(RowPlanning):
    """A traced model run node by node.

    `quantize` maps module names to functions applied to their outputs (format emulation).
    A probe run fixes which values depend on the batch and checks they are batch-first.
    """

    def __init__(self, model: nn.Module, quantize: dict, graph: fx.Graph | None = None,
                 attrs: dict | None = None):
        self.model = model
        self.graph = trace(model) if graph is None else graph
        self.attrs = attrs or {}  # get_attr targets that are not attributes of the model
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.quantize = quantize
        self.modules = dict(model.named_modules())
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) < 1:
            raise TraceError("the traced model takes no input")
        self.output = next(n for n in self.nodes if n.op == "output")
        self.batch_dep = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.batch_dep for a in n.all_input_nodes):
                self.batch_dep.add(n)
        self.module_nodes: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                self.module_nodes.setdefault(n.target, []).append(n)
        self._fns = {n: self._compile(n) for n in self.nodes}
        self._plans: dict = {}
        self._full_frees = _last_uses(self.nodes[len(self.placeholders):], self.output)
        self.is_tensor: dict = {}
        self.shapes: dict = {}  # tensor values of the probe run (batch of 3): shapes
        self.contiguous: dict = {}
        self.tail: dict = {}  # node -> (dim, index): the one row later nodes read of it
        self._tail_pad = 0
        self.probed = False

    def set_quantize(self, quantize: dict):
        """Emulate module outputs with these functions from now on."""
        self.quantize = quantize
        self._fns = {n: self._compile(n) for n in self.nodes}
        self._plans.clear()

    # -- execution ---------------------------------------------------------------------

    def _compile(self, node: fx.Node):
        load = fx.node.map_arg
        args, kwargs = node.args, node.kwargs
        if node.op == "call_module":
            mod = self.modules[node.target]
            q = self.quantize.get(node.target)
            if q is None:
                return lambda env: mod(*load(args, env.__getitem__), **load(kwargs, env.__getitem__))
            return lambda env: q(mod(*load(args, env.__getitem__), **load(kwargs, env.__getitem__)))
        if node.op == "call_function":
            fn = node.target
            return lambda env: fn(*load(args, env.__getitem__), **load(kwargs, env.__getitem__))
        if node.op == "call_method":
            name = node.target

            def call(env):
                self_obj, *rest = load(args, env.__getitem__)
                return getattr(self_obj, name)(*rest, **load(kwargs, env.__getitem__))
            return call
        if node.op == "get_attr":
            target = node.target
            if target in self.attrs:
                value = self.attrs[target]
                return lambda env: value

            def fetch(env):
                obj = self.model
                for part in target.split("."):
                    obj = getattr(obj, part)
                return obj
            return fetch
        if node.op == "output":
            return lambda env: load(args[0], env.__getitem__)
        return None

    def run_raw(self, node: fx.Node, env: dict):
        """A call_module node's output before format emulation."""
        mod = self.modules[node.target]
        load = fx.node.map_arg
        return mod(*load(node.args, env.__getitem__), **load(node.kwargs, env.__getitem__))

    def probe(self, x: torch.Tensor):
        """Run once on a batch of 3 copies of one image: record tensor-ness of every value and
        check that every batch-dependent tensor is batch-first."""
        x3 = x[:1].expand(3, *x.shape[1:]).contiguous()
        env = {self.placeholders[0]: x3}
        self.shapes[self.placeholders[0]] = tuple(x3.shape)
        self.contiguous[self.placeholders[0]] = True
        for n in self.placeholders[1:]:
            env[n] = n.args[0] if n.args else None
        for n in self.nodes[len(self.placeholders):]:
            value = self._fns[n](env)
            env[n] = value
            tensors = _tensors_in(value)
            self.is_tensor[n] = bool(tensors)
            if isinstance(value, torch.Tensor):
                self.shapes[n] = tuple(value.shape)
                self.contiguous[n] = value.is_contiguous()
            if n in self.batch_dep and tensors:
                if not isinstance(value, (torch.Tensor, tuple, list)):
                    raise TraceError(f"value {n.name} holds tensors in a {type(value).__name__}")
                if any(t.dim() == 0 or t.shape[0] != 3 for t in tensors):
                    raise TraceError(f"value {n.name} is not batch-first")
        out = env[self.output]
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise TraceError("the model output is not a [batch, classes] tensor")
        self.probed = True
        self._find_tail()
        return env

    def run(self, x: torch.Tensor, keep=(), keep_raw=()):
        """Full run; returns (logits, {node: value} for keep, {node: raw output} for keep_raw)."""
        env = {self.placeholders[0]: x}
        for n in self.placeholders[1:]:
            env[n] = n.args[0] if n.args else None
        cache, raw = {}, {}
        for n in self.placeholders:
            if n in keep:  # sizes of the input (torch.export) are recomputed from it
                cache[n] = env[n]
        for n, frees in zip(self.nodes[len(self.placeholders):], self._full_frees):
            if n in keep_raw:
                r = self.run_raw(n, env)
                raw[n] = r
                q = self.quantize.get(n.target)
                env[n] = q(r) if q is not None else r
            else:
                env[n] = self._fns[n](env)
            if n in keep:
                cache[n] = env[n]
            for a in frees:  # dropped as soon as unused, so memory is reused as in eager mode
                del env[a]
        return env[self.output], cache, raw

    # -- suffix plans --------------------------------------------------------------------

    def plan(self, start: fx.Node) -> Plan:
        if start in self._plans:
            return self._plans[start]
        down = {start}
        for n in self.nodes[self.order[start] + 1:]:
            if any(a in down for a in n.all_input_nodes):
                down.add(n)
        down.discard(start)
        # Batch-dependent non-tensor values (sizes) are recomputed for the gathered batch.
        execute = set(down)
        stack = list(down)
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if (a not in execute and a is not start and a in self.batch_dep
                        and a.op != "placeholder" and not self.is_tensor.get(a, True)):
                    execute.add(a)
                    stack.append(a)
        gathered, constants = set(), set()
        for n in execute:
            for a in n.all_input_nodes:
                if a is start or a in execute:
                    continue
                (gathered if a in self.batch_dep else constants).add(a)
        full = [(n, self._fns[n]) for n in self.nodes if n in execute]
        narrowed = {n for n in execute if n in self.tail}
        steps = [(n, self._tail_fn(n, narrowed) if n in narrowed else
                  self._seed_fn(n) if self._tail_seeds.get(n, (None,))[0] in narrowed
                  else fn) for n, fn in full]
        head, boundary = self._head(start, execute, narrowed)
        head_steps = [(n, self._head_fn(n, head, boundary, start) if n in head else fn)
                      for n, fn in steps]
        plan = Plan(start, steps, sorted(gathered | boundary, key=self.order.get),
                    sorted(constants, key=self.order.get), self.output not in down,
                    self._chain(start), _last_uses([n for n, _ in steps], self.output),
                    full, bool(narrowed), head_steps, 1 if head else 0)
        self._plans[start] = plan
        return plan

    def gather(self, cache: dict, nodes, idx):
        """The env of a suffix run: cached values of `nodes` for the images idx, each
        gathered when a step first reads it (a step that computes the value instead, as
        the whole-image nodes of Plan.head_steps do without a one-row fault, skips it)."""
        return _Gathered(cache, set(nodes), idx)

    def run_suffix(self, plan: Plan, start_value, env: dict, changed=None):
        """Execute plan's steps with env holding gathered/constant inputs; returns logits.
        changed: per fault, the positions (flat, in one image's value) where start_value
        differs from the golden value, if known."""
        env[plan.start] = start_value
        steps = plan.steps
        head = self._head_rows(plan, start_value, changed)
        if head is not None:
            steps = plan.head_steps
            t, ar, pad = head
            r = start_value.movedim(plan.head_dim, 1)[ar, t].unsqueeze(plan.head_dim)
            env[(plan.start, HEAD)] = r.index_select(0, pad) if pad is not None else r.contiguous()
            env[HEAD] = head
        if plan.rows:
            rows = start_value.shape[0]
            if tuple(start_value.shape[1:]) != self.shapes[plan.start][1:]:
                steps = plan.full_steps  # other image sizes than the probe's
            pad = None
            if rows < self._tail_pad:
                pad = torch.arange(self._tail_pad, device=start_value.device)
                pad[rows:] = 0
            env[ROWS] = (rows, pad)
        for (n, fn), frees in zip(steps, plan.frees):
            env[n] = fn(env)
            for a in frees:
                del env[a]
        return env[self.output]

    def run_chain(self, plan: Plan, start_value, env: dict):
        """Run the pointwise chain on slices (env holds the other operands, sliced alike);
        returns the value at its last node."""
        env = dict(env)
        env[plan.start] = start_value
        for n in plan.chain:
            env[n] = self._fns[n](env)
        return env[plan.chain[-1]]
