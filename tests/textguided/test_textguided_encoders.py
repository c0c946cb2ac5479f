"""Text encoders, encode_classes and the class-embedding file format."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from flipsafe.errors import ConfigError, DataError, UnknownNameError
from flipsafe.textguided import (
    ClassEmbeddings,
    CLIPEncoder,
    PrecomputedEncoder,
    TextEncoder,
    bundled_descriptions,
    encode_classes,
    get_encoder,
    load_embeddings,
    save_embeddings,
)


class TableEncoder(TextEncoder):
    """Returns fixed vectors per text so class means can be worked out by hand."""

    spec = "table"

    def __init__(self, table):
        self.table = table
        self.dim = len(next(iter(table.values())))

    def encode(self, texts):
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)


def test_class_vector_is_the_normalised_mean_of_its_descriptions():
    enc = TableEncoder({"x": [3.0, 0.0], "y": [0.0, 4.0], "z": [0.0, -2.0]})
    emb = encode_classes({"a": ["x", "y"], "b": ["z"]}, enc, source="hand")
    # mean of (3,0) and (0,4) is (1.5,2), length 2.5 -> (0.6,0.8); (0,-2) -> (0,-1)
    assert emb.classes == ["a", "b"]
    assert emb.vectors.dtype == torch.float32
    assert torch.allclose(emb.vectors, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    assert emb.provenance == {"encoder": "table", "descriptions": "hand",
                              "descriptions_per_class": {"a": 2, "b": 1}}


def test_bad_descriptions_and_specs_raise():
    enc = TableEncoder({"x": [1.0, 0.0]})
    with pytest.raises(DataError, match="'b'.*empty"):
        encode_classes({"a": ["x"], "b": []}, enc)
    with pytest.raises(DataError, match="zero"):
        encode_classes({"a": ["x"], "b": ["o"]}, TableEncoder({"x": [1.0, 0.0], "o": [0.0, 0.0]}))
    with pytest.raises(UnknownNameError, match="clip:<name-or-path>.*file:<path>.*minilm"):
        get_encoder("word2vec")
    with pytest.raises(ConfigError, match="after 'clip:'"):
        get_encoder("clip:")
    with pytest.raises(DataError, match="cannot load"):
        get_encoder("st:/no/such/model/dir")


def test_minilm_loads_offline_and_ranks_related_phrases_closer(minilm):
    assert minilm.spec == "minilm" and minilm.dim == 384
    v = F.normalize(minilm.encode(["a photo of a cat", "a photo of a kitten",
                                   "a stock market chart"]), dim=1)
    assert v.shape == (3, 384)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3


def test_encode_classes_with_minilm_matches_manual_average(minilm):
    d = {"cat": ["a small furry pet with whiskers", "a kitten asleep on a sofa"],
         "truck": ["a heavy lorry on the highway", "a red fire engine", "a dump truck"]}
    emb = encode_classes(d, minilm)
    raw = minilm.encode([t for ts in d.values() for t in ts]).numpy().astype(np.float64)
    expect = []
    for rows in (raw[:2], raw[2:]):
        mean = rows.sum(axis=0) / len(rows)
        expect.append(mean / math.sqrt(float((mean ** 2).sum())))
    assert np.allclose(emb.vectors.numpy(), np.array(expect), atol=1e-5)
    # The mean of distinct unit vectors is shorter than 1, so normalising changed it.
    assert np.linalg.norm(raw[:2].mean(axis=0)) < 0.99
    assert emb.provenance["encoder"] == "minilm"
    assert emb.provenance["descriptions_per_class"] == {"cat": 2, "truck": 3}


@pytest.mark.parametrize("name,query", [("cifar10", "a photo of a {}"),
                                        ("digits", "a handwritten digit {}")])
def test_bundled_descriptions_pick_out_their_own_class(minilm, name, query):
    emb = encode_classes(bundled_descriptions(name), minilm)
    assert emb.provenance["descriptions"] == f"bundled:{name}"
    q = F.normalize(minilm.encode([query.format(c) for c in emb.classes]), dim=1)
    nearest = (q @ emb.vectors.T).argmax(dim=1)
    assert nearest.tolist() == list(range(len(emb.classes)))


def test_save_and_load_embeddings_round_trip(tmp_path):
    vectors = F.normalize(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    emb = ClassEmbeddings(["cat", "dög", "aquarium_fish"], vectors,
                          {"encoder": "minilm", "descriptions_per_class": {"cat": 5}})
    path = save_embeddings(emb, tmp_path / "out" / "classes.safetensors")
    assert os.listdir(tmp_path / "out") == ["classes.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["cat", "dög", "aquarium_fish"]
        assert torch.equal(f.get_tensor("vectors"), vectors)
    back = load_embeddings(path)
    assert back.classes == emb.classes
    assert back.provenance == emb.provenance
    assert back.vectors.dtype == torch.float32 and torch.equal(back.vectors, vectors)


def test_load_embeddings_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_embeddings(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(DataError, match="readable"):
        load_embeddings(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"vectors": torch.ones(2, 3)}, str(bare))
    with pytest.raises(DataError, match="save_embeddings"):
        load_embeddings(bare)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"vectors": torch.ones(2, 3)}, str(wrong), metadata={"classes": '["a", "b", "c"]'})
    with pytest.raises(DataError, match="3 class names"):
        load_embeddings(wrong)


def test_file_encoder_looks_up_classes_and_cannot_encode(tmp_path):
    vectors = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    path = save_embeddings(ClassEmbeddings(["cat", "dog", "seven"], vectors,
                                           {"encoder": "minilm"}), tmp_path / "e.safetensors")
    enc = get_encoder(f"file:{path}")
    assert isinstance(enc, PrecomputedEncoder) and enc.dim == 2
    emb = encode_classes(["Dog", "7", "cat"], enc)
    assert emb.classes == ["Dog", "7", "cat"]
    s = 1 / math.sqrt(2)
    assert torch.allclose(emb.vectors, torch.tensor([[0.0, 1.0], [s, s], [1.0, 0.0]]))
    assert emb.provenance["precomputed"] == {"encoder": "minilm"}
    with pytest.raises(DataError, match="'horse'"):
        encode_classes(["cat", "horse"], enc)
    with pytest.raises(ConfigError, match="cannot encode"):
        enc.encode(["a photo"])


def test_clip_encoder_from_a_saved_tiny_model(tmp_path, capfd, tiny_clip):
    from transformers.utils import logging as hf_logging

    model, tokenizer = tiny_clip
    capfd.readouterr()
    bars_on = hf_logging.is_progress_bar_enabled()
    enc = get_encoder(f"clip:{tmp_path / 'clip'}")
    assert "Loading weights" not in capfd.readouterr().err  # transformers' own bar is off
    assert hf_logging.is_progress_bar_enabled() == bars_on  # ... and restored after
    assert enc.spec == f"clip:{tmp_path / 'clip'}" and enc.dim == 8
    texts = ["a cat", "a very long description of a dog", "ship"]
    out = enc.encode(texts)
    assert out.shape == (3, 8)
    # Padding a short text next to a long one must not change its embedding.
    with torch.no_grad():
        for i, t in enumerate(texts):
            alone = model(**tokenizer([t], return_tensors="pt")).text_embeds[0]
            assert torch.allclose(out[i], alone, atol=1e-5)
    direct = CLIPEncoder(model, tokenizer)
    assert torch.allclose(direct.encode(texts), out, atol=1e-6)
    emb = encode_classes({"cat": ["a cat", "cat"], "dog": ["a dog"]}, enc)
    assert emb.vectors.shape == (2, 8)
    assert torch.allclose(emb.vectors.norm(dim=1), torch.ones(2))


def test_clip_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install -c constraints.txt 'flipsafe\[clip\]'"):
        get_encoder("clip:openai/clip-vit-base-patch32")


def test_loading_minilm_prints_nothing():
    # A fresh process: the session's MiniLM is already loaded here.
    import subprocess

    code = "from flipsafe.textguided import get_encoder; get_encoder('minilm')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout == "" and proc.stderr == ""
