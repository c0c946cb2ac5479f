"""Campaign plans: validation, JSON round trips, fingerprints and fault-budget allocation."""

import dataclasses
import hashlib
import json
import re

import pytest

from flipsafe.campaign import CampaignPlan, Stratum, allocate, n_from_plan, plan_strata
from flipsafe.errors import CampaignError, ConfigError, FlipsafeError


def _plan(**changes):
    fields = {"model": "runs/a", "model_sha": "abc123", "dataset": "cifar10", "format": "fp16",
              "n": 100, "seed": 3}
    return CampaignPlan(**{**fields, **changes})


def test_defaults():
    plan = CampaignPlan(model="m", model_sha="s", dataset="d", format="fp32")
    assert (plan.images, plan.site, plan.fault, plan.layers) == (
        "correct", "activations", "bitflip", "all"
    )
    assert (plan.n, plan.confidence, plan.margin, plan.clamp) == (None, 0.99, 0.01, "none")
    assert (plan.allocation, plan.part_size, plan.seed) == ("proportional", 4096, 0)


@pytest.mark.parametrize(
    "changes, listed",
    [
        # The faults module owns the names (and accepts bitflipK / burstK).
        ({"fault": "flip"}, "bitflip, bitflip2, bitflip<K>, burst2, burst<K>, random, stuck0"),
        ({"site": "inputs"}, "activations, weights, metadata"),
        ({"images": "some"}, "correct, all"),
        ({"clamp": "relu"}, "none, profiled, goldeneye"),
        ({"allocation": "random"}, "proportional, equal"),
    ],
)
def test_bad_choices_list_the_valid_ones(changes, listed):
    with pytest.raises(FlipsafeError, match=re.escape(listed)):
        _plan(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers": "conv[1"}, "does not compile"),
        ({"n": 0}, "positive integer"),
        ({"n": True}, "positive integer"),
        ({"n": "most"}, "positive integer"),
        ({"confidence": 1.0}, "confidence"),
        ({"margin": 0}, "margin"),
        ({"n": None, "margin": None}, "both are None"),
        ({"part_size": 0}, "part_size"),
        ({"seed": 1.5}, "seed"),
        ({"model_sha": ""}, "model_sha"),
    ],
)
def test_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        _plan(**changes)


def test_accepts_regex_all_and_none():
    assert _plan(layers=r"^layer\d+\.conv").layers == r"^layer\d+\.conv"
    assert _plan(n="all").n == "all"
    assert _plan(n=None).n is None


def test_json_round_trip():
    plan = _plan(layers="last", fault="stuck1", margin=None, clamp="profiled")
    again = CampaignPlan.from_json(plan.to_json())
    assert again == plan


def test_from_json_rejects_unknown_and_missing_fields():
    data = _plan().to_dict()
    with pytest.raises(CampaignError, match="unknown field.*colour"):
        CampaignPlan.from_dict({**data, "colour": "red"})
    del data["dataset"]
    with pytest.raises(CampaignError, match="incomplete"):
        CampaignPlan.from_dict(data)
    with pytest.raises(CampaignError, match="not valid JSON"):
        CampaignPlan.from_json("{nope")
    with pytest.raises(CampaignError, match="version 2"):
        CampaignPlan.from_dict({**_plan().to_dict(), "version": 2})


def test_fingerprint_is_sha256_of_canonical_json_without_the_path():
    # Written out by hand: sorted keys, no spaces, every field but "model".
    canonical = (
        '{"allocation":"proportional","clamp":"none","confidence":0.99,"dataset":"cifar10",'
        '"fault":"bitflip","format":"fp16","images":"correct","layers":"all","margin":0.01,'
        '"model_sha":"abc123","n":100,"part_size":4096,"seed":3,"site":"activations",'
        '"version":1}'
    )
    assert _plan().fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()


def test_fingerprint_ignores_the_checkpoint_path_only():
    base = _plan()
    assert _plan(model="/moved/elsewhere").fingerprint() == base.fingerprint()
    for name, value in [("model_sha", "def456"), ("seed", 4), ("format", "bf16"),
                        ("part_size", 1024), ("fault", "zero"), ("n", "all")]:
        other = dataclasses.replace(base, **{name: value})
        assert other.fingerprint() != base.fingerprint(), name
        assert base.differing_fields(other) == [name]


SHA = "0123456789abcdef" * 4


def test_data_sha_is_fingerprinted_once_recorded():
    with_data = _plan(data_sha=SHA)
    canonical = (
        '{"allocation":"proportional","clamp":"none","confidence":0.99,"data_sha":"' + SHA
        + '","dataset":"cifar10","fault":"bitflip","format":"fp16","images":"correct",'
        '"layers":"all","margin":0.01,"model_sha":"abc123","n":100,"part_size":4096,"seed":3,'
        '"site":"activations","version":1}'
    )
    assert with_data.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    assert _plan().differing_fields(with_data) == ["data_sha"]
    assert with_data.differing_fields(_plan(data_sha="f" * 64)) == ["data_sha"]
    with pytest.raises(ConfigError, match="sha256"):
        _plan(data_sha="abc")


def test_plans_written_before_data_sha_keep_their_fingerprint():
    old = {k: v for k, v in _plan().to_dict().items() if k != "data_sha"}
    plan = CampaignPlan.from_json(json.dumps(old))
    assert plan.data_sha is None
    # The fingerprint a folder recorded before data_sha existed (test above, by hand).
    assert plan.fingerprint() == _plan().fingerprint()
    assert "data_sha" not in plan.fingerprinted()


def test_format_and_fault_names_have_one_spelling():
    upper = _plan(format=" FP16", fault="BitFlip2")
    assert (upper.format, upper.fault) == ("fp16", "bitflip2")
    assert upper.fingerprint() == _plan(fault="bitflip2").fingerprint()
    assert _plan(format="Float_E4M3FN").format == "float_e4m3fn"
    with pytest.raises(FlipsafeError, match="unknown format 'fp17'"):
        _plan(format="fp17")


@pytest.mark.parametrize("fault", ["bitflip3", "burst4", "burst2", "stuck1", "bitflip1"])
def test_plan_accepts_what_the_faults_module_parses(fault):
    from flipsafe.faults import parse

    assert _plan(fault=fault).fault == parse(fault).name


@pytest.mark.parametrize("fault", ["bitflip3", "burst3", "BURST32", "bitflip32"])
def test_multi_bit_plans_validate(fault):
    from flipsafe.campaign import FaultPlan

    assert _plan(fault=fault).fault == fault.lower()
    assert FaultPlan(fault=fault, n=5).fault == fault.lower()


@pytest.mark.parametrize("fault", ["bitflip0", "burst99", "burst0", "bitflip33", "flip"])
def test_plan_refuses_what_the_faults_module_refuses_with_its_one_line(fault):
    from flipsafe.faults import parse

    with pytest.raises(FlipsafeError) as want:
        parse(fault)
    with pytest.raises(FlipsafeError) as got:
        _plan(fault=fault)
    assert str(got.value) == str(want.value) and "\n" not in str(got.value)
    assert type(got.value) is type(want.value)


def test_bitflip_k_beyond_the_widest_code_says_the_range():
    for fault in ("bitflip0", "burst99"):
        with pytest.raises(FlipsafeError, match=r"K from 1 to 32"):
            _plan(fault=fault)


def test_proportional_allocation_largest_remainder():
    # fp32 over 100 elements: sign 100, exponent 800, mantissa 2300 pairs (total 3200).
    # n = 385: quotas 12.03, 96.25, 276.72 -> floors 12, 96, 276 (384); the one left goes
    # to the largest remainder (mantissa) -> 12, 96, 277.
    sizes = {("conv1", "sign"): 100, ("conv1", "exponent"): 800, ("conv1", "mantissa"): 2300}
    strata = allocate(sizes, 385, "proportional")
    assert strata == [
        Stratum("conv1", "sign", 100, 12),
        Stratum("conv1", "exponent", 800, 96),
        Stratum("conv1", "mantissa", 2300, 277),
    ]


def test_proportional_gives_every_field_one_when_n_allows():
    sizes = {("fc", "sign"): 1, ("fc", "exponent"): 8, ("fc", "mantissa"): 23}
    # n = 3: quotas 0.09, 0.75, 2.16 -> 0, 1, 2; sign is non-empty so it takes one from
    # the largest share (mantissa) -> 1, 1, 1.
    assert [s.n for s in allocate(sizes, 3)] == [1, 1, 1]
    # n = 2 < 3 fields: plain largest remainder, quotas 0.06, 0.5, 1.44 -> 0, 1, 1.
    assert [s.n for s in allocate(sizes, 2)] == [0, 1, 1]


def test_equal_allocation_and_capping():
    sizes = {("l", "sign"): 200, ("l", "exponent"): 800, ("l", "mantissa"): 2300}
    # 385 = 3 * 128 + 1; the spare one goes to the first field.
    assert [s.n for s in allocate(sizes, 385, "equal")] == [129, 128, 128]
    # Sign has only 10 (or 100) pairs, under its share of 128: it is taken whole and the
    # rest shared, 375 -> 188 / 187 (285 -> 143 / 142).
    small = {("l", "sign"): 10, ("l", "exponent"): 800, ("l", "mantissa"): 2300}
    assert [s.n for s in allocate(small, 385, "equal")] == [10, 188, 187]
    small[("l", "sign")] = 100
    assert [s.n for s in allocate(small, 385, "equal")] == [100, 143, 142]


def test_allocation_edges():
    sizes = {("a", "sign"): 4, ("a", "magnitude"): 28, ("b", "sign"): 0, ("b", "magnitude"): 7}
    # Per-layer budgets; b's empty sign field gets nothing; n above the space is exhaustive.
    strata = allocate(sizes, {"a": 8, "b": 50})
    assert [(s.layer, s.field, s.n) for s in strata] == [
        ("a", "sign", 1), ("a", "magnitude", 7), ("b", "sign", 0), ("b", "magnitude", 7)
    ]
    assert [s.n for s in allocate(sizes, "all", "equal")] == [4, 28, 0, 7]
    # One fault between two equal fields goes to the first.
    assert [s.n for s in allocate({("x", "p"): 5, ("x", "q"): 5}, 1)] == [1, 0]
    with pytest.raises(ConfigError, match="no entry for layer 'b'"):
        allocate(sizes, {"a": 8})
    with pytest.raises(ConfigError, match="proportional, equal"):
        allocate(sizes, 8, "random")


def test_n_from_plan():
    # N = 3200, 99 %, +-1 %: 3200 / (1 + 0.0001 * 3199 / 1.658724) = 2682.6 -> 2683.
    assert n_from_plan(_plan(n=None), 3200) == 2683
    assert n_from_plan(_plan(n=500), 300) == 300
    assert n_from_plan(_plan(n=500), 3000) == 500
    assert n_from_plan(_plan(n="all"), 3200) == 3200


def test_plan_strata_sizes_each_layer_from_its_own_space():
    sizes = {("a", "sign"): 100, ("a", "exponent"): 800, ("a", "mantissa"): 2300,
             ("b", "sign"): 2, ("b", "exponent"): 16, ("b", "mantissa"): 46}
    strata = plan_strata(_plan(n=None), sizes)
    # Layer a as in test_n_from_plan: 2683 = 83.84 + 670.75 + 1928.41 -> 84, 671, 1928
    # (floors 83, 670, 1928 leave 2: to sign .84 and exponent .75).
    # Layer b (64 pairs): 64 / (1 + 0.0001 * 63 / 1.658724) = 63.76 -> 64, exhaustive.
    assert [s.n for s in strata] == [84, 671, 1928, 2, 16, 46]


def test_plan_uses_published_t_values_for_large_strata():
    # Leveugle et al. tables: t = 2.576 at 99 % and 1.960 at 95 %, p = 0.5.
    # 2.576^2 * 0.25 / 0.01^2 = 16589.44 -> 16,590 for an effectively infinite N;
    # N = 10^9 changes it by less than one.
    from flipsafe.campaign.plan import CampaignPlan, n_from_plan

    def plan(confidence, margin):
        return CampaignPlan(model="m", model_sha="x", dataset="digits", format="fp32",
                            confidence=confidence, margin=margin)

    assert n_from_plan(plan(0.99, 0.01), 10**9) == 16590
    assert n_from_plan(plan(0.95, 0.01), 10**9) == 9604
    assert n_from_plan(plan(0.95, 0.05), 10**9) == 385


GOLDENEYE = {"site": "activations", "images": "correct", "clamp": "goldeneye",
             "fault": "bitflip"}


def test_goldeneye_protocol_sets_exactly_its_conventions():
    plan = _plan(protocol="goldeneye")
    assert {name: getattr(plan, name) for name in GOLDENEYE} == GOLDENEYE
    # Of everything a plan records, only the clamp (and the protocol's name) differ from the
    # plan without it: every other convention is already flipsafe's default.
    mine, plain = plan.to_dict(), _plan().to_dict()
    assert {k for k in mine if mine[k] != plain[k]} == {"clamp", "protocol"}
    assert mine["protocol"] == "goldeneye" and plain["protocol"] is None
    # Given explicitly with the protocol's values, the conventions are accepted.
    assert _plan(protocol="goldeneye", **GOLDENEYE) == plan
    assert _plan(protocol="goldeneye", fault="BitFlip").fault == "bitflip"


@pytest.mark.parametrize("name, value", [("clamp", "none"), ("clamp", "profiled"),
                                         ("images", "all"),
                                         ("site", "weights"), ("fault", "bitflip2")])
def test_goldeneye_protocol_refuses_a_conflicting_field_in_one_line(name, value):
    with pytest.raises(ConfigError) as err:
        _plan(protocol="goldeneye", **{name: value})
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"protocol goldeneye sets {name} {GOLDENEYE[name]}, but {name} {value} "
                       f"was given; leave {name} out or drop the protocol")
    # replace() on a protocol plan is held to the protocol too.
    with pytest.raises(ConfigError):
        dataclasses.replace(_plan(protocol="goldeneye"), **{name: value})


@pytest.mark.parametrize("layers", ["last", "all", "conv.*"])
def test_goldeneye_protocol_takes_any_layer_choice(layers):
    # The paper's headline figure is the last layer's, under GoldenEye's conventions.
    plan = _plan(protocol="goldeneye", layers=layers)
    assert plan.layers == layers and plan.clamp == "goldeneye"
    assert json.loads(plan.to_json())["protocol"] == "goldeneye"
    assert _plan(protocol="goldeneye").layers == "all"  # the default when left out


def test_unknown_protocol_is_refused():
    with pytest.raises(ConfigError, match="protocol must be one of: goldeneye; got 'paper'"):
        _plan(protocol="paper")


def test_protocol_is_fingerprinted_only_when_set():
    assert "protocol" not in _plan().fingerprinted()
    plan = _plan(protocol="goldeneye")
    canonical = (
        '{"allocation":"proportional","clamp":"goldeneye","confidence":0.99,'
        '"dataset":"cifar10","fault":"bitflip","format":"fp16","images":"correct",'
        '"layers":"all","margin":0.01,"model_sha":"abc123","n":100,"part_size":4096,'
        '"protocol":"goldeneye","seed":3,"site":"activations","version":1}'
    )
    assert plan.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    assert _plan(clamp="goldeneye").differing_fields(plan) == ["protocol"]
    # A plan written before protocols existed reads back with the same fingerprint.
    old = {k: v for k, v in _plan().to_dict().items() if k != "protocol"}
    assert CampaignPlan.from_json(json.dumps(old)).fingerprint() == _plan().fingerprint()
    assert CampaignPlan.from_json(plan.to_json()) == plan


def test_fault_plan_is_the_plan_without_its_model_and_data():
    from flipsafe.campaign import FaultPlan
    from flipsafe.campaign.plan import FAULT_FIELDS

    faults = FaultPlan(format="FP16", n=100, seed=3)
    assert faults.format == "fp16"  # checked and canonicalised like a CampaignPlan
    a = CampaignPlan.of("hf:models/a", "a" * 64, "cifar10", faults)
    b = CampaignPlan.of("export:b.pt2", "b" * 64, "cifar10", faults)
    assert a.fault_plan == b.fault_plan == faults
    assert a.differing_fields(b) == ["model_sha"]  # another model in a folder is refused
    assert set(FAULT_FIELDS) | {"model", "model_sha", "dataset", "data_sha", "preprocess",
                                "protect", "inputs", "version"} == set(a.to_dict())
    with pytest.raises(ConfigError, match="confidence"):
        FaultPlan(confidence=1.5)


def test_preprocess_is_fingerprinted_only_when_given():
    base = _plan()
    resized = _plan(preprocess={"image_size": 32, "mean": (0.5,), "std": [0.25]})
    assert resized.preprocess == {"image_size": 32, "mean": [0.5], "std": [0.25]}
    assert "preprocess" not in base.fingerprinted()
    assert base.differing_fields(resized) == ["preprocess"]
    assert CampaignPlan.from_json(resized.to_json()) == resized
    for bad in ({"image_size": 0}, {"mean": "0.5"}, {"std": [0.0]}, {"size": 3}):
        with pytest.raises(ConfigError):
            _plan(preprocess=bad)


def test_a_campaign_plan_is_a_fault_plan_with_a_model_and_data():
    from flipsafe.campaign import FaultPlan
    from flipsafe.campaign.plan import FAULT_FIELDS

    plan = _plan(n=50, clamp="profiled")
    assert isinstance(plan, FaultPlan)
    # Every fault field and its default is declared once, in FaultPlan.
    own = {f.name for f in dataclasses.fields(CampaignPlan)} - {
        f.name for f in dataclasses.fields(FaultPlan)}
    # protect is no fault field: a protected plan replays the unprotected plan's faults.
    assert own == {"model", "model_sha", "dataset", "data_sha", "preprocess", "protect",
                   "inputs", "version"}
    assert set(FAULT_FIELDS) == {f.name for f in dataclasses.fields(FaultPlan)}
    assert plan.fault_plan == FaultPlan(format="fp16", seed=3, n=50, clamp="profiled")
