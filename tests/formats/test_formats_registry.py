"""Format names, options, field layouts and errors."""

import pytest
import torch

from flipsafe import formats
from flipsafe.errors import ConfigError, FlipsafeError, UnknownNameError

CONCRETE = [n for n in formats.names() if "{" not in n] + [
    "float_e5m2", "float_e4m3fn", "float_e3m2fin", "float_e8m10", "fixed_q8.8", "fixed_q1.15",
    "bfp8", "bfp4", "bfp16"]


def test_names_cover_the_issue():
    names = formats.names()
    for n in ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "float_e{E}m{M}", "int8", "int4",
              "int8_channel", "fixed_q{I}.{F}", "bfp{M}", "mxfp8_e4m3", "mxfp8_e5m2",
              "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4_e2m1", "mxint8"]:
        assert n in names


@pytest.mark.parametrize("name", CONCRETE)
def test_every_element_bit_is_in_exactly_one_field(name):
    fmt = formats.get(name)
    positions = sorted(p for bits in fmt.fields.values() for p in bits)
    assert positions == list(range(fmt.bits))
    assert fmt.name == name
    block = fmt.block_size is not None
    assert bool(fmt.meta_fields) == (block or name.startswith("int") or name == "native")


@pytest.mark.parametrize("name", CONCRETE)
def test_canonical_is_the_one_spelling_get_uses(name):
    for spelling in (name, name.upper(), f"  {name.title()} "):
        assert formats.canonical(spelling) == name == formats.get(spelling).name


def test_canonical_refuses_unknown_names():
    with pytest.raises(UnknownNameError, match="fp16"):
        formats.canonical("fp17")
    with pytest.raises(UnknownNameError):
        formats.canonical(16)


def test_layouts():
    assert formats.get("fp32").fields == {"sign": (31,), "exponent": tuple(range(23, 31)),
                                          "mantissa": tuple(range(23))}
    mx = formats.get("mxfp4_e2m1")
    assert (mx.bits, mx.block_size, mx.meta_fields) == (4, 32, {"scale": 8})
    assert formats.get("mxint8").fields == {"sign": (7,), "magnitude": tuple(range(7))}
    assert formats.get("bfp6", block_size=8).block_size == 8
    assert formats.get("int8").meta_fields == {"scale": 32}
    assert formats.get("fp16").block_size is None and formats.get("fp16").meta_fields == {}


def test_calibrate_returns_self_without_a_scale():
    for name in ["fp16", "fp8_e4m3", "mxfp8_e4m3", "bfp8", "fixed_q4.4"]:
        fmt = formats.get(name)
        assert fmt.calibrate(3.0) is fmt
    int8 = formats.get("int8")
    assert int8.calibrate(3.0) is not int8 and int8.scale is None


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownNameError, match="unknown format 'fp12'.*mxfp4_e2m1"):
        formats.get("fp12")
    with pytest.raises(FlipsafeError, match="bfp\\{M\\}"):
        formats.get(None)


@pytest.mark.parametrize("name, message", [
    ("float_e4m0", "0 mantissa bits.*choose 1 to 23"),
    ("float_e1m3", "1 exponent bits.*choose 2 to 8"),
    ("float_e9m3", "choose 2 to 8"),
    ("float_e8m3fn", "choose 2 to 7"),
    ("float_e5m24", "choose 1 to 23"),
])
def test_impossible_float_parameters(name, message):
    with pytest.raises(ConfigError, match=message):
        formats.get(name)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="unknown option block; choose one of: saturate"):
        formats.get("fp16", block=3)
    with pytest.raises(ConfigError, match="takes no options"):
        formats.get("fixed_q4.4", saturate=True)
    with pytest.raises(ConfigError, match="True or False"):
        formats.get("fp8_e4m3", saturate="yes")
    assert formats.get("FP8_E4M3 ").name == "fp8_e4m3"


def test_generic_suffixes_choose_the_specials():
    x = torch.tensor([1e6, float("nan")])
    assert formats.get("float_e4m3").quantize(x)[0].item() == float("inf")
    assert formats.get("float_e4m3fn").quantize(x)[0].isnan()
    assert formats.get("float_e4m3fin").quantize(x).tolist() == [480.0, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(3, 100) * 10
    for name in ["fp16", "bf16", "fp8_e4m3", "float_e3m2fin", "int8_channel", "fixed_q4.4",
                 "bfp8", "mxfp8_e5m2", "mxint8"]:
        fmt = formats.get(name)
        enc, enc_gpu = fmt.encode(x), fmt.encode(x.cuda())
        assert torch.equal(enc.codes, enc_gpu.codes.cpu())
        assert torch.equal(fmt.decode(enc), fmt.decode(enc_gpu).cpu())
        flipped = formats.flip_bits(enc_gpu.codes, torch.tensor([0, 5], device="cuda"), 1)
        assert torch.equal(flipped.cpu(), formats.flip_bits(enc.codes, torch.tensor([0, 5]), 1))
