"""Fault models: bit masks, op codes and replacement values, checked bit by bit."""

import itertools
import math

import numpy as np
import pytest
import torch

from flipsafe import formats
from flipsafe.errors import ConfigError, FlipsafeError, UnknownNameError
from flipsafe.faults import (
    FAULT_MODELS,
    FLIP,
    RANDOM,
    SET0,
    SET1,
    ZERO,
    apply,
    bits_mask,
    draw,
    every_fault,
    mask_bits,
    parse,
    positions,
    stratum_size,
)

FORMATS = ["fp32", "bf16", "fp8_e4m3", "int8", "mxfp8_e4m3"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("model", [*FAULT_MODELS, "bitflip3", "burst4"])
def test_masks_have_the_right_bits(fmt_name, model):
    fmt = formats.get(fmt_name)
    d = draw(model, fmt, 400, generator=gen(1))
    allowed = set(range(fmt.bits))
    for bits, op, value, mask in zip(mask_bits(d.mask), d.op.tolist(), d.value.tolist(),
                                     d.mask.tolist()):
        assert set(bits) <= allowed
        if model in ("random", "zero"):
            assert bits == sorted(allowed)
        elif model.startswith("burst"):
            k = int(model[5:])
            assert bits == list(range(bits[0], bits[0] + k))
        else:
            assert len(bits) == (int(model[7:]) if model[7:].isdigit() else 1)
        assert op == {"stuck0": SET0, "stuck1": SET1, "random": RANDOM,
                      "zero": ZERO}.get(model, FLIP)
        assert value & ~mask == 0
        if model == "stuck1":
            assert value == mask
        elif model != "random":
            assert value == 0


def test_field_restriction_and_metadata_bits():
    fp32 = formats.get("fp32")
    d = draw("bitflip", fp32, 2000, field="exponent", generator=gen())
    assert {b for row in mask_bits(d.mask) for b in row} == set(range(23, 31))
    d = draw("bitflip2", fp32, 500, field=["sign", "exponent"], generator=gen())
    assert all(set(r) <= set(range(23, 32)) for r in mask_bits(d.mask))
    mx = formats.get("mxfp8_e4m3")
    d = draw("bitflip", mx, 1000, meta=True, generator=gen())
    assert {b for row in mask_bits(d.mask) for b in row} == set(range(8))
    assert positions(formats.get("int8"), meta=True) == list(range(32))
    with pytest.raises(ConfigError, match="no metadata"):
        draw("bitflip", fp32, 3, meta=True)
    with pytest.raises(UnknownNameError, match="exponent, mantissa"):
        draw("bitflip", fp32, 3, field="fraction")
    with pytest.raises(ConfigError, match="adjacent"):  # 8 bits allowed, but not in a row
        draw("burst8", formats.get("bf16"), 3, field=["sign", "mantissa"])
    with pytest.raises(ConfigError, match=r"only 1 is allowed .*choose at most 1 bit$"):
        draw("bitflip2", fp32, 3, field="sign")


def test_single_bit_flips_are_uniform_over_bits():
    d = draw("bitflip", formats.get("fp32"), 64000, generator=gen(2))
    counts = torch.bincount(torch.log2(d.mask.double()).long(), minlength=32)
    assert int(counts.min()) > 1700 and int(counts.max()) < 2300  # 2000 expected, sd ~44


def test_same_seed_same_faults_other_seed_other_faults():
    fmt = formats.get("bf16")
    for model in FAULT_MODELS:
        a, b = draw(model, fmt, 50, generator=gen(7)), draw(model, fmt, 50, generator=gen(7))
        assert torch.equal(a.mask, b.mask) and torch.equal(a.value, b.value)
    a, c = draw("random", fmt, 50, generator=gen(7)), draw("random", fmt, 50, generator=gen(8))
    assert not torch.equal(a.value, c.value)


def test_apply_matches_the_format_bit_primitives():
    g = gen(3)
    codes = torch.randint(-2**31, 2**31 - 1, (300,), generator=g, dtype=torch.int64)
    codes = codes.to(torch.int32)
    mask = torch.ones(300, dtype=torch.int64) << torch.randint(32, (300,), generator=g)
    mask |= torch.ones(300, dtype=torch.int64) << torch.randint(32, (300,), generator=g)
    idx = torch.arange(300)
    flip = apply(codes, mask, torch.full((300,), FLIP))
    assert torch.equal(flip, formats.flip_bits(codes, idx, mask))
    assert torch.equal(apply(codes, mask, torch.full((300,), SET1)),
                       formats.force_bits(codes, idx, mask, 1))
    assert torch.equal(apply(codes, mask, torch.full((300,), SET0)),
                       formats.force_bits(codes, idx, mask, 0))


def test_apply_random_and_zero_by_python_ints():
    g = gen(4)
    codes = torch.randint(0, 256, (200,), generator=g, dtype=torch.int32)
    mask = torch.randint(0, 256, (200,), generator=g)
    value = torch.randint(0, 256, (200,), generator=g)
    ops = torch.randint(0, 5, (200,), generator=g)
    got = apply(codes, mask, ops, value).tolist()
    for c, m, v, o, r in zip(codes.tolist(), mask.tolist(), value.tolist(), ops.tolist(), got):
        want = {FLIP: c ^ m, SET0: c & ~m, SET1: c | m, RANDOM: (c & ~m) | (v & m),
                ZERO: c & ~m}[o]
        assert r == want


@pytest.mark.parametrize("dtype,width", [(torch.int32, 32), (torch.int64, 64)])
def test_apply_matches_a_numpy_brute_force(dtype, width):
    """Every op, bit by bit in NumPy: FLIP inverts the masked bits, SET0/ZERO clear them,
    SET1 sets them, RANDOM copies them from the value; masks and values are taken as
    codes of the codes' width (an int64 mask's bit 31 is an int32 code's sign bit)."""
    g = gen(width)
    n = 600
    codes = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64).to(dtype)
    mask = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64)
    mask[:200] = torch.ones(200, dtype=torch.int64) << torch.randint(width, (200,), generator=g)
    value = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64)
    ops = torch.randint(0, 5, (n,), generator=g)
    got = apply(codes, mask, ops, value).numpy().astype(np.int64)
    c, m = codes.numpy().astype(np.int64), mask.to(dtype).numpy().astype(np.int64)
    v, o = value.to(dtype).numpy().astype(np.int64), ops.numpy()
    want = c.copy()
    for b in range(width):
        bit = np.int64(-(2**63)) if b == 63 else np.int64(1) << np.int64(b)
        hit, old = (m & bit) != 0, (c & bit) != 0
        new = np.select([o == FLIP, o == SET1, o == RANDOM], [~old, True, (v & bit) != 0], False)
        want = np.where(hit & (new != old), want ^ bit, want)
    if width == 32:  # bits above 31 of the sign-extended int64 follow bit 31
        want = want.astype(np.int32).astype(np.int64)
    assert np.array_equal(got, want)


def test_mask_bits_round_trip_and_parse_errors():
    rows = [[0], [31], [3, 4], [], [0, 5, 31]]
    assert mask_bits(bits_mask(rows)) == rows
    assert parse("burst3").k == 3 and parse("bitflip12").kind == "flip"
    with pytest.raises(UnknownNameError, match="bitflip, bitflip2, bitflip<K>, burst2"):
        parse("flipflop")
    with pytest.raises(FlipsafeError):
        parse("bitflip0")


def test_parse_takes_k_from_1_to_the_widest_code():
    assert parse("bitflip32").k == 32 and parse("burst32").kind == "burst"
    for name in ("bitflip33", "burst99", "burst0", "bitflip0"):
        with pytest.raises(UnknownNameError, match=r"K from 1 to 32 \(the widest code has 32"):
            parse(name)


def test_parse_gives_one_spelling_per_fault_model():
    assert [parse(n).name for n in (" BitFlip2 ", "BURST3", "bitflip1", "burst1", "Stuck1")] == [
        "bitflip2", "burst3", "bitflip", "bitflip", "stuck1"]
    assert parse("burst1").kind == "flip" and parse("burst1").k == 1


def _brute_force_strata(fmt, model):
    """Every distinct mask of `model` on one element, by the field of its highest bit,
    from the format's field table alone."""
    k = parse(model).k
    field_of = {b: name for name, bits in fmt.fields.items() for b in bits}
    if model.startswith("burst"):
        sets = [tuple(range(s, s + k)) for s in range(fmt.bits - k + 1)]
    else:
        sets = list(itertools.combinations(range(fmt.bits), k))
    strata = {name: set() for name in fmt.fields}
    for bits in sets:
        strata[field_of[max(bits)]].add(sum(1 << b for b in bits))
    return strata


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("model", ["bitflip", "stuck1", "bitflip2", "burst2", "bitflip3", "burst3"])
def test_strata_by_highest_bit_match_brute_force(fmt_name, model):
    fmt = formats.get(fmt_name)
    strata = _brute_force_strata(fmt, model)
    # The strata partition the whole space: C(bits, K) sets, bits-K+1 runs.
    k = parse(model).k
    whole = fmt.bits - k + 1 if model.startswith("burst") else math.comb(fmt.bits, k)
    assert sum(len(m) for m in strata.values()) == whole == stratum_size(model, fmt)
    for field, masks in strata.items():
        assert stratum_size(model, fmt, field) == len(masks)
        index, d = every_fault(model, fmt, 3, field, gen())
        # Every fault of the stratum once on every element, element-major.
        assert index.tolist() == [i for i in range(3) for _ in masks]
        rows = list(zip(index.tolist(), d.mask.tolist()))
        assert len(set(rows)) == len(rows) and {m for _, m in rows} == masks
        if not masks:
            with pytest.raises(ConfigError, match="highest bit"):
                draw(model, fmt, 5, generator=gen(), top=field)
            continue
        drawn = draw(model, fmt, 300, generator=gen(5), top=field)
        assert set(drawn.mask.tolist()) <= masks
        assert set(drawn.op.tolist()) == {parse(model).op}
        if model == "stuck1":
            assert torch.equal(drawn.value, drawn.mask) and torch.equal(d.value, d.mask)


def test_multi_bit_draws_cross_fields_and_are_uniform_in_their_stratum():
    fmt = formats.get("fp8_e4m3")  # sign 7, exponent 3..6, mantissa 0..2
    # bitflip2 topped by an exponent bit: 3 + 4 + 5 + 6 = 18 pairs, 12 reach the mantissa.
    masks = _brute_force_strata(fmt, "bitflip2")["exponent"]
    assert len(masks) == 18
    d = draw("bitflip2", fmt, 18000, generator=gen(11), top="exponent")
    counts = torch.bincount(d.mask, minlength=256)[sorted(masks)]
    assert int(counts.sum()) == 18000
    assert int(counts.min()) > 850 and int(counts.max()) < 1150  # 1000 expected, sd ~31
    # burst2 topped by the lowest exponent bit is bits 2 and 3: mantissa into exponent.
    d = draw("burst2", fmt, 400, generator=gen(12), top="exponent")
    assert set(d.mask.tolist()) == {0b1100, 0b11000, 0b110000, 0b1100000}
    # The one-bit draw of a stratum is the field-restricted draw, fault for fault.
    a = draw("bitflip", fmt, 100, generator=gen(13), top="mantissa")
    b = draw("bitflip", fmt, 100, field="mantissa", generator=gen(13))
    assert torch.equal(a.mask, b.mask)
    # field still restricts every bit: no burst2 within sign+mantissa is topped by the sign.
    with pytest.raises(ConfigError, match="highest bit in field 'sign'"):
        draw("burst2", formats.get("fp32"), 3, field=["sign", "mantissa"], generator=gen(),
             top="sign")


def test_whole_value_models_have_one_fault_per_element():
    fmt = formats.get("bf16")
    for model in ("random", "zero"):
        assert stratum_size(model, fmt) == 1
        index, d = every_fault(model, fmt, 4, generator=gen())
        assert index.tolist() == [0, 1, 2, 3] and set(d.mask.tolist()) == {0xFFFF}
        with pytest.raises(ConfigError, match="no highest bit"):
            draw(model, fmt, 3, generator=gen(), top="sign")
