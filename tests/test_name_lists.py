"""Each name list (sites, clamps, fault models, head kinds, description sets) has one owner;
everyone else imports it."""

import ast
import pathlib

import pytest

from flipsafe.errors import UnknownNameError

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "flipsafe"


def string_lists():
    """{frozenset of names: [where]} for every literal tuple/list/set of two or more strings
    assigned to an UPPER_CASE name in src/."""
    found = {}
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Assign, ast.AnnAssign)):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if not any(isinstance(t, ast.Name) and t.id.lstrip("_").isupper() for t in targets):
                continue
            value = node.value
            if isinstance(value, (ast.Tuple, ast.List, ast.Set)) and len(value.elts) >= 2 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
                key = frozenset(e.value for e in value.elts)
                found.setdefault(key, []).append(f"{f.relative_to(SRC)}:{node.lineno}")
    return found


def test_no_name_list_is_defined_twice():
    twice = {tuple(sorted(k)): v for k, v in string_lists().items() if len(v) > 1}
    assert not twice


def test_the_owners_and_their_importers_agree():
    from flipsafe import campaign, checkpoint, faults, inject, textguided, workflow
    from flipsafe.inject import emulate
    from flipsafe.protect.registry import registered

    assert campaign.SITES is faults.CAMPAIGN_SITES
    assert campaign.FAULTS is faults.FAULT_MODELS
    assert campaign.CLAMPS is emulate.CLAMPS is inject.CLAMPS
    assert inject.SITES is faults.SITES
    assert {s for k in registered().values() for s in k.sites} <= set(faults.CAMPAIGN_SITES)
    assert workflow.BUNDLED_DESCRIPTION_SETS is textguided.BUNDLED_SETS
    assert not hasattr(checkpoint, "HEAD_KINDS")
    assert set(faults.CAMPAIGN_SITES) <= set(faults.SITES)
    assert set(workflow.PLAIN_HEADS) < set(textguided.HEAD_KINDS)


def test_the_site_registry_names_exactly_the_sites_faults_owns():
    from flipsafe.faults import PARAMS, SITES
    from flipsafe.inject.sites import SITE_TYPES

    assert set(SITE_TYPES) == set(PARAMS)
    assert all(SITES[cls.name] == p for p, cls in SITE_TYPES.items())


def test_one_table_of_sites_feeds_the_engine_the_campaigns_and_the_fit():
    """faults.SITE_SPECS is the one owner: the engine's site classes, the campaign's
    sites, what ecc guards, and the FIT's raw rate and residency per site are read off it."""
    from flipsafe import faults
    from flipsafe.inject.sites import SITE_TYPES
    from flipsafe.safety import fit

    specs = faults.SITE_SPECS
    assert {s.param: s.name for s in specs.values()} == {
        p: cls.name for p, cls in SITE_TYPES.items()}
    assert faults.CAMPAIGN_SITES == ("activations", "weights", "metadata", "weight_metadata",
                                     "pe", "weight_words", "zero_points",
                                     "weight_zero_points")
    assert faults.WEIGHT_SITES == ("weights",)
    assert fit.SITE_RATE == {"activations": fit.DATAPATH, "weights": fit.MEMORY,
                             "metadata": fit.MEMORY, "weight_metadata": fit.MEMORY,
                             "pe": fit.DATAPATH, "weight_words": fit.MEMORY,
                             "zero_points": fit.MEMORY, "weight_zero_points": fit.MEMORY}
    assert fit.NO_FIT_SITES == ("pe",) and faults.site_spec("pe").array
    assert fit.TRANSIENT_SITES == ("activations", "metadata")
    assert [s.name for s in specs.values() if s.channels] == ["activations"]
    assert faults.site_spec("weights").stored and not faults.site_spec("metadata").stored
    with pytest.raises(UnknownNameError, match="registers"):
        faults.site_spec("registers")
