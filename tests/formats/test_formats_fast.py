"""The MX fast quantiser (BlockFormat.fast_quantizer) against the encode/decode path, the
scalar OCP MX reference and ml_dtypes, bit for bit."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from fmt_reference import ELEMENTS, MXReference

from flipsafe import formats

MX_FLOATS = {k: v for k, v in ELEMENTS.items() if k.startswith("mx") and v[0] == "float"}
# The element types ml_dtypes has (their casts round to nearest even, like OCP MX).
ML_DTYPES = {
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
    "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
    "mxfp4_e2m1": ml_dtypes.float4_e2m1fn,
}
NAN, INF = float("nan"), float("inf")


def bits(t):
    return t.contiguous().view(torch.int32)


def hard_inputs(shape, seed):
    """Blocks at exponents from float32 subnormal to near overflow (shared scale codes 0
    and 1 included), with zero blocks, signed zeros, ±inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-150, 125, (*shape[:-1], 1), generator=g).float())
    x = torch.randn(*shape, generator=g) * scale
    flat = x.view(-1)
    flat[::17] = 0.0
    flat[1::23] = -0.0
    rows = x.view(-1, shape[-1])
    if shape[-1] >= 32 and rows.shape[0] > 2:
        rows[1, :32] = 0.0  # a whole zero block
        rows[-1, :32] = torch.randn(32, generator=g) * 1e-41  # float32 subnormals
    if flat.numel() > 8:
        flat[5] = NAN
        flat[-3] = -INF
        flat[len(flat) // 2] = INF
    return x


@pytest.mark.parametrize("name", MX_FLOATS)
def test_fast_quantizer_is_the_shortcut_and_equals_encode_decode(name):
    fmt = formats.get(name)
    fast = fmt.fast_quantizer()
    assert getattr(fast, "__self__", None) is not fmt  # the shortcut, not fmt.quantize
    for i, shape in enumerate([(40, 64), (7, 3, 32), (5, 16), (9, 4), (2, 3, 96), (6, 48),
                               (1,), (3, 31)]):
        x = hard_inputs(shape, i)
        want = fmt.decode(fmt.encode(x))
        assert torch.equal(bits(fast(x)), bits(want)), shape
    half = hard_inputs((4, 64), 9).to(torch.bfloat16)
    assert torch.equal(bits(fast(half)), bits(fmt.decode(fmt.encode(half))))


@pytest.mark.parametrize("name", MX_FLOATS)
def test_fast_quantizer_matches_the_scalar_reference(name):
    fmt = formats.get(name)
    fast = fmt.fast_quantizer()
    ref = MXReference(MX_FLOATS[name])
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(64, generator=g) * 2.0**e for e in (-149, -140, -127, -120, -3, 0, 60)]
    rows.append(torch.zeros(64))
    special = torch.randn(64, generator=g)
    special[2], special[40] = NAN, -INF  # one bad value per block: both blocks all NaN
    rows.append(special)
    x = torch.stack(rows)
    got = fast(x)
    for r, row in enumerate(x.tolist()):
        for lo in range(0, 64, 32):
            _, _, values = ref.block(row[lo:lo + 32])
            out = got[r, lo:lo + 32].tolist()
            assert all(o == v or (math.isnan(o) and math.isnan(v)) for o, v in zip(out, values)), \
                (r, lo)
    assert got[-1].isnan().all()  # NaN/inf blocks decode to NaN throughout


@pytest.mark.parametrize("name", MX_FLOATS)
@pytest.mark.parametrize("k", [-126, -20, 0, 30])
def test_fast_quantizer_matches_ml_dtypes_under_a_pinned_scale(name, k):
    """A block whose maximum is pinned to the element's largest value has scale X = 2**k;
    every element is then X times the ml_dtypes cast of V / X (nothing overflows)."""
    fmt = formats.get(name)
    dtype = ML_DTYPES[name]
    top = float(ml_dtypes.finfo(dtype).max)
    rng = np.random.default_rng(abs(k) + len(name))
    y = (rng.uniform(-top, top, (8, 64)) * rng.choice([1.0, 2.0**-3, 2.0**-9], (8, 64)))
    y = y.astype(np.float32)
    y[:, ::32] = top  # the pinned maximum of each block
    y[0, 1:5] = [0.0, -0.0, top / 2, -top]
    want = y.astype(dtype).astype(np.float32) * np.float32(2.0**k)
    x = torch.from_numpy(y) * 2.0**k
    got = fmt.fast_quantizer()(x)
    assert torch.equal(bits(got), bits(torch.from_numpy(want)))


def test_shortcut_is_refused_when_it_would_differ():
    class Skewed(formats.BlockFormat):
        def quantize(self, x):
            return super().quantize(x) * 1.0000001  # not what the shortcut computes

    ref = formats.get("mxfp8_e4m3")
    fmt = Skewed(ref.name, ref.element, ref.block_size, ref.meta_name)
    assert getattr(fmt.fast_quantizer(), "__self__", None) is fmt


@pytest.mark.parametrize("name", ["mxint8", "bfp8", "bf16", "fp8_e4m3", "int8", "fixed_q4.4"])
def test_other_formats_quantize_as_they_are(name):
    fmt = formats.get(name)
    assert fmt.fast_quantizer() == fmt.quantize
