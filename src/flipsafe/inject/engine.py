"""The fault-injection engine: golden runs, batched faulty runs and their outcomes."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from flipsafe.errors import ConfigError, FlipsafeError, InjectionError, unknown
from flipsafe.faults import PARAMS, FaultSet, draw
from flipsafe.inject import emulate
from flipsafe.inject.capture import CaptureError, export_graph
from flipsafe.inject.exhaustive import Exhaustive, exhaustive
from flipsafe.inject.graph import Program, TraceError
from flipsafe.inject.weights import faulty_raw_output
from flipsafe.metrics.outcomes import (
    FIELDS,
    GoldenOutcomes,
    Outcomes,
    compute_outcomes,
    unchanged_outcomes,
)

# Site names accepted by layers()/sample() and the FaultSet param each one corrupts.
SITES = {"activations": "output", "weights": "weight", "biases": "bias",
         "metadata": "meta", "weight_metadata": "weight_meta"}
SITES.update({p: p for p in PARAMS})

KINDS = ("conv", "linear", "norm", "attention", "other")
EMULATED = ("conv", "linear", "norm")  # kinds whose outputs are held in the format
GOLDEN_BATCH = 256  # images per slice of a golden forward

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
          nn.modules.instancenorm._InstanceNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                    else ())


def kind_of(mod: nn.Module) -> str:
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, _NORMS):
        return "norm"
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    return "other"


@dataclass(frozen=True)
class LayerInfo:
    """An injectable layer at one site.

    `numel` is the range of a fault's `index` at this site (output elements of one image,
    parameter elements, or metadata codes) and `fields` the bit fields of those codes.
    """

    name: str
    type: str
    kind: str
    site: str
    output_shape: tuple
    weight_shape: tuple | None
    bias_shape: tuple | None
    numel: int
    fields: dict
    emulated: bool


@dataclass
class Golden:
    """Golden run of a batch: logits, per-image outcome columns and cached values."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    outcomes: GoldenOutcomes
    raw: dict = field(default_factory=dict)  # layer -> raw output [B, ...]
    inputs: dict = field(default_factory=dict)  # layer -> tuple of module inputs
    nodes: dict = field(default_factory=dict)  # fx node -> cached value


def _a(word: str) -> str:
    """`word` with its indefinite article: "an output", "a weight"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _as_batches(data) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


class Engine:
    """Bit-exact, batched fault injection into a private emulated copy of `model`.

    format: a flipsafe.formats name (or Format); weights of parameterised leaf modules
    are held in it, and so are the outputs of Conv/Linear/normalisation modules.
    clamp: 'none', 'profiled' (faulty values beyond the layer's range, or NaN/Inf, go to
    +-range keeping their sign) or 'goldeneye' (as GoldenEye: NaN goes to +range).
    ranges: {layer: max |activation|} from `profile` (needed by clamping and by formats
    with a calibrated scale). suffix: run only the graph after the faulty layer when the
    model can be captured as a graph: with torch.fx, else (once the engine sees an input)
    with torch.export (False forces full forwards with hooks). chunk: faulty
    images per forward pass. memory: bytes of cached activations `run` may hold when it
    makes its own golden runs (images are then taken in blocks).
    """

    def __init__(self, model: nn.Module, format="fp32", clamp: str = "none", ranges=None,
                 device="cpu", suffix: bool = True, chunk: int = 64, input_shape=None,
                 memory: int = 1 << 30):
        if clamp not in emulate.CLAMPS:
            raise unknown("clamp mode", str(clamp), emulate.CLAMPS)
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")
        self.device = torch.device(device)
        self.fmt = emulate.get_format(format)
        self.exact_fp32 = self.fmt.name == "fp32"
        self.clamp = clamp
        self.chunk = chunk
        self.memory = int(memory)
        self.ranges = {str(k): float(v) for k, v in (ranges or {}).items()}
        self.model = copy.deepcopy(model).eval().to(self.device)
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if getattr(m, "inplace", False):
                m.inplace = False  # a cached output must not be overwritten downstream
        self.modules = dict(self.model.named_modules())
        # Leaves as torch.fx sees them: modules without children, and attention modules
        # (their out_proj is a child that never runs as a module).
        self.leaves = {n: m for n, m in self.modules.items() if n and (
            not list(m.children()) or isinstance(m, nn.MultiheadAttention))}
        self.kinds = {n: kind_of(m) for n, m in self.leaves.items()}
        self.emulated = [n for n, k in self.kinds.items() if k in EMULATED]
        self.params: dict[tuple[str, str], emulate.ParamCodes] = {}
        self._param_limit: dict[tuple[str, str], torch.Tensor] = {}
        with torch.no_grad():
            for name, mod in self.leaves.items():
                for pname, p in mod.named_parameters(recurse=False):
                    if not p.dtype.is_floating_point:
                        continue
                    pfmt = emulate.calibrate_param(self.fmt, p)
                    codes = emulate.ParamCodes(pfmt, p)
                    self.params[(name, pname)] = codes
                    p.copy_(codes.values)
                    codes.values = p  # one copy of the emulated values: the model's own
                    self._param_limit[(name, pname)] = p.abs().max()
        self._quant: dict = {}
        self._coders: dict = {}
        self.program = None
        self.trace_error = None
        self._export = False  # capture with torch.export once an input is seen
        if suffix:
            try:
                self.program = Program(self.model, {})
            except TraceError as exc:
                self.trace_error = str(exc)
                self._export = True
        self._shapes: dict | None = None
        self._calls: dict = {}
        if input_shape is not None:
            self._probe(torch.zeros(1, *input_shape, device=self.device))

    # -- emulation ----------------------------------------------------------------------

    def _output_format(self, name: str):
        if self.exact_fp32:
            return self.fmt
        return emulate.calibrate_output(self.fmt, self.ranges.get(name), name)

    def _ensure_emulation(self):
        if self._quant or self.exact_fp32:
            return
        quant, fast = {}, {}
        for name in self.emulated:
            if self._calls.get(name, 0) == 0:
                continue
            fmt = self._output_format(name)
            if id(fmt) not in fast:
                fast[id(fmt)] = emulate.fast_quantizer(fmt)
            quant[name] = fast[id(fmt)]
        self._quant = quant
        if self.program is not None:
            self.program.set_quantize(quant)

    @property
    def needs_ranges(self) -> bool:
        """Whether clamping or the format's output scales need activation ranges (profile)."""
        return self.clamp != "none" or (not self.exact_fp32 and emulate.needs_scale(self.fmt))

    def set_ranges(self, ranges: dict):
        """Use these activation ranges (as returned by profile) from now on."""
        self.ranges.update({str(k): float(v) for k, v in ranges.items()})
        self._quant = {}
        self._coders = {}
        if self.program is not None:
            self.program.set_quantize({})

    def quantize_output(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s raw output as the emulated model holds it (in the format)."""
        q = self._quant.get(name)
        return raw if q is None else q(raw)

    def _coder(self, name: str, site: str) -> emulate.TensorCoder:
        key = (name, site)
        if key not in self._coders:
            self._coders[key] = emulate.TensorCoder(self._output_format(name),
                                                    self._shapes[name], is_param=False)
        return self._coders[key]

    # -- probing and layer tables -------------------------------------------------------

    def _hooked(self, hooks: dict):
        """Register forward hooks {module name: fn(module, inputs, output)}; returns handles."""
        return [self.modules[n].register_forward_hook(fn) for n, fn in hooks.items()]

    def _emulation_hooks(self, skip=()):
        def make(name):
            q = self._quant[name]
            return lambda mod, inp, out: q(out)
        return {n: make(n) for n in self._quant if n not in skip}

    def _probe(self, images: torch.Tensor):
        if self._shapes is not None:
            return
        x = images[:1].to(self.device)
        x3 = x.expand(3, *x.shape[1:]).contiguous()
        shapes, calls = {}, {}

        def make(name):
            def hook(mod, inp, out):
                calls[name] = calls.get(name, 0) + 1
                if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == 3:
                    shapes[name] = tuple(out.shape[1:])
                else:
                    shapes[name] = None
            return hook
        handles = self._hooked({n: make(n) for n in self.leaves})
        try:
            with torch.no_grad():
                out = self.model(x3)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InjectionError(
                f"the model must return a [batch, classes] tensor of logits, got "
                f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        self._shapes, self._calls = shapes, calls
        if self._export:
            self._export = False
            try:
                graph, attrs = export_graph(self.model, x3, self.leaves)
                self.program = Program(self.model, {}, graph, attrs)
            except (CaptureError, TraceError) as exc:
                self.trace_error = f"{self.trace_error}; {exc}"
        if self.program is not None:
            try:
                with torch.no_grad():
                    got = self.program.probe(x)[self.program.output]
                for name, nodes in self.program.module_nodes.items():
                    if name in calls and len(nodes) != calls[name]:
                        raise TraceError(f"module {name} runs differently when traced")
                # Same kernels on the same batch: a graph that computes other logits than
                # the model (a shape specialised while capturing) is not used.
                scale = float(torch.nan_to_num(out, 0.0, 0.0, 0.0).abs().max())
                if got.shape != out.shape or not torch.allclose(
                        got, out, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
                    raise TraceError("the captured graph computes other logits than the model")
            except TraceError as exc:
                self.program, self.trace_error = None, str(exc)
            except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as exc:
                # The traced graph failed where the model did not: use hooks instead.
                self.program, self.trace_error = None, f"traced graph failed: {exc}"

    @property
    def suffix(self) -> bool:
        """Whether faulty runs execute only the graph after the faulty layer (a model only
        torch.export captures is captured once the engine has seen an input)."""
        return self.program is not None

    def _need_probe(self):
        if self._shapes is None:
            raise InjectionError(
                "the engine has not seen an input yet; pass input_shape=(C, H, W) to Engine "
                "or call golden()/profile() with images first")

    def _site(self, site: str) -> str:
        if site not in SITES:
            raise unknown("site", str(site), list(SITES))
        return SITES[site]

    def _candidates(self, param: str) -> list[str]:
        names = []
        for n, m in self.leaves.items():
            if param in ("output", "meta"):
                ok = self._calls.get(n, 0) == 1 and self._shapes.get(n) is not None
                # A module torch.export records no operation for (an identity) has no
                # node to start a suffix run from.
                ok = ok and (self.program is None or n in self.program.module_nodes)
            else:
                p = getattr(m, "weight" if param == "weight_meta" else param, None)
                ok = isinstance(p, torch.Tensor) and (n, "weight" if param == "weight_meta"
                                                      else param) in self.params
                # Faulty outputs are followed per image: the output must be batch-first
                # (not, e.g., attention windows holding parts of several images).
                ok = ok and self._calls.get(n, 0) == 1 and self._shapes.get(n) is not None
            if ok:
                names.append(n)
        return names

    def _why(self, name: str, param: str) -> str:
        calls = self._calls.get(name, 0)
        if calls == 0:
            return "it never runs as a module (its parent uses its parameters directly)"
        if calls > 1:
            return f"it runs {calls} times per forward, so its output is not one value"
        if param in ("output", "meta"):
            if self.program is not None and name not in self.program.module_nodes:
                return "the captured graph has no operation of it (it passes its input on)"
            return "its output is not a single batch-first tensor"
        pname = "weight" if param == "weight_meta" else param
        if (name, pname) not in self.params:
            return f"it has no floating-point {pname} parameter"
        return ("its output is not a single batch-first tensor, so a parameter fault's "
                "effect cannot be followed image by image")

    def _info(self, name: str, param: str) -> LayerInfo:
        mod = self.leaves[name]
        w = getattr(mod, "weight", None)
        b = getattr(mod, "bias", None)
        shape = self._shapes.get(name)
        if param == "output":
            numel, fields = math.prod(shape), dict(self.fmt.fields)
        elif param == "meta":
            numel = self._coder(name, "output").meta_numel if self.fmt.meta_fields else 0
            fields = dict(self.fmt.meta_fields)
        elif param == "weight_meta":
            numel = self.params[(name, "weight")].coder.meta_numel
            fields = dict(self.fmt.meta_fields)
        else:
            numel, fields = getattr(mod, param).numel(), dict(self.fmt.fields)
        return LayerInfo(
            name=name, type=type(mod).__name__, kind=self.kinds[name], site=param,
            output_shape=shape, numel=numel, fields=fields, emulated=name in self.emulated,
            weight_shape=tuple(w.shape) if isinstance(w, torch.Tensor) else None,
            bias_shape=tuple(b.shape) if isinstance(b, torch.Tensor) else None)

    def classifier(self) -> str:
        """Name of the Linear producing the class scores ('last')."""
        from flipsafe.textguided.head import classifier_layer_name
        try:
            return classifier_layer_name(self.model)
        except FlipsafeError as exc:
            raise InjectionError(f"cannot find the classifier layer: {exc}") from None

    def layers(self, site: str = "activations", select: str = "all") -> list[LayerInfo]:
        """Layers at `site` ('activations', 'weights', 'biases', 'metadata',
        'weight_metadata') matching `select`: 'all' (Conv/Linear/normalisation layers for
        activations and metadata, every parameterised layer otherwise), 'last' (the
        classifier), an exact layer name, type names or kinds joined by '|' (e.g.
        'Conv2d|Linear', 'conv', 'norm'), or else a regular expression searched in names."""
        self._need_probe()
        param = self._site(site)
        if param in ("meta", "weight_meta") and not self.fmt.meta_fields:
            raise InjectionError(
                f"format {self.fmt.name} has no metadata to corrupt; formats with metadata "
                f"are the block formats (mx*, bfp*) and scaled integers (int8, int4, "
                f"int8_channel)")
        cands = self._candidates(param)
        if select in self.leaves and select not in cands:
            raise InjectionError(f"layer {select!r} has no {site} site: {self._why(select, param)}"
                                 f"; layers with one: {', '.join(cands) or 'none'}")
        if not cands:
            raise InjectionError(f"the model has no layer with {_a(param)} site")
        if select == "all":
            chosen = [n for n in cands if param not in ("output", "meta")
                      or self.kinds[n] in EMULATED]
        elif select == "last":
            chosen = [n for n in cands if n == self.classifier()]
        elif select in cands:
            chosen = [select]
        else:
            parts = str(select).split("|")
            types = {type(self.leaves[n]).__name__ for n in cands} | set(KINDS)
            if all(p in types for p in parts):
                chosen = [n for n in cands if type(self.leaves[n]).__name__ in parts
                          or self.kinds[n] in parts]
            else:
                try:
                    rx = re.compile(select)
                except re.error as exc:
                    raise InjectionError(
                        f"layer selection {select!r} is neither a layer name, a type nor a "
                        f"valid regular expression ({exc}); layers: {', '.join(cands)}") from None
                chosen = [n for n in cands if rx.search(n)]
        if not chosen:
            types = sorted({type(self.leaves[n]).__name__ for n in cands})
            raise InjectionError(
                f"no layer with {_a(param)} site matches {select!r}; layers: {', '.join(cands)}"
                f" (types: {', '.join(types)}; or 'all', 'last')")
        return [self._info(n, param) for n in chosen]

    # -- profiling ----------------------------------------------------------------------

    def profile(self, batches) -> dict[str, float]:
        """Largest |output| of every leaf layer over `batches` (a tensor of images, or an
        iterable of image tensors or (images, labels) pairs); also kept by the engine."""
        ranges: dict[str, float] = {}

        def make(name):
            def hook(mod, inp, out):
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    finite = torch.where(torch.isfinite(out), out.abs(), 0.0)
                    ranges[name] = max(ranges.get(name, 0.0), float(finite.max()))
            return hook
        seen = False
        for x in _as_batches(batches):
            x = x.to(self.device)
            self._probe(x)
            # Calibrated formats are profiled unquantised: their scale comes from this range.
            emulated = not emulate.needs_scale(self.fmt)
            if emulated:
                self._ensure_emulation()
            hooks = self._hooked(self._emulation_hooks()) if emulated else []
            hooks += self._hooked({n: make(n) for n in self.leaves})
            try:
                with torch.no_grad():
                    self.model(x)
            finally:
                for h in hooks:
                    h.remove()
            seen = True
        if not seen:
            raise ConfigError("profile() got no images")
        self.set_ranges(ranges)
        return dict(ranges)

    # -- golden runs --------------------------------------------------------------------

    def golden(self, images: torch.Tensor, labels: torch.Tensor, layers=None) -> Golden:
        """Golden run of a batch: clean logits, outcome columns and the values faulty runs
        reuse (for `layers`, default every injectable layer)."""
        images, labels = self.prepare(images, labels)
        if layers is None:
            layers = set(self._candidates("output")) | set(self._candidates("weight"))
        g = Golden(images, labels, None, None)
        g.logits = self._fill(g, layers, force=True)
        g.outcomes = GoldenOutcomes.of(g.logits, labels)
        return g

    def prepare(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a batch, see the model run once (layer table, graph capture), build the
        format emulation; returns images and labels on the engine's device."""
        images, labels = self._batch(images, labels)
        self._probe(images)
        self._ensure_emulation()
        return images, labels

    def cache(self, golden: Golden, layers) -> None:
        """Make `golden` hold what faulty runs of `layers` read."""
        self._fill(golden, layers)

    def sites(self, site: str) -> list[str]:
        """Names of the layers that have `site` (before any selection)."""
        self._need_probe()
        return self._candidates(self._site(site))

    def _batch(self, images, labels):
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise ConfigError("images must be a tensor [batch, ...]")
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        if labels.numel() != images.shape[0]:
            raise ConfigError(f"got {images.shape[0]} images but {labels.numel()} labels")
        return images.to(self.device), labels

    def _forward(self, x, replace: str, value):
        """Full forward with emulation in which layer `replace` outputs `value`."""
        hooks = self._emulation_hooks(skip={replace})
        hooks[replace] = lambda mod, inp, out: value
        handles = self._hooked(hooks)
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()

    def _fill(self, g: Golden, layers, force: bool = False):
        """Cache what faulty runs of `layers` read: raw outputs and inputs of each layer,
        and (suffix mode) the node values their suffix plans gather. Returns the logits of
        the run, or None when everything was cached already."""
        layers = [n for n in layers if n not in g.raw]
        if not layers and not force:
            return None
        raw, inputs = {}, {}

        # Without a graph, the model's own code runs after the layer, and an in-place op
        # there (`hidden += residual`) would overwrite the cached output unless the model
        # goes on with a copy (emulated layers go on with their quantised copy anyway).
        copy_out = self.program is None

        def make(name):
            def hook(mod, inp, out):
                raw[name] = out
                inputs[name] = inp
                if copy_out and name not in self._quant and isinstance(out, torch.Tensor):
                    return out.clone()
                return None
            return hook
        keep = set()
        if self.program is not None:
            for n in layers:
                for node in self.program.module_nodes.get(n, []):
                    p = self.program.plan(node)
                    keep.update(p.gathered)
                    keep.update(p.constants)
            keep.difference_update(g.nodes)
        # Capture hooks run before the emulation hooks, so they see raw outputs. The batch
        # goes through in slices, so a large golden run needs little transient memory.
        handles = self._hooked({n: make(n) for n in layers})
        logits, parts = [], []
        try:
            with torch.no_grad():
                for start in range(0, g.images.shape[0], GOLDEN_BATCH):
                    x = g.images[start:start + GOLDEN_BATCH]
                    raw.clear()
                    inputs.clear()
                    cache = {}
                    if self.program is not None:
                        out, cache, _ = self.program.run(x, keep=keep)
                    else:
                        emu = self._hooked(self._emulation_hooks())
                        try:
                            out = self.model(x)
                        finally:
                            for h in emu:
                                h.remove()
                    logits.append(out)
                    parts.append((dict(raw), dict(inputs), cache))
        finally:
            for h in handles:
                h.remove()
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

    # -- faulty runs --------------------------------------------------------------------

    def run(self, faults: FaultSet, images: torch.Tensor, labels: torch.Tensor,
            golden: Golden | None = None) -> Outcomes:
        """Outcomes of every fault in `faults`, in their order; each fault is injected alone
        into one run of its image (`faults.image` indexes `images`).

        Without `golden`, the images are taken in blocks (each image's golden run once), so
        the cached activations stay within the engine's `memory` budget."""
        images, labels = self.prepare(images, labels)
        self._validate(faults, images.shape[0])
        if golden is not None:
            if golden.images.shape != images.shape:
                raise ConfigError("golden was computed for a different batch of images")
            return self._run_groups(faults, golden)
        out = _empty_outcomes(len(faults), self.device)
        used = torch.unique(faults.image)
        block = self._image_block(faults)
        for start in range(0, used.numel(), block):
            ids = used[start:start + block]
            rows = torch.isin(faults.image, ids).nonzero().reshape(-1)
            local = faults.select(rows)
            local.image = torch.searchsorted(ids, local.image)
            dev_ids = ids.to(self.device)
            g = self.golden(images[dev_ids], labels[dev_ids], layers=set(local.layer_names))
            res = self._run_groups(local, g)
            for f in FIELDS:
                getattr(out, f)[rows.to(self.device)] = getattr(res, f)
        return out

    def _image_block(self, faults: FaultSet) -> int:
        """Images per golden block: as many as the cached values of `faults`' layers allow."""
        per_image = 0
        for name in set(faults.layer_names):
            per_image += 3 * math.prod(self._shapes.get(name) or (1,))
        return int(min(512, max(8, self.memory // max(1, 4 * per_image))))

    def _run_groups(self, faults: FaultSet, golden: Golden) -> Outcomes:
        groups = _groups(faults)
        self._fill(golden, {name for name, _ in groups})
        out = _empty_outcomes(len(faults), self.device)
        for (name, param), rows in groups.items():
            res = self._run_group(name, PARAMS[param], faults.select(rows), golden)
            dev_rows = rows.to(self.device)
            for f in FIELDS:
                getattr(out, f)[dev_rows] = getattr(res, f)
        return out

    def _validate(self, faults: FaultSet, n_images: int) -> dict:
        if not isinstance(faults, FaultSet):
            raise ConfigError(f"faults must be a FaultSet, got {type(faults).__name__}")
        if len(faults) and (int(faults.image.min()) < 0 or int(faults.image.max()) >= n_images):
            raise InjectionError(f"fault image positions must be in 0..{n_images - 1} (the "
                                 f"batch has {n_images} images)")
        for (layer, param), rows in _groups(faults).items():
            pname = PARAMS[param]
            site = {v: s for s, v in SITES.items() if s not in PARAMS}[pname]
            if layer not in self.leaves:
                raise unknown("layer", layer, self._candidates(pname))
            cands = self._candidates(pname)
            if layer not in cands:
                have = [s for s, p in SITES.items() if s not in PARAMS
                        and (self.fmt.meta_fields or p not in ("meta", "weight_meta"))
                        and layer in self._candidates(p)]
                raise InjectionError(
                    f"layer {layer!r} ({type(self.leaves[layer]).__name__}) has no {site} "
                    f"site ({self._why(layer, pname)}); its sites: {', '.join(have) or 'none'}")
            info = self.layers(site, layer)[0]
            idx = faults.index[rows]
            if int(idx.min()) < 0 or int(idx.max()) >= info.numel:
                raise InjectionError(
                    f"fault index {int(idx.max()) if int(idx.max()) >= info.numel else int(idx.min())}"
                    f" is out of range for the {site} of {layer!r}; choose 0..{info.numel - 1}")

    def clamp_limit(self, name: str, pname: str) -> torch.Tensor:
        """The clamp limit of layer `name`'s output ('output') or parameter `pname`."""
        if pname in ("output", "meta"):
            if name not in self.ranges:
                raise InjectionError(
                    f"clamp={self.clamp!r} needs the activation range of {name!r}; call "
                    f"engine.profile(training_images) or pass ranges= to the Engine")
            return torch.tensor(self.ranges[name], device=self.device)
        return self._param_limit[(name, pname)]

    def _run_group(self, name: str, pname: str, f: FaultSet, g: Golden) -> Outcomes:
        dev = self.device
        img = f.image.to(dev)
        index, mask = f.index.to(dev), f.mask.to(dev)
        op, value = f.op.to(dev), f.value.to(dev)
        golden = g.outcomes.select(img)
        raw = g.raw[name]
        B = raw.shape[0]
        with torch.no_grad():
            if pname in ("output", "meta"):
                coder = self._coder(name, "output")
                flat = raw.reshape(B, -1)
                is_meta = pname == "meta"
                pos, new = emulate.corrupt_values(
                    coder, _Gather(flat, img), index, is_meta, mask, op, value)
                if name in self._quant:
                    old = _old_values(coder, flat, img, pos, is_meta, index)
                else:
                    old = flat[img[:, None], pos]
            else:
                param = "weight" if pname == "weight_meta" else pname
                codes = self.params[(name, param)]
                pos, new = codes.corrupt(index, pname == "weight_meta", mask, op, value)
                old = codes.values.reshape(-1)[pos]
            nonfinite = ~torch.isfinite(new).all(1)
            if self.clamp != "none":
                site = "output" if pname in ("output", "meta") else param
                new = emulate.clamp(new, self.clamp_limit(name, site), self.clamp)
            changed = ~emulate.same_bits(new, old).all(1)
            res = unchanged_outcomes(golden, nonfinite)
            live = changed.nonzero().reshape(-1)
            if pname in ("output", "meta") and live.numel() and self.program is not None:
                live = live[~self._masked(name, g, img[live], pos[live], new[live],
                                          is_meta)]
            for start in range(0, live.numel(), self.chunk):
                rows = live[start:start + self.chunk]
                logits = self._faulty_logits(name, pname, g, img[rows], pos[rows], new[rows],
                                             old[rows])
                if logits is None:
                    continue
                part = compute_outcomes(golden.select(rows), logits, g.labels[img[rows]],
                                        nonfinite[rows])
                for fld in FIELDS:
                    getattr(res, fld)[rows] = getattr(part, fld)
        return res

    def _start_value(self, name, pname, g, img, pos, new, old):
        """Output of layer `name` for these faults (after emulation), one row per fault."""
        raw = g.raw[name].index_select(0, img)
        if pname in ("output", "meta"):
            # raw is a fresh gathered copy, so scattering into it (or its quantised
            # copy) leaves the cache intact.
            out = self.quantize_output(name, raw).contiguous()
            out.view(out.shape[0], -1).scatter_(1, pos, new)
            return out
        param = "weight" if pname == "weight_meta" else pname
        mod = self.leaves[name]
        args = tuple(a.index_select(0, img) if isinstance(a, torch.Tensor) else a
                     for a in g.inputs[name])
        faulty = faulty_raw_output(mod, param, args, {}, raw, pos, new, old)
        return self.quantize_output(name, faulty)

    def _faulty_logits(self, name, pname, g, img, pos, new, old):
        start = self._start_value(name, pname, g, img, pos, new, old)
        if self.program is not None:
            node = self.program.module_nodes[name][0]
            plan = self.program.plan(node)
            if plan.dead:
                return None
            env = self.program.gather(g.nodes, plan.gathered, img)
            for c in plan.constants:
                env[c] = g.nodes[c]
            # An output fault changes start only at pos (one row of a transformer's tokens).
            return self.program.run_suffix(plan, start, env,
                                           pos if pname in ("output", "meta") else None)
        return self._forward(g.images.index_select(0, img), name, start)

    def _masked(self, name, g, img, pos, new, is_meta) -> torch.Tensor:
        """Faults whose change dies in the pointwise nodes right after the layer (e.g. a
        negative value staying negative through BatchNorm and ReLU): their logits are the
        golden ones. Runs the real nodes on one row (all channels) around each fault."""
        no = torch.zeros(img.numel(), dtype=torch.bool, device=self.device)
        node = self.program.module_nodes[name][0]
        plan = self.program.plan(node)
        if plan.dead:
            return ~no
        if is_meta or pos.shape[1] != 1 or not plan.chain:
            return no
        shape = self._shapes[name]
        others = {a for n in plan.chain for a in n.all_input_nodes
                  if a is not node and a not in plan.chain}
        if any(tuple(g.nodes[a].shape[1:]) != shape for a in others):
            return no
        take = _Slicer(shape, pos[:, 0])
        raw_s = take(g.raw[name], img)
        gold = self.quantize_output(name, raw_s)
        # Layer outputs may be channels-last (or otherwise strided); the flat view below
        # needs a contiguous copy.
        faulty = gold.clone(memory_format=torch.contiguous_format)
        faulty.view(faulty.shape[0], -1)[torch.arange(img.numel(), device=self.device),
                                         take.offset] = new[:, 0]
        env = {a: torch.cat([take(g.nodes[a], img)] * 2) for a in others}
        with torch.no_grad():
            out = self.program.run_chain(plan, torch.cat([faulty, gold]), env)
        half = img.numel()
        same = emulate.same_bits(out[:half], out[half:]).reshape(half, -1).all(1)
        return same

    # -- sampling -------------------------------------------------------------------------

    def sample(self, n: int, site: str = "activations", select: str = "all",
               fault_model: str = "bitflip", images: int | torch.Tensor = 1, field=None,
               generator: torch.Generator | None = None, by: str = "layer") -> FaultSet:
        """n random faults: layers uniformly (by='layer') or every element equally likely
        (by='element'), elements uniformly within a layer, bits from `fault_model`
        restricted to `field`, and images uniformly from range(images) (or, given a tensor,
        in that order)."""
        infos = self.layers(site, select)
        if by not in ("layer", "element"):
            raise unknown("layer weighting", str(by), ["layer", "element"])
        numel = torch.tensor([i.numel for i in infos], dtype=torch.float64)
        weights = torch.ones_like(numel) if by == "layer" else numel
        layer = torch.multinomial(weights, n, replacement=True, generator=generator)
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        index = (u * numel[layer]).floor().long().clamp_(max=(numel[layer] - 1).long())
        param = self._site(site)
        d = draw(fault_model, self.fmt, n, field, generator, meta=param in ("meta", "weight_meta"))
        if isinstance(images, torch.Tensor):
            image = images.long().reshape(-1)
        else:
            image = torch.randint(int(images), (n,), generator=generator)
        return FaultSet([i.name for i in infos], layer=layer, index=index, mask=d.mask,
                        op=d.op, value=d.value, image=image, param=param)

    # -- exhaustive classifier faults -----------------------------------------------------

    def exhaustive_last_layer(self, images, labels, fault_model: str = "bitflip", bits=None,
                              golden: Golden | None = None) -> Exhaustive:
        """Outcomes of every (weight, bit) fault of the classifier Linear on every image,
        computed analytically from the cached features."""
        return exhaustive(self, images, labels, fault_model, bits, golden)


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


def _groups(faults: FaultSet) -> dict:
    """Row indices of the faults of each (layer name, param code), in first-seen order."""
    key = faults.layer * len(PARAMS) + faults.param
    return {(faults.layers[k // len(PARAMS)], k % len(PARAMS)):
            (key == k).nonzero().reshape(-1) for k in torch.unique(key).tolist()}


def _empty_outcomes(n: int, device) -> Outcomes:
    def make(f):
        if f.endswith("top1"):
            return torch.zeros(n, dtype=torch.int64, device=device)
        if f in ("sdc", "due", "nonfinite"):
            return torch.zeros(n, dtype=torch.bool, device=device)
        return torch.zeros(n, dtype=torch.float32, device=device)
    return Outcomes(**{f: make(f) for f in FIELDS})


class _Gather:
    """Lazy rows of a cached [B, numel] tensor: `obj.gather(1, pos)` reads flat[img, pos]."""

    def __init__(self, flat: torch.Tensor, img: torch.Tensor):
        self.flat, self.img = flat, img

    def gather(self, dim: int, pos: torch.Tensor) -> torch.Tensor:
        return self.flat[self.img[:, None], pos]


def _old_values(coder, flat, img, pos, is_meta, index):
    """Golden (emulated) values at the corrupted positions."""
    vals = flat[img[:, None], pos]
    if is_meta or not coder.block:
        codes, meta = coder.encode_rows(vals)
        return coder.decode_rows(codes, meta)
    gpos, offset = coder.element_groups(index)
    codes, meta = coder.encode_rows(flat[img[:, None], gpos])
    rows = torch.arange(len(index), device=index.device)
    return coder.decode_rows(codes, meta)[rows, offset][:, None]


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
