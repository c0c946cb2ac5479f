"""Format emulation helpers: the MX quantiser shortcut equals the format, bit for bit."""

import pytest
import torch

from flipsafe import formats
from flipsafe.inject import emulate


def bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2",
                                  "mxfp4_e2m1"])
def test_mx_shortcut_is_used_and_equals_the_format(name):
    fmt = formats.get(name)
    fast = emulate.fast_quantizer(fmt)
    assert getattr(fast, "__self__", None) is not fmt  # the shortcut, not fmt.quantize
    g = torch.Generator().manual_seed(0)
    for shape in [(40, 64), (7, 3, 32), (5, 16), (9, 4), (2, 3, 96), (6, 48)]:
        scale = torch.exp2(torch.randint(-150, 125, (*shape[:-1], 1), generator=g).float())
        x = torch.randn(*shape, generator=g) * scale
        x.view(-1)[::17] = 0.0
        x.view(-1)[5] = float("nan") if shape[0] % 2 else float("-inf")
        assert torch.equal(bits(fast(x)), bits(fmt.quantize(x))), shape


def test_shortcut_is_refused_when_it_would_differ():
    class Skewed(formats.get("mxfp8_e4m3").__class__):
        def quantize(self, x):
            return super().quantize(x) * 1.0000001  # not what the shortcut computes

    ref = formats.get("mxfp8_e4m3")
    fmt = Skewed(ref.name, ref.element, ref.block_size, ref.meta_name)
    q = emulate.fast_quantizer(fmt)
    assert getattr(q, "__self__", None) is fmt
    assert emulate.fast_quantizer(formats.get("bf16")).__self__.name == "bf16"


def test_clamp_modes_by_hand():
    v = torch.tensor([1.0, -7.0, 9.0, float("inf"), float("-inf"), float("nan"),
                      -float("nan")])
    limit = torch.tensor(5.0)
    prof = emulate.clamp(v, limit, "profiled").tolist()
    ge = emulate.clamp(v, limit, "goldeneye").tolist()
    assert prof == [1.0, -5.0, 5.0, 5.0, -5.0, 5.0, -5.0]
    assert ge == [1.0, -5.0, 5.0, 5.0, -5.0, 5.0, 5.0]
    assert emulate.clamp(v, limit, "none") is v
