"""What formats say about themselves: metadata layouts, calibration, rounding toward zero."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from flipsafe import formats


def test_layout_kinds_and_sizes():
    assert formats.get("fp16").meta_layout((4, 5)).kind == "none"
    assert formats.get("fp16").meta_layout((4, 5)).numel == 0
    t = formats.get("int8").meta_layout((4, 5))
    assert (t.kind, t.name, t.numel, t.group_size) == ("tensor", "scale", 1, 20)
    c = formats.get("int8_channel").meta_layout((4, 5))
    assert (c.kind, c.name, c.numel, c.group_size) == ("channel", "scale", 4, 5)
    b = formats.get("mxfp8_e4m3").meta_layout((3, 70))
    assert (b.kind, b.name, b.numel, b.group_size) == ("block", "scale", 9, 32)
    assert formats.get("bfp8").meta_layout((2, 16)).name == "exponent"


@pytest.mark.parametrize("name,shape", [("int8", (4, 5)), ("int8_channel", (4, 5)),
                                        ("int8_channel", (6,)), ("mxfp8_e4m3", (3, 70)),
                                        ("mxint8", (2, 3, 40)), ("bfp8", (5, 16)),
                                        ("int4", ())])
def test_layout_agrees_with_encode(name, shape):
    """Flipping metadata code k changes exactly the elements groups(k) lists, and
    of_element inverts groups; the metadata tensor has layout.numel codes."""
    fmt = formats.get(name)
    layout = fmt.meta_layout(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) + 3.0
    enc = fmt.encode(x)
    meta = enc.meta[layout.name]
    assert meta.numel() == layout.numel
    base = fmt.decode(enc).reshape(-1)
    positions = torch.arange(math.prod(shape) or 1)
    for k in range(layout.numel):
        flipped = formats.flip_bits(meta, torch.tensor([k]), 1 << 2)
        out = fmt.decode(formats.Encoded(enc.codes, {layout.name: flipped})).reshape(-1)
        changed = set(torch.nonzero(out != base).reshape(-1).tolist())
        group = set(layout.groups(torch.tensor([k]))[0].tolist())
        assert changed == group, k
        assert set(positions[layout.of_element(positions) == k].tolist()) == group
    groups, offset = layout.element_groups(positions)
    assert torch.equal(groups.gather(1, offset[:, None])[:, 0], positions)


def test_needs_calibration():
    assert [formats.get(n).needs_calibration for n in ("int8", "int4", "int8_channel")] == [
        True, True, True]
    for name in ("fp32", "bf16", "fp8_e4m3", "mxfp8_e4m3", "mxint8", "bfp8", "fixed_q4.4"):
        fmt = formats.get(name)
        assert not fmt.needs_calibration
        assert fmt.calibrated_for(torch.ones(3)) is fmt


def test_calibrated_for_takes_the_range_per_channel_or_per_tensor():
    w = torch.tensor([[1.0, -4.0], [0.0, 0.0], [0.5, 2.0]])
    per_tensor = formats.get("int8").calibrated_for(w)
    assert torch.equal(per_tensor.scale, torch.tensor(4.0) / 127)
    per_channel = formats.get("int8_channel").calibrated_for(w)
    # The all-zero channel gets amax 1 (any positive scale holds it exactly).
    assert torch.equal(per_channel.scale, torch.tensor([4.0, 1.0, 2.0]) / 127)


REPRESENTABLE = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16,
                 "fp8_e4m3": ml_dtypes.float8_e4m3fn}


@pytest.mark.parametrize("name", list(REPRESENTABLE))
def test_toward_zero_is_the_largest_value_not_above(name):
    fmt = formats.get(name)
    dtype = REPRESENTABLE[name]
    g = torch.Generator().manual_seed(3)
    top = float(ml_dtypes.finfo(dtype).max)
    x = torch.cat([torch.randn(2000, generator=g) * 10, torch.tensor(
        [7.5234375, -7.5234375, 0.0, 1e-30, top, min(top * 1.5, 3.3e38), -min(top * 1.01, 3.4e38), 3e38])])
    got = fmt.toward_zero(x)
    # Brute force in NumPy: the format values as float64, the largest one <= |x|.
    width = np.dtype(dtype).itemsize
    codes = np.arange(2 ** (8 * width), dtype=np.uint32).astype({1: np.uint8, 2: np.uint16}[width])
    with np.errstate(invalid="ignore"):  # NaN codes, dropped below
        grid = np.unique(np.abs(codes.view(dtype).astype(np.float64)))
    grid = grid[np.isfinite(grid)]
    ax = np.abs(x.double().numpy())
    want = grid[np.searchsorted(grid, ax, side="right") - 1] * np.sign(x.double().numpy())
    assert np.array_equal(got.double().numpy(), want)


def test_toward_zero_int8_and_fixed_by_hand():
    fmt = formats.get("int8", amax=127.0)  # scale 1
    assert fmt.toward_zero(torch.tensor([7.9, -7.9, 200.0, -0.5])).tolist() == [
        7.0, -7.0, 127.0, -0.0]
    fixed = formats.get("fixed_q4.4")  # steps of 1/16, range [-8, 8 - 1/16]
    assert fixed.toward_zero(torch.tensor([1.99, -1.99, 9.0, -9.0])).tolist() == [
        1.9375, -1.9375, 7.9375, -8.0]


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8", "bfp8", "int8_channel"])
def test_toward_zero_in_formats_with_a_shared_scale(name):
    """Under the scale quantize would choose, each value is the nearest one not above |x|:
    quantize's value where that is not above, else the next one toward zero."""
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=g) * torch.exp2(torch.randint(-20, 20, (6, 1), generator=g))
    out = fmt.toward_zero(x)
    near = fmt.quantize(x)
    assert bool((out.abs() <= x.abs()).all())
    assert torch.equal(out.sign() * (out != 0), x.sign() * (out != 0))
    keep = near.abs() <= x.abs()
    assert torch.equal(out[keep], near[keep]) and bool((out[~keep].abs() < near[~keep].abs()).all())
    assert torch.equal(fmt.quantize(out), out)  # still values of the format, same scales
