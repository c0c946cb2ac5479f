"""The models a campaign can run on ("targets"), each named by a spec string.

  - ``<folder>``: a checkpoint made by `flipsafe train` (no prefix);
  - ``hf:<folder>``: a Hugging Face `transformers` image classifier (config.json and
    weights), loaded with local_files_only=True; logits are the output's `.logits`, class
    names come from `id2label`, image size and normalisation from preprocessor_config.json;
  - ``torchscript:<file.pt>``: a `torch.jit.save`d module;
  - ``export:<file.pt2>``: a `torch.export.save`d ExportedProgram (a PT2E-quantized one
    included: deployed.pt2e);
  - ``onnx:<file.onnx>``: an ONNX file, float or QDQ-quantized (deployed.onnx_model);
  - ``python:<module>:<callable>``: a function (imported from `module`, which must be on
    sys.path) that returns an nn.Module;
  - in Python, an nn.Module itself (`ModuleTarget`).

Every target gives the same things (the `Target` protocol): `load(sample)` the model in
eval mode, its content hash `sha`, class names (or None), `preprocess` (image size and
normalisation the model asks for, when it says), and a `description` for reports. The
kind is chosen once, from the spec's prefix (`resolve`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from flipsafe.campaign.plan import SPEC_PREFIXES
from flipsafe.compat import ConvNd, quiet_imports
from flipsafe.deployed import onnx_model, pt2e
from flipsafe.errors import CampaignError, ModelError

# The spec prefixes a user may write ("module:" names an nn.Module given in Python).
PREFIXES = SPEC_PREFIXES
KINDS = ("<flipsafe checkpoint folder>", "hf:<folder>", "torchscript:<file.pt>",
         "export:<file.pt2>", "onnx:<file.onnx>", "python:<module>:<callable>")


@dataclass(frozen=True)
class Preprocess:
    """What a model says about its input: image size, channels and normalisation
    (each None when the model does not say)."""

    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass
class Evaluation:
    """What a campaign evaluates on: images and labels as the model takes them, train()
    giving training images likewise (to profile ranges and bounds on), the class names
    when the data knows them, the inputs pipeline used (None: images given as they are),
    and the model when reading the data loaded it already (a flipsafe checkpoint)."""

    images: torch.Tensor
    labels: torch.Tensor
    train: Callable[[], torch.Tensor]
    classes: list[str] | None = None
    inputs: Inputs | None = None
    model: nn.Module | None = None

    @classmethod
    def given(cls, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
        """Images a Python caller hands over as the model takes them (they also stand in
        for training images)."""
        return cls(images, labels, lambda: images)


class FromDataset:
    """A target whose campaign data is a dataset spec, fitted to the model's inputs."""

    def evaluation(self, plan) -> Evaluation:
        """The test split of plan.dataset through the inputs pipeline (plan.preprocess)."""
        from flipsafe.data import load

        bundle = load(plan.dataset)
        inputs = resolve_inputs(self, bundle, plan.preprocess)
        return Evaluation(apply_inputs(inputs, bundle.test), bundle.test.labels,
                          lambda: apply_inputs(inputs, bundle.train),
                          bundle.classes if bundle.classes_known else None, inputs)


class Target(Protocol):
    spec: str  # what the plan records as `model`
    kind: str
    sha: str  # sha256 hex of the weights / file
    classes: list[str] | None
    preprocess: Preprocess
    description: str
    flipsafe: bool  # a checkpoint made by `flipsafe train` (its dataset is known)
    portable: bool  # rebuilt from `spec` alone (on a Ray worker, say)
    # quantized: bool, where a kind can be: the model stores its own codes (format native)

    def load(self, sample: torch.Tensor | None = None) -> nn.Module:
        """The model in eval mode; `sample` (a batch of images) is needed by kinds that
        must be traced."""

    def evaluation(self, plan) -> Evaluation:
        """The campaign data of `plan` (its dataset and preprocessing) for this model."""


def sha256_file(path: Path) -> str:
    from flipsafe.checkpoint import sha256_file as sha

    return sha(path)


def state_sha(module: nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\x00{array.dtype}\x00{list(array.shape)}\x00".encode())
        # reshape: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes()
                      if array.numel() else b"")
    return digest.hexdigest()


def _file(spec: str, path: str, what: str) -> Path:
    p = Path(path)
    if not path:
        raise ModelError(f"{spec!r} names no file; use {what}")
    if not p.is_file():
        raise ModelError(f"model file {path!r} not found ({spec})")
    return p


class Logits(nn.Module):
    """A model whose output carries its class scores in `.logits` (Hugging Face style),
    seen as one returning the logits tensor."""

    def __init__(self, model: nn.Module, keyword: str | None = None):
        super().__init__()
        self.model = model
        self.keyword = keyword

    def forward(self, x):
        out = self.model(**{self.keyword: x}) if self.keyword else self.model(x)
        return out.logits


@dataclass
class CheckpointTarget:
    """A folder made by `flipsafe train`."""

    spec: str
    kind: str = "flipsafe"
    flipsafe: bool = True
    portable: bool = True
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        from flipsafe.checkpoint import read_config

        self.config = read_config(self.spec)

    @property
    def sha(self) -> str:
        from flipsafe.checkpoint import WEIGHTS

        return self.config["files"][WEIGHTS]

    @property
    def classes(self):
        return self.config.get("classes")

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.config["image_size"], self.config["in_channels"])

    @property
    def description(self) -> str:
        return f"flipsafe checkpoint {self.spec} ({self.config['arch']})"

    def load(self, sample=None) -> nn.Module:
        from flipsafe.checkpoint import load_checkpoint

        return load_checkpoint(self.spec).model

    def evaluation(self, plan) -> Evaluation:
        """The test split of the checkpoint's dataset as it was trained on, and the model
        (loaded once, checked against the plan's weights hash)."""
        from flipsafe.checkpoint import WEIGHTS, check_dataset, load_checkpoint
        from flipsafe.data import load

        ckpt = load_checkpoint(self.spec)
        if ckpt.config["files"][WEIGHTS] != plan.model_sha:
            raise CampaignError(
                f"the checkpoint at {self.spec} is not the model this plan was made for "
                "(its weights hash differs); use a new --out folder for a new model")
        bundle = load(plan.dataset)
        check_dataset(ckpt.config, bundle)
        inputs = resolve_inputs(self, bundle, None)
        images, labels = bundle.test.tensors()
        return Evaluation(images, labels, lambda: bundle.train.tensors()[0], None, inputs,
                          ckpt.model)


@dataclass
class HFTarget(FromDataset):
    """A `transformers` AutoModelForImageClassification folder."""

    spec: str
    path: Path
    kind: str = "hf"
    flipsafe: bool = False
    portable: bool = True

    def __post_init__(self):
        if not self.path.is_dir():
            raise ModelError(f"Hugging Face model folder {str(self.path)!r} not found ({self.spec})")
        try:
            self.config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.path} has no readable config.json, so it is not a Hugging "
                             f"Face model folder ({exc.__class__.__name__})") from None
        self.weights = sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not self.weights:
            raise ModelError(f"{self.path} has no weights (*.safetensors or *.bin); save the "
                             "model with save_pretrained")

    @cached_property
    def sha(self) -> str:
        digest = hashlib.sha256()
        for p in [self.path / "config.json", *self.weights]:
            digest.update(f"{p.name}\x00{sha256_file(p)}\x00".encode())
        return digest.hexdigest()

    @property
    def classes(self):
        labels = self.config.get("id2label")
        if not isinstance(labels, dict) or not labels:
            return None
        try:
            return [str(labels[k]) for k in sorted(labels, key=int)]
        except ValueError:
            return None

    @property
    def preprocess(self) -> Preprocess:
        size = self.config.get("image_size")
        size = size if isinstance(size, int) else None
        channels = self.config.get("num_channels")
        mean = std = None
        path = self.path / "preprocessor_config.json"
        if path.is_file():
            try:
                pre = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise ModelError(f"{path} is not valid JSON") from None
            size = _hf_size(pre.get("size"), pre.get("crop_size")) or size
            if pre.get("do_normalize", True) and pre.get("image_mean") and pre.get("image_std"):
                mean = tuple(float(v) for v in pre["image_mean"])
                std = tuple(float(v) for v in pre["image_std"])
        return Preprocess(size, channels if isinstance(channels, int) else None, mean, std)

    @property
    def description(self) -> str:
        arch = ", ".join(self.config.get("architectures") or [self.config.get("model_type", "?")])
        return f"Hugging Face {arch} from {self.path}"

    def load(self, sample=None) -> nn.Module:
        """The classifier as a graph of its layers (torch.export, lifted) when it exports
        with the same logits on `sample`, so the engine can run only the layers after a
        fault; else the model as transformers builds it (same results, slower)."""
        model = self.eager()
        if sample is None:
            return model
        from flipsafe.campaign.lift import export_and_lift

        with _quiet_torch():
            return export_and_lift(model, sample) or model

    def eager(self) -> nn.Module:
        """The model as transformers builds it, returning the logits tensor."""
        try:
            with quiet_imports():
                from transformers import AutoModelForImageClassification
        except ImportError:
            raise ModelError("hf: models need the transformers package; install it "
                             "(pip install transformers)") from None
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForImageClassification.from_pretrained(  # user-machine: local only
                str(self.path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ModelError(f"cannot load {self.path} as a Hugging Face image classifier: "
                             f"{_first_line(exc)}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        return Logits(model, keyword="pixel_values").eval()


def _hf_size(size, crop) -> int | None:
    for value in (crop, size):
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            if value.get("height") and value.get("height") == value.get("width"):
                return int(value["height"])
            if value.get("shortest_edge") and value is crop:
                return int(value["shortest_edge"])
    if isinstance(size, dict) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    return None


@dataclass
class FileTarget(FromDataset):
    """A model saved in one file: TorchScriptTarget or ExportTarget."""

    spec: str
    path: Path
    flipsafe: bool = False
    portable: bool = True
    classes: list[str] | None = None
    kind = ""  # the spec prefix
    what = ""  # what the file holds, in words

    @cached_property
    def sha(self) -> str:
        return sha256_file(self.path)

    @property
    def input_shape(self) -> tuple | None:
        """The input shape the file says, one entry per dimension (an int where static,
        None where dynamic); None when it does not say."""
        return None

    @property
    def preprocess(self) -> Preprocess:
        shape = self.input_shape
        if shape is None or len(shape) != 4:
            return Preprocess()
        _, channels, h, w = shape
        return Preprocess(h if h is not None and h == w else None, channels)

    def shape_text(self) -> str | None:
        """The input shape as text, e.g. "[batch, 1, 8, 8]" (None if unknown)."""
        shape = self.input_shape
        if shape is None:
            return None
        dims = ["batch" if i == 0 and d is None else "any" if d is None else str(d)
                for i, d in enumerate(shape)]
        return f"[{', '.join(dims)}]"

    @property
    def description(self) -> str:
        return f"{self.what} {self.path}"

    def load(self, sample=None) -> nn.Module:
        with _quiet_torch():
            return self._load(sample)

    def _load(self, sample) -> nn.Module:
        raise NotImplementedError


@dataclass
class ExportTarget(FileTarget):
    """A saved torch.export program: it says the input shape it was exported with
    (`input_shape`), so its image size and channels are the model's."""

    kind = "export"
    what = "torch.export program"

    @cached_property
    def program(self):
        """The saved torch.export program (a PT2E-quantized one once torchao has
        registered its quantize/dequantize ops)."""
        if pt2e.mentions_ops(self.path):
            pt2e.register_ops()
        with _quiet_torch():
            try:
                return torch.export.load(str(self.path))
            except Exception as exc:  # noqa: BLE001 - a file that is not an export archive
                raise ModelError(f"{self.path} is not a saved torch.export program "
                                 f"({type(exc).__name__}); save one with torch.export.save"
                                 ) from None

    @cached_property
    def input_shape(self) -> tuple | None:
        program = self.program
        names = program.graph_signature.user_inputs
        vals = [n.meta.get("val") for n in program.graph.nodes
                if n.op == "placeholder" and n.name in names]
        if len(vals) != 1 or not hasattr(vals[0], "shape"):
            return None
        return tuple(d if isinstance(d, int) else None for d in vals[0].shape)

    @property
    def quantized(self) -> bool:
        """Whether the program stores quantized codes (PT2E)."""
        return pt2e.is_quantized_graph(self.program.graph_module)

    def _load(self, sample) -> nn.Module:
        from flipsafe.campaign.lift import lift_layers

        gm = self.program.module()
        return lift_layers(gm, pt2e.patterns(gm)).eval()


@dataclass
class OnnxTarget(FileTarget):
    """An ONNX file, float or QDQ-quantized, read by deployed.onnx_model: its input shape
    is the file's; a quantized file runs in its own codes (format native)."""

    kind = "onnx"
    what = "ONNX model"

    @cached_property
    def proto(self):
        return onnx_model.load_proto(self.path)

    @cached_property
    def input_shape(self) -> tuple | None:
        return onnx_model.input_shape(self.proto)

    @property
    def quantized(self) -> bool:
        return onnx_model.is_quantized(self.proto)

    def _load(self, sample) -> nn.Module:
        from flipsafe.campaign.lift import lift_layers
        from flipsafe.deployed.patterns import find

        gm = onnx_model.to_graph(self.path)
        return lift_layers(gm, find(gm, onnx_model.ONNX)).eval()


@dataclass
class TorchScriptTarget(FileTarget):
    """A TorchScript file, converted to a torch.export program on a sample batch."""

    kind = "torchscript"
    what = "TorchScript module"

    def _load(self, sample) -> nn.Module:
        from flipsafe.campaign.lift import lift_layers

        try:
            scripted = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{self.path} is not a TorchScript file ({_first_line(exc)}); save "
                             "one with torch.jit.save(torch.jit.script(model), path)") from None
        if sample is None:
            raise ModelError("a TorchScript model is traced on a sample batch; none was given")
        from flipsafe.compat import torchscript_to_export

        try:
            program = torchscript_to_export(scripted.eval(), (sample[:2],))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot convert TorchScript {self.path} to a graph flipsafe can "
                             f"inject into: {_first_line(exc)}") from None
        return lift_layers(program.module()).eval()


@dataclass
class PythonTarget(FromDataset):
    """`python:<module>:<callable>`: a function returning an nn.Module."""

    spec: str
    module: str
    attr: str
    kind: str = "python"
    # Why its weights hash may change between calls, said when a plan's hash differs.
    sha_hint = " (a python: callable must build the same weights on every call: seed or load them)"
    flipsafe: bool = False
    portable: bool = True
    classes: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    _model: nn.Module | None = None

    def __post_init__(self):
        if not self.module or not self.attr:
            raise ModelError(f"{self.spec!r}: use python:<module>:<callable>, e.g. "
                             "python:mymodels:build")

    def _build(self) -> nn.Module:
        if self._model is None:
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")  # a module in the working folder, as `python -m` finds
            try:
                mod = importlib.import_module(self.module)
            except SystemExit as exc:
                raise ModelError(f"importing {self.module!r} ({self.spec}) called "
                                 f"sys.exit({exc.code!r})") from None
            except Exception as exc:  # noqa: BLE001 - any import failure is the user's
                raise ModelError(f"cannot import {self.module!r} ({self.spec}): "
                                 f"{_first_line(exc)}") from None
            fn = getattr(mod, self.attr, None)
            if not callable(fn):
                raise ModelError(f"{self.module} has no callable {self.attr!r} ({self.spec})")
            try:
                model = fn()
            except SystemExit as exc:  # user code must not end the campaign quietly
                raise ModelError(f"{self.module}.{self.attr}() ({self.spec}) called "
                                 f"sys.exit({exc.code!r}) instead of returning an nn.Module"
                                 ) from None
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"{self.module}.{self.attr}() failed: {_first_line(exc)}") from None
            if not isinstance(model, nn.Module):
                raise ModelError(f"{self.module}.{self.attr}() returned "
                                 f"{type(model).__name__}, not a torch nn.Module")
            self._model = model.eval()
        return self._model

    @cached_property
    def sha(self) -> str:
        return state_sha(self._build())

    @property
    def description(self) -> str:
        return f"{type(self._build()).__name__} from Python {self.module}.{self.attr}()"

    def load(self, sample=None) -> nn.Module:
        return self._build()


@dataclass
class ModuleTarget(FromDataset):
    """An nn.Module given in Python; `spec` is "module:<ClassName>" unless named."""

    model: nn.Module
    spec: str = ""
    kind: str = "module"
    flipsafe: bool = False
    portable: bool = False  # an object in this process: the plan cannot rebuild it
    classes: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)

    def __post_init__(self):
        if not isinstance(self.model, nn.Module):
            raise ModelError(f"the model must be a torch nn.Module, got {type(self.model).__name__}")
        self.spec = self.spec or f"module:{type(self.model).__name__}"
        self.model.eval()

    @property
    def sha(self) -> str:
        # Not cached: a module changed after its campaign was planned must be refused.
        return state_sha(self.model)

    @property
    def description(self) -> str:
        return f"{type(self.model).__name__} given in Python"

    def load(self, sample=None) -> nn.Module:
        return self.model


def _python_target(spec: str, rest: str) -> PythonTarget:
    module, _, attr = rest.rpartition(":")
    return PythonTarget(spec, module, attr)


# The targets a spec string names, by prefix: fn(spec, what follows the prefix) -> Target.
SPEC_TARGETS = {
    "hf": lambda spec, rest: HFTarget(spec, Path(rest)),
    "torchscript": lambda spec, rest: TorchScriptTarget(
        spec, _file(spec, rest, "torchscript:<file.pt>")),
    "export": lambda spec, rest: ExportTarget(spec, _file(spec, rest, "export:<file.pt2>")),
    "onnx": lambda spec, rest: OnnxTarget(spec, _file(spec, rest, "onnx:<file.onnx>")),
    "python": _python_target,
}
assert set(SPEC_TARGETS) == set(PREFIXES)


def resolve(model) -> Target:
    """The target for a spec string (see the module docstring), an nn.Module, or a target."""
    if isinstance(model, nn.Module):
        return ModuleTarget(model)
    if not isinstance(model, (str, Path)):
        if hasattr(model, "load") and hasattr(model, "sha"):
            return model
        raise ModelError(f"a model must be a spec string or an nn.Module, got {type(model).__name__}")
    spec = str(model)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in SPEC_TARGETS:
        return SPEC_TARGETS[prefix](spec, rest)
    if Path(spec).is_file():
        raise ModelError(f"{spec!r} is a file, not a checkpoint folder; say what it holds: "
                         f"torchscript:{spec} or export:{spec} (models: {', '.join(KINDS)})")
    return CheckpointTarget(spec)


@contextlib.contextmanager
def _quiet_torch():
    """Silence the warnings torch.export and its TorchScript converter log while loading."""
    from flipsafe.compat import TORCH_EXPORT_LOGGERS

    loggers = [logging.getLogger(name) for name in TORCH_EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _numbers(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


@dataclass(frozen=True)
class Inputs:
    """How a campaign turns a dataset's pixels into what the model takes, and where each
    setting came from; printed once when a campaign starts and recorded in plan.json.

    `size` is the data's own (H, W); `image_size` the size images are resized to (None:
    kept); `pixel_min`/`pixel_max` the raw pixels on the 0..1 scale (uint8 divided by 255).
    """

    dataset: str
    channels: int
    size: tuple[int, int]
    image_size: int | None
    size_source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    norm_source: str
    pixel_min: float
    pixel_max: float

    def to_dict(self) -> dict:
        return {"channels": self.channels, "data_size": list(self.size),
                "image_size": self.image_size, "size_source": self.size_source,
                "mean": list(self.mean), "std": list(self.std),
                "normalisation_source": self.norm_source,
                "pixel_range": [self.pixel_min, self.pixel_max]}

    def describe(self) -> str:
        h, w = self.size
        resize = (f"kept at {h}x{w}" if self.image_size is None
                  else f"resized to {self.image_size}x{self.image_size}")
        return (f"inputs: {self.channels}x{h}x{w} images of {self.dataset}, {resize} "
                f"({self.size_source}); mean {_numbers(self.mean)}, std {_numbers(self.std)} "
                f"({self.norm_source})")

    def warnings(self) -> list[str]:
        """What the user must hear about these inputs: pixels off the 0..1 scale that are
        normalised again."""
        low, high = self.pixel_min, self.pixel_max
        if self.norm_source == USER_NORMALISATION or (low >= -1e-6 and high <= 1 + 1e-6):
            return []
        seen = f"{self.dataset}'s pixels range from {low:.4g} to {high:.4g}, not 0..1"
        source = self.norm_source.split(";")[0]
        if low >= 0:
            return [(f"{seen} (0..255 as floats?), yet are taken as 0..1 pixels and "
                     f"normalised with {source} mean/std; store them as uint8 or divided by "
                     "255, or give --mean/--std in the data's own units")]
        return [(f"{seen} (already normalised?), yet are normalised again with {source} "
                 "mean/std; give --mean 0 --std 1 to take them as they are")]


USER_NORMALISATION = "--mean/--std"


def _pixel_range(bundle) -> tuple[float, float]:
    lows, highs = [], []
    for split in {id(bundle.test): bundle.test, id(bundle.train): bundle.train}.values():
        x = split.pixels
        if x.numel():
            scale = 255.0 if x.dtype == torch.uint8 else 1.0
            lows.append(float(x.min()) / scale)
            highs.append(float(x.max()) / scale)
    return (min(lows), max(highs)) if lows else (0.0, 1.0)


def resolve_inputs(target: Target, bundle, preprocess: dict | None) -> Inputs:
    """How `target` takes the images of `bundle`: image size and mean/std given by the user
    (`preprocess`: --image-size/--mean/--std) override the model's own (a Hugging Face
    preprocessor_config.json, an export program's input shape), which override the data's.
    A flipsafe checkpoint takes its images as it was trained: normalised with the dataset's
    statistics. ModelError when the channel counts disagree or a size cannot be taken."""
    pre, opts = target.preprocess, preprocess or {}
    pixels = bundle.test.pixels
    channels, size = int(pixels.shape[1]), tuple(int(d) for d in pixels.shape[-2:])
    low, high = _pixel_range(bundle)
    if target.flipsafe:
        return Inputs(bundle.spec, channels, size, None, "the data's size, as trained",
                      tuple(bundle.test.mean.reshape(-1).tolist()),
                      tuple(bundle.test.std.reshape(-1).tolist()),
                      "the dataset's, as in training", low, high)
    exported = getattr(target, "shape_text", lambda: None)()
    if pre.channels is not None and channels != pre.channels:
        held = f"{channels}x{size[0]}x{size[1]}"
        raise ModelError(
            f"{bundle.spec} has {held} images ({channels} channels) but the model takes "
            f"{pre.channels} channels"
            + (f" (it was exported for inputs of shape {exported})" if exported else "")
            + f"; use a dataset of {pre.channels}-channel images stored channels first "
            "([N, C, H, W])"
            + (" (imagefolder:<dir>?channels=3)" if pre.channels == 3 else ""))
    if opts.get("image_size") is not None:
        wanted = opts["image_size"]
        if exported and pre.image_size is not None and wanted != pre.image_size:
            raise ModelError(f"--image-size {wanted} does not fit {target.spec}: it was "
                             f"exported for inputs of shape {exported}; leave --image-size "
                             f"out (images are then resized to {pre.image_size})")
        source = "--image-size"
        if pre.image_size is not None and wanted != pre.image_size:
            source += f"; the model says {pre.image_size}"
    elif pre.image_size is not None:
        wanted, source = pre.image_size, ("its exported input shape" if exported
                                          else "the model's own size")
    else:
        wanted, source = None, "the data's size; the model says none"
    if wanted is not None and tuple(size) == (wanted, wanted):
        wanted = None
    if wanted is not None:
        _check_fits(bundle, channels, wanted, pre.image_size)
    if opts.get("mean") is not None:
        mean, std, norm = opts["mean"], opts["std"], USER_NORMALISATION
        if pre.mean is not None:
            norm += f"; the model's own: mean {_numbers(pre.mean)}, std {_numbers(pre.std)}"
    elif pre.mean is not None:
        mean, std, norm = pre.mean, pre.std, "the model's own"
    else:
        mean = bundle.mean or tuple(bundle.test.mean.reshape(-1).tolist())
        std = bundle.std or tuple(bundle.test.std.reshape(-1).tolist())
        norm = "the dataset's; the model says none"
    mean, std = list(mean), list(std)
    if len(mean) == 1 and len(std) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ModelError(f"{norm.split(';')[0]} mean/std have {len(mean)}/{len(std)} values "
                         f"but the images have {channels} channels; give one value per channel")
    return Inputs(bundle.spec, channels, size, wanted, source, tuple(mean), tuple(std), norm,
                  low, high)


def _check_fits(bundle, channels: int, size: int, expected: int | None) -> None:
    """Refuse, in one line, a resize whose images would not fit in memory."""
    from flipsafe.data.imagefolder import available_memory_bytes

    n = len(bundle.test) + (len(bundle.train) if bundle.train is not bundle.test else 0)
    need = 4 * n * channels * size * size
    free = available_memory_bytes() or 2**40
    if need > free // 2:
        says = (f"the model expects {expected}x{expected}" if expected is not None
                else "the model does not say its size")
        raise ModelError(f"--image-size {size} would need {need / 2**30:,.1f} GiB for "
                         f"{n:,} images of {channels}x{size}x{size} ({free / 2**30:,.1f} GiB "
                         f"free); {says}, and the data's images are "
                         f"{'x'.join(str(d) for d in bundle.test.pixels.shape[-2:])}")


def apply_inputs(inputs: Inputs, split) -> torch.Tensor:
    """The images of dataset `split` (an ImageTensors) as `inputs` says the model takes
    them: pixels on the 0..1 scale, resized, normalised; float32 [N, C, H, W]."""
    import torch.nn.functional as F

    x = split.pixels
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if inputs.image_size is not None:
        size = (inputs.image_size, inputs.image_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(inputs.mean, dtype=torch.float32).reshape(-1, 1, 1)
    s = torch.tensor(inputs.std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((x - m) / s).contiguous()


def model_inputs(target: Target, split, bundle, preprocess: dict | None) -> torch.Tensor:
    """The images of dataset `split` (an ImageTensors of `bundle`) as `target` takes them
    (resolve_inputs, then apply_inputs)."""
    return apply_inputs(resolve_inputs(target, bundle, preprocess), split)


def _export_hint(target) -> str:
    """Why an export program may refuse images: the input shape it was exported with ("" for
    targets that say no such shape)."""
    exported = getattr(target, "shape_text", lambda: None)()
    if exported is None:
        return ""
    shape = target.input_shape
    if shape and isinstance(shape[0], int):
        return (f" (the program was exported for inputs of shape {exported}, a static batch "
                f"of {shape[0]}: export it with a dynamic batch dimension)")
    return f" (the program was exported for inputs of shape {exported})"


def check_model(target: Target, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                classes: list[str] | None) -> nn.Module:
    """`model` as the engine needs it (a module returning a logits tensor), after checking
    it runs on `images`, returns one score per class and has as many classes as the
    dataset. Outputs with `.logits` are unwrapped by a Logits module. ModelError else."""
    shape = "x".join(str(d) for d in images.shape[1:])
    batch = images[: min(3, len(images))]
    try:
        with torch.no_grad():
            out = model(batch)
    except SystemExit as exc:
        raise ModelError(f"the model ({target.spec}) called sys.exit({exc.code!r}) when run on "
                         f"{shape} images") from None
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on these images
        hint = "" if target.flipsafe else (
            _export_hint(target) or " (for other image sizes give --image-size)")
        raise ModelError(f"the model ({target.spec}) fails on {shape} images{hint}: "
                         f"{_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor):
        if isinstance(getattr(out, "logits", None), torch.Tensor):
            model, out = Logits(model), out.logits
        else:
            raise ModelError(f"the model ({target.spec}) returns {type(out).__name__}, not a "
                             "logits tensor or an object with .logits")
    if out.dim() != 2 or out.shape[0] != len(batch) or not out.is_floating_point():
        raise ModelError(f"the model ({target.spec}) returns a tensor of shape "
                         f"{list(out.shape)} for {len(batch)} images; it must return logits "
                         "[images, classes]")
    if not any(isinstance(m, (ConvNd, nn.Linear)) for m in model.modules()):
        raise ModelError(f"the model ({target.spec}) has no Conv or Linear layer to inject "
                         "faults into")
    n_classes = out.shape[1]
    if classes is not None and len(classes) != n_classes:
        raise ModelError(f"the model ({target.spec}) scores {n_classes} classes but the dataset "
                         f"has {len(classes)}; use the dataset the model was trained for")
    if len(labels) and int(labels.max()) >= n_classes:
        raise ModelError(f"the dataset has label {int(labels.max())} but the model "
                         f"({target.spec}) scores only {n_classes} classes")
    return model
