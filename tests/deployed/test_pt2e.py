"""PT2E-quantized programs: stored int8 codes, scales and activation codes as fault sites.
(test_verify checks campaign outcomes against the saved program run with each bit flipped.)"""

from __future__ import annotations

import pytest
import torch
from deployed_models import images

from flipsafe.campaign.targets import resolve
from flipsafe.errors import ConfigError
from flipsafe.formats import AffineFormat
from flipsafe.inject import Engine

pytest.importorskip("torchao")


def ops():
    from flipsafe.deployed.pt2e import register_ops

    register_ops()
    return torch.ops.quantized_decomposed


def test_the_stored_format_computes_what_the_pt2e_ops_compute():
    """Decode equals dequantize_per_tensor / _per_channel bit for bit; quantize equals
    quantize_per_tensor (x * (1 / scale), ties to even), on random and boundary values."""
    qd = ops()
    g = torch.Generator().manual_seed(0)
    for dtype, lo, hi in ((torch.uint8, 0, 255), (torch.int8, -128, 127)):
        scale, zp = 0.0123456789, 7 if dtype == torch.uint8 else 0
        fmt = AffineFormat(dtype, scale, zp, lo, hi)
        codes = torch.randint(lo, hi + 1, (4096,), generator=g).to(dtype)
        want = qd.dequantize_per_tensor(codes, scale, zp, lo, hi, dtype)
        enc = fmt.encode(want)
        assert torch.equal(fmt.decode(enc).view(torch.int32), want.view(torch.int32))
        x = torch.cat([torch.randn(4096, generator=g) * 2, (torch.arange(-300, 300) + 0.5)
                       * scale, torch.tensor([1e30, -1e30, float("nan")])])
        q = qd.quantize_per_tensor(x, scale, zp, lo, hi, dtype)
        assert torch.equal(fmt.quantize(x), qd.dequantize_per_tensor(q, scale, zp, lo, hi,
                                                                     dtype))
    scales = torch.rand(6, generator=g) / 50 + 1e-3
    zps = torch.zeros(6, dtype=torch.int64)
    codes = torch.randint(-128, 128, (6, 27), generator=g).to(torch.int8)
    want = qd.dequantize_per_channel(codes, scales, zps, 0, -128, 127, torch.int8)
    fmt = AffineFormat(torch.int8, scales, zps, -128, 127)
    assert torch.equal(fmt.decode(fmt.encode(want)).view(torch.int32), want.view(torch.int32))
    assert torch.equal(fmt.encode(want).codes, codes.to(torch.int32) & 0xFF)


def test_a_pt2e_program_loads_with_its_stored_codes_as_sites(pt2e_file):
    target = resolve(f"export:{pt2e_file}")
    assert target.quantized
    model = target.load()
    engine = Engine(model, "native", input_shape=(1, 8, 8))
    weights = [info.name for info in engine.layers("weights")]
    assert weights == ["conv1", "conv2", "conv3", "fc"]
    acts = engine.layers("activations")
    assert all(info.kind == "quant" for info in acts) and len(acts) >= 4
    assert engine.layers("weight_metadata")[0].numel == 6  # a scale per output channel
    assert {info.numel for info in engine.layers("metadata")} == {1}  # one scale per image
    assert engine.suffix
    # Biases and float outputs are not stored codes: no site, and the reason says so.
    with pytest.raises(Exception, match="keeps its bias in float"):
        engine.layers("biases", "conv1")
    with pytest.raises(Exception, match="keeps its output in float"):
        engine.layers("activations", "conv1")
    # The lifted model computes what the program computes.
    x, _ = images(16)
    assert torch.equal(model(x), target.program.module()(x))


def test_emulated_formats_are_refused_on_a_quantized_model(pt2e_file):
    model = resolve(f"export:{pt2e_file}").load()
    with pytest.raises(ConfigError, match="use format native"):
        Engine(model, "int8", input_shape=(1, 8, 8))


def test_stored_codes_round_toward_zero_on_their_grid():
    """A clamp limit goes to the largest stored value at most its size (as every format)."""
    fmt = AffineFormat(torch.uint8, 0.5, 10)
    x = torch.tensor([1.3, -1.3, 2.0, 200.0, -200.0])
    got = fmt.toward_zero(x)
    assert got.tolist() == [1.0, -1.0, 2.0, 122.5, -5.0]  # codes 12, 8, 14, 255, 0
    signed = AffineFormat(torch.int8, torch.tensor([0.25, 1.0]), torch.zeros(2))
    assert signed.toward_zero(torch.tensor([[0.6, -0.6], [-3.7, 3.2]])).tolist() == \
        [[0.5, -0.5], [-3.0, 3.0]]
