"""SECDED (72,64) and parity over packed weight codes, checked against brute force."""

import itertools

import numpy as np
import pytest
import torch

from flipsafe.errors import ConfigError
from flipsafe.protect import check_protection, word_cost
from flipsafe.protect.ecc import (
    CLEAN,
    CORRECTED,
    DETECTED,
    decode,
    ecc_classify,
    encode,
    pack,
    parity_classify,
)


def _codes(n, seed=0):
    """fp32 codes of random weights (int32 bit patterns, negative when the sign is set)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).view(torch.int32)


def test_pack_is_little_endian_element_order():
    codes = torch.tensor([0x11, -1, 0x7F], dtype=torch.int32)
    words = pack(codes, 32)
    assert [int(w) for w in words] == [0x11 | (0xFFFFFFFF << 32), 0x7F]
    words8 = pack(torch.arange(1, 10, dtype=torch.int32), 8)
    assert int(words8[0]) == sum(v << (8 * j) for j, v in enumerate(range(1, 9)))
    assert int(words8[1]) == 9
    assert int(pack(torch.tensor([-1], dtype=torch.int32), 16)[0]) == 0xFFFF


def test_check_bits_make_a_hamming_codeword():
    # Independent construction: 64 data bits at non-power-of-two positions 1..71, check
    # bit j at position 2**j; the XOR of the positions of all set bits is 0 and bit 7 makes
    # the parity of all 72 bits even.
    words = pack(_codes(12, seed=1), 32)
    check = encode(words)
    data_pos = [p for p in range(1, 72) if p & (p - 1)]
    for w, c in zip(words, check):
        w, c = int(w), int(c)
        ones = [data_pos[i] for i in range(64) if w >> i & 1]
        ones += [1 << j for j in range(7) if c >> j & 1]
        acc = 0
        for p in ones:
            acc ^= p
        assert acc == 0
        assert (len(ones) + (c >> 7)) % 2 == 0


def test_every_single_bit_flip_of_every_word_is_corrected():
    words = pack(_codes(6, seed=2), 32)
    check = encode(words)
    for w, c in zip(words, check):
        flipped = np.array([w ^ (np.uint64(1) << np.uint64(b)) for b in range(64)], np.uint64)
        out, status = decode(flipped, np.full(64, c, np.uint8))
        assert (status == CORRECTED).all()
        assert (out == w).all()
    out, status = decode(words, check)
    assert (status == CLEAN).all() and (out == words).all()


def test_every_double_bit_flip_within_a_word_is_detected_not_miscorrected():
    words = pack(_codes(4, seed=3), 32)
    check = encode(words)
    pairs = list(itertools.combinations(range(64), 2))
    assert len(pairs) == 2016
    for w, c in zip(words, check):
        flipped = np.array([w ^ (np.uint64(1) << np.uint64(a)) ^ (np.uint64(1) << np.uint64(b))
                            for a, b in pairs], np.uint64)
        _, status = decode(flipped, np.full(len(pairs), c, np.uint8))
        assert (status == DETECTED).all()


def test_a_triple_flip_can_be_miscorrected():
    # Data bits 0, 1, 4 sit at positions 3, 5, 9; 3 ^ 5 ^ 9 = 15 is the position of data
    # bit 10, so the decoder sees one error, flips bit 10 and hands back a wrong word.
    word = pack(_codes(2, seed=4), 32)[:1]
    bad = word ^ np.uint64(0b10011)
    out, status = decode(bad, encode(word))
    assert status[0] == CORRECTED
    assert int(out[0]) == int(word[0]) ^ 0b10000010011
    idx = torch.tensor([0])
    faulty = (_codes(2, seed=4)[:1] ^ 0b10011)
    corrected, detected = ecc_classify(_codes(2, seed=4), idx, faulty, 32)
    assert not corrected[0] and not detected[0]


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_every_single_bit_weight_fault_is_corrected_and_double_detected(bits):
    codes = _codes(5, seed=5) & ((1 << bits) - 1) if bits < 32 else _codes(5, seed=5)
    n = codes.numel()
    index = torch.arange(n).repeat_interleave(bits)
    masks = torch.tensor([1 << b for b in range(bits)] * n, dtype=torch.int64).to(torch.int32)
    faulty = codes[index] ^ masks
    corrected, detected = ecc_classify(codes, index, faulty, bits)
    assert corrected.all() and not detected.any()
    pairs = list(itertools.combinations(range(bits), 2))
    index2 = torch.arange(n).repeat_interleave(len(pairs))
    m2 = torch.tensor([(1 << a) | (1 << b) for a, b in pairs] * n, dtype=torch.int64)
    faulty2 = codes[index2] ^ m2.to(torch.int32)
    corrected2, detected2 = ecc_classify(codes, index2, faulty2, bits)
    assert detected2.all() and not corrected2.any()
    _, parity_single = parity_classify(codes, index, faulty, bits)
    _, parity_double = parity_classify(codes, index2, faulty2, bits)
    assert parity_single.all() and not parity_double.any()


def test_unchanged_code_is_neither_corrected_nor_detected():
    codes = _codes(3)
    c, d = ecc_classify(codes, torch.tensor([1]), codes[1:2], 32)
    assert not c[0] and not d[0]


def test_parity_detects_odd_counts_only():
    codes = _codes(4, seed=6)
    for k in range(1, 9):
        mask = (1 << k) - 1
        _, d = parity_classify(codes, torch.tensor([2]), codes[2:3] ^ mask, 32)
        assert bool(d[0]) == (k % 2 == 1)


def test_costs_and_bad_names():
    assert word_cost("ecc").memory_overhead == 8 / 64
    assert word_cost("parity").memory_overhead == 1 / 64
    with pytest.raises(ConfigError):
        check_protection("tmr2")
    with pytest.raises(ConfigError, match="weights"):
        check_protection("ecc", "activations")
    assert check_protection("ecc", "weights") == "ecc"


@pytest.mark.parametrize("bits", [4, 8, 16, 32])
def test_unpack_inverts_pack(bits):
    from flipsafe.protect.ecc import pack, unpack

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << min(bits, 31), (37,), generator=g, dtype=torch.int64)
    if bits == 32:  # 32-bit patterns are held as int32, the sign bit included
        codes = codes.to(torch.int32) | torch.tensor(-(1 << 31), dtype=torch.int32)
    back = unpack(pack(codes, bits), bits, codes.numel())
    assert back.dtype == torch.int32 and back.tolist() == codes.to(torch.int32).tolist()
