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


def test_a_transient_pe_fit_counts_the_arrays_bits_once_shared_by_layer_time(lenet, tmp_path,
                                                                              capsys):
    """The PEs' unit bits are at risk once, shared by the layers in proportion to their
    share of the PE's events; a permanent PE campaign's FIT is refused in one line."""
    from flipsafe.safety.fit import estimate_fit

    out = tmp_path / "t"
    assert main(["campaign", str(lenet), "--site", "pe", "--fault", "bitflip", "--array",
                 "4x4", "--n", "30", "--out", str(out)]) == 0
    est = estimate_fit([out], raw_fit_per_mbit=20.0)[0]
    assert est.total.bits == pytest.approx(16 * 32)  # 4x4 PEs, a float32 product each
    plan = json.loads((out / "plan.json").read_text())
    assert plan["accelerator"] == "ws:4x4:product:transient"
    manifest = json.loads((out / "manifest.json").read_text())
    steps = {s["layer"]: s["elements"] for s in manifest["strata"]}
    for group in est.by_layer:  # each layer's share: its events over all layers'
        assert group.bits == pytest.approx(16 * 32 * steps[group.layer] / sum(steps.values()))
    stuck = tmp_path / "s"
    assert main(["campaign", str(lenet), "--site", "pe", "--fault", "stuck1", "--array", "4x4",
                 "--n", "5", "--out", str(stuck)]) == 0
    capsys.readouterr()
    assert main(["fit", str(stuck), "--raw-fit-per-mbit", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "permanent PE faults" in err[0]
