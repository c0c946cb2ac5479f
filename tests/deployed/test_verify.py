"""`flipsafe verify`: a campaign's rows replayed on the model file in its own runtime agree
with what the engine recorded, site by site, >= 200 rows each."""

from __future__ import annotations

import json

import pytest

from flipsafe.cli import main
from flipsafe.deployed import verify

pytest.importorskip("onnxruntime")
pytest.importorskip("torchao")

ROWS = 200


def campaign(spec, site, out, capsys) -> None:
    # 60 faults per layer: every site of the tiny CNN has >= 4 layers, so >= 240 rows
    assert main(["campaign", spec, "--dataset", "digits", "--site", site, "--n", "60",
                 "--out", str(out), "--seed", "3"]) == 0
    capsys.readouterr()


def replay(out, capsys, *flags) -> tuple[int, str]:
    code = main(["verify", str(out), "--n", str(ROWS), *flags])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("site", ["weights", "activations", "metadata", "weight_metadata",
                                  "zero_points", "weight_zero_points"])
def test_pt2e_campaigns_agree_with_the_saved_program(pt2e_file, site, tmp_path, capsys):
    out = tmp_path / site
    campaign(f"export:{pt2e_file}", site, out, capsys)
    code, text = replay(out, capsys)
    assert f"replayed {ROWS} rows in torch" in text and code == 0, text
    assert "verify: every row agrees" in text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "native"  # the default for a quantized target


@pytest.mark.parametrize("site", ["weights", "activations", "zero_points",
                                  "weight_zero_points"])
def test_onnx_code_faults_agree_with_onnx_runtime_as_deployed(onnx_pair, site, tmp_path,
                                                               capsys):
    out = tmp_path / site
    campaign(f"onnx:{onnx_pair[1]}", site, out, capsys)
    code, text = replay(out, capsys)
    assert "graph optimizations on" in text and code == 0, text


@pytest.mark.parametrize("site", ["metadata", "weight_metadata"])
def test_onnx_scale_faults_agree_with_the_qdq_graph_as_written(onnx_pair, site, tmp_path,
                                                               capsys):
    """Scale faults follow the QDQ graph's arithmetic; ONNX Runtime's fused integer
    kernels fold the scales into one multiplier and may round otherwise (the docs say so)."""
    out = tmp_path / site
    campaign(f"onnx:{onnx_pair[1]}", site, out, capsys)
    code, text = replay(out, capsys, "--no-optimizations")
    assert "graph optimizations off" in text and code == 0, text


def test_a_disagreement_is_named_and_exits_1(monkeypatch, tmp_path, capsys):
    row = {"fault_id": 7, "layer": "conv1", "param": "weight", "index": 3, "bits": [7],
           "image_id": 2, "sdc": True}
    bad = verify.Verification("torch", 10, {c: 10 for c in verify.COLUMNS}, {"sdc": row})
    bad.agree["sdc"] = 9
    monkeypatch.setattr(verify, "run", lambda *a, **k: bad)
    assert main(["verify", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "sdc                9    10   90.00%" in text
    assert "first disagreement in sdc: fault 7 (conv1 weight index 3" in text


def test_compare_checks_each_column_against_runtime_logits():
    import torch

    golden = torch.tensor([[2.0, 1.0, 0.0]])
    faulty = torch.tensor([[0.0, 3.0, 0.0]])
    recorded = {"sdc": True, "due": False, "faulty_top1": 1, "golden_top1": 0,
                "faulty_loss": float(torch.nn.functional.cross_entropy(faulty, torch.tensor([0])))}
    assert all(verify.compare(recorded, golden, faulty, 0).values())
    wrong = {**recorded, "sdc": False, "faulty_loss": recorded["faulty_loss"] * 1.01}
    got = verify.compare(wrong, golden, faulty, 0)
    assert not got["sdc"] and not got["faulty_loss"] and got["due"]


def test_verify_refuses_a_float_campaign_with_one_line(tmp_path, capsys, onnx_pair):
    out = tmp_path / "float"
    assert main(["campaign", f"onnx:{onnx_pair[0]}", "--dataset", "digits", "--n", "5",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verify replays quantized deployed models" in err[0]
