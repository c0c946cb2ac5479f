"""Float formats against ml_dtypes: every code, a million-plus casts, and hand-worked flips."""

import copy
import itertools
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from fmt_reference import float_grid, nearest_even

from flipsafe import formats
from flipsafe.errors import ConfigError

# ml_dtypes warns when a reference cast overflows or meets NaN; that is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in cast:RuntimeWarning")

# flipsafe name -> the ml_dtypes type with the same semantics
REFERENCE = {
    "fp16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "float_e4m3": ml_dtypes.float8_e4m3,
    "float_e3m4": ml_dtypes.float8_e3m4,
    "float_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float_e2m3fin": ml_dtypes.float6_e2m3fn,
    "float_e3m2fin": ml_dtypes.float6_e3m2fn,
    "float_e2m1fin": ml_dtypes.float4_e2m1fn,
}
FINITE = {"float_e2m3fin", "float_e3m2fin", "float_e2m1fin"}


def bit_generic(fmt):
    """The same format forced onto the bit-trick path (fp16/bf16 normally use torch casts)."""
    out = copy.copy(fmt)
    out._native = None
    return out


def codes_of(ref_values: np.ndarray) -> np.ndarray:
    width = ref_values.dtype.itemsize
    return ref_values.view(np.uint16 if width == 2 else np.uint8).astype(np.int64)


def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise equal float32, or both NaN."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a.view(np.int32) == b.view(np.int32)) | (np.isnan(a) & np.isnan(b))


def edge_inputs(dtype) -> np.ndarray:
    """Every representable value, the midpoints between neighbours (ties) and one float32
    ulp either side of them, beyond the largest value, and float32 specials/subnormals."""
    width = np.dtype(dtype).itemsize * 8
    codes = np.arange(2**width, dtype=np.uint16 if width == 16 else np.uint8)
    vals = codes.view(dtype).astype(np.float32)
    pos = np.unique(vals[np.isfinite(vals) & (vals >= 0)]).astype(np.float64)
    step = np.diff(pos)
    mids = (pos[:-1] + step / 2).astype(np.float32)  # exact: a float32 holds every midpoint
    top = pos[-1] + np.concatenate([[0.25, 0.5, 0.75, 1.0, 2.0]]) * step[-1]
    pts = np.concatenate([pos.astype(np.float32), mids, top.astype(np.float32)])
    near = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)),
                           np.nextafter(pts, np.float32(0))])
    specials = np.array([0.0, np.inf, np.nan, 1e-45, 1.1754942e-38, 1.1754944e-38,
                         3.4028235e38, 1e38, 65504, 65520, 65519.996], np.float32)
    out = np.concatenate([near, specials])
    return np.concatenate([out, -out]).astype(np.float32)


def random_inputs(n: int, seed: int) -> np.ndarray:
    """Random float32 bit patterns (every exponent, NaN payloads, subnormals) plus values
    on the scale where small formats round."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, n // 2, dtype=np.uint64).astype(np.uint32).view(np.float32)
    scaled = (rng.standard_normal(n // 2) * 2.0 ** rng.integers(-20, 20, n // 2))
    return np.concatenate([bits, scaled.astype(np.float32)])


@pytest.mark.parametrize("name", REFERENCE)
def test_every_code_decodes_as_ml_dtypes(name):
    fmt, dtype = formats.get(name), REFERENCE[name]
    n = 2**fmt.bits
    codes = torch.arange(n, dtype=torch.int32)
    ours = fmt.decode(formats.Encoded(codes)).numpy()
    ref = np.arange(n).astype(np.uint16 if fmt.bits == 16 else np.uint8).view(dtype)
    assert same(ours, ref).all()
    ours_generic = bit_generic(fmt).decode(formats.Encoded(codes)).numpy()
    assert same(ours_generic, ref).all()


@pytest.mark.parametrize("name", REFERENCE)
def test_quantize_and_encode_match_ml_dtypes_casts(name):
    fmt, dtype = formats.get(name), REFERENCE[name]
    x = np.concatenate([random_inputs(1_000_000, seed=len(name)), edge_inputs(dtype)])
    assert len(x) > 1_000_000
    ref = x.astype(dtype)
    ref_values = ref.astype(np.float32)
    if name in FINITE:
        # ml_dtypes turns NaN into a zero of the opposite sign; flipsafe keeps the sign.
        nan = np.isnan(x)
        ref_values[nan] = np.copysign(np.float32(0), x[nan])
    for f in (fmt, bit_generic(fmt)):
        xt = torch.from_numpy(x)
        q = f.quantize(xt).numpy()
        assert same(q, ref_values).all(), x[~same(q, ref_values)][:10]
        enc = f.encode(xt)
        codes = enc.codes.numpy()
        keep = ~np.isnan(ref_values) & ~np.isnan(x)
        assert (codes[keep] == codes_of(ref)[keep]).all()
        assert same(f.decode(enc).numpy(), q).all()


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp16", "bf16", "float_e3m4"])
def test_saturate_clamps_to_max_and_keeps_nan(name):
    fmt = formats.get(name, saturate=True)
    dtype = REFERENCE[name]
    top = float(ml_dtypes.finfo(dtype).max)
    x = np.concatenate([random_inputs(200_000, seed=7), edge_inputs(dtype)])
    # Saturating rounding = rounding the input clipped to ±max (inf clips too, NaN stays).
    ref = np.clip(x, -top, top).astype(dtype).astype(np.float32)
    q = fmt.quantize(torch.from_numpy(x)).numpy()
    assert same(q, ref).all()
    assert q[np.isinf(x)].tolist() == [top if v > 0 else -top for v in x[np.isinf(x)]]


def test_overflow_conventions_hand_checked():
    x = torch.tensor([464.0, 465.0, 1e9, float("inf"), -float("inf"), 57344.0, 61440.0])
    # e4m3: 464 is the tie between 448 and the NaN slot 480 and goes to even (448).
    e4m3 = formats.get("fp8_e4m3").quantize(x).tolist()
    assert e4m3[:1] == [448.0] and all(np.isnan(e4m3[1:5]))
    assert formats.get("fp8_e4m3", saturate=True).quantize(x).tolist()[:5] == [
        448.0, 448.0, 448.0, 448.0, -448.0]
    # e5m2: max 57344; 61440 is the tie with 65536 and rounds to even (infinity).
    assert formats.get("fp8_e5m2").quantize(x).tolist()[5:] == [57344.0, float("inf")]
    assert formats.get("fp8_e5m2", saturate=True).quantize(x).tolist()[5:] == [57344.0] * 2


def test_fp32_is_identity_and_codes_are_the_bit_pattern():
    x = torch.tensor([0.15625, -2.5, 0.0, -0.0, float("inf"), 1e-45])
    fmt = formats.get("fp32")
    assert torch.equal(fmt.quantize(x).view(torch.int32), x.view(torch.int32))
    enc = fmt.encode(x)
    assert enc.codes.dtype == torch.int32 and enc.meta == {}
    assert enc.codes.tolist() == [0x3E200000, -0x3FE00000, 0, -(2**31), 0x7F800000, 1]
    assert torch.equal(fmt.decode(enc).view(torch.int32), x.view(torch.int32))


def test_flipping_the_top_exponent_bit_of_fp32_by_hand():
    fmt = formats.get("fp32")
    # 0.15625 = 1.25 * 2**-3: biased exponent 124 = 0b01111100 -> 252 = 0b11111100.
    # 3.0 = 1.5 * 2**1: biased exponent 128 = 0b10000000 -> 0, a subnormal 0.5 * 2**-126.
    # -1.0: biased exponent 127 = 0b01111111 -> 255 with mantissa 0, so -inf.
    enc = fmt.encode(torch.tensor([0.15625, 3.0, -1.0]))
    top = formats.bit_mask(fmt.fields["exponent"][-1])
    assert fmt.fields["exponent"][-1] == 30
    enc.codes = formats.flip_bits(enc.codes, torch.arange(3), top)
    assert fmt.decode(enc).tolist() == [1.25 * 2.0**125, 0.5 * 2.0**-126, -float("inf")]
    assert 1.25 * 2.0**125 == pytest.approx(5.3169119831396635e37, rel=1e-15)


def test_small_format_flips_by_hand():
    # fp8_e4m3 448 = S.1111.110: flipping mantissa bit 0 gives the NaN pattern S.1111.111.
    e4m3 = formats.get("fp8_e4m3")
    enc = e4m3.encode(torch.tensor([448.0, 1.0]))
    assert enc.codes.tolist() == [0x7E, 0x38]
    enc.codes = formats.flip_bits(enc.codes, torch.tensor([0, 1]), torch.tensor([1, 0x40]))
    # 1.0 = 0.0111.000; flipping exponent bit 6 gives 0.1111.000 = 2**(15 - 7) = 256.
    out = e4m3.decode(enc).tolist()
    assert np.isnan(out[0]) and out[1] == 256.0
    # fp16 1.0 = 0x3C00; flipping bit 14 gives 0x7C00 = inf; bit 15 gives -1.
    fp16 = formats.get("fp16")
    enc = fp16.encode(torch.tensor([1.0, 1.0]))
    enc.codes = formats.flip_bits(enc.codes, torch.tensor([0, 1]), torch.tensor([1 << 14, 1 << 15]))
    assert fp16.decode(enc).tolist() == [float("inf"), -1.0]


def test_generic_formats_describe_their_bits():
    fmt = formats.get("float_e3m2fin")
    assert fmt.bits == 6 and fmt.max == 28.0 and fmt.min_subnormal == 0.0625
    assert fmt.fields == {"sign": (5,), "exponent": (2, 3, 4), "mantissa": (0, 1)}
    assert formats.get("fp8_e4m3").max == 448.0 and formats.get("fp8_e5m2").max == 57344.0
    assert formats.get("bf16").fields["exponent"] == tuple(range(7, 15))


def test_half_precision_inputs_are_accepted_exactly():
    x = torch.tensor([0.1, -3.3, 1e-6], dtype=torch.float16)
    fmt = formats.get("fp8_e5m2")
    assert torch.equal(fmt.quantize(x), fmt.quantize(x.float()))


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.float64),
                                 torch.zeros(3, dtype=torch.int32), [1.0, 2.0]])
def test_wrong_input_dtype_names_the_choices(bad):
    fmt = formats.get("fp8_e4m3")
    for op in (fmt.quantize, fmt.encode):
        with pytest.raises(ConfigError, match="float32, float16, bfloat16"):
            op(bad)


def test_decode_refuses_float_codes():
    with pytest.raises(ConfigError, match="int32, int64"):
        formats.get("fp16").decode(formats.Encoded(torch.zeros(3)))


@pytest.mark.parametrize("name, e, m, specials", [
    ("float_e2m2", 2, 2, "ieee"), ("float_e3m3fn", 3, 3, "fn"), ("float_e5m3fin", 5, 3, "finite"),
    ("float_e6m1", 6, 1, "ieee"), ("float_e4m6fin", 4, 6, "finite"), ("float_e7m2fn", 7, 2, "fn"),
])
def test_generic_formats_match_a_scalar_reference(name, e, m, specials):
    grid = float_grid(e, m, specials)
    mags = [float(v) for v, _ in grid]
    rng = np.random.default_rng(e * 10 + m)
    mids = [(a + b) / 2 for a, b in itertools.pairwise(mags)]
    x = np.concatenate([mags, mids, rng.uniform(0, mags[-1], 3000),
                        mags[-1] * 2.0 ** -rng.uniform(0, 2 ** (e - 1) + m + 2, 3000)])
    x = np.concatenate([x, -x]).astype(np.float32)
    fmt = formats.get(name)
    enc = fmt.encode(torch.from_numpy(x))
    sign = 1 << (fmt.bits - 1)
    for v, code in zip(x.tolist(), enc.codes.tolist(), strict=True):
        _, ref = nearest_even(grid, abs(Fraction(v)))
        assert code == ref | (sign if np.signbit(v) else 0), (v, code, ref)
    assert same(fmt.decode(enc).numpy(), fmt.quantize(torch.from_numpy(x)).numpy()).all()
