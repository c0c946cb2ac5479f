"""Multi-bit upsets in memory words of stored weights: a burst across two codes changes
two weights, as the slow reference computes it with the formats' own bit primitives."""

from __future__ import annotations

import copy

import pytest
import torch
from inject_reference import Reference, TinyNet, outcome, param_view
from test_inject_reference import check

from flipsafe import formats
from flipsafe.errors import ConfigError
from flipsafe.faults import FaultSet
from flipsafe.formats.words import WordLayout
from flipsafe.inject import Engine


def word_logits(ref: Reference, image, layer, word, mask, op, value, per, bits):
    """Logits with every code of one word faulted by its slice of the word's mask."""
    pf = ref.param_formats[(layer, "weight")]
    orig = dict(ref.original.named_modules())[layer].weight.detach()
    enc = pf.encode(param_view(orig))
    for e in range(per):
        j, sub = word * per + e, (mask >> (e * bits)) & ((1 << bits) - 1)
        if j < orig.numel() and sub:
            enc = ref._fault_codes(enc, False, j, sub, op, (value >> (e * bits)) & ((1 << bits) - 1))
    new = pf.decode(enc).reshape(orig.shape)
    saved = ref.model
    ref.model = copy.deepcopy(saved)
    try:
        with torch.no_grad():
            dict(ref.model.named_modules())[layer].weight.copy_(new)
        logits, _ = ref.logits(image)
    finally:
        ref.model = saved
    before = dict(saved.named_modules())[layer].weight.detach()
    changed = new.view(torch.int32) != before.view(torch.int32)
    return logits, not bool(torch.isfinite(new[changed]).all())


@pytest.mark.parametrize("fmt, word", [("fp16", 32), ("int8", 32), ("int8", 64),
                                       ("fp32", 64), ("bf16", 16)])
def test_word_upsets_equal_the_reference(fmt, word):
    torch.manual_seed(0)
    model = TinyNet()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(10, (6,), generator=g)
    engine = Engine(model, fmt, word_bits=word)
    ranges = engine.profile(x)
    ref = Reference(model, fmt, ranges)
    layout = engine.codes("weight_words")
    assert layout.per_word == word // formats.get(fmt).bits
    sampled = engine.sample(40, "weight_words", "all", "burst2", images=6,
                            generator=torch.Generator().manual_seed(3))
    b = layout.code_bits
    # and by hand: bursts across the boundary of codes 0 and 1 of a word (bits b-1, b) -
    # exponent/sign bits of two weights at once where the format puts them there
    crossing = FaultSet(sampled.layers, layer=torch.arange(4) % len(sampled.layers),
                        index=torch.arange(4), mask=3 << (b - 1), image=torch.arange(4),
                        param="weight_word")
    faults = FaultSet.cat([sampled, crossing]) if layout.per_word > 1 else sampled
    got = engine.run(faults, x, y)
    expected, golden = [], {}
    for i in range(len(faults)):
        img = int(faults.image[i])
        if img not in golden:
            golden[img] = outcome(ref.logits(x[img:img + 1])[0], int(y[img]))
        logits, nonfinite = word_logits(ref, x[img:img + 1], faults.layers[int(faults.layer[i])],
                                        int(faults.index[i]), int(faults.mask[i]),
                                        int(faults.op[i]), int(faults.value[i]),
                                        layout.per_word, layout.code_bits)
        o, gd = outcome(logits, int(y[img])), golden[img]
        expected.append({"golden_top1": gd["top1"], "faulty_top1": o["top1"], "due": o["due"],
                         "sdc": (o["top1"] != gd["top1"]) and not o["due"],
                         "golden_loss": gd["loss"], "faulty_loss": o["loss"],
                         "faulty_top2diff": o["top2diff"], "nonfinite": nonfinite})
    check(got, expected, fmt)
    assert (got.delta_loss > 1e-6).sum() >= 3  # the upsets did something


def test_word_layouts_and_their_refusals():
    layout = WordLayout(formats.get("int8"), 32)
    assert layout.per_word == 4 and layout.words(10) == 3
    assert layout.fields["sign"] == (7, 15, 23, 31)
    for fmt, bits, words in (("mxfp8_e4m3", 32, "not packed"), ("fp32", 16, "whole"),
                             ("int8", 24, "16, 32, 64")):
        with pytest.raises(ConfigError, match=words):
            WordLayout(formats.get(fmt), bits)
