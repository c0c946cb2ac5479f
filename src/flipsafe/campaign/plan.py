"""Campaign plans (what to inject, how many, how to split) and their stable fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flipsafe.errors import CampaignError, ConfigError
from flipsafe.faults import check_campaign_site, site_spec
from flipsafe.faults import parse as parse_fault
from flipsafe.formats import canonical as canonical_format
from flipsafe.inject.emulate import check_clamp
from flipsafe.metrics.stats import sample_size, z_value
from flipsafe.protect import check_protection
from flipsafe.seeds import check_seed

PLAN_VERSION = 1

IMAGES = ("correct", "all")
# Sites, fault models and clamp modes are owned (and checked) by flipsafe.faults
# (CAMPAIGN_SITES, parse) and flipsafe.inject.emulate (CLAMPS).
ALLOCATIONS = ("proportional", "equal")

# The checkpoint folder may be moved between runs; model_sha identifies the model instead.
# `inputs` records how the pixels were prepared (mean, std, size and where each came from);
# their effect is in data_sha (the images as the model takes them), which is fingerprinted.
NOT_FINGERPRINTED = ("model", "inputs")
# Fields added after plans were first written: left out of the fingerprint while None, so
# the fingerprints of folders written before them stay valid.
OPTIONAL_FINGERPRINTED = ("data_sha", "preprocess", "protocol", "protect", "budget",
                          "accelerator", "word_bits")
# Likewise left out while they hold the value every plan had before they existed.
DEFAULT_FINGERPRINTED = {"sampling": "fixed"}
# How n is reached when the margin decides it: "fixed", Leveugle's worst-case size for every
# layer; "adaptive", a pilot that only allocates and a second stage sized to the margin
# from it (flipsafe.campaign.adaptive).
SAMPLINGS = ("fixed", "adaptive")
# The fields of a FaultPlan: what defines the faults, whatever the model.
FAULT_FIELDS = ("format", "images", "site", "fault", "layers", "n", "confidence", "margin",
                "clamp", "seed", "allocation", "part_size", "protocol", "sampling", "budget",
                "accelerator", "word_bits")

# The fields a protocol may set, with the value each takes when neither the caller nor a
# protocol gives one (the one place these defaults live).
CONVENTION_DEFAULTS = {"site": "activations", "layers": "all", "images": "correct",
                       "clamp": "none", "fault": "bitflip"}
# Named evaluation protocols: the plan fields each one fixes. GoldenEye (Mahmoud et al.,
# DSN-W 2022): faults in the outputs of layers, each fault on one image (every fault here is
# a (fault, element, image) triple), correctly classified images with a positive top-1
# margin ("correct"), NaN clamped to +max ("goldeneye"), single-bit flips. It fixes no layer
# choice: GoldenEye injects every Conv/Linear layer in turn, and the text-guided paper's
# headline is its last layer, so --layers stays free (default "all"). Its non-finite
# outcomes are dropped from mismatch and mean delta-loss, which the improvement-factor table
# reports beside flipsafe's own definitions.
PROTOCOLS = {
    "goldeneye": {"site": "activations", "images": "correct", "clamp": "goldeneye",
                  "fault": "bitflip"},
}
PREPROCESS_KEYS = ("image_size", "mean", "std")
# Prefixes of a plan's `model` that name models flipsafe did not train (the kinds of
# flipsafe.campaign.targets): those a user writes, and "module:" for an nn.Module given
# in Python.
SPEC_PREFIXES = ("hf", "torchscript", "export", "onnx", "python")
TARGET_PREFIXES = (*SPEC_PREFIXES, "module")


def is_flipsafe_spec(spec: str) -> bool:
    """True when a plan's `model` names a `flipsafe train` folder (no target prefix)."""
    prefix, sep, _ = str(spec).partition(":")
    return not (sep and prefix in TARGET_PREFIXES)


def _choice(name: str, value, choices) -> str:
    """`value` in its one spelling (choices are lower-case; any case is accepted)."""
    value = value.lower() if isinstance(value, str) else value
    if value not in choices:
        raise ConfigError(f"{name} must be one of: {', '.join(choices)}; got {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _apply_protocol(plan) -> None:
    """Fill the conventions left None from the plan's protocol (else CONVENTION_DEFAULTS) and
    refuse one given against the protocol."""
    if plan.protocol is not None:
        object.__setattr__(plan, "protocol", _choice("protocol", plan.protocol, tuple(PROTOCOLS)))
    for name in ("site", "images", "clamp"):  # one spelling, so the protocol's compare equal
        value = getattr(plan, name)
        if isinstance(value, str):
            object.__setattr__(plan, name, value.lower())
    conventions = PROTOCOLS.get(plan.protocol, {})
    for name, usual in CONVENTION_DEFAULTS.items():
        if getattr(plan, name) is None:
            object.__setattr__(plan, name, conventions.get(name, usual))
    object.__setattr__(plan, "fault", parse_fault(plan.fault).name)
    for name, wanted in conventions.items():
        if getattr(plan, name) != wanted:
            raise ConfigError(
                f"protocol {plan.protocol} sets {name} {wanted}, but {name} "
                f"{getattr(plan, name)} was given; leave {name} out or drop the protocol"
            )


def _check_words(plan) -> None:
    """Site weight_words packs codes into words of word_bits (default 32); other sites
    take no word."""
    from flipsafe.formats.words import WORD_BITS

    if not site_spec(plan.site).words:
        if plan.word_bits is not None:
            raise ConfigError(f"--word-bits packs the weights of --site weight_words; this "
                              f"plan's site is {plan.site}")
        return
    bits = 32 if plan.word_bits is None else plan.word_bits
    if not (_is_int(bits) and bits in WORD_BITS):
        raise ConfigError(f"--word-bits must be one of {', '.join(map(str, WORD_BITS))}, "
                          f"got {plan.word_bits!r}")
    object.__setattr__(plan, "word_bits", int(bits))


def _check_accelerator(plan) -> None:
    """Site pe runs on an array (default ws:16x16:product), its faults permanent (stuck-at)
    or transient (bit flips) by the fault model; other sites take no array."""
    from flipsafe import accel

    if not site_spec(plan.site).array:
        if plan.accelerator is not None:
            raise ConfigError(f"--array/--dataflow/--pe-unit describe the PE faults of --site "
                              f"pe; this plan's site is {plan.site}")
        return
    # stuck-at faults hold a unit for the whole layer; bit flips are one event in time
    acc = dataclasses.replace(accel.parse(plan.accelerator),
                              transient=plan.fault not in accel.PERMANENT)
    object.__setattr__(plan, "accelerator", acc.spec)


def _check_faults(plan) -> None:
    """Check (and canonicalise) the fault fields of a FaultPlan or CampaignPlan; a protocol
    (PROTOCOLS) fills or fixes site, layers, images, clamp and fault first."""
    _apply_protocol(plan)
    if not isinstance(plan.format, str) or not plan.format:
        raise ConfigError(f"format must be a non-empty string, got {plan.format!r}")
    if not isinstance(plan.layers, str) or not plan.layers:
        raise ConfigError(f"layers must be a non-empty string, got {plan.layers!r}")
    # One spelling per name, so plans, fingerprints and range caches agree.
    object.__setattr__(plan, "format", canonical_format(plan.format))
    object.__setattr__(plan, "fault", parse_fault(plan.fault).name)
    object.__setattr__(plan, "images", _choice("images", plan.images, IMAGES))
    object.__setattr__(plan, "site", check_campaign_site(plan.site))
    object.__setattr__(plan, "clamp", check_clamp(plan.clamp))
    object.__setattr__(plan, "allocation", _choice("allocation", plan.allocation, ALLOCATIONS))
    if plan.layers not in ("all", "last"):
        try:
            re.compile(plan.layers)
        except re.error as exc:
            raise ConfigError(
                f"layers must be 'all', 'last' or a regular expression over layer names; "
                f"{plan.layers!r} does not compile: {exc}"
            ) from None
    if not (plan.n is None or plan.n == "all" or (_is_int(plan.n) and plan.n >= 1)):
        raise ConfigError(
            f"n must be a positive integer, 'all', or None (sized from confidence and "
            f"margin), got {plan.n!r}"
        )
    if not (_is_number(plan.confidence) and 0.0 < plan.confidence < 1.0):
        raise ConfigError(
            f"confidence must be strictly between 0 and 1 (e.g. 0.99), got {plan.confidence!r}"
        )
    if plan.margin is not None and not (_is_number(plan.margin) and 0.0 < plan.margin < 1.0):
        raise ConfigError(
            f"margin must be strictly between 0 and 1 (e.g. 0.01) or None, got {plan.margin!r}"
        )
    if plan.n is None and plan.margin is None:
        raise ConfigError("give n (faults per layer) or a margin to size n from; both are None")
    object.__setattr__(plan, "sampling", _choice("sampling", plan.sampling, SAMPLINGS))
    if plan.adaptive and plan.n is not None:
        raise ConfigError(f"adaptive sampling sizes each layer from --margin; it cannot take "
                          f"--n {plan.n} (leave --n out, or use --sampling fixed)")
    if plan.adaptive and plan.allocation != "proportional":
        raise ConfigError("adaptive sampling allocates by itself (Neyman); leave --allocation out")
    if plan.budget is not None:
        if not (_is_int(plan.budget) and plan.budget >= 1):
            raise ConfigError(f"--budget must be a whole number of injections of at least 1, "
                              f"got {plan.budget!r}")
        if not plan.adaptive:
            raise ConfigError("--budget caps an adaptive campaign; add --sampling adaptive "
                              "(and leave --n out)")
    _check_accelerator(plan)
    _check_words(plan)
    check_seed(plan.seed)
    if not _is_int(plan.part_size):
        raise ConfigError(f"part_size must be an integer, got {plan.part_size!r}")
    if plan.part_size < 1:
        raise ConfigError(f"part_size must be at least 1, got {plan.part_size}")


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """What defines the faults of a campaign, whatever the model: the same FaultPlan run on
    two models gives two campaigns that can be compared.

    n is the number of faults per layer: an int, "all" (the whole fault space), or None
    to size it per layer with sample_size(confidence, margin, layer size). When n is
    given, margin is not used (set it to None).
    """

    format: str = "fp32"
    images: str | None = None
    site: str | None = None
    fault: str | None = None
    layers: str | None = None
    n: int | str | None = None
    confidence: float = 0.99
    margin: float | None = 0.01
    clamp: str | None = None
    seed: int = 0
    allocation: str = "proportional"
    part_size: int = 4096
    protocol: str | None = None
    sampling: str = "fixed"
    budget: int | None = None
    accelerator: str | None = None  # site pe: 'dataflow:RxC:unit' (flipsafe.accel)
    word_bits: int | None = None  # site weight_words: bits of one memory word (default 32)

    def __post_init__(self):
        _check_faults(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def fault_plan(self) -> FaultPlan:
        """The fault-defining fields of this plan (of a CampaignPlan too), as a FaultPlan."""
        return FaultPlan(**{name: getattr(self, name) for name in FAULT_FIELDS})

    @property
    def adaptive(self) -> bool:
        """Whether the plan's size comes from the adaptive design (campaign.adaptive)."""
        return self.sampling == "adaptive"

    @property
    def progress_label(self) -> str:
        """How a campaign's progress bar names its faults: site, format and fault."""
        return f"{self.site} {self.format} {self.fault}"


def check_preprocess(preprocess) -> None:
    """Raise ConfigError unless `preprocess` is None or a dict of image_size (int >= 1) and
    mean/std (lists of numbers, std > 0)."""
    if preprocess is None:
        return
    if not isinstance(preprocess, Mapping) or set(preprocess) - set(PREPROCESS_KEYS):
        raise ConfigError(f"preprocess must be a dict with keys among {PREPROCESS_KEYS}, "
                          f"got {preprocess!r}")
    size = preprocess.get("image_size")
    if size is not None and not (_is_int(size) and size >= 1):
        raise ConfigError(f"image size must be a positive whole number, got {size!r}")
    for key in ("mean", "std"):
        value = preprocess.get(key)
        if value is None:
            continue
        if not (isinstance(value, (list, tuple)) and value
                and all(_is_number(v) and math.isfinite(v) for v in value)):
            raise ConfigError(f"{key} must be a list of numbers, one per channel, got {value!r}")
        if key == "std" and any(v <= 0 for v in value):
            raise ConfigError(f"std values must be positive, got {list(value)}")
    if (preprocess.get("mean") is None) != (preprocess.get("std") is None):
        given, missing = ("mean", "std") if preprocess.get("mean") is not None else ("std", "mean")
        raise ConfigError(f"--{given} was given without --{missing}: give both (one value per "
                          "channel, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225), or "
                          "neither to use the model's or the dataset's")


@dataclass(frozen=True, kw_only=True)
class CampaignPlan(FaultPlan):
    """Everything that defines a campaign's results, checked on construction: the target
    (model, model_sha), the data (dataset, data_sha, preprocess) and the fault plan
    (the FAULT_FIELDS, see FaultPlan; `fault_plan` gives them back as one).

    model names the target: a `flipsafe train` folder, or a spec such as `hf:<folder>`,
    `torchscript:<file>`, `export:<file>`, `onnx:<file>`, `python:<module>:<callable>` (see
    flipsafe.campaign.targets); model_sha is the sha256 of its weights or file. model is
    not fingerprinted (a folder may move), model_sha is, so a results folder refuses
    another model. format and fault are stored in their one spelling ("FP16" becomes
    "fp16"). data_sha is the sha256 of the evaluation images and labels (runner.prepare
    fills it in); None only in plans written before it was recorded, or not yet
    prepared. preprocess holds the --image-size/--mean/--std given for a model flipsafe
    did not train (None: none given). protocol names a set of conventions (PROTOCOLS, e.g.
    "goldeneye"): site, layers, images, clamp and fault left as None take the protocol's
    values (without a protocol, CONVENTION_DEFAULTS), and a value given that differs from the
    protocol's is refused. protect is a protection specification (flipsafe.protect.spec, e.g.
    "ranger,abft:layers=last,dup" or "ecc" on a weights campaign; stored in its canonical
    spelling) replayed on the very faults of the unprotected plan: it is no
    fault field, so the fault list of a protected plan is the unprotected one's.
    """

    model: str
    model_sha: str
    dataset: str
    data_sha: str | None = None
    preprocess: dict | None = None
    protect: str | None = None
    inputs: dict | None = None
    version: int = PLAN_VERSION

    def __post_init__(self):
        for name in ("model", "model_sha", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        _check_faults(self)
        if self.data_sha is not None and not (
            isinstance(self.data_sha, str) and re.fullmatch(r"[0-9a-f]{64}", self.data_sha)
        ):
            raise ConfigError(f"data_sha must be a sha256 hex digest or None, got {self.data_sha!r}")
        check_preprocess(self.preprocess)
        if self.inputs is not None and not isinstance(self.inputs, Mapping):
            raise ConfigError(f"inputs must be a dict or None, got {self.inputs!r}")
        # One spelling per specification ('ecc' stays 'ecc'), so fingerprints agree.
        object.__setattr__(self, "protect", check_protection(self.protect, self.site))
        if self.protect is not None and self.adaptive:
            raise ConfigError(
                "--protect replays the faults of the unprotected campaign, but an adaptive "
                "campaign draws its second stage from what its own pilot saw, so the two would "
                "inject other faults and lose their pairing; use --sampling fixed (the default "
                "with --protect) or --n")
        if self.preprocess is not None:
            clean = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                     for k, v in self.preprocess.items() if v is not None}
            object.__setattr__(self, "preprocess", clean or None)
        if not _is_int(self.version):
            raise ConfigError(f"version must be an integer, got {self.version!r}")
        if self.version != PLAN_VERSION:
            raise CampaignError(
                f"plan version {self.version} is not supported (this flipsafe reads version "
                f"{PLAN_VERSION}); use a matching flipsafe or start a new campaign"
            )

    @classmethod
    def of(cls, model: str, model_sha: str, dataset: str, faults: FaultPlan | None = None,
           **fields) -> CampaignPlan:
        """The plan of running fault plan `faults` (default FaultPlan()) on one model."""
        return cls(model=model, model_sha=model_sha, dataset=dataset,
                   **(faults or FaultPlan()).to_dict(), **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping) -> CampaignPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CampaignError(
                f"campaign plan has unknown field(s) {', '.join(unknown)}; it may come from a "
                f"newer flipsafe (known fields: {', '.join(sorted(known))})"
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise CampaignError(f"campaign plan is incomplete: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> CampaignPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CampaignError(f"campaign plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CampaignError("campaign plan must be a JSON object of fields")
        return cls.from_dict(data)

    @property
    def protections(self) -> tuple:
        """The plan's protections as typed items (protect.spec.Protection; () for none):
        what code reads; the string `protect` is what plan.json stores."""
        from flipsafe.protect.spec import parse

        return parse(self.protect, self.site)

    def fingerprinted(self) -> dict:
        """The fields that define results (all but the checkpoint path, and the optional
        fields that are None)."""
        data = self.to_dict()
        for name in NOT_FINGERPRINTED:
            del data[name]
        for name in OPTIONAL_FINGERPRINTED:
            if data[name] is None:
                del data[name]
        for name, usual in DEFAULT_FINGERPRINTED.items():
            if data[name] == usual:
                del data[name]
        return data

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of fingerprinted(); stable across runs and machines."""
        canonical = json.dumps(self.fingerprinted(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def differing_fields(self, other: CampaignPlan) -> list[str]:
        """Names of the fingerprinted fields whose values differ between two plans."""
        mine, theirs = self.fingerprinted(), other.fingerprinted()
        return [name for name in {**mine, **theirs} if mine.get(name) != theirs.get(name)]


@dataclass(frozen=True)
class Stratum:
    """One (layer, field) cell of the fault space: size faults in it, n faults allocated.

    size counts (element, bit, image) triples for sampled plans and (element, bit) pairs for
    exhaustive ones (`n="all"`). elements and width, when known, say what is at risk in the
    hardware: `elements` codes of `width` bits each in this field (images not counted).
    """

    layer: str
    field: str
    size: int
    n: int
    elements: int | None = None
    width: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data) -> Stratum:
        """A Stratum from a results manifest entry; CampaignError if it is malformed."""
        try:
            s = cls(**data)
        except TypeError as exc:
            raise CampaignError(f"a stratum record is malformed ({exc})") from None
        ints = (s.size, s.n) + tuple(v for v in (s.elements, s.width) if v is not None)
        if not (isinstance(s.layer, str) and isinstance(s.field, str)
                and all(_is_int(v) and v >= 0 for v in ints)):
            raise CampaignError(f"a stratum record is malformed: {data!r}")
        return s


def _largest_remainder(n: int, sizes: list[int]) -> list[int]:
    total = sum(sizes)
    quotas = [n * s / total for s in sizes]
    counts = [int(q) for q in quotas]
    # Ties go to the earlier field so the split is deterministic.
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _proportional(n: int, sizes: list[int]) -> list[int]:
    counts = _largest_remainder(n, sizes)
    nonempty = [i for i, s in enumerate(sizes) if s > 0]
    if n >= len(nonempty):
        # A tiny field (e.g. the sign bit) still gets one fault, taken from the largest share.
        for i in nonempty:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] = 1
    return counts


def _equal(n: int, sizes: list[int]) -> list[int]:
    counts = [0] * len(sizes)
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    left = n
    # Water-filling: fields smaller than their equal share are taken whole and the
    # rest is shared again among the others.
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        full = [i for i in open_ if sizes[i] - counts[i] <= share]
        if not full:
            for rank, i in enumerate(open_):
                counts[i] += share + (1 if rank < extra else 0)
            break
        for i in full:
            left -= sizes[i] - counts[i]
            counts[i] = sizes[i]
        open_ = [i for i in open_ if i not in full]
    return counts


def allocate(
    strata_sizes: Mapping[tuple[str, str], int],
    n_per_layer: int | str | Mapping[str, int],
    allocation: str = "proportional",
) -> list[Stratum]:
    """Split each layer's fault budget across its fields; strata come back in input order.

    n_per_layer is one int for every layer, a dict layer -> int, or "all" (every stratum
    exhaustively). "proportional" gives each field its share of the layer's fault space,
    rounded by largest remainder so the counts add up to n exactly; when n is at least
    the number of non-empty fields every non-empty field gets at least 1. "equal" gives
    each non-empty field the same count (earlier fields take the remainder), capped at
    the field's size with the excess shared by the others. A layer whose n reaches its
    fault-space size is injected exhaustively.
    """
    allocation = _choice("allocation", allocation, ALLOCATIONS)
    layers: dict[str, list[tuple[str, int]]] = {}
    for (layer, field_name), size in strata_sizes.items():
        if not _is_int(size) or size < 0:
            raise ConfigError(f"stratum ({layer}, {field_name}) size must be an integer >= 0, "
                              f"got {size!r}")
        layers.setdefault(layer, []).append((field_name, size))
    counts: dict[tuple[str, str], int] = {}
    for layer, fields in layers.items():
        sizes = [size for _, size in fields]
        if n_per_layer == "all":
            n = sum(sizes)
        elif isinstance(n_per_layer, Mapping):
            if layer not in n_per_layer:
                raise ConfigError(f"n_per_layer has no entry for layer {layer!r}")
            n = n_per_layer[layer]
        else:
            n = n_per_layer
        if not _is_int(n) or n < 0:
            raise ConfigError(f"faults per layer must be an integer >= 0 or 'all', got {n!r}")
        if n >= sum(sizes):
            split = sizes
        elif allocation == "proportional":
            split = _proportional(n, sizes)
        else:
            split = _equal(n, sizes)
        for (field_name, _), k in zip(fields, split):
            counts[(layer, field_name)] = k
    return [Stratum(layer, f, size, counts[(layer, f)]) for (layer, f), size in strata_sizes.items()]


def n_from_plan(plan: CampaignPlan, layer_population: int) -> int:
    """Faults for one layer whose fault space has layer_population (element, bit) pairs.

    An int n is capped at the population, "all" is the population, and None uses
    sample_size(confidence, margin, population) with t rounded up to three
    decimals (2.576 for 99 %), the convention of Leveugle's published tables; it
    errs on the side of a few more injections (16,590 rather than 16,588).
    """
    if not _is_int(layer_population) or layer_population < 0:
        raise ConfigError(f"layer_population must be an integer >= 0, got {layer_population!r}")
    if plan.n == "all":
        return layer_population
    if plan.n is None:
        t = math.ceil(z_value(plan.confidence) * 1000) / 1000
        return sample_size(plan.confidence, plan.margin, population=layer_population, t=t)
    return min(plan.n, layer_population)


def plan_strata(plan: CampaignPlan, strata_sizes: Mapping[tuple[str, str], int]) -> list[Stratum]:
    """allocate() with each layer's n taken from the plan and its fault-space size."""
    population: dict[str, int] = {}
    for (layer, _), size in strata_sizes.items():
        population[layer] = population.get(layer, 0) + size
    n_per_layer = {layer: n_from_plan(plan, size) for layer, size in population.items()}
    return allocate(strata_sizes, n_per_layer, plan.allocation)
