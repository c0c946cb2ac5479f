"""Checkpoints: a folder with model.safetensors and config.json that rebuilds a model exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flipsafe import atomic
from flipsafe.errors import CheckpointError, ConfigError, FlipsafeError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class Checkpoint:
    """A rebuilt model (in eval mode) and the config it was saved with."""

    model: nn.Module
    config: dict
    path: Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(config: dict) -> nn.Module:
    """Build an untrained model with the architecture and head described by `config`."""
    from flipsafe.models import build

    backbone = build(
        config["arch"],
        num_classes=config["num_classes"],
        in_channels=config["in_channels"],
        image_size=config["image_size"],
    )
    from flipsafe.textguided import HEAD_KINDS, make_text_guided

    head = config.get("head", "linear")
    if head == "linear":
        return backbone
    if head not in HEAD_KINDS:
        raise CheckpointError(f"config.json names an unknown head {head!r}; expected one of {HEAD_KINDS}")

    # The head's weights come from the state dict, so a randomly initialised
    # cosine head of the right width rebuilds the same structure for both kinds.
    return make_text_guided(
        backbone,
        None,
        head="cosine",
        embed_dim=config["embed_dim"],
        num_classes=config["num_classes"],
    )


def exists(path) -> bool:
    """True when folder `path` holds (part of) a checkpoint: its weights or its config."""
    folder = Path(path)
    return (folder / WEIGHTS).exists() or (folder / CONFIG).exists()


def save(model: nn.Module, out_dir, config: dict) -> Path:
    """Save `model` and `config` to `out_dir` (created if needed); returns the folder."""
    out = atomic.make_folder(out_dir, "checkpoint folder")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    full = dict(config)
    full["versions"] = {"flipsafe": _flipsafe_version(), "torch": torch.__version__}
    # Both files are written in full before the weights replace their old copy, so a
    # failure while writing (a full disk) leaves an earlier checkpoint whole.
    with atomic.atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
        full["files"] = {WEIGHTS: sha256_file(tmp)}
        atomic.write_json(out / CONFIG, full)
    return out


def read_config(path) -> dict:
    """Read and check a checkpoint's config.json, with clear errors for missing files."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is a file, not a checkpoint folder; give the "
                              "folder `flipsafe train --out DIR` wrote")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist; train one "
                              "with `flipsafe train --out DIR`")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing; this folder is not a flipsafe checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc}); re-save the checkpoint") from None
    missing = [k for k in ("arch", "num_classes", "in_channels", "image_size", "files") if k not in config]
    if missing:
        raise CheckpointError(f"{cfg_path} lacks {', '.join(missing)}; re-save the checkpoint")
    bad = [k for k in ("num_classes", "in_channels", "image_size")
           if type(config[k]) is not int or config[k] < 1]
    if bad:
        raise CheckpointError(f"{cfg_path} has invalid {', '.join(bad)} (not positive whole "
                              "numbers); the file was altered, restore it or re-train")
    files = config["files"]
    digest = files.get(WEIGHTS) if isinstance(files, dict) else None
    # Without a well-formed hash the weights could not be verified: refuse rather than skip.
    if not (isinstance(digest, str) and len(digest) == 64
            and all(ch in "0123456789abcdef" for ch in digest)):
        raise CheckpointError(
            f"{cfg_path} has no valid 'files' entry with the sha256 of {WEIGHTS} "
            f"(found {json.dumps(files)[:80]}); the file was altered, restore it or re-train"
        )
    return config


def load_checkpoint(path, map_location="cpu") -> Checkpoint:
    """Rebuild the saved model exactly (same logits) after checking its files' hashes."""
    folder = Path(path)
    config = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete, re-train or restore it")
    if sha256_file(weights) != config["files"][WEIGHTS]:
        raise CheckpointError(
            f"{weights} does not match the hash in config.json: the file was altered or "
            "replaced; restore the original or re-train"
        )
    try:
        model = build_model(config)
    except CheckpointError:
        raise
    except (FlipsafeError, KeyError, TypeError, ValueError) as exc:
        what = f"lacks {exc}" if isinstance(exc, KeyError) else f"describes no buildable model ({exc})"
        raise CheckpointError(
            f"{folder / CONFIG} {what}; restore the original config.json or re-train"
        ) from None
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"cannot read {weights}: {exc}") from None
    misfit = _state_misfit(model, state)
    if misfit:
        raise CheckpointError(
            f"{weights} does not fit the model that {folder / CONFIG} describes "
            f"(arch {config['arch']}, head {config.get('head', 'linear')}, "
            f"{config['num_classes']} classes): {misfit}; restore the matching config.json "
            "or re-train"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{weights} does not load into the model in config.json: {first}") from None
    model.eval()
    return Checkpoint(model=model, config=config, path=folder)


def check_dataset(config: dict, bundle) -> None:
    """Raise ConfigError unless the dataset `bundle` (a DatasetBundle) has the class count
    and image shape (channels, size) the checkpoint with `config` was trained on."""
    want = (config["num_classes"], config["in_channels"], config["image_size"])
    have = (len(bundle.classes), bundle.in_channels, bundle.image_size)
    if want == have:
        return

    def shape(n, c, s):
        return f"{n} classes of {c}x{s}x{s} images"

    hint = ""
    if bundle.spec.startswith("imagefolder:") and want[0] == have[0]:
        hint = f" (or load it with ?size={want[2]}&channels={want[1]})"
    own = f" ({config['dataset']})" if config.get("dataset") else ""
    raise ConfigError(
        f"{bundle.spec or 'the dataset'} has {shape(*have)} but the model was trained on "
        f"{shape(*want)}; use the model's own dataset{own}{hint}"
    )


def _state_misfit(model: nn.Module, state: dict) -> str:
    """'' when `state` loads into `model` exactly; else what differs, on one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    found = []
    if missing:
        found.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        found.append(f"{len(reshaped)} of another shape (first: {k}, saved "
                     f"{list(state[k].shape)}, expected {list(expected[k].shape)})")
    return ", ".join(found)


def load(path, map_location="cpu") -> nn.Module:
    """The model saved in checkpoint folder `path`, in eval mode."""
    return load_checkpoint(path, map_location).model


def _flipsafe_version() -> str:
    from flipsafe import __version__

    return __version__
