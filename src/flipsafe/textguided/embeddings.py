"""Class embeddings: one unit vector per class, saved as safetensors with JSON metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flipsafe import atomic
from flipsafe.errors import ConfigError, DataError

FORMAT = "flipsafe.class_embeddings/1"


@dataclass
class ClassEmbeddings:
    """`vectors[i]` is the L2-normalised embedding of `classes[i]`; `provenance` says how."""

    classes: list[str]
    vectors: torch.Tensor
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.classes = [str(c) for c in self.classes]
        if not isinstance(self.vectors, torch.Tensor) or self.vectors.dim() != 2:
            raise ConfigError("class embedding vectors must be a 2-D tensor [classes, dim]")
        if self.vectors.shape[0] != len(self.classes):
            raise ConfigError(
                f"{self.vectors.shape[0]} embedding vectors for {len(self.classes)} class names; "
                "give one vector per class"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError("class names in class embeddings must be distinct")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def normalize_rows(vectors: torch.Tensor, where: str) -> torch.Tensor:
    """Rows scaled to unit length; an all-zero or non-finite row is an error, not a NaN."""
    vectors = vectors.detach().float()
    norms = vectors.norm(dim=1)
    bad = (~torch.isfinite(norms)) | (norms == 0)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise DataError(f"{where}: rows {rows} are zero or not finite and have no direction")
    return F.normalize(vectors, dim=1)


def save_embeddings(emb: ClassEmbeddings, path) -> Path:
    """Write `emb` to a .safetensors file (tensor 'vectors'; classes and provenance in metadata)."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "classes": json.dumps(emb.classes, ensure_ascii=False),
        "provenance": json.dumps(emb.provenance, ensure_ascii=False),
    }
    tensors = {"vectors": emb.vectors.detach().float().cpu().contiguous()}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_embeddings(path) -> ClassEmbeddings:
    """Read class embeddings written by `save_embeddings`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class embeddings file {str(path)!r} not found")
    where = f"class embeddings file {str(path)!r}"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{where} is not a readable safetensors file: {exc}") from None
    if "vectors" not in tensors or "classes" not in metadata:
        raise DataError(
            f"{where} lacks the 'vectors' tensor or 'classes' metadata; "
            "write it with flipsafe.textguided.save_embeddings"
        )
    try:
        classes = json.loads(metadata["classes"])
        provenance = json.loads(metadata.get("provenance", "{}"))
    except ValueError as exc:
        raise DataError(f"{where} has malformed metadata: {exc}") from None
    if not isinstance(classes, list) or not isinstance(provenance, dict):
        raise DataError(f"{where} has malformed metadata: classes must be a list")
    try:
        return ClassEmbeddings(classes, tensors["vectors"].float(), provenance)
    except ConfigError as exc:
        raise DataError(f"{where}: {exc}") from None
