"""MX and BFP against a scalar reference of the OCP MX v1.0 conversion, and hand-worked flips."""

import itertools
import math

import numpy as np
import pytest
import torch
from fmt_reference import ELEMENTS, MXReference

from flipsafe import formats
from flipsafe.errors import ConfigError

NAN, INF = float("nan"), float("inf")


def block_inputs(seed: int) -> torch.Tensor:
    """Rows of blocks at many magnitudes: ordinary, tiny (subnormal), huge, all-zero, with
    ties on the element grid, and with NaN/inf; the last block is partial."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for exp in (-140, -130, -60, -8, -1, 0, 3, 40, 100, 126):
        rows.append(torch.randn(70, generator=g) * 2.0**exp)
    rows.append(torch.zeros(70))
    ties = torch.randint(-64, 64, (70,), generator=g) / 16 + 1 / 32  # halfway on a fine grid
    rows.append(ties)
    rows.append(torch.randint(-8, 8, (70,), generator=g) * 0.25 + 0.125)
    special = torch.randn(70, generator=g)
    special[3], special[40], special[69] = NAN, INF, -INF
    rows.append(special)
    spiky = torch.randn(70, generator=g) * 1e-3
    spiky[::9] = torch.randn(8, generator=g) * 1e3
    rows.append(spiky)
    return torch.stack(rows)


def tie_rows(ref: MXReference, block: int, seed: int) -> torch.Tensor:
    """Rows whose blocks hold exact midpoints between neighbouring element values (after
    scaling by X = 2**k), with the block maximum pinned so that the scale is 2**k."""
    rng = np.random.default_rng(seed)
    if ref.element[0] == "float":
        mags = [float(v) for v, _ in ref.grid]
        top = mags[-1]
        mids = [(a + b) / 2 for a, b in itertools.pairwise(mags)]
    else:
        step = 2.0 ** -(ref.bits - 2)
        top = 1.5
        mids = [(j + 0.5) * step for j in range(2 ** (ref.bits - 1) - 1)]
    rows = []
    for k in (-3, 0, 5):
        row = rng.choice(mids, 70) * rng.choice([-1.0, 1.0], 70)
        row[::block] = top  # one pinned maximum per block
        rows.append(row * 2.0**k)
    return torch.tensor(np.array(rows), dtype=torch.float32)


@pytest.mark.parametrize("name", ELEMENTS)
def test_round_trip_matches_the_scalar_reference(name):
    fmt = formats.get(name)
    ref = MXReference(ELEMENTS[name])
    x = torch.cat([block_inputs(len(name)), tie_rows(ref, fmt.block_size, len(name))])
    enc = fmt.encode(x)
    n_blocks = -(-x.shape[1] // fmt.block_size)
    assert enc.codes.shape == x.shape and enc.codes.dtype == torch.int32
    assert enc.meta[fmt.meta_name].shape == (x.shape[0], n_blocks)
    out = fmt.decode(enc)
    assert torch.equal(out.isnan(), fmt.quantize(x).isnan())
    assert torch.equal(out.nan_to_num(), fmt.quantize(x).nan_to_num())
    for r, row in enumerate(x.tolist()):
        for b in range(n_blocks):
            lo, hi = b * fmt.block_size, min((b + 1) * fmt.block_size, len(row))
            scale, codes, values = ref.block(row[lo:hi])
            assert enc.meta[fmt.meta_name][r, b].item() == scale, (r, b)
            assert enc.codes[r, lo:hi].tolist() == codes, (r, b)
            got = out[r, lo:hi].tolist()
            assert all(g == v or (math.isnan(g) and math.isnan(v)) for g, v in zip(got, values))


def test_mxfp8_e4m3_scale_and_its_flips_by_hand():
    fmt = formats.get("mxfp8_e4m3")
    x = torch.tensor([1.0, 0.5, -3.0] + [0.0] * 29)
    enc = fmt.encode(x)
    # max |V| = 3: floor(log2 3) = 1, emax(e4m3) = 8, so X = 2**(1 - 8) and the E8M0 code
    # is 127 - 7 = 120; the elements are V * 2**7: 128 = 0.1110.000, 64, -384 = 1.1111.100
    assert enc.meta["scale"].tolist() == [120]
    assert enc.codes[:3].tolist() == [0x70, 0x68, 0xFC]
    flipped = []
    for bit in (0, 3, 7):
        scale = formats.flip_bits(enc.meta["scale"], torch.tensor([0]), 1 << bit)
        flipped.append(fmt.decode(formats.Encoded(enc.codes, {"scale": scale}))[:3].tolist())
    # bit 0: code 121, X doubles; bit 3: code 112, X = 2**-15;
    # bit 7: code 248, X = 2**121: 128 * 2**121 = 2**128 overflows float32, 64 * 2**121 = 2**127
    assert flipped[0] == [2.0, 1.0, -6.0]
    assert flipped[1] == [2.0**-8, 2.0**-9, -3 * 2.0**-8]
    assert flipped[2] == [INF, 2.0**127, -INF]
    nan_scale = formats.force_bits(enc.meta["scale"], torch.tensor([0]), 0xFF, 1)
    assert fmt.decode(formats.Encoded(enc.codes, {"scale": nan_scale})).isnan().all()


def test_mxint8_and_bfp8_by_hand():
    # MXINT8: max 1.9999 -> shared exponent 0, X = 1; elements round(V * 64), clamped at 127
    enc = formats.get("mxint8").encode(torch.tensor([1.0, -0.75, 0.0078125, 1.9999]))
    assert enc.meta["scale"].tolist() == [127]
    assert enc.codes.tolist() == [0x40, 0xD0, 0, 0x7F]
    # BFP8 (block 16): max 3 -> exponent 1 (code 128); mantissas round(V / 2**(1 - 6))
    fmt = formats.get("bfp8")
    enc = fmt.encode(torch.tensor([3.0, 0.1, -1.0, 0.046875]))
    assert fmt.block_size == 16 and fmt.meta_fields == {"exponent": 8}
    assert enc.meta["exponent"].tolist() == [128]
    assert enc.codes.tolist() == [96, 3, 0xE0, 2]  # 3.2 -> 3; 1.5 -> 2 (even)
    assert fmt.decode(enc).tolist() == [3.0, 3 / 32, -1.0, 2 / 32]


def test_block_layout_options():
    fmt = formats.get("mxfp4_e2m1", block_size=4)
    x = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10)
    enc = fmt.encode(x)
    assert enc.meta["scale"].shape == (2, 3, 3) and enc.codes.shape == x.shape
    # a partial block is its own block: the last two values share one scale
    assert enc.meta["scale"][0, 0, 2].item() == 127 + math.floor(math.log2(9)) - 2
    one = formats.get("mxfp8_e5m2").encode(torch.tensor(5.0))
    assert one.codes.shape == () and one.meta["scale"].shape == (1,)
    assert formats.get("mxfp8_e5m2").decode(one).item() == 5.0
    empty = formats.get("mxint8").encode(torch.zeros(3, 0))
    assert empty.meta["scale"].shape == (3, 0)
    # blocks run along the last dimension only
    col = formats.get("mxint8").encode(torch.tensor([[1.0], [100.0]]))
    assert col.meta["scale"].tolist() == [[127], [133]]


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_impossible_block_size(size):
    with pytest.raises(ConfigError, match="block_size"):
        formats.get("mxfp8_e4m3", block_size=size)


@pytest.mark.parametrize("name", ["bfp0", "bfp1", "bfp25"])
def test_impossible_bfp_mantissa(name):
    with pytest.raises(ConfigError, match="choose 2 to 24"):
        formats.get(name)


def test_decode_checks_the_metadata():
    fmt = formats.get("mxfp6_e3m2")
    enc = fmt.encode(torch.randn(2, 64))
    with pytest.raises(ConfigError, match="meta\\['scale'\\]"):
        fmt.decode(formats.Encoded(enc.codes))
    with pytest.raises(ConfigError, match="need"):
        fmt.decode(formats.Encoded(enc.codes, {"scale": enc.meta["scale"][:, :1]}))


def test_meta_codes_above_eight_bits_are_ignored():
    fmt = formats.get("mxfp8_e4m3")
    enc = fmt.encode(torch.tensor([1.0, 2.0]))
    high = enc.meta["scale"] | 0x100
    assert torch.equal(fmt.decode(formats.Encoded(enc.codes, {"scale": high})), fmt.decode(enc))
    assert np.isnan(fmt.decode(formats.Encoded(enc.codes, {"scale": high | 0xFF})).numpy()).all()
