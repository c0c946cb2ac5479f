"""Fault sites: what a fault corrupts in a layer, one class per site, in one registry."""

# A site says which layers have it, what a fault index ranges over, how faults change
# values (corrupt), what the layer hands on with them (start_value) and the clamp limit
# of the values it corrupts. Adding a site is one class here, registered with @site
# (and its FaultSet parameter name in faults.PARAMS).

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from flipsafe import accel
from flipsafe.deployed.modules import stored_format
from flipsafe.errors import InjectionError
from flipsafe.faults import SITES, apply, site_param
from flipsafe.formats.words import WordLayout
from flipsafe.inject import emulate
from flipsafe.inject.emulated import ALL, KINDS, EmulatedModel
from flipsafe.inject.weights import faulty_raw_output


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


def _a(word: str) -> str:
    """`word` with its indefinite article: "an output", "a weight"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class Site:
    """A fault site of an emulated model `em` run by executor `ex`."""

    name: str  # what users call it ("activations")
    param: str  # its FaultSet parameter name ("output")
    meta = False  # faults corrupt metadata codes (a whole group of values each)
    on_output = False  # faults change the layer's output itself (masking may apply)
    all_kinds: tuple | None = ALL  # the layer kinds 'all' selects (None: every one)

    def __init__(self, em: EmulatedModel, ex):
        self.em, self.ex = em, ex

    def available(self) -> bool:
        """Whether the format has what this site corrupts."""
        return not self.meta or bool(self.em.fmt.meta_fields)

    def has(self, layer: str) -> bool:
        raise NotImplementedError

    def candidates(self) -> list[str]:
        return [n for n in self.em.leaves if self.has(n)]

    def why_not(self, layer: str) -> str:
        calls = self.em.calls.get(layer, 0)
        if calls == 0:
            return "it never runs as a module (its parent uses its parameters directly)"
        if calls > 1:
            return f"it runs {calls} times per forward, so its output is not one value"
        return self._why_not(layer)

    def _why_not(self, layer: str) -> str:
        raise NotImplementedError

    def numel(self, layer: str) -> int:
        raise NotImplementedError

    def codes(self):
        """What faults here flip bits of, shaped as a format (bits, fields, meta_fields):
        the engine's format, or its codes packed in words (WordSite)."""
        return self.em.fmt

    def info(self, layer: str) -> LayerInfo:
        em = self.em
        mod = em.leaves[layer]
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        fields = self.codes().meta_fields if self.meta else self.codes().fields
        return LayerInfo(
            name=layer, type=type(mod).__name__, kind=em.kinds[layer], site=self.param,
            output_shape=em.shapes.get(layer), numel=self.numel(layer), fields=dict(fields),
            emulated=layer in em.emulated,
            weight_shape=tuple(w.shape) if isinstance(w, torch.Tensor) else None,
            bias_shape=tuple(b.shape) if isinstance(b, torch.Tensor) else None)

    def select(self, select: str, asked: str) -> list[LayerInfo]:
        """Layers with this site matching `select` (see Engine.layers); `asked` is the site
        name the user gave."""
        em, param = self.em, self.param
        if not self.available():
            raise InjectionError(
                f"format {em.fmt.name} has no metadata to corrupt; formats with metadata "
                f"are the block formats (mx*, bfp*) and scaled integers (int8, int4, "
                f"int8_channel)")
        cands = self.candidates()
        if select in em.leaves and select not in cands:
            raise InjectionError(f"layer {select!r} has no {asked} site: "
                                 f"{self.why_not(select)}; layers with one: "
                                 f"{', '.join(cands) or 'none'}")
        if not cands:
            raise InjectionError(f"the model has no layer with {_a(param)} site")
        types = {n: type(em.leaves[n]).__name__ for n in cands}
        if select == "all":
            chosen = [n for n in cands if self.all_kinds is None or em.kinds[n] in self.all_kinds]
        elif select == "last":
            chosen = [n for n in cands if n == em.classifier()]
        elif select in cands:
            chosen = [select]
        else:
            parts = str(select).split("|")
            if all(p in set(types.values()) | set(KINDS) for p in parts):
                chosen = [n for n in cands if types[n] in parts or em.kinds[n] in parts]
            else:
                try:
                    rx = re.compile(select)
                except re.error as exc:
                    raise InjectionError(
                        f"layer selection {select!r} is neither a layer name, a type nor a "
                        f"valid regular expression ({exc}); layers: {', '.join(cands)}") from None
                chosen = [n for n in cands if rx.search(n)]
        if not chosen:
            raise InjectionError(
                f"no layer with {_a(param)} site matches {select!r}; layers: {', '.join(cands)}"
                f" (types: {', '.join(sorted(set(types.values())))}; or 'all', 'last')")
        return [self.info(n) for n in chosen]

    def corrupt(self, layer: str, faults, golden) -> tuple:
        """(img, pos, new, old) of `faults` at `layer`: the image of each, the flat
        positions its fault changes, their new and their golden values."""
        raise NotImplementedError

    def limit(self, layer: str, clamp: str) -> torch.Tensor:
        """The clamp limit of the values faults here corrupt (`clamp` names the mode)."""
        raise NotImplementedError

    def faulty_output(self, layer, golden, img, pos, new, old) -> torch.Tensor:
        """Output of `layer` in the format for these faults, before any guard."""
        raise NotImplementedError

    def start_value(self, layer, golden, img, pos, new, old) -> torch.Tensor:
        """What `layer` hands on for these faults (in the format, guarded)."""
        return self.em.guarded(layer, self.faulty_output(layer, golden, img, pos, new, old))


SITE_TYPES: dict[str, type[Site]] = {}  # FaultSet parameter name -> site class


def site(cls: type[Site]) -> type[Site]:
    """Register a site class."""
    SITE_TYPES[cls.param] = cls
    return cls


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


@site
class OutputSite(Site):
    """Elements of a layer's output on one image."""

    name, param, on_output = "activations", "output", True

    def has(self, layer):
        em = self.em
        return (em.runs_once(layer) and self.ex.start_error(layer) is None
                and (not em.native or layer in em.emulated))

    def _why_not(self, layer):
        if self.em.native and layer not in self.em.emulated:
            return "the model keeps its output in float, not as stored codes"
        return self.ex.start_error(layer) or "its output is not a single batch-first tensor"

    def numel(self, layer):
        return math.prod(self.em.shapes[layer])

    def corrupt(self, layer, faults, golden):
        em, dev = self.em, self.em.device
        img, index = faults.image.to(dev), faults.index.to(dev)
        raw = golden.raw[layer]
        coder = em.coder(layer)
        flat = raw.reshape(raw.shape[0], -1)
        with torch.no_grad():
            pos, new = emulate.corrupt_values(coder, _Gather(flat, img), index, self.meta,
                                              faults.mask.to(dev), faults.op.to(dev),
                                              faults.value.to(dev))
            if layer in em.quant:
                old = _old_values(coder, flat, img, pos, self.meta, index)
            else:
                old = flat[img[:, None], pos]
        return img, pos, new, old

    def limit(self, layer, clamp):
        if layer not in self.em.ranges:
            raise InjectionError(
                f"clamp={clamp!r} needs the activation range of {layer!r}; call "
                f"engine.profile(training_images) or pass ranges= to the Engine")
        return torch.tensor(self.em.ranges[layer], device=self.em.device)

    def faulty_output(self, layer, golden, img, pos, new, old):
        # A fresh gathered copy, so scattering into it (or its quantised copy) leaves the
        # cache intact.
        raw = golden.raw[layer].index_select(0, img)
        out = self.em.quantize_output(layer, raw).contiguous()
        out.view(out.shape[0], -1).scatter_(1, pos, new)
        return out


class ParameterSite(Site):
    """Elements of a parameter `pname` of a layer (held in the format once, shared by all
    images; each fault is followed on its own image)."""

    pname: str

    def has(self, layer):
        p = getattr(self.em.leaves[layer], self.pname, None)
        # Faulty outputs are followed per image: the output must be batch-first (not,
        # e.g., attention windows holding parts of several images).
        return (isinstance(p, torch.Tensor) and (layer, self.pname) in self.em.params
                and self.em.runs_once(layer))

    def _why_not(self, layer):
        if (layer, self.pname) not in self.em.params:
            if self.em.native:
                return f"the model keeps its {self.pname} in float, not as stored codes"
            return f"it has no floating-point {self.pname} parameter"
        return ("its output is not a single batch-first tensor, so a parameter fault's "
                "effect cannot be followed image by image")

    def numel(self, layer):
        return getattr(self.em.leaves[layer], self.pname).numel()

    def corrupt(self, layer, faults, golden):
        dev = self.em.device
        codes = self.em.params[(layer, self.pname)]
        with torch.no_grad():
            pos, new = codes.corrupt(faults.index.to(dev), self.meta, faults.mask.to(dev),
                                     faults.op.to(dev), faults.value.to(dev))
            old = codes.values.reshape(-1)[pos]
        return faults.image.to(dev), pos, new, old

    def limit(self, layer, clamp):
        return self.em.param_limits[(layer, self.pname)]

    def faulty_output(self, layer, golden, img, pos, new, old):
        raw = golden.raw[layer].index_select(0, img)
        args = tuple(a.index_select(0, img) if isinstance(a, torch.Tensor) else a
                     for a in golden.inputs[layer])
        faulty = faulty_raw_output(self.em.leaves[layer], self.pname, args, {}, raw, pos, new,
                                   old)
        return self.em.quantize_output(layer, faulty)


@site
class WeightSite(ParameterSite):
    name, param, pname = "weights", "weight", "weight"


@site
class BiasSite(ParameterSite):
    name, param, pname = "biases", "bias", "bias"


@site
class OutputMetaSite(OutputSite):
    """Metadata codes (shared scales) of a layer's output on one image."""

    name, param, meta = "metadata", "meta", True

    def numel(self, layer):
        return self.em.coder(layer).meta_numel if self.em.fmt.meta_fields else 0


@site
class WeightMetaSite(WeightSite):
    """Metadata codes of a layer's weight."""

    name, param, meta = "weight_metadata", "weight_meta", True

    def numel(self, layer):
        return self.em.params[(layer, self.pname)].coder.meta_numel


@site
class PESite(OutputSite):
    """A unit of one processing element of the accelerator (flipsafe.accel): a fault's
    index is the PE (row-major) - times the PE's time steps for transient faults, index =
    PE * steps + step; a permanent one changes every output of the layer the PE computes.
    A float model's PEs compute in float32; a quantized model's (format native) in int8
    codes with int32 products and accumulators (accel.Int8)."""

    name, param = "pe", "pe"

    @property
    def accelerator(self) -> accel.Accelerator:
        """The array of the engine (Engine(accelerator=...))."""
        return self.em.accelerator

    def _int8(self, layer) -> bool:
        mod = self.em.leaves[layer]
        return stored_format(mod, "weight") is not None and stored_format(mod, "input") is not None

    def codes(self):
        return accel.codes(self.accelerator, self.em.fmt)

    def has(self, layer):
        em = self.em
        number = self._int8(layer) if em.native else em.fmt.name == "fp32"
        # (its output need not be stored: the next quantize reads what the PE computed)
        return (number and em.runs_once(layer) and self.ex.start_error(layer) is None
                and accel.supports(em.leaves[layer]) is None)

    def _why_not(self, layer):
        if self.em.native and not self._int8(layer):
            return "its weight or input is not stored as int8 codes (an int8 PE reads both)"
        if not self.em.native and self.em.fmt.name != "fp32":
            return (f"PE faults are modeled in float32 or in a quantized model's int8; the "
                    f"format here is {self.em.fmt.name}")
        return (accel.supports(self.em.leaves[layer]) or self.ex.start_error(layer)
                or "its output is not a single batch-first tensor")

    def select(self, select, asked):
        if not self.em.native and self.em.fmt.name != "fp32":
            raise InjectionError(f"no layer has a pe site: {self._why_not('')}; use --format "
                                 "fp32")
        return super().select(select, asked)

    def gemm_dims(self, layer) -> tuple[int, int, int]:
        """(M, K, N) of the layer's GEMM for one image."""
        mod, shape = self.em.leaves[layer], self.em.shapes[layer]
        if isinstance(mod, torch.nn.Linear):
            return math.prod(shape[:-1]), mod.in_features, mod.out_features
        return math.prod(shape[1:]), mod.weight[0].numel(), mod.out_channels

    def steps(self, layer) -> int:
        """Time steps per PE a transient fault may strike at (1: permanent faults)."""
        acc = self.accelerator
        return accel.time_steps(acc, *self.gemm_dims(layer)) if acc.transient else 1

    def numel(self, layer):
        return self.accelerator.pes * self.steps(layer)

    def _operands(self, layer, x):
        """(X, W, arith, scale): the GEMM operands as the PEs hold them, their number
        system, and what turns an accumulator change into an output change (per n)."""
        mod = self.em.leaves[layer]
        if not self.em.native:
            X, W = accel.gemm_operands(mod, x)
            return X, W, accel.FLOAT32, None
        fin, fw = stored_format(mod, "input"), stored_format(mod, "weight")
        xi = fin.ints(fin.encode(x).codes).to(torch.float64) - float(fin.zero_point)
        wi = fw.ints(self.em.params[(layer, "weight")].codes).to(torch.float64)
        X, W = accel.gemm_operands(mod, xi, wi.reshape(mod.weight.shape))
        scale = fin.scale.to(torch.float64) * fw.scale.to(torch.float64).reshape(-1)
        arith = accel.Int8(int(fin.zero_point), fin.dtype == torch.int8)
        return X, W, arith, scale.expand(W.shape[1]).to(x.device)

    def corrupt(self, layer, faults, golden):
        dev, acc = self.em.device, self.accelerator
        img = faults.image.to(dev)
        mod = self.em.leaves[layer]
        with torch.no_grad():
            X, W, arith, scale = self._operands(layer,
                                                golden.inputs[layer][0].index_select(0, img))
            gemm = X @ W if acc.unit == "accumulator" and not acc.transient else None
            index, steps = faults.index.to(dev), self.steps(layer)
            m, n, delta = accel.output_change(
                acc, X, W, index // steps, faults.mask.to(dev), faults.op.to(dev),
                faults.value.to(dev), gemm, index % steps if acc.transient else None, arith)
            if scale is not None:  # an int32 accumulator change, in the output's units
                delta = delta * scale[n.clamp(min=0)]
            delta = delta.to(torch.float32)
            raw = golden.raw[layer]
            flat = raw.reshape(raw.shape[0], -1)
            if isinstance(mod, torch.nn.Conv2d):  # [N, H', W']: channel-major
                pos = n * X.shape[1] + m
            else:  # [..., M, N] tokens then features
                pos = m * W.shape[1] + n
            pad = m < 0  # entries beyond the layer's edge repeat the first real one
            first = torch.argmax((~pad).to(torch.int8), dim=1, keepdim=True)
            pos = torch.where(pad, pos.gather(1, first), pos)
            delta = torch.where(pad, delta.gather(1, first), delta)
            idle = pad.all(1, keepdim=True)  # a PE this layer leaves idle: no change
            pos, delta = torch.where(idle, 0, pos), torch.where(idle, 0.0, delta)
            old = flat[img[:, None], pos]
            new = old + delta
        return img, pos, new, old


@site
class WordSite(WeightSite):
    """A memory word of a layer's stored weight codes (formats.words): a fault's index is
    the word, its bits are the word's (code 0 in the low bits), so one upset may change
    two neighbouring weights."""

    name, param = "weight_words", "weight_word"

    def codes(self):
        return WordLayout(self.em.fmt, self.em.word_bits)

    def has(self, layer):
        fmt = self.em.fmt
        return super().has(layer) and fmt.block_size is None and not fmt.native

    def _why_not(self, layer):
        if self.em.fmt.block_size is not None or self.em.fmt.native:
            return f"{self.em.fmt.name} codes are not packed into words here"
        return super()._why_not(layer)

    def numel(self, layer):
        return self.codes().words(super().numel(layer))

    def corrupt(self, layer, faults, golden):
        dev, words = self.em.device, self.codes()
        params = self.em.params[(layer, self.pname)]
        total, per, b = params.codes.numel(), words.per_word, words.code_bits
        with torch.no_grad():
            word, mask = faults.index.to(dev), faults.mask.to(dev)
            op, value = faults.op.to(dev), faults.value.to(dev)
            lane = torch.arange(per, device=dev)
            pos = word[:, None] * per + lane  # [n, per] the word's codes
            real = pos < total  # the last word may be part empty
            pos = torch.where(real, pos, pos[:, :1])
            shift = lane * b
            sub = (mask[:, None] >> shift) & ((1 << b) - 1)
            sub = torch.where(real, sub, 0)
            vals = (value[:, None] >> shift) & ((1 << b) - 1)
            codes = apply(params.codes[pos], sub, op[:, None].expand_as(sub), vals)
            coder = params.coder
            meta = params.meta[coder.meta_of_element(pos)] if coder.meta is not None else None
            new = coder.decode_rows(codes.reshape(-1, 1), None if meta is None else
                                    meta.reshape(-1)).reshape(pos.shape)
            old = params.values.reshape(-1)[pos]
        return faults.image.to(dev), pos, new, old


def _zero_points(fmt, faults, dev) -> torch.Tensor:
    """Each fault's zero point: the stored 8-bit pattern with the fault applied."""
    pattern = fmt.zero_point_pattern().to(dev).expand(len(faults))
    return fmt.ints(apply(pattern, faults.mask.to(dev), faults.op.to(dev),
                          faults.value.to(dev)))


@site
class ZeroPointSite(OutputSite):
    """The zero point of a quantized model's activation codes (one per tensor, so one per
    image): a fault shifts every value of the image's tensor (format native)."""

    name, param = "zero_points", "zero_point"

    def has(self, layer):
        return self.em.native and super().has(layer)

    def _why_not(self, layer):
        if not self.em.native:
            return "zero points are a quantized model's (format native)"
        return super()._why_not(layer)

    def numel(self, layer):
        return 1

    def corrupt(self, layer, faults, golden):
        dev = self.em.device
        img = faults.image.to(dev)
        fmt = self.em.coder(layer).fmt
        with torch.no_grad():
            raw = golden.raw[layer]
            old = raw.reshape(raw.shape[0], -1).index_select(0, img)
            codes = fmt.encode(old).codes
            scale = fmt.scale.to(dev).expand(len(img))
            new = fmt.values(codes, scale, _zero_points(fmt, faults, dev))
            pos = torch.arange(old.shape[1], device=dev).expand(len(img), -1)
        return img, pos, new, old


@site
class WeightZeroPointSite(WeightSite):
    """The zero point of a quantized model's weight codes, one per output channel: a fault
    shifts every weight of the channel (format native)."""

    name, param = "weight_zero_points", "weight_zero_point"

    def has(self, layer):
        return self.em.native and super().has(layer)

    def _why_not(self, layer):
        if not self.em.native:
            return "zero points are a quantized model's (format native)"
        return super()._why_not(layer)

    def numel(self, layer):
        return self.em.params[(layer, self.pname)].coder.meta_numel

    def corrupt(self, layer, faults, golden):
        dev = self.em.device
        params = self.em.params[(layer, self.pname)]
        coder, fmt = params.coder, params.coder.fmt
        with torch.no_grad():
            index = faults.index.to(dev)
            pos = coder.meta_groups(index)
            scale = params.meta[index].view(torch.float32)
            new = fmt.values(params.codes[pos], scale, _zero_points(fmt, faults, dev))
            old = params.values.reshape(-1)[pos]
        return faults.image.to(dev), pos, new, old


__all__ = ["SITES", "SITE_TYPES", "LayerInfo", "Site", "bind_sites", "site_param"]


def bind_sites(em: EmulatedModel, ex) -> dict[str, Site]:
    """Every registered site of `em` run by `ex`, by FaultSet parameter name."""
    return {p: cls(em, ex) for p, cls in SITE_TYPES.items()}
