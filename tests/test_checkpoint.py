import json

import pytest
import torch

from flipsafe import CheckpointError, checkpoint
from flipsafe.workflow import HeadSpec, build_classifier

CLASSES = [str(i) for i in range(10)]


def _model(head: str, tmp_path):
    spec = HeadSpec.parse(head)
    if spec.kind == "text":
        from flipsafe.textguided import ClassEmbeddings, save_embeddings

        vectors = torch.nn.functional.normalize(torch.randn(10, 24), dim=1)
        path = tmp_path / "classes.safetensors"
        save_embeddings(ClassEmbeddings(classes=CLASSES, vectors=vectors, provenance={"encoder": "test"}), path)
        spec = HeadSpec("text", str(path))
    return build_classifier("lenet", spec, "digits", CLASSES, in_channels=1, image_size=8, seed=3)


@pytest.mark.parametrize("head", ["linear", "cosine", "text"])
def test_round_trip_gives_identical_logits(tmp_path, head):
    model, config = _model(head, tmp_path)
    # Perturb every parameter and buffer so that defaults cannot pass by accident.
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(torch.randn_like(t) * 0.01)
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    checkpoint.save(model, tmp_path / "ckpt", config)
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert torch.equal(model(x), loaded(x))
    assert type(loaded) is type(model)


def test_altered_weights_are_refused(tmp_path):
    model, config = _model("linear", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    data = bytearray((folder / checkpoint.WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (folder / checkpoint.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="altered"):
        checkpoint.load(folder)


@pytest.mark.parametrize("victim", [checkpoint.WEIGHTS, checkpoint.CONFIG])
def test_missing_file_is_refused(tmp_path, victim):
    model, config = _model("linear", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    (folder / victim).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load(folder)


def test_missing_folder_and_broken_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere")
    model, config = _model("linear", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    (folder / checkpoint.CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(folder)
    cfg = dict(config, files={})
    del cfg["arch"]
    (folder / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="arch"):
        checkpoint.load(folder)


def test_failed_save_over_a_checkpoint_leaves_it_whole(tmp_path, monkeypatch):
    import errno

    from flipsafe import atomic

    model, config = _model("linear", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_json", disk_full)
    with pytest.raises(OSError):
        checkpoint.save(model, folder, config)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    checkpoint.load(folder)  # still loads: weights and config still agree


@pytest.mark.parametrize("files", [{}, [], None, "abc", {checkpoint.WEIGHTS: ""},
                                   {checkpoint.WEIGHTS: 5}, {"other.bin": "0" * 64}])
def test_a_tampered_files_entry_is_refused(tmp_path, files):
    # {} once turned the weights-hash check off; [] crashed with AttributeError.
    model, config = _model("linear", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    cfg = json.loads((folder / checkpoint.CONFIG).read_text())
    cfg["files"] = files
    (folder / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.load(folder)
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.read_config(folder)


def test_weights_are_checked_against_the_hash_always(tmp_path):
    model, config = _model("linear", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    other, _ = _model("linear", tmp_path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    checkpoint.save(other, tmp_path / "other", config)
    (folder / checkpoint.WEIGHTS).write_bytes((tmp_path / "other" / checkpoint.WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="altered"):
        checkpoint.load(folder)


@pytest.mark.parametrize("change, needles", [
    ({"embed_dim": 0}, ["config.json", "embed_dim must be a positive integer"]),
    ({"embed_dim": None}, ["config.json", "embed_dim"]),
    ({"num_classes": 3}, ["config.json", "head.fc.weight, saved [10, 24], expected [3, 24]"]),
    ({"head": "linear"}, ["config.json", "missing", "unexpected"]),
])
def test_a_tampered_config_is_named_in_one_line(tmp_path, change, needles):
    model, config = _model("cosine:24", tmp_path)
    folder = checkpoint.save(model, tmp_path / "ckpt", config)
    cfg = json.loads((folder / checkpoint.CONFIG).read_text())
    for key, value in change.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (folder / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(folder)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
