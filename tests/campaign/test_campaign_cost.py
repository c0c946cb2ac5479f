"""A campaign records what its protections cost in its manifest (once), figures checked by
hand against the model."""

import json
import math

import pytest
from torch import nn

from flipsafe.campaign.runner import (
    COST_IMAGES,
    campaign_cost,
    make_plan,
    prepare,
    run_campaign,
)
from flipsafe.campaign.store import read_cost
from flipsafe.checkpoint import load_checkpoint


def _linear_flops(model) -> int:
    """2 * in * out per Linear of an MLP: every image passes each Linear once."""
    return sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear))


def test_an_ecc_campaign_records_its_cost_once(mlp_checkpoint, tmp_path):
    model = load_checkpoint(mlp_checkpoint).model
    assert all(not isinstance(m, (nn.Conv2d, nn.BatchNorm1d)) for m in model.modules())
    plan = make_plan(mlp_checkpoint, site="weights", layers="last", n=20, seed=1, protect="ecc")
    run_campaign(plan, tmp_path / "e", show_progress=False)
    cost = read_cost(tmp_path / "e")
    params = sum(p.numel() for p in model.parameters())
    assert cost["model_flops"] == _linear_flops(model)
    assert cost["param_bits"] == 32 * params and cost["protect"] == "ecc"
    # ecc over every parameterised layer (its default layers=all): 8 bits per 64-bit word.
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    words = sum(math.ceil(p.numel() * 32 / 64) for m in layers for p in m.parameters())
    assert cost["total"]["memory_bits"] == 8 * words
    assert cost["total"]["memory_overhead"] == pytest.approx(8 * words / (32 * params))
    assert cost["total"]["flops"] == 0 and cost["total"]["latency_overhead"] == 0
    assert 0 <= cost["clean_accuracy"] <= 1 and cost["images"] == COST_IMAGES
    # A resume keeps the figures measured the first time.
    before = (tmp_path / "e" / "manifest.json").read_text()
    run_campaign(plan, tmp_path / "e", show_progress=False)
    assert (tmp_path / "e" / "manifest.json").read_text() == before


def test_an_unprotected_campaign_records_model_flops_for_the_head_comparison(
        mlp_checkpoint, tmp_path):
    plan = make_plan(mlp_checkpoint, site="weights", layers="last", n=10, seed=1)
    run_campaign(plan, tmp_path / "b", show_progress=False)
    cost = read_cost(tmp_path / "b")
    assert cost["model_flops"] == _linear_flops(load_checkpoint(mlp_checkpoint).model)
    assert cost["protections"] == {} and cost["total"]["flops"] == 0
    assert cost["clean_latency_s"] is None  # nothing in the model to time
    json.dumps(cost, allow_nan=False)


def test_dup_on_the_last_layer_costs_its_flops_and_a_compare_per_output(mlp_checkpoint):
    plan = make_plan(mlp_checkpoint, site="activations", layers="last", n=10, seed=1,
                     protect="dup:layers=last")
    prep = prepare(plan)
    cost = campaign_cost(prep)
    last = dict(prep.engine.model.named_modules())[prep.classifier]
    assert cost["total"]["flops"] == 2 * last.in_features * last.out_features + last.out_features
    assert cost["total"]["detected_clean"] == 0 and cost["total"]["accuracy_change"] == 0
    assert cost["total"]["latency_s"] > 0
    # Channels chosen by a campaign (e.g. under a budget) replace whole layers.
    two = campaign_cost(prep, {"dup": {prep.classifier: [0, 3]}})
    assert two["total"]["flops"] == 2 * 2 * last.in_features + 2
