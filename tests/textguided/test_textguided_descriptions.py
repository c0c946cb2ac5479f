"""Bundled, template and file-based class descriptions."""

import json
import os

import pytest
import yaml

from flipsafe.errors import ConfigError, DataError, UnknownNameError
from flipsafe.textguided import (
    DEFAULT_TEMPLATES,
    bundled_descriptions,
    load_descriptions,
    save_descriptions,
    template_descriptions,
)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The 100 fine labels of CIFAR-100 in their standard order, typed out independently.
CIFAR100 = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm"
]


@pytest.mark.parametrize("name,classes", [("digits", DIGITS), ("cifar10", CIFAR10),
                                          ("cifar100", CIFAR100)])
def test_bundled_sets_cover_the_standard_classes_with_distinct_sentences(name, classes):
    d = bundled_descriptions(name)
    assert list(d) == classes
    assert d.source == f"bundled:{name}"
    everything = []
    for c, texts in d.items():
        assert len(set(texts)) >= 5, c
        for t in texts:
            assert len(t.split()) >= 5 and t.endswith("."), (c, t)
        everything += texts
    # A sentence reused for two classes would pull their vectors together.
    assert len(everything) == len(set(everything))


def test_bundled_lookup_matches_names_case_insensitively_and_by_digit():
    cifar = bundled_descriptions("cifar10")
    picked = bundled_descriptions("cifar10", classes=["Dog", "CAT"])
    assert list(picked) == ["Dog", "CAT"]
    assert picked["Dog"] == cifar["dog"] and picked["CAT"] == cifar["cat"]

    digits = bundled_descriptions("digits")
    by_number = bundled_descriptions("digits", classes=[str(i) for i in range(10)])
    assert [by_number[str(i)] for i in range(10)] == [digits[w] for w in DIGITS]
    # torchvision's MNIST spells its classes "7 - seven".
    assert bundled_descriptions("digits", ["7 - seven"])["7 - seven"] == digits["seven"]

    fish = bundled_descriptions("cifar100", ["aquarium fish"])
    assert fish["aquarium fish"] == bundled_descriptions("cifar100")["aquarium_fish"]


def test_bundled_errors():
    with pytest.raises(UnknownNameError, match="cifar10, cifar100, digits"):
        bundled_descriptions("imagenet")
    with pytest.raises(DataError, match="'zebra'"):
        bundled_descriptions("cifar10", ["cat", "zebra"])
    with pytest.raises(ConfigError, match="twice"):
        bundled_descriptions("digits", ["3", "three"])


def test_templates_fill_each_class_into_every_template():
    d = template_descriptions(["cat", "aquarium_fish"])
    assert len(DEFAULT_TEMPLATES) >= 5
    assert len(d["cat"]) == len(DEFAULT_TEMPLATES)
    assert "a photo of a cat." in d["cat"]
    assert "a photo of a aquarium fish." in d["aquarium_fish"]
    assert d.source == "template"
    custom = template_descriptions(["dog"], ["{} on grass", "itap of a {}"])
    assert custom == {"dog": ["dog on grass", "itap of a dog"]}
    with pytest.raises(ConfigError, match="exactly once"):
        template_descriptions(["dog"], ["a photo"])
    with pytest.raises(ConfigError):
        template_descriptions([])


def test_json_and_yaml_files_load_and_round_trip(tmp_path):
    data = {"Cat": ["  a small furry pet ", "whiskers"], "dog": ["barks"]}
    j = tmp_path / "d.json"
    j.write_text(json.dumps(data))
    loaded = load_descriptions(j)
    assert loaded == {"Cat": ["a small furry pet", "whiskers"], "dog": ["barks"]}
    assert loaded.source == f"file:{j}"

    y = tmp_path / "d.yaml"
    y.write_text("0:\n  - a round loop\ncat:\n  - meows\n")
    assert load_descriptions(y, classes=["zero", "CAT"]) == {"zero": ["a round loop"],
                                                            "CAT": ["meows"]}

    out = save_descriptions(loaded, tmp_path / "sub" / "out.json")
    assert json.loads(out.read_text()) == {"Cat": ["a small furry pet", "whiskers"],
                                           "dog": ["barks"]}
    out_yaml = save_descriptions(loaded, tmp_path / "out.yml")
    assert yaml.safe_load(out_yaml.read_text()) == json.loads(out.read_text())
    assert sorted(os.listdir(tmp_path / "sub")) == ["out.json"]


@pytest.mark.parametrize("content,pattern", [
    ({"cat": ["meows"]}, "'dog'"),                      # requested class missing
    ({"cat": ["meows"], "dog": []}, "'dog'.*empty"),     # empty list
    ({"cat": ["meows"], "dog": ["barks", 3]}, "'dog'.*string"),
    ({"cat": ["meows"], "dog": "barks"}, "'dog'.*list"),
    ({"cat": ["meows"], "dog": ["  "]}, "'dog'.*blank"),
    (["cat", "dog"], "mapping"),
])
def test_bad_description_files_raise_data_error_naming_the_class(tmp_path, content, pattern):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(content))
    with pytest.raises(DataError, match=pattern):
        load_descriptions(p, classes=["cat", "dog"])


def test_unreadable_description_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_descriptions(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid"):
        load_descriptions(bad)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"Cat": ["a"], "cat": ["b"]}))
    with pytest.raises(DataError, match="same class"):
        load_descriptions(dup, classes=["cat"])


def test_saving_invalid_descriptions_keeps_the_existing_file(tmp_path):
    p = tmp_path / "d.json"
    save_descriptions({"cat": ["meows"]}, p)
    before = p.read_bytes()
    with pytest.raises(DataError, match="'dog'"):
        save_descriptions({"cat": ["meows"], "dog": []}, p)
    assert p.read_bytes() == before


def test_digits_dataset_class_names_find_the_bundled_set():
    data = pytest.importorskip("flipsafe.data")
    classes = data.load("digits").classes
    assert list(bundled_descriptions("digits", classes)) == list(classes)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_description_file_that_is_not_utf8_is_a_data_error(tmp_path, suffix):
    bad = tmp_path / f"latin1{suffix}"
    bad.write_bytes('{"café": ["a cup of café"]}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_descriptions(bad)
    assert str(bad) in str(err.value)
