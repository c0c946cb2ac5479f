"""The emulated model: a model's private copy held in a number format, and its layer table."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flipsafe import accel
from flipsafe.compat import BatchNorm, ConvNd, InstanceNorm
from flipsafe.deployed.modules import QuantDequant, is_quantized, stored_format, stored_layers
from flipsafe.errors import ConfigError, FlipsafeError, InjectionError, unknown
from flipsafe.inject import emulate

KINDS = ("conv", "linear", "norm", "attention", "quant", "other")
EMULATED = ("conv", "linear", "norm")  # kinds whose outputs are held in the format
# What select='all' means at every site, for layers(), sample() and campaigns alike: the Conv
# and Linear layers (GoldenEye's convention; normalisations are folded into them on
# deployment), and a quantized model's stored activation codes (deployed.QuantDequant).
ALL = ("conv", "linear", "quant")

_NORMS = (BatchNorm, nn.LayerNorm, nn.GroupNorm,
          InstanceNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                    else ())


def kind_of(mod: nn.Module) -> str:
    if isinstance(mod, ConvNd):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, _NORMS):
        return "norm"
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    if isinstance(mod, QuantDequant):
        return "quant"
    return "other"


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Leaves as torch.fx sees them: modules without children, and attention modules
    (their out_proj is a child that never runs as a module)."""
    return {n: m for n, m in model.named_modules() if n and (
        not list(m.children()) or isinstance(m, nn.MultiheadAttention))}


def kinds_of(leaves: dict) -> dict[str, str]:
    """{layer name: kind} of leaf modules."""
    return {n: kind_of(m) for n, m in leaves.items()}


def classifier_of(model: nn.Module) -> str:
    """Name of the Linear producing the class scores ('last')."""
    from flipsafe.textguided.head import classifier_layer_name
    try:
        return classifier_layer_name(model)
    except FlipsafeError as exc:
        raise InjectionError(f"cannot find the classifier layer: {exc}") from None


def check_guards(guards: dict | None, leaves: dict) -> dict:
    """Guards {layer name: callable} with every name a leaf layer; None means none."""
    guards = dict(guards or {})
    for name, fn in guards.items():
        if name not in leaves:
            raise unknown("layer to guard", str(name), list(leaves))
        if not callable(fn):
            raise ConfigError(f"the guard of {name!r} must be callable")
    return guards


def _check_native(fmt, model: nn.Module) -> None:
    """A quantized model runs in its own codes (native), a float model in an emulated
    format; anything else contradicts what the model stores."""
    if fmt.native and not is_quantized(model):
        raise ConfigError("format native corrupts the codes a quantized model stores, and "
                          "this model stores none; choose an emulated format such as fp32 "
                          "or int8")
    if not fmt.native and is_quantized(model):
        layers = stored_layers(model)
        raise ConfigError(f"the model is quantized (it stores its own codes in "
                          f"{', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}); "
                          f"format {fmt.name} would contradict them; use format native")


class EmulatedModel:
    """`model` held in format `fmt`: complete once constructed.

    Takes `model` as its own (hand it a private copy): it goes to `device` in eval mode,
    without in-place modules, and the floating-point parameters of its leaf modules are
    rewritten in the format (`params` holds their codes). One run on `example` (one image,
    as three copies) fixes the layer table: `shapes` (per-image output shape of each leaf,
    None if not one batch-first tensor), `calls` (runs per forward) and `probe_logits`.
    Outputs of Conv/Linear/normalisation layers are held in the format (`quant`, scaled
    from `ranges` for calibrated formats), then passed through `guards` (`emit`).
    """

    def __init__(self, model: nn.Module, fmt, example: torch.Tensor, device, ranges=None,
                 guards=None):
        self.fmt = fmt
        self.device = torch.device(device)
        self.exact_fp32 = fmt.name == "fp32"
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if getattr(m, "inplace", False) is True:  # not a child module named so
                m.inplace = False  # a cached output must not be overwritten downstream
        self.modules = dict(self.model.named_modules())
        self.leaves = leaf_modules(self.model)
        self.kinds = kinds_of(self.leaves)
        # the hardware sites pe and weight_words read (the Engine sets its own)
        self.accelerator, self.word_bits = accel.parse(None), 32
        self.native = bool(fmt.native)
        _check_native(fmt, self.model)
        if self.native:  # the layers storing their outputs as codes
            self.emulated = [n for n, m in self.leaves.items() if stored_format(m, "output")]
        else:
            self.emulated = [n for n, k in self.kinds.items() if k in EMULATED]
        self.params: dict[tuple[str, str], emulate.ParamCodes] = {}
        self.param_limits: dict[tuple[str, str], torch.Tensor] = {}
        with torch.no_grad():
            for name, mod in self.leaves.items():
                for pname, p in mod.named_parameters(recurse=False):
                    stored = stored_format(mod, pname)
                    if not p.dtype.is_floating_point or (self.native and stored is None):
                        continue
                    codes = emulate.ParamCodes(stored or emulate.calibrate_param(fmt, p), p)
                    if stored is not None and not bool(emulate.same_bits(codes.values, p).all()):
                        raise InjectionError(f"the stored codes of {name}.{pname} do not decode "
                                             f"to the weights the model computes with")
                    self.params[(name, pname)] = codes
                    p.copy_(codes.values)
                    codes.values = p  # one copy of the emulated values: the model's own
                    self.param_limits[(name, pname)] = p.abs().max()
        self.example = example[:1].to(self.device)
        self.shapes, self.calls, self.probe_logits = self._probe(self.example)
        self.emulate(ranges or {}, guards or {})

    # -- the layer table ------------------------------------------------------------------

    def _probe(self, x: torch.Tensor):
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
        with self.hooks({n: make(n) for n in self.leaves}), torch.no_grad():
            out = self.model(x3)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InjectionError(
                f"the model must return a [batch, classes] tensor of logits, got "
                f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        return shapes, calls, out

    def runs_once(self, name: str) -> bool:
        """Whether layer `name` runs once per forward with one batch-first tensor output."""
        return self.calls.get(name, 0) == 1 and self.shapes.get(name) is not None

    def classifier(self) -> str:
        return classifier_of(self.model)

    # -- outputs in the format ------------------------------------------------------------

    def emulate(self, ranges: dict, guards: dict):
        """Hold outputs in the format scaled from `ranges`, then apply `guards`."""
        self.ranges = {str(k): float(v) for k, v in ranges.items()}
        self.guards = check_guards(guards, self.leaves)
        self.coders: dict = {}
        quant, fast = {}, {}
        self.missing_range = None  # a run layer whose calibrated format lacks its range
        for name in self.emulated:
            if self.exact_fp32 or self.native or self.calls.get(name, 0) == 0:
                continue
            if self.fmt.needs_calibration and name not in self.ranges:
                self.missing_range = self.missing_range or name
                continue
            fmt = self.output_format(name)
            if id(fmt) not in fast:
                fast[id(fmt)] = fmt.fast_quantizer()
            quant[name] = fast[id(fmt)]
        emit = dict(quant)
        for name, guard in self.guards.items():
            q = quant.get(name)
            emit[name] = guard if q is None else (lambda x, q=q, guard=guard: guard(q(x)))
        self.quant, self.emit = quant, emit

    def require_ranges(self):
        """Refuse to run while a calibrated format lacks a layer's activation range."""
        if self.missing_range is not None:
            emulate.calibrate_output(self.fmt, None, self.missing_range)

    def output_format(self, name: str):
        if self.native:  # the layer's own (QuantDequant) format
            return stored_format(self.leaves[name], "output")
        if self.exact_fp32:
            return self.fmt
        return emulate.calibrate_output(self.fmt, self.ranges.get(name), name)

    def holds(self, name: str) -> bool:
        """Whether layer `name`'s output is held in a format: quantised by the emulation,
        or a quantized model's own stored codes (native)."""
        return name in self.quant or (self.native and name in self.emulated)

    def coder(self, name: str) -> emulate.TensorCoder:
        """How one image's output of layer `name` is encoded (fault groups, metadata)."""
        if name not in self.coders:
            self.coders[name] = emulate.TensorCoder(self.output_format(name), self.shapes[name],
                                                    is_param=False)
        return self.coders[name]

    def quantize_output(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s raw output as the emulated model holds it (in the format)."""
        q = self.quant.get(name)
        return raw if q is None else q(raw)

    def guarded(self, name: str, value: torch.Tensor) -> torch.Tensor:
        guard = self.guards.get(name)
        return value if guard is None else guard(value)

    def held_output(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """What layer `name` hands on for its raw output: in the format, then guarded."""
        return self.guarded(name, self.quantize_output(name, raw))

    # -- running with hooks ---------------------------------------------------------------

    @contextlib.contextmanager
    def hooks(self, fns: dict):
        """Forward hooks {module name: fn(module, inputs, output)} while the block runs."""
        handles = [self.modules[n].register_forward_hook(fn) for n, fn in fns.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def emulation_hooks(self, skip=(), guarded: bool = True) -> dict:
        """Hooks that hold layer outputs in the format (and guard them, if `guarded`)."""
        emit = self.emit if guarded else self.quant

        def make(name):
            q = emit[name]
            return lambda mod, inp, out: q(out)
        return {n: make(n) for n in emit if n not in skip}

    def observe_ranges(self, x: torch.Tensor, ranges: dict):
        """Raise `ranges` {layer: max |output|} to what every leaf layer outputs on `x`."""

        def make(name):
            def hook(mod, inp, out):
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    finite = torch.where(torch.isfinite(out), out.abs(), 0.0)
                    ranges[name] = max(ranges.get(name, 0.0), float(finite.max()))
            return hook
        # Calibrated formats are profiled unquantised: their scale comes from this range;
        # ranges are those of the unguarded model (guards are built from them).
        hooks = {} if self.fmt.needs_calibration else self.emulation_hooks(guarded=False)
        with self.hooks(hooks), self.hooks({n: make(n) for n in self.leaves}), \
                torch.no_grad():
            self.model(x)
