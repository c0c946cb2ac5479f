"""Bit primitives: flipping or forcing bit k changes exactly that bit, vectorised."""

import numpy as np
import pytest
import torch

from flipsafe import formats
from flipsafe.errors import ConfigError


def test_flipping_bit_k_changes_exactly_that_bit():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-(2**31), 2**31 - 1, (64, 50), dtype=torch.int32, generator=g)
    index = torch.randperm(codes.numel(), generator=g)[:32 * 40]
    bits = torch.arange(32).repeat(40)  # every bit position, many elements each
    out = formats.flip_bits(codes, index, formats.bit_mask(bits))
    assert out.shape == codes.shape and out.dtype == torch.int32
    diff = (out ^ codes).reshape(-1)
    assert diff[index].tolist() == [-(2**31) if b == 31 else 1 << b for b in bits.tolist()]
    untouched = torch.ones(codes.numel(), dtype=torch.bool)
    untouched[index] = False
    assert (diff[untouched] == 0).all()


def test_flip_returns_a_new_tensor_and_works_on_int64():
    codes = torch.tensor([5, 6, 7], dtype=torch.int64)
    out = formats.flip_bits(codes, torch.tensor([2]), torch.tensor([1 << 40]))
    assert codes.tolist() == [5, 6, 7] and out.tolist() == [5, 6, 7 + 2**40]
    # an int32 mask with bit 31 set means bit 31 of an int64 code, not bits 31..63
    bit31 = torch.tensor([-(2**31)], dtype=torch.int32)
    assert formats.flip_bits(codes, torch.tensor([0]), bit31).tolist() == [5 + 2**31, 6, 7]


def test_every_format_code_bit_flip_changes_one_bit_of_the_decoded_pattern():
    # For each format: encode, flip each bit of element 0, and check the code changed in
    # that bit alone (the value may change in any way the format dictates).
    x = torch.tensor([[0.7, -1.3, 2.0, 0.01] * 8])
    for name in ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "float_e2m1fin", "int8",
                 "int4", "fixed_q4.4", "bfp8", "mxfp6_e2m3", "mxint8"]:
        fmt = formats.get(name)
        enc = fmt.encode(x)
        for k in range(fmt.bits):
            out = formats.flip_bits(enc.codes, torch.tensor([0]), formats.bit_mask(k))
            diff = (out ^ enc.codes).reshape(-1)
            assert diff[0].item() == (-(2**31) if k == 31 else 1 << k) and not diff[1:].any()


def test_duplicates_apply_in_order():
    codes = torch.zeros(4, dtype=torch.int32)
    index = torch.tensor([1, 1, 2, 1, 3, 3])
    mask = torch.tensor([0b001, 0b010, 0b100, 0b001, 0b1, 0b1])
    # index 1: bit0 twice (cancels) and bit1 once; index 3: bit 0 twice (cancels)
    assert formats.flip_bits(codes, index, mask).tolist() == [0, 0b010, 0b100, 0]
    forced = formats.force_bits(torch.full((2,), 0b1111, dtype=torch.int32),
                                torch.tensor([0, 0, 1]), torch.tensor([0b0110, 0b0010, 0b1000]),
                                torch.tensor([0, 1, 0]))
    # index 0: clear bits 1-2, then set bit 1 again (later pair wins); index 1: clear bit 3
    assert forced.tolist() == [0b1011, 0b0111]


def test_force_bits_sets_and_clears():
    codes = torch.tensor([0b1010, 0b1010], dtype=torch.int32)
    assert formats.force_bits(codes, torch.tensor([0, 1]), 0b0110, 1).tolist() == [0b1110] * 2
    assert formats.force_bits(codes, torch.tensor([0, 1]), 0b0110, 0).tolist() == [0b1000] * 2
    assert formats.force_bits(codes, None, 0b0001, True).tolist() == [0b1011] * 2
    signs = formats.force_bits(codes, torch.tensor([1]), formats.bit_mask(31), 1)
    assert signs.tolist() == [0b1010, 0b1010 - 2**31]


def test_dense_masks_without_index():
    codes = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    out = formats.flip_bits(codes, None, torch.tensor([1, 0, 2, 0, 4, 8]))
    assert out.tolist() == [[1, 1, 0], [3, 0, 13]]
    assert formats.flip_bits(codes, None, 1).tolist() == [[1, 0, 3], [2, 5, 4]]


def test_metadata_codes_take_the_same_primitives():
    fmt = formats.get("mxint8")
    enc = fmt.encode(torch.ones(2, 64))
    scale = formats.force_bits(enc.meta["scale"], torch.tensor([3]), 0xFF, 0)  # X = 2**-127
    out = fmt.decode(formats.Encoded(enc.codes, {"scale": scale}))
    assert out[1, 32:].tolist() == [2.0**-127] * 32 and out[:, :32].eq(1).all()


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(3), torch.tensor([0]), 1), "integer code tensor"),
    ((torch.zeros(3, dtype=torch.int32), torch.tensor([3]), 1), "out of range"),
    ((torch.zeros(3, dtype=torch.int32), torch.tensor([0.0]), 1), "flat positions"),
    ((torch.zeros(3, dtype=torch.int32), torch.tensor([0]), 0.5), "integer tensor"),
    ((torch.zeros(3, dtype=torch.int32), torch.tensor([0]), 2**32), r"\[0, 2\*\*32\)"),
    ((torch.zeros(3, dtype=torch.int32), torch.tensor([0, 1]), torch.tensor([1, 2, 3])),
     "one per index"),
])
def test_bad_requests(args, message):
    with pytest.raises(ConfigError, match=message):
        formats.flip_bits(*args)


def test_force_value_must_be_a_bit():
    with pytest.raises(ConfigError, match="0 or 1"):
        formats.force_bits(torch.zeros(2, dtype=torch.int32), torch.tensor([0]), 1, 2)


def test_bit_mask():
    assert formats.bit_mask([0, 3, 31, 63]).tolist() == [1, 8, 2**31, -(2**63)]
    with pytest.raises(ConfigError, match="0..63"):
        formats.bit_mask([64])


def brute_force(codes, masks, flips, values, width):
    """Bit by bit in NumPy: each masked bit flipped, or copied from the value."""
    codes = np.asarray(codes).astype(np.int64)
    masks, values = np.asarray(masks).astype(np.int64), np.asarray(values).astype(np.int64)
    out = codes.copy()
    for b in range(width):
        bit = np.int64(1) << np.int64(b) if b < 63 else np.int64(-(2**63))
        hit = (masks & bit) != 0
        old = (codes & bit) != 0
        new = np.where(np.asarray(flips), ~old, (values & bit) != 0)
        out = np.where(hit & (new != old), out ^ bit, out)
    return out


@pytest.mark.parametrize("dtype,width", [(torch.int32, 32), (torch.int64, 64)])
def test_write_bits_matches_a_numpy_brute_force(dtype, width):
    g = torch.Generator().manual_seed(width)
    n = 500
    codes = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64).to(dtype)
    masks = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64)
    masks[:100] &= torch.randint(0, 2, (100,), generator=g) << torch.randint(
        width, (100,), generator=g)  # single bits, the top one included
    values = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64)
    flips = torch.rand(n, generator=g) < 0.5
    got = formats.write_bits(codes, masks, flips, values)
    # The primitive sees masks and values as codes' dtype (int64 -> int32 wraps).
    m, v = masks.to(dtype).numpy(), values.to(dtype).numpy()
    want = brute_force(codes.numpy(), m, flips.numpy(), v, width)
    assert got.dtype == dtype
    assert np.array_equal(got.numpy().astype(np.int64), want.astype(dtype_np(dtype)))
    assert torch.equal(formats.write_bits(codes, masks, True), formats.write_bits(
        codes, masks, torch.ones(n, dtype=torch.bool), values))
    idx = torch.arange(n)
    assert torch.equal(formats.flip_bits(codes, idx, masks & 0xFFFFFFFF if width == 32 else masks),
                       torch.from_numpy(brute_force(codes.numpy(), m, True, v, width)
                                        .astype(dtype_np(dtype))))
    ones = torch.from_numpy(brute_force(codes.numpy(), m, False, -1, width).astype(dtype_np(dtype)))
    zeros = torch.from_numpy(brute_force(codes.numpy(), m, False, 0, width).astype(dtype_np(dtype)))
    m_ok = masks & 0xFFFFFFFF if width == 32 else masks
    assert torch.equal(formats.force_bits(codes, idx, m_ok, 1), ones)
    assert torch.equal(formats.force_bits(codes, idx, m_ok, 0), zeros)


def dtype_np(dtype):
    return np.int32 if dtype == torch.int32 else np.int64
