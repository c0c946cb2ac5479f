"""Cosine classification heads and turning a backbone into a text-guided classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flipsafe.errors import ConfigError, unknown
from flipsafe.textguided.embeddings import ClassEmbeddings, normalize_rows

# The classifier heads flipsafe builds (this module owns the list): the backbone's own
# Linear, a cosine head from random unit vectors (the control), and a cosine head started
# at the class embeddings. make_text_guided builds the last two.
HEAD_KINDS = ("linear", "cosine", "text")
COSINE_HEADS = tuple(k for k in HEAD_KINDS if k != "linear")
INITIAL_TEMPERATURE = 0.07


class CosineHead(nn.Module):
    """Logits = exp(logit_scale) * fc(normalize(features)), fc a bias-free Linear(E, C).

    `fc.weight` starts as the row-normalised `init` [C, E] (or random unit rows
    from `generator` when `init` is None) and is then trained freely: it is not
    re-normalised in forward. `freeze=True` sets `fc.weight.requires_grad=False`
    so the class directions stay fixed; `logit_scale` (the inverse temperature,
    starting at log(1/0.07)) stays trainable either way, since it only sharpens
    or softens the scores without moving any class direction.
    """

    def __init__(self, embed_dim: int, num_classes: int, init: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, freeze: bool = False):
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes, bias=False)
        if init is None:
            init = torch.randn(num_classes, embed_dim, generator=generator)
        elif tuple(init.shape) != (num_classes, embed_dim):
            raise ConfigError(
                f"head init has shape {tuple(init.shape)} but the head needs "
                f"[{num_classes}, {embed_dim}] (classes x embedding width)"
            )
        with torch.no_grad():
            self.fc.weight.copy_(normalize_rows(init, "head init"))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.fc.weight.requires_grad_(not freeze)

    @property
    def embed_dim(self) -> int:
        return self.fc.in_features

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * self.fc(F.normalize(features, dim=-1))


class TextGuidedClassifier(nn.Module):
    """`head(backbone(x))`: the backbone ends in a projection to the embedding width."""

    def __init__(self, backbone: nn.Module, head: CosineHead, classes: list[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classes = list(classes) if classes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_final_linear(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier Linear: `name` if given, else timm's get_classifier(), else the
    last nn.Linear in named_modules() order."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise unknown("layer", name, _linear_names(model) or ["(the model has no nn.Linear)"])
        if not isinstance(modules[name], nn.Linear):
            raise ConfigError(
                f"layer {name!r} is a {type(modules[name]).__name__}, not an nn.Linear; "
                f"Linear layers: {', '.join(_linear_names(model)) or 'none'}"
            )
        return name, modules[name]
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        clf = get_classifier()
        if isinstance(clf, nn.Linear):
            for n, m in model.named_modules():
                if m is clf:
                    return n, m
    names = _linear_names(model)
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer to use as the classifier"
        )
    return names[-1], modules[names[-1]]


def classifier_layer_name(model: nn.Module) -> str:
    """Name of the Linear producing class scores: '<head>.fc' under a CosineHead, else the
    final Linear."""
    heads = [n for n, m in model.named_modules() if isinstance(m, CosineHead)]
    if heads:
        return f"{heads[-1]}.fc" if heads[-1] else "fc"
    return find_final_linear(model)[0]


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def make_text_guided(
    backbone: nn.Module,
    embeddings: ClassEmbeddings | torch.Tensor | None,
    layer: str | None = None,
    head: str = "text",
    freeze_head: bool = False,
    generator: torch.Generator | None = None,
    embed_dim: int | None = None,
    num_classes: int | None = None,
) -> TextGuidedClassifier:
    """Replace the backbone's final Linear(in, C) by Linear(in, E) and add a CosineHead.

    head="text" starts the head at the class embeddings [C, E]; head="cosine" is
    the control with random unit vectors from `generator` (then `embeddings` may be
    None if `embed_dim` and `num_classes` are given). `embed_dim` / `num_classes`,
    when given, must agree with the embeddings. The backbone is changed in place.
    """
    if head not in COSINE_HEADS:
        raise unknown("head", head, COSINE_HEADS)
    if isinstance(backbone, TextGuidedClassifier) or any(
        isinstance(m, CosineHead) for m in backbone.modules()
    ):
        raise ConfigError("the backbone already has a cosine head; pass the plain backbone")

    classes = None
    vectors = None
    if isinstance(embeddings, ClassEmbeddings):
        classes, vectors = embeddings.classes, embeddings.vectors
    elif isinstance(embeddings, torch.Tensor):
        vectors = embeddings
    elif embeddings is not None:
        raise ConfigError(
            f"embeddings must be ClassEmbeddings or a [classes, dim] tensor, "
            f"got {type(embeddings).__name__}"
        )
    if vectors is not None:
        if vectors.dim() != 2:
            raise ConfigError(
                f"embeddings must be 2-D [classes, dim], got shape {tuple(vectors.shape)}"
            )
        for what, given, actual in (("num_classes", num_classes, vectors.shape[0]),
                                    ("embed_dim", embed_dim, vectors.shape[1])):
            if given is not None and given != actual:
                raise ConfigError(
                    f"{what}={given} but the class embeddings have shape {tuple(vectors.shape)}; "
                    "embed the descriptions of this model's classes with a matching encoder"
                )
        num_classes, embed_dim = int(vectors.shape[0]), int(vectors.shape[1])
    elif head == "text":
        raise ConfigError("head='text' needs class embeddings; pass them or use head='cosine'")

    name, old = find_final_linear(backbone, layer)
    if num_classes is None:
        num_classes = old.out_features
    if embed_dim is None:
        raise ConfigError("head='cosine' without embeddings needs embed_dim (e.g. 384)")
    for what, value in (("num_classes", num_classes), ("embed_dim", embed_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")

    # The head is built first so that a bad init leaves the backbone untouched.
    init = vectors.detach() if head == "text" else None
    cosine = CosineHead(embed_dim, num_classes, init, generator=generator, freeze=freeze_head)
    cosine.to(device=old.weight.device)
    projection = nn.Linear(old.in_features, embed_dim, bias=True)
    projection.to(device=old.weight.device, dtype=old.weight.dtype)
    _replace_submodule(backbone, name, projection)
    return TextGuidedClassifier(backbone, cosine, classes)
