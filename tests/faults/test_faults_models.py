"""Fault models: bit masks, op codes and replacement values, checked bit by bit."""

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
    mask_bits,
    parse,
    positions,
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


def test_mask_bits_round_trip_and_parse_errors():
    rows = [[0], [31], [3, 4], [], [0, 5, 31]]
    assert mask_bits(bits_mask(rows)) == rows
    assert parse("burst3").k == 3 and parse("bitflip12").kind == "flip"
    with pytest.raises(UnknownNameError, match="bitflip, bitflip2, bitflip<K>, burst2"):
        parse("flipflop")
    with pytest.raises(FlipsafeError):
        parse("bitflip0")
