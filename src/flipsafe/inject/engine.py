"""The fault-injection engine: one facade over the emulated model, its executor and verbs."""

# Its parts: emulated.EmulatedModel, executors (graph or hooks, chosen once), sites (one
# class per fault site), and two peers on their public API: injector.Injector (`run`) and
# exhaustive.ExhaustiveLastLayer.

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from flipsafe import accel
from flipsafe.errors import ConfigError, InjectionError
from flipsafe.faults import FaultSet, Sampler
from flipsafe.inject import emulate, emulated
from flipsafe.inject.executors import GOLDEN_BATCH, Golden, check_batch, choose_executor
from flipsafe.inject.exhaustive import Exhaustive, ExhaustiveLastLayer
from flipsafe.inject.injector import Injector, SiteValues
from flipsafe.inject.sites import SITES, LayerInfo, bind_sites, site_param
from flipsafe.metrics.outcomes import Outcomes

__all__ = ["GOLDEN_BATCH", "SITES", "Engine", "Golden", "LayerInfo", "SiteValues"]


def _as_batches(data) -> Iterable[torch.Tensor]:
    for item in [data] if isinstance(data, torch.Tensor) else data:
        yield item[0] if isinstance(item, (tuple, list)) else item


class Engine:
    """Bit-exact, batched fault injection into a private emulated copy of `model`.

    format: a flipsafe.formats name (or Format); weights of parameterised leaf modules
    are held in it, and so are the outputs of Conv/Linear/normalisation modules.
    clamp: 'none', 'profiled' (faulty values beyond the layer's range, or NaN/Inf, go to
    +-range keeping their sign) or 'goldeneye' (as GoldenEye: NaN goes to +range).
    ranges: {layer: max |activation|} from `profile` (needed by clamping and by formats
    with a calibrated scale). suffix: run only the graph after the faulty layer where the
    model is captured as a graph by torch.fx or torch.export (False: full forwards with
    hooks); the executor is chosen with the emulated model, from the first input seen (or
    `input_shape`). chunk: faulty images per forward pass. memory: bytes of cached
    activations `run` may hold when it makes its own golden runs. guards: see set_guards.
    accelerator: the array of site 'pe' (accel.parse); word_bits: site weight_words' word.
    """

    def __init__(self, model: nn.Module, format="fp32", clamp: str = "none", ranges=None,
                 device="cpu", suffix: bool = True, chunk: int = 64, input_shape=None,
                 memory: int = 1 << 30, guards: dict | None = None, accelerator=None,
                 word_bits: int = 32):
        emulate.check_clamp(clamp)
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")
        self.device = torch.device(device)
        self.fmt = emulate.get_format(format)
        self.clamp, self.chunk, self.memory = clamp, chunk, int(memory)
        self.ranges = {str(k): float(v) for k, v in (ranges or {}).items()}
        self.guards: dict = {}
        self.model = copy.deepcopy(model)  # the emulated model's own, once it is made
        self.trace_error = None  # why faulty runs are not graph runs
        self._suffix = suffix
        self.accelerator, self.word_bits = accel.parse(accelerator), int(word_bits)
        self._em, self._ex, self._sites = None, None, {}
        if input_shape is not None:
            self._made(torch.zeros(1, *input_shape, device=self.device))
        if guards:
            self.set_guards(guards)

    def _made(self, images: torch.Tensor) -> emulated.EmulatedModel:
        """The emulated model and its executor, made once from the first input seen."""
        if self._em is None:
            em = emulated.EmulatedModel(self.model, self.fmt, images, self.device, self.ranges,
                                        self.guards)
            self._ex, self.trace_error = choose_executor(em, self._suffix)
            # the hardware the pe and weight_words sites read (inject.sites)
            em.accelerator, em.word_bits = self.accelerator, self.word_bits
            self._em, self._sites = em, bind_sites(em, self._ex)
        return self._em

    def _need(self) -> emulated.EmulatedModel:
        if self._em is None:
            raise InjectionError("the engine has not seen an input yet; pass input_shape=(C, H, "
                                 "W) to Engine or call golden()/profile() with images first")
        return self._em

    @property
    def suffix(self) -> bool:
        """Whether faulty runs execute only the graph after the faulty layer (known once
        the engine has seen an input)."""
        return self._ex is not None and self._ex.suffix

    @property
    def leaves(self) -> dict:
        return self._em.leaves if self._em else emulated.leaf_modules(self.model)

    @property
    def kinds(self) -> dict:
        return self._em.kinds if self._em else emulated.kinds_of(self.leaves)

    @property
    def params(self) -> dict:
        """{(layer, parameter): emulate.ParamCodes} of the emulated parameters."""
        return self._need().params

    @property
    def needs_ranges(self) -> bool:
        """Whether clamping or the format's output scales need activation ranges (profile)."""
        return self.clamp != "none" or (self.fmt.name != "fp32" and self.fmt.needs_calibration)

    def _emulation_changed(self):
        if self._em is not None:
            self._em.emulate(self.ranges, self.guards)
            self._ex.refresh()  # a graph executor compiles the quantisers into its program

    def set_guards(self, guards: dict | None):
        """Protect layers with guards {layer name: fn(value) -> value}: each function is
        applied to what its layer hands on (its output held in the format, after a fault
        injected there) in golden and faulty runs alike. A guard must act element by
        element (it may be given a slice of the output: all channels, the last dim whole)
        and leave its own results unchanged (clamps, clips). None or {} removes them."""
        self.guards = emulated.check_guards(guards, self.leaves)
        self._emulation_changed()

    def set_ranges(self, ranges: dict):
        """Use these activation ranges (as returned by profile) from now on."""
        self.ranges.update({str(k): float(v) for k, v in ranges.items()})
        self._emulation_changed()

    def quantize_output(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s raw output as the emulated model holds it (in the format)."""
        return self._need().quantize_output(name, raw)

    def held_output(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """What layer `name` hands on for its raw output: in the format, then guarded."""
        return self._need().held_output(name, raw)

    def clamp_limit(self, name: str, pname: str) -> torch.Tensor:
        """The clamp limit of layer `name`'s output ('output') or parameter `pname`."""
        self._need()
        return self._sites[pname].limit(name, self.clamp)

    def classifier(self) -> str:
        """Name of the Linear producing the class scores ('last')."""
        return emulated.classifier_of(self.model)

    def _site(self, site: str) -> str:
        return site_param(site)

    def layers(self, site: str = "activations", select: str = "all") -> list[LayerInfo]:
        """Layers at `site` ('activations', 'weights', 'biases', 'metadata',
        'weight_metadata') matching `select`: 'all' (Conv/Linear/normalisation layers for
        activations and metadata, every parameterised layer otherwise), 'last' (the
        classifier), an exact layer name, type names or kinds joined by '|' (e.g.
        'Conv2d|Linear', 'conv', 'norm'), or else a regular expression searched in names."""
        self._need()
        return self._sites[self._site(site)].select(select, site)

    def codes(self, site: str):
        """What faults at `site` flip bits of, shaped as a format (Site.codes)."""
        self._need()
        return self._sites[self._site(site)].codes()

    def sites(self, site: str) -> list[str]:
        """Names of the layers that have `site` (before any selection)."""
        self._need()
        return self._sites[self._site(site)].candidates()

    @emulate.exact
    def profile(self, batches) -> dict[str, float]:
        """Largest |output| of every leaf layer over `batches` (a tensor of images, or an
        iterable of image tensors or (images, labels) pairs); also kept by the engine."""
        ranges: dict[str, float] = {}
        seen = False
        for x in _as_batches(batches):
            x = x.to(self.device)
            self._made(x).observe_ranges(x, ranges)
            seen = True
        if not seen:
            raise ConfigError("profile() got no images")
        self.set_ranges(ranges)
        return dict(ranges)

    # -- golden and faulty runs ---------------------------------------------------------------

    def prepare(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a batch, make the emulated model from it once (layer table, executor) and
        check it can run; returns images and labels on the engine's device."""
        images, labels = check_batch(images, labels, self.device)
        self._made(images).require_ranges()
        return images, labels

    @emulate.exact
    def golden(self, images: torch.Tensor, labels: torch.Tensor, layers=None) -> Golden:
        """Golden run of a batch: clean logits, outcome columns and the values faulty runs
        reuse (for `layers`, default every injectable layer)."""
        images, labels = self.prepare(images, labels)
        if layers is None:
            layers = {n for p in ("output", "weight") for n in self._sites[p].candidates()}
        return self._ex.golden(images, labels, layers, GOLDEN_BATCH)

    def cache(self, golden: Golden, layers) -> None:
        """Make `golden` hold what faulty runs of `layers` read."""
        self._ex.cache(golden, layers, GOLDEN_BATCH)

    def _injector(self) -> Injector:
        return Injector(self._need(), self._ex, self.clamp, self.chunk, self.memory,
                        GOLDEN_BATCH)

    @emulate.exact
    def run(self, faults: FaultSet, images: torch.Tensor, labels: torch.Tensor,
            golden: Golden | None = None) -> Outcomes:
        """Outcomes of every fault in `faults`, in their order; each fault is injected alone
        into one run of its image (`faults.image` indexes `images`).

        Without `golden`, the images are taken in blocks (each image's golden run once), so
        the cached activations stay within the engine's `memory` budget."""
        images, labels = self.prepare(images, labels)
        return self._injector().run(faults, images, labels, golden)

    def _image_block(self, faults: FaultSet) -> int:
        return self._injector().image_block(faults)

    def site_values(self, faults: FaultSet, golden: Golden, chunk: int = 256):
        """SiteValues of groups of at most `chunk` faults (see Injector.site_values)."""
        with emulate.full_precision():
            yield from self._injector().site_values(faults, golden, chunk)

    # -- sampling -------------------------------------------------------------------------

    def sample(self, n: int, site: str = "activations", select: str = "all",
               fault_model: str = "bitflip", images: int | torch.Tensor = 1, field=None,
               generator: torch.Generator | None = None, by: str = "layer") -> FaultSet:
        """n random faults in the layers(site, select): see faults.Sampler.uniform."""
        sampler = Sampler(self.layers(site, select), fault_model, self.codes(site),
                          self._site(site))
        return sampler.uniform(n, images, field, generator, by)

    # -- exhaustive classifier faults -----------------------------------------------------

    @emulate.exact
    def exhaustive_last_layer(self, images, labels, fault_model: str = "bitflip", bits=None,
                              golden: Golden | None = None) -> Exhaustive:
        """Outcomes of every (weight, bit) fault of the classifier Linear on every image,
        computed analytically from the cached features."""
        images, labels = self.prepare(images, labels)
        return ExhaustiveLastLayer(self._em, self._ex, self.clamp, GOLDEN_BATCH).run(
            images, labels, fault_model, bits, golden)
