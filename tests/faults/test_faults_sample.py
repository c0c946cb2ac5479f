"""faults.Sampler: stratum sizes by hand, stratified and uniform draws, and their strata."""

from collections import namedtuple

import pytest
import torch

from flipsafe import formats
from flipsafe.errors import ConfigError, UnknownNameError
from flipsafe.faults import VALUE, FaultSet, Sampler, stratum_seed

Layer = namedtuple("Layer", "name numel fields")
FP32 = formats.get("fp32")
LAYERS = [Layer("a", 10, dict(FP32.fields)), Layer("b", 4, dict(FP32.fields))]
FIELD_OF = {b: name for name, bits in FP32.fields.items() for b in bits}


def test_sizes_by_hand():
    # One bit: a field's stratum is its bits (sign 1, exponent 8, mantissa 23).
    sizes = Sampler(LAYERS, "bitflip", FP32).sizes(images=3)
    assert sizes == {("a", "sign"): 10 * 1 * 3, ("a", "exponent"): 10 * 8 * 3,
                     ("a", "mantissa"): 10 * 23 * 3, ("b", "sign"): 4 * 1 * 3,
                     ("b", "exponent"): 4 * 8 * 3, ("b", "mantissa"): 4 * 23 * 3}
    # Two distinct bits, by the highest: bit r tops r pairs. Mantissa 0..22: 0+..+22 = 253,
    # exponent 23..30: 23+..+30 = 212, sign 31: 31; together C(32, 2) = 496.
    two = Sampler(LAYERS[:1], "bitflip2", FP32).sizes()
    assert two == {("a", "sign"): 310, ("a", "exponent"): 2120, ("a", "mantissa"): 2530}
    # Whole-value faults: one stratum per layer, one fault per element.
    assert Sampler(LAYERS, "zero", FP32).sizes(images=2) == {("a", VALUE): 20, ("b", VALUE): 8}


def test_stratified_draws_each_stratum_from_its_own_seed():
    sampler = Sampler(LAYERS, "bitflip2", FP32)
    ids = torch.tensor([3, 5, 8])
    counts = {("a", "exponent"): 50, ("b", "mantissa"): 20, ("b", "sign"): 0, ("a", "sign"): 5}
    fs = sampler.stratified(counts, seed=7, images=ids)
    assert len(fs) == 75 and fs.layers == ["a", "b"]
    assert fs.stratum_names == ["exponent"] * 50 + ["mantissa"] * 20 + ["sign"] * 5
    assert fs.layer_names == ["a"] * 50 + ["b"] * 20 + ["a"] * 5
    assert [FIELD_OF[max(b)] for b in fs.bits()] == fs.stratum_names
    assert all(len(b) == 2 for b in fs.bits())
    assert set(fs.image.tolist()) <= {3, 5, 8}
    assert bool((fs.index < torch.tensor([10, 4])[fs.layer]).all())
    # A stratum's faults depend only on (seed, layer, field): alone they are the same.
    alone = sampler.stratified({("b", "mantissa"): 20}, seed=7, images=ids)
    part = fs.select(slice(50, 70))
    for col in ("index", "mask", "image"):
        assert torch.equal(getattr(alone, col), getattr(part, col)), col
    # ... and its first draws are the elements, from the stratum's own generator.
    gen = torch.Generator().manual_seed(stratum_seed(7, "b", "mantissa"))
    assert torch.equal(alone.index, torch.randint(4, (20,), generator=gen))
    other = sampler.stratified({("b", "mantissa"): 20}, seed=8, images=ids)
    assert not torch.equal(alone.index, other.index)


def test_stratified_every_fault_and_its_checks():
    sampler = Sampler(LAYERS[1:], "bitflip", FP32)
    sizes = sampler.sizes()
    fs = sampler.stratified(sizes, seed=0, images=torch.tensor([1]), every=True)
    assert sorted(zip(fs.index.tolist(), (b[0] for b in fs.bits()))) == \
        [(i, b) for i in range(4) for b in range(32)]
    assert [FIELD_OF[b[0]] for b in fs.bits()] == fs.stratum_names
    with pytest.raises(ConfigError, match="holds 4 faults per image, not 5"):
        sampler.stratified({("b", "sign"): 5}, seed=0, images=torch.tensor([1]), every=True)
    with pytest.raises(UnknownNameError, match="stratum of b"):
        sampler.stratified({("b", "value"): 5}, seed=0, images=torch.tensor([1]))
    with pytest.raises(UnknownNameError, match="layer"):
        sampler.stratified({("c", "sign"): 5}, seed=0, images=torch.tensor([1]))
    empty = sampler.stratified({("b", "sign"): 0}, seed=0, images=torch.tensor([1]))
    assert len(empty) == 0 and empty.layers == ["b"]


def test_uniform_marks_each_fault_with_the_field_of_its_highest_bit():
    gen = torch.Generator().manual_seed(3)
    fs = Sampler(LAYERS, "burst2", FP32, param="weight").uniform(400, images=5, generator=gen)
    assert isinstance(fs, FaultSet) and len(fs) == 400
    assert fs.param_names == ["weight"] * 400
    assert fs.stratum_names == [FIELD_OF[max(b)] for b in fs.bits()]
    assert {"sign", "exponent", "mantissa"} == set(fs.stratum_names)
    assert set(fs.image.tolist()) <= set(range(5))
    zero = Sampler(LAYERS, "zero", FP32).uniform(10, generator=gen)
    assert zero.stratum_names == [VALUE] * 10
    restricted = Sampler(LAYERS, "bitflip", FP32).uniform(50, field="sign", generator=gen)
    assert restricted.stratum_names == ["sign"] * 50
    with pytest.raises(UnknownNameError, match="layer weighting"):
        Sampler(LAYERS, "bitflip", FP32).uniform(5, by="neuron")
    with pytest.raises(ConfigError, match="no layers"):
        Sampler([], "bitflip", FP32)


def test_metadata_strata_use_the_metadata_fields():
    mx = formats.get("mxfp8_e4m3")
    layers = [Layer("a", 6, dict(mx.meta_fields))]
    sampler = Sampler(layers, "bitflip", mx, param="meta")
    (field,) = mx.meta_fields
    assert sampler.sizes() == {("a", field): 6 * mx.meta_fields[field]}
    fs = sampler.uniform(20, generator=torch.Generator().manual_seed(0))
    assert fs.stratum_names == [field] * 20
    assert max(max(b) for b in fs.bits()) < mx.meta_fields[field]
