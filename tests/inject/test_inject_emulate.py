"""Format emulation helpers: clamping (the MX quantiser shortcut is tested in tests/formats)."""

import pytest
import torch

from flipsafe import formats
from flipsafe.errors import UnknownNameError
from flipsafe.inject import emulate


def bits(t):
    return t.contiguous().view(torch.int32)


def test_clamp_modes_by_hand():
    v = torch.tensor([1.0, -7.0, 9.0, float("inf"), float("-inf"), float("nan"),
                      -float("nan")])
    limit = torch.tensor(5.0)
    prof = emulate.clamp(v, limit, "profiled").tolist()
    ge = emulate.clamp(v, limit, "goldeneye").tolist()
    assert prof == [1.0, -5.0, 5.0, 5.0, -5.0, 5.0, -5.0]
    assert ge == [1.0, -5.0, 5.0, 5.0, -5.0, 5.0, 5.0]
    assert emulate.clamp(v, limit, "none") is v


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp8_e4m3", "int8"])
@pytest.mark.parametrize("mode", ["profiled", "goldeneye"])
def test_clamped_values_are_values_of_the_format_within_the_limit(name, mode):
    """A profiled limit such as 7.5234375 is no bf16 value (8 significant bits needed 10):
    it is written as the largest format value below it, never above."""
    fmt = formats.get(name)
    if fmt.needs_calibration:
        fmt = fmt.calibrate(7.5234375 * 1.3)  # a scale whose grid misses the limit
    g = torch.Generator().manual_seed(0)
    values = fmt.quantize(torch.randn(500, generator=g) * 20)
    values = torch.cat([values, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    for lim in (7.5234375, 0.3337, 100.1):
        limit = torch.tensor(lim)
        out = emulate.clamp(values, limit, mode, fmt)
        assert bool((out.abs() <= lim).all())
        assert torch.equal(bits(fmt.decode(fmt.encode(out))), bits(out))
        # Values already within the limit are kept as they are.
        inside = values.abs() <= lim
        assert torch.equal(bits(out[inside]), bits(values[inside]))
        clamped = out[~inside].abs()
        assert clamped.numel() and bool((clamped == clamped[0]).all())
        # The largest format value <= limit: the next one up exceeds the limit.
        assert bool((fmt.quantize(torch.tensor([lim])) >= clamped[0]).all())
    bf = emulate.clamp(torch.tensor([9.0, -9.0]), torch.tensor(7.5234375), "profiled",
                       formats.get("bf16"))
    assert bf.tolist() == [7.5, -7.5]  # bf16 values near 7.5 are 7.5 and 7.53125


def test_clamp_refuses_an_unknown_mode():
    with pytest.raises(UnknownNameError, match="clamp must be one of: none, profiled, goldeneye"):
        emulate.clamp(torch.ones(2), torch.tensor(1.0), "clip")
