"""torch.fx programs: golden runs that cache node values, and suffix runs after one node."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from flipsafe.compat import BatchNorm

_INPLACE_FUNCS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
}

# Nodes a one-element change passes through position by position (per channel at most),
# so the change can be followed on a small slice to see whether it dies out.
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Mish, nn.Softplus,
)
POINTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
    torch.mul, torch.div, F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardtanh,
    F.leaky_relu, torch.sigmoid, torch.tanh, F.hardswish, F.elu, F.dropout,
}
_aten = torch.ops.aten
POINTWISE_FUNCS |= {  # the same operations in graphs captured with torch.export
    _aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor, _aten.relu.default,
    _aten.gelu.default, _aten.silu.default, _aten.hardtanh.default, _aten.leaky_relu.default,
    _aten.sigmoid.default, _aten.tanh.default, _aten.hardswish.default, _aten.elu.default,
}


_ROWS = "rows of the run"  # env key of a suffix run: (faulty rows, padding index or None)
_HEAD = "changed rows"  # env key: (row index per fault, arange, padding index or None)


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


def trace(model: nn.Module) -> fx.Graph:
    """Trace model (modules of torch.nn stay leaves) with in-place ops made out-of-place,
    so cached values are never overwritten later in the same run."""
    try:
        graph = fx.symbolic_trace(model).graph
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


class Program:
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

    # -- the one-row tail ----------------------------------------------------------------

    # A classifier often reads one row of a value (a ViT's class token: x[:, 0]); the nodes
    # before it that work row by row along that dim (Linear, LayerNorm, pointwise) then
    # need only that row. Suffix runs compute them on it: a [rows, 1, ...] slice, with the
    # rows padded to at least the dim's size, so matrix products keep the shapes (M of at
    # least one full image's rows) whose results do not depend on M, and the row is put
    # back into a tensor laid out as in a full run before the reading node.

    def _seed(self, node: fx.Node):
        """(input, dim, index) if node reads one row of a batch value: aten.select.int or
        x[:, ..., k] on dim >= 1."""
        if node.op != "call_function" or not node.args or node.kwargs:
            return None
        src = node.args[0]
        if not isinstance(src, fx.Node) or src not in self.shapes or src not in self.batch_dep:
            return None
        ndim = len(self.shapes[src])
        if node.target is _aten.select.int and len(node.args) == 3:
            dim, index = node.args[1], node.args[2]
        elif node.target is operator.getitem and isinstance(node.args[1], tuple):
            ints = [i for i, v in enumerate(node.args[1]) if type(v) is int]
            rest = [v for i, v in enumerate(node.args[1]) if i not in ints]
            if len(ints) != 1 or any(v != slice(None) for v in rest):
                return None
            dim, index = ints[0], node.args[1][ints[0]]
        else:
            return None
        if type(dim) is not int or type(index) is not int:
            return None
        dim = dim + ndim if dim < 0 else dim
        if not 1 <= dim < ndim:
            return None
        size = self.shapes[src][dim]
        index = index + size if index < 0 else index
        return (src, dim, index) if 0 <= index < size else None

    def _aligned(self, a: fx.Node, u: fx.Node, dim: int):
        """The dim of operand `a` that lines up with `dim` of u's output; None if `a`
        broadcasts along it, False if it cannot be sliced alike."""
        sa, su = self.shapes.get(a), self.shapes[u]
        if sa is None:
            return None if not self.is_tensor.get(a, True) else False
        da = dim - (len(su) - len(sa))
        if da < 0 or (sa[da] == 1 and su[dim] != 1):
            return None
        return da if sa[da] == su[dim] and self.contiguous.get(a) else False

    def _row_local(self, node: fx.Node, dim: int) -> bool:
        """Whether row k of node's output along dim depends on row k of its operands only."""
        shape = self.shapes.get(node)
        if shape is None or not 1 <= dim < len(shape) or node not in self.batch_dep:
            return False
        if any(a not in node.args for a in node.all_input_nodes):
            return False  # operands inside lists (cat) or keywords are not followed
        if node.op == "call_module":
            mod = self.modules[node.target]
            if mod.training or len(node.args) != 1:
                return False
            if isinstance(mod, nn.Linear):
                ok = dim < len(shape) - 1
            elif isinstance(mod, nn.LayerNorm):
                ok = dim < len(shape) - len(mod.normalized_shape)
            else:
                ok = isinstance(mod, _POINTWISE_MODULES) or node.meta.get("pointwise", False)
            # Emulated outputs are quantised element by element or in blocks of the last dim.
            ok = ok and (node.target not in self.quantize or dim < len(shape) - 1)
        elif node.op == "call_function":
            if node.target is _aten.slice.Tensor:
                d = node.args[1] if len(node.args) > 1 else 0
                ok = type(d) is int and (d + len(shape) if d < 0 else d) != dim
            else:
                ok = node.target in POINTWISE_FUNCS
        else:
            return False
        if not ok:
            return False
        return all(self._aligned(a, node, dim) is not False for a in node.all_input_nodes
                   if self.is_tensor.get(a, a in self.shapes))

    def _find_tail(self):
        """Program.tail: the nodes only one row (dim, index) of whose value is read, that
        compute that row from the same row of their operands."""
        seeds = {}
        for n in self.nodes:
            seed = self._seed(n)
            if seed is not None:
                seeds[n] = seed
        tail = {}
        for n in reversed(self.nodes):
            if n.op == "placeholder" or n not in self.shapes or not n.users:
                continue
            want = None
            for u in n.users:
                if u in seeds and seeds[u][0] is n and n not in u.args[1:]:
                    w = seeds[u][1:]
                elif u in tail and n in u.args:
                    du, k = tail[u]
                    da = self._aligned(n, u, du)
                    w = (da, k) if type(da) is int and da >= 1 else None
                else:
                    w = None
                if w is None or (want is not None and w != want):
                    want = None
                    break
                want = w
            if want is not None and self._row_local(n, want[0]):
                tail[n] = want
        self.tail = tail
        self._tail_seeds = {u: s for u, s in seeds.items() if s[0] in tail}
        self._tail_pad = max((self.shapes[n][d] for n, (d, _) in tail.items()), default=0)
        self._plans.clear()

    def _tail_fn(self, node: fx.Node, narrowed: set):
        """node's step on one row: operands not computed on it are sliced (and padded)."""
        dim, index = self.tail[node]
        spec = {}
        for a in node.all_input_nodes:
            da = self._aligned(a, node, dim)
            if a not in narrowed and da is not None:
                spec[a] = (da, a in self.batch_dep)

        args, kwargs = node.args, node.kwargs
        q = self.quantize.get(node.target) if node.op == "call_module" else None
        target = self.modules[node.target] if node.op == "call_module" else node.target

        def run(env):
            pad = env[_ROWS][1]

            def load(a):
                if a not in spec:
                    return env[a]
                da, batch = spec[a]
                v = env[a].narrow(da, index, 1)
                return v.index_select(0, pad) if batch and pad is not None else v.contiguous()
            out = target(*fx.node.map_arg(args, load), **kwargs)
            return q(out) if q is not None else out
        return run

    def _seed_fn(self, node: fx.Node):
        """The reading node of a one-row tail: the row, laid out as in a full run."""
        src, dim, index = self._tail_seeds[node]
        rest = self.shapes[src][1:]

        def run(env):
            rows = env[_ROWS][0]
            row = env[src].narrow(0, 0, rows).select(dim, 0)
            out = row.new_empty((rows, *rest)).select(dim, index)
            return out.copy_(row)
        return run

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

    # -- one changed row ------------------------------------------------------------------

    # A fault in one row of a [B, T, D] value (one token) changes only that row through the
    # nodes that work row by row (Linear, LayerNorm, pointwise), up to the next node that
    # mixes rows (attention). Suffix runs compute that row alone there (padded as in the
    # tail) and put it into the cached golden value where a row-mixing node reads it.

    def _head(self, start: fx.Node, execute: set, narrowed: set):
        """({node: dim} computed on the changed row, the subset read whole by later nodes)."""
        shape = self.shapes.get(start)
        if shape is None or len(shape) < 3 or start not in self.batch_dep or start in narrowed:
            return {}, set()
        head = {start: 1}
        for n in self.nodes[self.order[start] + 1:]:
            if n not in execute or n in narrowed or n not in self.shapes:
                continue
            changed = [a for a in n.all_input_nodes if a in execute or a is start]
            if not changed or any(a not in head for a in changed):
                continue
            dims = {head[a] + len(self.shapes[n]) - len(self.shapes[a]) for a in changed}
            if len(dims) != 1:
                continue
            d = dims.pop()
            if not 1 <= d < len(self.shapes[n]) or not self._row_local(n, d):
                continue
            if any(self._aligned(a, n, d) != head[a] for a in changed):
                continue
            # Unchanged operands sliced alike must be batch values (gathered per fault).
            if any(a not in head and self._aligned(a, n, d) is not None
                   and a not in self.batch_dep for a in n.all_input_nodes):
                continue
            head[n] = d
        del head[start]
        if not any(n.op == "call_module" and isinstance(self.modules[n.target], nn.Linear)
                   for n in head):
            return {}, set()
        boundary = {n for n in head if any(u not in head for u in n.users)}
        return head, boundary

    def _head_fn(self, node: fx.Node, head: dict, boundary: set, start: fx.Node):
        """node's step on the changed row of each fault; a node read whole by later nodes
        returns the golden value with that row replaced (its row is kept beside it)."""
        dim = head[node]
        rowed = {a: (a is start or a in boundary) for a in node.all_input_nodes
                 if a is start or a in head}
        spec = {a: self._aligned(a, node, dim) for a in node.all_input_nodes if a not in rowed}
        spec = {a: da for a, da in spec.items() if da is not None}
        args, kwargs = node.args, node.kwargs
        q = self.quantize.get(node.target) if node.op == "call_module" else None
        target = self.modules[node.target] if node.op == "call_module" else node.target
        whole = node in boundary

        def run(env):
            t, ar, pad = env[_HEAD]

            def load(a):
                if a in rowed:
                    return env[(a, _HEAD)] if rowed[a] else env[a]
                if a not in spec:
                    return env[a]
                r = env[a].movedim(spec[a], 1)[ar, t].unsqueeze(spec[a])
                return r.index_select(0, pad) if pad is not None else r.contiguous()
            out = target(*fx.node.map_arg(args, load), **kwargs)
            out = q(out) if q is not None else out
            if not whole:
                return out
            env[(node, _HEAD)] = out
            full = env[node].clone()
            full.movedim(dim, 1)[ar, t] = out.narrow(0, 0, ar.numel()).select(dim, 0)
            return full
        return run

    def _head_rows(self, plan: Plan, start_value, changed):
        """(row per fault, arange, padding) when every fault changes one row of start."""
        if changed is None or not plan.head_dim:
            return None
        shape = self.shapes[plan.start]
        if tuple(start_value.shape[1:]) != shape[1:]:
            return None
        d = plan.head_dim
        row = changed // math.prod(shape[d + 1:]) % shape[d]
        if changed.shape[1] > 1 and not bool((row == row[:, :1]).all()):
            return None
        t = row[:, 0]
        n = t.numel()
        ar = torch.arange(n, device=t.device)
        pad = None
        if n < shape[d]:
            pad = torch.arange(shape[d], device=t.device)
            pad[n:] = 0
        return t, ar, pad

    def _chain(self, start: fx.Node) -> list:
        chain, node = [], start
        while len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "output" or not self._pointwise(user, node):
                break
            chain.append(user)
            node = user
        return chain

    def _pointwise(self, node: fx.Node, src: fx.Node) -> bool:
        if node.kwargs and any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return False
        if node.op == "call_module":
            mod = self.modules[node.target]
            if isinstance(mod, BatchNorm):
                ok = mod.running_mean is not None and not mod.training
            else:
                ok = isinstance(mod, _POINTWISE_MODULES) and not mod.training
            return ok and node.args[:1] == (src,) and len(node.all_input_nodes) == 1
        if node.op == "call_function" and node.target in POINTWISE_FUNCS:
            others = [a for a in node.all_input_nodes if a is not src]
            # Other tensor operands must be batch values of the same shape (sliced alike).
            return all(a in self.batch_dep and self.is_tensor.get(a, False) for a in others)
        return False

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
            env[(plan.start, _HEAD)] = r.index_select(0, pad) if pad is not None else r.contiguous()
            env[_HEAD] = head
        if plan.rows:
            rows = start_value.shape[0]
            if tuple(start_value.shape[1:]) != self.shapes[plan.start][1:]:
                steps = plan.full_steps  # other image sizes than the probe's
            pad = None
            if rows < self._tail_pad:
                pad = torch.arange(self._tail_pad, device=start_value.device)
                pad[rows:] = 0
            env[_ROWS] = (rows, pad)
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
