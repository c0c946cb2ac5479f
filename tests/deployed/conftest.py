"""Deployed-model tests: the quantized models are built once per module, offline."""

import sys
from pathlib import Path

import pytest
import torch

# The engine's slow reference and its outcome check live with the engine's tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inject"))

from deployed_models import onnx_files, pt2e_program


@pytest.fixture(scope="module")
def pt2e_file(tmp_path_factory):
    """A PT2E-quantized TinyCNN saved with torch.export.save."""
    path = tmp_path_factory.mktemp("pt2e") / "tiny_int8.pt2"
    torch.export.save(pt2e_program(), str(path))
    return path


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    """(float ONNX file, QDQ int8 ONNX file) of the same TinyCNN."""
    return onnx_files(tmp_path_factory.mktemp("onnx"))
