"""The protection specification parser: one spelling per specification, one line per error."""

import pytest

from flipsafe.errors import ConfigError
from flipsafe.protect.registry import registered
from flipsafe.protect.spec import canonical, parse


def test_canonical_orders_items_and_options_and_normalises_budgets():
    a = canonical("ranger,abft:layers=last,ecc", "weights")
    b = canonical(" ECC , abft:layers=last , ranger ", "weights")
    assert a == b == "ecc,abft:layers=last,ranger"
    assert canonical("dup:map=r:budget=0.1") == canonical("dup:budget=10%:map=r")
    assert parse("dup:budget=10%")[0].budget == pytest.approx(0.10)
    assert parse("tmr:budget=100%")[0].budget == 1.0
    assert canonical(None) is None and canonical("none") is None and parse("") == ()


def test_each_item_keeps_its_options():
    (ab, rg) = parse("ranger:per=channel,abft:layers=conv1|fc")
    assert (ab.name, ab.layers, rg.name, rg.per_channel) == ("abft", "conv1|fc", "ranger", True)
    assert parse("clip")[0].layers == "all" and not parse("clip")[0].per_channel


@pytest.mark.parametrize("spec, site, words", [
    ("foo", None, "unknown protection 'foo'"),
    ("abft:x=1", None, "abft takes no option 'x'"),
    ("dup:budget=0", None, "(0, 100%]"),
    ("dup:budget=101%", None, "(0, 100%]"),
    ("dup:budget=ten", None, "percentage"),
    ("dup:map=r", None, "add dup:budget"),
    ("ecc,parity", None, "both ecc and parity"),
    ("dup,tmr", None, "both dup and tmr"),
    ("ranger,ranger", None, "twice"),
    ("ranger:per=pixel", None, "per must be one of"),
    ("abft:layers", None, "needs a value"),
    ("ecc", "activations", "ecc cannot guard a campaign on the activations site"),
    ("dup", "weights", "same stored weights"),
    ("ranger", "metadata", "ranger cannot guard"),
])
def test_bad_specifications_give_one_line(spec, site, words):
    with pytest.raises(ConfigError) as err:
        parse(spec, site)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_every_protection_guards_some_campaign_site():
    for name, kind in registered().items():
        assert parse(name, kind.sites[0])[0].name == name


def test_labels_shorten_map_folders_only():
    from flipsafe.protect.spec import label

    assert label(None) == "none"
    assert label("ecc,abft:layers=last") == "ecc,abft:layers=last"
    assert label("dup:budget=10%:map=/a/b/baseline/") == "dup:budget=10%:map=…/baseline"
    assert label("tmr:budget=5%:map=res") == "tmr:budget=5%:map=res"


@pytest.mark.parametrize("spec,site", [("dup", "weights"), ("tmr", "weights"),
                                       ("ecc", "activations"), ("ranger", "metadata")])
def test_site_errors_are_one_clean_sentence(spec, site):
    with pytest.raises(ConfigError) as err:
        parse(spec, site)
    text = str(err.value)
    assert "(" not in text and ")" not in text, text  # no stacked parentheticals
    assert text.count("use ") == 1 and "--site" in text, text
    if spec in ("dup", "tmr"):
        assert text.endswith("; use ecc to protect weights, or --site activations")
