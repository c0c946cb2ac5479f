"""FaultSet: columns, broadcasting, selection, concatenation and validation."""

import dataclasses

import pytest
import torch

from flipsafe.errors import ConfigError, UnknownNameError
from flipsafe.faults import PARAMS, SET1, FaultSet


def test_scalars_broadcast_and_names_resolve():
    fs = FaultSet(["a", "b"], layer=[0, 1, 1], index=[4, 5, 6], mask=1 << 3, op=SET1,
                  image=[2, 0, 1], param=["output", "weight", "meta"])
    assert len(fs) == 3
    assert fs.mask.tolist() == [8, 8, 8] and fs.op.tolist() == [SET1] * 3
    assert fs.layer_names == ["a", "b", "b"]
    assert fs.param_names == ["output", "weight", "meta"]
    assert fs.bits() == [[3], [3], [3]]
    d = fs.to_dict()
    assert d["op"] == ["set1"] * 3 and d["bits"] == [[3], [3], [3]]
    assert PARAMS.index("weight") == int(fs.param[1])


def test_select_and_cat_merge_layer_lists():
    a = FaultSet(["x", "y"], layer=[0, 1], index=[1, 2], mask=[1, 2], image=[0, 1])
    b = FaultSet(["y", "z"], layer=[1, 0], index=[3, 4], mask=[4, 8], param="bias")
    c = FaultSet.cat([a, b])
    assert c.layers == ["x", "y", "z"]
    assert c.layer_names == ["x", "y", "z", "y"]
    assert c.param_names == ["output", "output", "bias", "bias"]
    assert c.index.tolist() == [1, 2, 3, 4]
    s = c.select(torch.tensor([3, 0]))
    assert s.layer_names == ["y", "x"] and s.mask.tolist() == [8, 1]
    assert len(c.select(c.index > 10)) == 0


def test_validation_errors():
    with pytest.raises(ConfigError, match="equal lengths"):
        FaultSet(["a"], layer=[0, 0], index=[1, 2, 3], mask=1)
    with pytest.raises(ConfigError, match="layer must be in 0..0"):
        FaultSet(["a"], layer=[1], index=[0], mask=1)
    with pytest.raises(UnknownNameError, match="weight_meta"):
        FaultSet(["a"], layer=0, index=0, mask=1, param="gradient")
    with pytest.raises(ConfigError, match="integers"):
        FaultSet(["a"], layer=0, index=torch.tensor([0.5]), mask=1)
    with pytest.raises(ConfigError, match="op must be in"):
        FaultSet(["a"], layer=0, index=0, mask=1, op=9)
    empty = FaultSet(["a"], layer=torch.zeros(0, dtype=torch.long),
                     index=torch.zeros(0, dtype=torch.long), mask=1)
    assert len(empty) == 0 and empty.mask.numel() == 0


def test_faultset_is_immutable_and_replace_returns_a_new_one():
    fs = FaultSet(["a", "b"], layer=[0, 1], index=[4, 5], mask=[1, 2], image=[0, 1])
    for name, value in (("image", torch.tensor([3, 3])), ("mask", torch.tensor([8, 8])),
                        ("op", 1), ("value", 0), ("layers", ["c"]), ("stratum", 0)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(fs, name, value)
    moved = fs.with_image([7, 9])
    assert moved.image.tolist() == [7, 9] and fs.image.tolist() == [0, 1]
    assert moved.index.tolist() == [4, 5] and moved.layer_names == ["a", "b"]
    flipped = fs.replace(mask=1 << 4, op=SET1)  # scalars broadcast, as in the constructor
    assert flipped.mask.tolist() == [16, 16] and flipped.op.tolist() == [SET1, SET1]
    assert fs.mask.tolist() == [1, 2] and fs.op.tolist() == [0, 0]
    with pytest.raises(ConfigError, match="layer must be in 0..1"):
        fs.replace(layer=[0, 2])  # validated anew
    with pytest.raises(UnknownNameError, match="FaultSet column"):
        fs.replace(colour=[1, 2])
    with pytest.raises(UnknownNameError, match="FaultSet column"):
        fs.replace(_n=5)


def test_stratum_column_follows_select_and_cat():
    a = FaultSet(["x"], layer=0, index=[1, 2, 3], mask=[1, 2, 4],
                 strata=["mantissa", "exponent"], stratum=[0, 1, 0])
    b = FaultSet(["y"], layer=0, index=[5, 6], mask=[1, 1], strata=["sign", "mantissa"],
                 stratum=[0, 1])
    hand = FaultSet(["x"], layer=0, index=0, mask=1)
    assert hand.stratum_names == [""]  # built by hand: no stratum
    c = FaultSet.cat([a, b, hand])
    assert c.strata == ["mantissa", "exponent", "sign", ""]
    assert c.stratum_names == ["mantissa", "exponent", "mantissa", "sign", "mantissa", ""]
    assert c.select(torch.tensor([4, 1])).stratum_names == ["mantissa", "exponent"]
    assert c.to_dict()["stratum"] == c.stratum_names
    with pytest.raises(ConfigError, match="stratum must be in 0..1"):
        FaultSet(["x"], layer=0, index=0, mask=1, strata=["a", "b"], stratum=2)
