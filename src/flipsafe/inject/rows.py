"""Row planning of graph suffix runs: which nodes need only one row of a value (a
classifier's class token: the one-row tail), and which compute a faulty row alone until
values mix (one changed row); Program (inject.graph) takes these methods."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from flipsafe.compat import BatchNorm

# Nodes a one-element change passes through position by position (per channel at most),
# so the change can be followed on a small slice to see whether it dies out.
POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Mish, nn.Softplus,
)
POINTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
    torch.mul, torch.div, F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardtanh,
    F.leaky_relu, torch.sigmoid, torch.tanh, F.hardswish, F.elu, F.dropout,
}
ATEN = torch.ops.aten
POINTWISE_FUNCS |= {  # the same operations in graphs captured with torch.export
    ATEN.add.Tensor, ATEN.sub.Tensor, ATEN.mul.Tensor, ATEN.div.Tensor, ATEN.relu.default,
    ATEN.gelu.default, ATEN.silu.default, ATEN.hardtanh.default, ATEN.leaky_relu.default,
    ATEN.sigmoid.default, ATEN.tanh.default, ATEN.hardswish.default, ATEN.elu.default,
}


ROWS = "rows of the run"  # env key of a suffix run: (faulty rows, padding index or None)
HEAD = "changed rows"  # env key: (row index per fault, arange, padding index or None)



class RowPlanning:
    """The row planning methods of inject.graph.Program (a mixin: they read the Program's
    graph analysis, shapes, batch_dep, contiguous, is_tensor, modules and quantize)."""

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
        if node.target is ATEN.select.int and len(node.args) == 3:
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
                ok = (isinstance(mod, POINTWISE_MODULES) or node.meta.get("pointwise", False)
                      or getattr(mod, "flipsafe_pointwise", False))
            # Emulated outputs are quantised element by element or in blocks of the last dim.
            ok = ok and (node.target not in self.quantize or dim < len(shape) - 1)
        elif node.op == "call_function":
            if node.target is ATEN.slice.Tensor:
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
            pad = env[ROWS][1]

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
            rows = env[ROWS][0]
            row = env[src].narrow(0, 0, rows).select(dim, 0)
            out = row.new_empty((rows, *rest)).select(dim, index)
            return out.copy_(row)
        return run

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
            t, ar, pad = env[HEAD]

            def load(a):
                if a in rowed:
                    return env[(a, HEAD)] if rowed[a] else env[a]
                if a not in spec:
                    return env[a]
                r = env[a].movedim(spec[a], 1)[ar, t].unsqueeze(spec[a])
                return r.index_select(0, pad) if pad is not None else r.contiguous()
            out = target(*fx.node.map_arg(args, load), **kwargs)
            out = q(out) if q is not None else out
            if not whole:
                return out
            env[(node, HEAD)] = out
            full = env[node].clone()
            full.movedim(dim, 1)[ar, t] = out.narrow(0, 0, ar.numel()).select(dim, 0)
            return full
        return run

    def _head_rows(self, plan, start_value, changed):
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
                ok = ((isinstance(mod, POINTWISE_MODULES)
                       or getattr(mod, "flipsafe_pointwise", False)) and not mod.training)
            return ok and node.args[:1] == (src,) and len(node.all_input_nodes) == 1
        if node.op == "call_function" and node.target in POINTWISE_FUNCS:
            others = [a for a in node.all_input_nodes if a is not src]
            # Other tensor operands must be batch values of the same shape (sliced alike).
            return all(a in self.batch_dep and self.is_tensor.get(a, False) for a in others)
        return False
