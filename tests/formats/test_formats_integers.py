"""Scaled integers and fixed point against hand-computed two's-complement codes."""

import numpy as np
import pytest
import torch

from flipsafe import formats
from flipsafe.errors import ConfigError

NAN, INF = float("nan"), float("inf")


def scale_bits(value: float) -> int:
    return int(np.array(value, np.float32).view(np.int32))


def test_int8_calibrated_codes_by_hand():
    fmt = formats.get("int8").calibrate(127.0)  # scale exactly 1.0
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -3.7, 200.0, -200.0, INF, NAN, -128.0])
    enc = fmt.encode(x)
    # ties to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; -4 = 0xFC; saturation at +-127 (0x7F, 0x81)
    assert enc.codes.tolist() == [0, 2, 2, 0, 0xFC, 0x7F, 0x81, 0x7F, 0, 0x81]
    assert enc.meta["scale"].tolist() == scale_bits(1.0)
    assert fmt.decode(enc).tolist() == [0, 2, 2, 0, -4, 127, -127, 127, 0, -127]
    assert torch.equal(fmt.quantize(x), fmt.decode(enc))


def test_int4_calibrated_codes_by_hand():
    fmt = formats.get("int4", amax=7.0)  # scale 1.0, codes -7..7 in 4 bits
    enc = fmt.encode(torch.tensor([3.5, -3.5, 7.4, -9.0, -1.0, 0.0]))
    assert enc.codes.tolist() == [0x4, 0xC, 0x7, 0x9, 0xF, 0x0]
    assert fmt.fields == {"sign": (3,), "magnitude": (0, 1, 2)}


def test_int8_scale_from_the_tensor_max():
    x = torch.tensor([-4.0, 1.0, 3.0, 0.0])
    enc = formats.get("int8").encode(x)
    scale = np.float32(4.0) / np.float32(127)
    assert enc.meta["scale"].item() == scale_bits(scale)
    # 1 / (4/127) = 31.75 -> 32; 3 / (4/127) = 95.25 -> 95; -4 -> -127 = 0x81
    assert enc.codes.tolist() == [0x81, 32, 95, 0]
    expected = (np.array([-127, 32, 95, 0], np.float32) * scale).tolist()
    assert formats.get("int8").decode(enc).tolist() == expected


def test_all_zero_and_non_finite_tensors():
    fmt = formats.get("int8")
    assert fmt.encode(torch.zeros(5)).meta["scale"].item() == scale_bits(1.0)
    enc = fmt.encode(torch.tensor([INF, 2.54, NAN, -INF]))  # scale from finite values only
    assert enc.meta["scale"].item() == scale_bits(np.float32(2.54) / np.float32(127))
    assert enc.codes.tolist() == [0x7F, 0x7F, 0, 0x81]


def test_int8_channel_scales_follow_dim0():
    x = torch.tensor([[1.0, -0.5, 0.25], [2.0, 1.0, -2.0]])
    enc = formats.get("int8_channel").encode(x)
    s0, s1 = np.float32(1) / np.float32(127), np.float32(2) / np.float32(127)
    assert enc.meta["scale"].tolist() == [scale_bits(s0), scale_bits(s1)]
    # row 0: 127, -63.5 -> -64 (even), 31.75 -> 32; row 1: 127, 63.5 -> 64, -127
    assert enc.codes.tolist() == [[0x7F, 0xC0, 32], [0x7F, 64, 0x81]]


def test_int8_channel_calibration_per_channel():
    fmt = formats.get("int8_channel").calibrate(torch.tensor([127.0, 254.0]))  # scales 1, 2
    x = torch.tensor([[1.4, -2.6], [3.0, -500.0]])
    enc = fmt.encode(x)
    assert enc.codes.tolist() == [[1, 0xFD], [2, 0x81]]  # 1.5 -> 2 (even); saturated -127
    assert fmt.decode(enc).tolist() == [[1.0, -3.0], [4.0, -254.0]]
    assert fmt.calibrate(127.0).encode(x).codes.tolist() == [[1, 0xFD], [3, 0x81]]
    with pytest.raises(ConfigError, match="calibrated for 2 channels"):
        fmt.encode(torch.zeros(3, 2))


def test_flipping_a_scale_bit_rescales_the_tensor():
    fmt = formats.get("int8").calibrate(127.0)
    enc = fmt.encode(torch.tensor([3.0, -5.0]))
    # 1.0f = 0x3F800000; bit 23 is the exponent's lowest bit: 0x3F000000 = 0.5
    enc.meta["scale"] = formats.flip_bits(enc.meta["scale"], torch.tensor([0]), 1 << 23)
    assert fmt.decode(enc).tolist() == [1.5, -2.5]


@pytest.mark.parametrize("amax", [0.0, -1.0, float("nan"), float("inf")])
def test_impossible_calibration(amax):
    with pytest.raises(ConfigError, match="finite and > 0"):
        formats.get("int8").calibrate(amax)


def test_calibration_shape_is_checked():
    with pytest.raises(ConfigError, match="a scalar"):
        formats.get("int8").calibrate(torch.ones(3))


def test_fixed_q4_4_codes_by_hand():
    fmt = formats.get("fixed_q4.4")  # 8 bits, step 1/16, range [-8, 7.9375]
    x = torch.tensor([1.03125, 1.09375, -1.0, 7.9375, 100.0, -100.0, -8.0, NAN, 0.03125,
                      0.09375, INF])
    enc = fmt.encode(x)
    # 16.5 -> 16 and 17.5 -> 18 (ties to even); -16 = 0xF0; saturation 0x7F / 0x80
    assert enc.codes.tolist() == [0x10, 0x12, 0xF0, 0x7F, 0x7F, 0x80, 0x80, 0, 0, 2, 0x7F]
    assert fmt.decode(enc).tolist() == [1.0, 1.125, -1.0, 7.9375, 7.9375, -8.0, -8.0, 0.0,
                                        0.0, 0.125, 7.9375]
    assert torch.equal(fmt.quantize(x), fmt.decode(enc))
    assert fmt.bits == 8 and fmt.fields["sign"] == (7,)


def test_fixed_q1_7_and_q16_16():
    q17 = formats.get("fixed_q1.7")
    assert q17.encode(torch.tensor([0.5, -1.0, 1.0, -0.0078125])).codes.tolist() == [
        0x40, 0x80, 0x7F, 0xFF]
    q16 = formats.get("fixed_q16.16")  # 32-bit: codes are the int32 itself
    enc = q16.encode(torch.tensor([-1.5, 1e6, -1e6, 2.0**-16]))
    assert enc.codes.tolist() == [-98304, 2**31 - 1, -(2**31), 1]
    # 2**31 - 1 has 31 significant bits; float32 rounds (2**31 - 1) / 2**16 to 32768.
    assert q16.decode(enc).tolist() == [-1.5, 32768.0, -32768.0, 2.0**-16]


@pytest.mark.parametrize("name", ["fixed_q0.8", "fixed_q20.20", "fixed_q1.40"])
def test_impossible_fixed_point(name):
    with pytest.raises(ConfigError, match="I >= 1"):
        formats.get(name)


def test_decode_needs_the_scale():
    with pytest.raises(ConfigError, match="scale"):
        formats.get("int8").decode(formats.Encoded(torch.zeros(3, dtype=torch.int32)))
