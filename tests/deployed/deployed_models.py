"""Tiny quantized CNNs built offline: a PT2E program (torchao, X86 Inductor quantizer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

SIDE, CLASSES = 8, 10


class TinyCNN(nn.Module):
    """Conv/ReLU, max-pool, a residual add, a second conv, a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(6, 8, 3)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(8 * 2 * 2, CLASSES)

    def forward(self, x):
        y = self.pool(self.relu1(self.conv1(x)))
        y = self.relu2(self.conv2(y)) + y
        y = self.relu3(self.conv3(y))
        return self.fc(torch.flatten(y, 1))


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, SIDE, SIDE, generator=g), torch.randint(CLASSES, (n,), generator=g)


def float_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def calibration() -> list[torch.Tensor]:
    """The tiny CNN's calibration batches."""
    return [images(32, 100 + k)[0] for k in range(4)]


def pt2e_program(model=None, batches=None):
    """`model` (default: the tiny CNN) quantized by torchao's PT2E flow on `batches`
    (default: calibration()), exported with a dynamic batch."""
    pytest.importorskip("torchao")
    from flipsafe.deployed.pt2e import register_ops

    register_ops()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = float_model() if model is None else model
    batches = calibration() if batches is None else batches
    x = batches[0][:8]
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    for b in batches:
        prepared(b)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (x,), dynamic_shapes=({0: batch},))


def onnx_files(folder, model=None, batches=None):
    """(float ONNX, QDQ int8 ONNX) of `model` (default: the tiny CNN): torch.onnx.export
    with a dynamic batch, then ONNX Runtime's quantize_static (per-channel int8 weights,
    uint8 activations) calibrated on `batches` (default: calibration())."""
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = float_model() if model is None else model
    batches = calibration() if batches is None else batches
    x = batches[0][:4]
    fp32, int8 = folder / "tiny_fp32.onnx", folder / "tiny_int8.onnx"
    torch.onnx.export(model, (x,), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Calibration(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    return fp32, int8
