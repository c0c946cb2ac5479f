"""End-to-end jobs shared by the CLI and Python users: build, train and save a classifier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flipsafe import checkpoint
from flipsafe.errors import CheckpointError, ConfigError, DataError
from flipsafe.textguided.describe import BUNDLED_SETS as BUNDLED_DESCRIPTION_SETS
from flipsafe.textguided.head import HEAD_KINDS
from flipsafe.train import TrainConfig, TrainResult, train

# The --head spellings: a head kind (textguided owns them), with its source where it has one.
PLAIN_HEADS = tuple(k for k in HEAD_KINDS if k != "text")  # linear, cosine
HEAD_SPECS = (*PLAIN_HEADS, "cosine:<width>", "text:minilm", "text:<classes.safetensors>")


@dataclass(frozen=True)
class HeadSpec:
    """A parsed `--head` value: linear, cosine, or text with its embedding source."""

    kind: str
    # text: "minilm" or a path to class embeddings; cosine: the head's width.
    source: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HeadSpec:
        if spec in PLAIN_HEADS:
            return cls(spec)
        if spec.startswith("cosine:") and spec[len("cosine:"):].isdigit():
            return cls("cosine", spec[len("cosine:"):])
        if spec.startswith("text:") and len(spec) > len("text:"):
            return cls("text", spec[len("text:"):])
        if spec == "text":
            return cls("text", "minilm")
        raise ConfigError(
            f"unknown head {spec!r}; choose {', '.join(HEAD_SPECS)} (the last made by "
            "`flipsafe embed`)"
        )


def dataset_family(spec: str) -> str:
    """The bundled description set that fits a dataset spec, or '' if none does."""
    name = spec.split(":", 1)[0]
    return name if name in BUNDLED_DESCRIPTION_SETS else ""


def embed_classes(dataset_spec: str, classes: list[str], encoder: str = "minilm"):
    """ClassEmbeddings of a dataset's classes with `encoder` (see flipsafe.textguided):
    the bundled descriptions of its family, else template sentences of its class names."""
    from flipsafe import textguided as tg

    family = dataset_family(dataset_spec)
    if family:
        descriptions = tg.bundled_descriptions(family, classes)
    else:
        descriptions = tg.template_descriptions(classes)
    return tg.encode_classes(descriptions, tg.get_encoder(encoder))


def class_embeddings_for(head: HeadSpec, dataset_spec: str, classes: list[str]):
    """ClassEmbeddings for a text head, in the dataset's class order."""
    from flipsafe import textguided as tg

    if head.source == "minilm":
        return embed_classes(dataset_spec, classes, "minilm")
    path = Path(head.source)
    if not path.is_file():
        raise DataError(
            f"class embeddings {str(path)!r} not found; make them with "
            "`flipsafe embed --descriptions D.json --out classes.safetensors` or use text:minilm"
        )
    emb = tg.load_embeddings(path)
    return _reorder(emb, classes)


def _reorder(emb, classes: list[str]):
    """Put embeddings in the dataset's class order, checking that every class is present."""
    if len(emb.classes) != len(classes):
        raise ConfigError(
            f"the class embeddings have {len(emb.classes)} classes but the dataset has "
            f"{len(classes)}; embed descriptions of this dataset's classes"
        )
    from flipsafe.textguided import canonical_class

    position = {canonical_class(c): i for i, c in enumerate(emb.classes)}
    missing = [c for c in classes if canonical_class(c) not in position]
    if missing:
        raise DataError(
            f"the class embeddings have no vector for {missing}; they cover {emb.classes}"
        )
    order = [position[canonical_class(c)] for c in classes]
    emb.vectors = emb.vectors[order]
    emb.classes = list(classes)
    return emb


def build_classifier(
    arch: str,
    head: HeadSpec,
    dataset_spec: str,
    classes: list[str],
    in_channels: int,
    image_size: int,
    seed: int = 0,
    freeze_head: bool = False,
) -> tuple[nn.Module, dict]:
    """An untrained classifier and the checkpoint config fields that describe it."""
    from flipsafe.models import build

    torch.manual_seed(seed)
    backbone = build(arch, num_classes=len(classes), in_channels=in_channels, image_size=image_size)
    config = {
        "arch": arch,
        "num_classes": len(classes),
        "in_channels": in_channels,
        "image_size": image_size,
        "classes": list(classes),
        "dataset": dataset_spec,
        "head": head.kind,
        "embed_dim": None,
        "text": None,
        "freeze_head": freeze_head,
        "seed": seed,
    }
    if head.kind == "linear":
        return backbone, config
    from flipsafe.textguided import make_text_guided

    generator = torch.Generator().manual_seed(seed)
    if head.kind == "text":
        emb = class_embeddings_for(head, dataset_spec, classes)
        model = make_text_guided(backbone, emb, head="text", freeze_head=freeze_head)
        config["embed_dim"] = int(emb.vectors.shape[1])
        config["text"] = dict(emb.provenance)
    else:
        # The control head takes the text head's width (MiniLM's 384) so the two
        # differ only in where the head's initial vectors come from.
        dim = int(head.source or 384)
        model = make_text_guided(
            backbone, None, head="cosine", embed_dim=dim, num_classes=len(classes),
            freeze_head=freeze_head, generator=generator,
        )
        config["embed_dim"] = dim
    return model, config


def train_classifier(
    dataset: str = "digits",
    arch: str = "resnet20",
    head: str = "linear",
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    freeze_head: bool = False,
    show_progress: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    label: str | None = None,
) -> tuple[nn.Module, dict, TrainResult]:
    """Train one classifier on `dataset` with the shared recipe, on `device`; save it to
    `out` if given. `label` names the progress bar (default: architecture and head).

    A checkpoint already in `out` is refused before any training unless overwrite=True:
    campaigns run on it would no longer match it.
    """
    from flipsafe.data import load as load_data

    if out is not None and not overwrite and checkpoint.exists(out):
        raise CheckpointError(
            f"{out} already holds a trained checkpoint, and campaigns run on it would no "
            "longer resume if it were replaced; choose another --out, or pass --force to "
            "replace it"
        )
    config = config or TrainConfig()
    bundle = load_data(dataset)
    spec = HeadSpec.parse(head)
    model, meta = build_classifier(
        arch, spec, dataset, bundle.classes, bundle.in_channels, bundle.image_size,
        seed=config.seed, freeze_head=freeze_head,
    )
    result = train(model, bundle.train, bundle.test, config, show_progress,
                   description=label or f"{arch}/{spec.kind}", device=device)
    meta["train"] = config.to_dict()
    meta["accuracy"] = result.accuracy
    meta["head_spec"] = head
    if out is not None:
        checkpoint.save(model, out, meta)
    return model, meta, result
