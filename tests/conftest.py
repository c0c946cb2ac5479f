"""Shared test settings: offline, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import string

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_clip(tmp_path):
    """A random CLIP text model with a 54-token vocabulary, saved to tmp_path/clip (as a
    user's clip:<path> encoder); returns (model, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    vocab = {}
    for piece in list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]:
        vocab[piece] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=8, max_position_embeddings=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    return model, tokenizer

