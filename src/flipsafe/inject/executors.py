"""Executors: golden runs that cache what faulty runs read, and faulty runs from a layer on."""

# Two ways to run an emulated model, chosen once per model by `choose_executor`: a captured
# graph (torch.fx, else torch.export) runs only the nodes after the faulty layer from
# cached golden values; hooks run full forwards with the faulty layer's output replaced.

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from flipsafe.errors import ConfigError
from flipsafe.inject import emulate
from flipsafe.inject.capture import CaptureError, export_graph
from flipsafe.inject.emulated import EmulatedModel
from flipsafe.inject.graph import Program, TraceError, gather_rows
from flipsafe.inject.rows import POINTWISE_FUNCS
from flipsafe.metrics.outcomes import GoldenOutcomes

GOLDEN_BATCH = 256  # images per slice of a golden forward


@dataclass
class Golden:
    """Golden run of a batch: logits, per-image outcome columns and cached values."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    outcomes: GoldenOutcomes
    raw: dict = field(default_factory=dict)  # layer -> raw output [B, ...]
    inputs: dict = field(default_factory=dict)  # layer -> tuple of module inputs
    nodes: dict = field(default_factory=dict)  # graph node -> cached value


def check_batch(images, labels, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [batch, ...] and as many integer labels, on `device`."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise ConfigError("images must be a tensor [batch, ...]")
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ConfigError(f"got {images.shape[0]} images but {labels.numel()} labels")
    return images.to(device), labels


class Executor(Protocol):
    """How faulty runs of an emulated model are executed."""

    suffix: bool  # faulty runs execute only what follows the faulty layer

    def start_error(self, layer: str) -> str | None:
        """Why faulty runs cannot start from `layer`'s output (None: they can)."""

    def golden(self, images, labels, layers, batch: int = GOLDEN_BATCH) -> Golden:
        """Golden run of a batch caching what faulty runs of `layers` read."""

    def cache(self, golden: Golden, layers, batch: int = GOLDEN_BATCH) -> None:
        """Make `golden` hold what faulty runs of `layers` read."""

    def logits_after(self, layer: str, values, images, golden: Golden, changed=None):
        """Logits when `layer` hands on `values` (one row per image of `golden` at
        positions `images`); None if the logits do not depend on `layer`. changed: per
        row, the flat positions where `values` differs from the golden output, if known
        (a graph run may then compute only the rows that matter)."""

    def masked(self, layer, golden, img, pos, new, is_meta) -> torch.Tensor:
        """Which output faults provably leave the logits golden (checked cheaply)."""

    def elementwise_after(self, layer: str, golden: Golden, width: int) -> bool | None:
        """Whether what follows `layer` treats each of its `width` outputs alone and reads
        no per-image values (None: this executor cannot tell)."""

    def refresh(self) -> None:
        """Take up the emulated model's changed output emulation (ranges, guards)."""


def choose_executor(em: EmulatedModel, suffix: bool) -> tuple[Executor, str | None]:
    """The executor for `em` and why it is not a graph one (None if it is): a graph from
    torch.fx, else torch.export, checked against the model's logits; else hooks."""
    if not suffix:
        return HookExecutor(em), None
    x = em.example
    error = None
    try:
        program = Program(em.model, {})
    except TraceError as exc:
        error = str(exc)
        try:
            graph, attrs = export_graph(em.model, x.expand(3, *x.shape[1:]).contiguous(),
                                        em.leaves)
            program = Program(em.model, {}, graph, attrs)
        except (CaptureError, TraceError) as exc2:
            return HookExecutor(em), f"{error}; {exc2}"
    out = em.probe_logits
    try:
        with torch.no_grad():
            got = program.probe(x)[program.output]
        for name, nodes in program.module_nodes.items():
            if name in em.calls and len(nodes) != em.calls[name]:
                raise TraceError(f"module {name} runs differently when traced")
        # Same kernels on the same batch: a graph that computes other logits than the
        # model (a shape specialised while capturing) is not used.
        scale = float(torch.nan_to_num(out, 0.0, 0.0, 0.0).abs().max())
        if got.shape != out.shape or not torch.allclose(
                got, out, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
            raise TraceError("the captured graph computes other logits than the model")
    except TraceError as exc:
        return HookExecutor(em), str(exc)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # The traced graph failed where the model did not: use hooks instead.
        return HookExecutor(em), f"traced graph failed: {exc}"
    return GraphExecutor(em, program), error


def _cat_values(values: list, sizes: list):
    """Join per-slice cached values: batch tensors (or tuples of them) along dim 0;
    values that do not depend on the images are the same in every slice."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        batched = all(v.dim() > 0 and v.shape[0] == n for v, n in zip(values, sizes))
        return torch.cat(values) if batched else first
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_values(list(v), sizes) for v in zip(*values))
    return first


class _GoldenRuns:
    """Golden runs in slices, with layer inputs and raw outputs captured by hooks."""

    copies_outputs = False  # whether a cached output is copied before the model goes on

    def __init__(self, em: EmulatedModel):
        self.em = em

    def golden(self, images, labels, layers, batch: int = GOLDEN_BATCH) -> Golden:
        g = Golden(images, labels, None, None)
        g.logits = self._fill(g, layers, True, batch)
        g.outcomes = GoldenOutcomes.of(g.logits, labels)
        return g

    def cache(self, golden: Golden, layers, batch: int = GOLDEN_BATCH) -> None:
        self._fill(golden, layers, False, batch)

    def _keep(self, layers: list, g: Golden) -> set:
        return set()

    def _fill(self, g: Golden, layers, force: bool, batch: int):
        """Cache what faulty runs of `layers` read. Returns the logits of the run, or None
        when everything was cached already."""
        layers = [n for n in layers if n not in g.raw]
        if not layers and not force:
            return None
        raw, inputs = {}, {}
        copy_out, emit = self.copies_outputs, self.em.emit

        def make(name):
            def hook(mod, inp, out):
                raw[name] = out
                inputs[name] = inp
                if copy_out and name not in emit and isinstance(out, torch.Tensor):
                    return out.clone()
                return None
            return hook
        keep = self._keep(layers, g)
        # Capture hooks run before the emulation hooks, so they see raw outputs. The batch
        # goes through in slices, so a large golden run needs little transient memory.
        logits, parts = [], []
        with self.em.hooks({n: make(n) for n in layers}), torch.no_grad():
            for start in range(0, g.images.shape[0], batch):
                raw.clear()
                inputs.clear()
                out, cache = self._run(g.images[start:start + batch], keep)
                logits.append(out)
                parts.append((dict(raw), dict(inputs), cache))
        if len(parts) == 1:
            r, i, c = parts[0]
        else:
            sizes = [t.shape[0] for t in logits]
            r, i, c = ({k: _cat_values([p[j][k] for p in parts], sizes) for k in parts[0][j]}
                       for j in range(3))
        g.raw.update(r)
        g.inputs.update(i)
        g.nodes.update(c)
        return torch.cat(logits)


def _copy_of(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_of(v) for v in value)
    return value


def _batch_first(value, n: int) -> bool:
    """Whether value is a tensor, or a tuple/list of tensors (and None), all n rows first."""
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1 and value.shape[0] == n
    if isinstance(value, (tuple, list)):
        return len(value) > 0 and all(v is None or _batch_first(v, n) for v in value) and \
            any(v is not None for v in value)
    return False


def _returning(value):
    """A forward that hands on `value` whatever it is given."""
    return lambda *args, **kwargs: value


def _call_order(em: EmulatedModel) -> dict:
    """{module name: (first entry, last exit, calls, batch-first output)} of one forward
    of the probe image (as three copies)."""
    clock, seen = [0], {}

    def tick():
        clock[0] += 1
        return clock[0]
    handles = []
    for name, mod in em.modules.items():
        if not name:
            continue

        def pre(mod, inp, name=name):
            entry = seen.setdefault(name, [tick(), 0, 0, True])
            entry[2] += 1

        def post(mod, inp, out, name=name):
            entry = seen[name]
            entry[1] = tick()
            entry[3] = entry[3] and _batch_first(out, 3)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            em.model(em.example.expand(3, *em.example.shape[1:]).contiguous())
    finally:
        for h in handles:
            h.remove()
    return {n: tuple(v) for n, v in seen.items()}


class HookExecutor(_GoldenRuns):
    """Full forwards with emulation hooks; the faulty layer's hook hands on the faulty value.

    Modules that finish before the faulty layer starts (the embeddings and the blocks
    before it) do not run again: their forward hands on their golden output, cached by
    the golden run (one row per image), so a faulty run computes what follows the
    layer's block at most - a coarse suffix run for models no graph captures."""

    suffix = False
    # The model's own code runs after the layer, and an in-place op there (`hidden +=
    # residual`) would overwrite the cached output unless the model goes on with a copy
    # (emulated layers go on with their quantised copy anyway).
    copies_outputs = True

    def __init__(self, em: EmulatedModel):
        super().__init__(em)
        self.order = _call_order(em)
        self._before: dict = {}

    def before(self, layer: str) -> list:
        """The outermost modules that run once, with a batch-first output, and finish
        before `layer` starts: what faulty runs of `layer` take from the golden cache."""
        if layer not in self._before:
            start = self.order.get(layer, (0,))[0]
            done = {n for n, (_, end, calls, ok) in self.order.items()
                    if calls == 1 and ok and end < start
                    and not layer.startswith(n + ".")}
            self._before[layer] = sorted(n for n in done if not any(
                n.startswith(m + ".") for m in done))
        return self._before[layer]

    def _keep(self, layers, g):
        return {("before", n) for layer in layers for n in self.before(layer)} - set(g.nodes)

    def _run(self, x, keep):
        cache = {}

        def make(key):
            def hook(mod, inp, out):
                cache[key] = _copy_of(out)  # later code may change the output in place
            return hook
        capture = {key[1]: make(key) for key in keep}
        with self.em.hooks(capture), self.em.hooks(self.em.emulation_hooks()):
            return self.em.model(x), cache

    def start_error(self, layer):
        return None

    def logits_after(self, layer, values, images, golden, changed=None):
        hooks = self.em.emulation_hooks(skip={layer})
        hooks[layer] = lambda mod, inp, out: values
        patched = []
        try:
            for name in self.before(layer):
                cached = golden.nodes.get(("before", name))
                if cached is None:
                    continue
                mod = self.em.modules[name]
                patched.append((mod, mod.__dict__.get("forward")))
                mod.forward = _returning(gather_rows(cached, images))
            with self.em.hooks(hooks):
                return self.em.model(golden.images.index_select(0, images))
        finally:
            for mod, own in patched:
                del mod.forward
                if own is not None:
                    mod.forward = own

    def masked(self, layer, golden, img, pos, new, is_meta):
        return torch.zeros(img.numel(), dtype=torch.bool, device=self.em.device)

    def elementwise_after(self, layer, golden, width):
        return None

    def refresh(self):
        pass


class GraphExecutor(_GoldenRuns):
    """A captured graph (graph.Program): golden runs cache node values, faulty runs
    execute the suffix after the faulty layer on gathered golden values."""

    suffix = True

    def __init__(self, em: EmulatedModel, program: Program):
        super().__init__(em)
        self.program = program
        self.refresh()

    def refresh(self):
        self.program.set_quantize(self.em.emit)

    def _plan(self, layer: str):
        return self.program.plan(self.program.module_nodes[layer][0])

    def _keep(self, layers, g):
        keep = set()
        for n in layers:
            for node in self.program.module_nodes.get(n, []):
                p = self.program.plan(node)
                keep.update(p.gathered)
                keep.update(p.constants)
        keep.difference_update(g.nodes)
        return keep

    def _run(self, x, keep):
        out, cache, _ = self.program.run(x, keep=keep)
        return out, cache

    def start_error(self, layer):
        # A module torch.export records no operation for (an identity) has no node to
        # start a suffix run from.
        if layer not in self.program.module_nodes:
            return "the captured graph has no operation of it (it passes its input on)"
        return None

    def logits_after(self, layer, values, images, golden, changed=None):
        plan = self._plan(layer)
        if plan.dead:
            return None
        env = self.program.gather(golden.nodes, plan.gathered, images) if plan.gathered else {}
        for c in plan.constants:
            env[c] = golden.nodes[c]
        return self.program.run_suffix(plan, values, env, changed)

    def masked(self, layer, golden, img, pos, new, is_meta):
        """Faults whose change dies in the pointwise nodes right after the layer (e.g. a
        negative value staying negative through BatchNorm and ReLU): their logits are the
        golden ones. Runs the real nodes on one row (all channels) around each fault."""
        em, g = self.em, golden
        no = torch.zeros(img.numel(), dtype=torch.bool, device=em.device)
        node = self.program.module_nodes[layer][0]
        plan = self.program.plan(node)
        if plan.dead:
            return ~no
        if is_meta or pos.shape[1] != 1 or not plan.chain:
            return no
        shape = em.shapes[layer]
        others = {a for n in plan.chain for a in n.all_input_nodes
                  if a is not node and a not in plan.chain}
        if any(tuple(g.nodes[a].shape[1:]) != shape for a in others):
            return no
        take = _Slicer(shape, pos[:, 0])
        held = em.quantize_output(layer, take(g.raw[layer], img))
        # Layer outputs may be channels-last (or otherwise strided); the flat view below
        # needs a contiguous copy.
        faulty = held.clone(memory_format=torch.contiguous_format)
        faulty.view(faulty.shape[0], -1)[torch.arange(img.numel(), device=em.device),
                                         take.offset] = new[:, 0]
        gold, faulty = em.guarded(layer, held), em.guarded(layer, faulty)
        env = {a: torch.cat([take(g.nodes[a], img)] * 2) for a in others}
        with torch.no_grad():
            out = self.program.run_chain(plan, torch.cat([faulty, gold]), env)
        half = img.numel()
        return emulate.same_bits(out[:half], out[half:]).reshape(half, -1).all(1)

    def elementwise_after(self, layer, golden, width):
        plan = self._plan(layer)
        if plan.gathered:
            return False
        for n, _ in plan.steps:
            if n.op == "output":
                continue
            if n.op != "call_function" or n.target not in POINTWISE_FUNCS:
                return False
            for a in n.all_input_nodes:
                if a in plan.constants:
                    v = golden.nodes.get(a)
                    if not isinstance(v, torch.Tensor):
                        continue
                    if v.numel() != 1 and (v.dim() == 0 or v.shape[-1] != width
                                           or v.numel() != width):
                        return False
        return True


class _Slicer:
    """One row of a [B, C, ..., W] value around each fault: all channels, the fault's
    middle coordinates, the whole last dim (so blocks of block formats stay whole)."""

    def __init__(self, shape: tuple, index: torch.Tensor):
        self.shape = shape
        if len(shape) >= 3:
            coords = []
            rest = index
            for size in reversed(shape):
                coords.append(rest % size)
                rest = rest // size
            coords = coords[::-1]
            self.mid = coords[1:-1]
            c, w = coords[0], coords[-1]
            self.offset = c * shape[-1] + w
        else:
            self.mid = None
            self.offset = index

    def __call__(self, value: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        if self.mid is None:
            return value.index_select(0, img)
        idx = (img, slice(None), *self.mid, slice(None))
        sl = value[idx]  # [n, C, W]
        return sl.reshape(sl.shape[0], self.shape[0], *([1] * len(self.mid)), self.shape[-1])
