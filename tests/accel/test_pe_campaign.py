"""PE-fault campaigns from the command line: plan fields, refusals, resumable results,
and the report that sets element and PE faults of one model side by side."""

from __future__ import annotations

import json

import pytest

from flipsafe.campaign.plan import CampaignPlan
from flipsafe.cli import main
from flipsafe.errors import ConfigError


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    from flipsafe.train import TrainConfig
    from flipsafe.workflow import train_classifier

    out = tmp_path_factory.mktemp("models") / "lenet"
    train_classifier("digits", arch="lenet", head="linear", out=out,
                     config=TrainConfig(epochs=2), show_progress=False)
    return out


def test_the_plan_records_the_array_and_refuses_what_does_not_fit():
    plan = CampaignPlan(model="m", model_sha="0" * 64, dataset="digits", site="pe",
                        fault="stuck1", n=5)
    assert plan.accelerator == "ws:16x16:product"  # the default array
    plan = CampaignPlan(model="m", model_sha="0" * 64, dataset="digits", site="pe",
                        fault="stuck0", n=5, accelerator="OS:4x8:Accumulator")
    assert plan.accelerator == "os:4x8:accumulator"
    other = CampaignPlan(model="m", model_sha="0" * 64, dataset="digits", site="pe",
                         fault="stuck0", n=5, accelerator="os:8x4:accumulator")
    assert other.fingerprint() != plan.fingerprint()
    flips = CampaignPlan(model="m", model_sha="0" * 64, dataset="digits", site="pe",
                         fault="bitflip2", n=5, accelerator="is:4x4:input")
    assert flips.accelerator == "is:4x4:input:transient"  # flips are one event in time
    for fields, words in (({"site": "pe", "accelerator": "ws:accumulator"}, "output-stat"),
                          ({"site": "activations", "accelerator": "ws"}, "--site pe")):
        with pytest.raises(ConfigError, match=words):
            CampaignPlan(model="m", model_sha="0" * 64, dataset="digits", n=5, **fields)


def test_a_pe_campaign_runs_resumes_and_compares_with_element_faults(lenet, tmp_path,
                                                                     capsys):
    pe, element = tmp_path / "pe", tmp_path / "element"
    args = ["campaign", str(lenet), "--site", "pe", "--fault", "stuck1", "--array", "4x4",
            "--dataflow", "os", "--pe-unit", "accumulator", "--n", "20", "--out", str(pe)]
    assert main(args) == 0
    plan = json.loads((pe / "plan.json").read_text())
    assert plan["accelerator"] == "os:4x4:accumulator" and plan["site"] == "pe"
    assert main(args) == 0  # finished: resuming changes nothing
    assert main(["campaign", str(lenet), "--site", "activations", "--fault", "stuck1",
                 "--n", "20", "--out", str(element)]) == 0
    capsys.readouterr()
    assert main(["summary", str(pe), "--faults", str(element)]) == 0
    text = capsys.readouterr().out
    assert "Fault models: pe / element" in text
    assert "pe: pe stuck1 os:4x4:accumulator; element: activations stuck1" in text
    report = tmp_path / "r.html"
    assert main(["report", str(pe), "--faults", str(element), "--out", str(report)]) == 0
    assert "Fault models on one model" in report.read_text()
    # a PE flag without --site pe, or a model that is not the same: one line, exit 2
    capsys.readouterr()
    assert main(["campaign", str(lenet), "--array", "4x4", "--n", "5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--site pe" in capsys.readouterr().err
