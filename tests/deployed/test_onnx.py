"""ONNX files read by flipsafe compute what ONNX Runtime computes; malformed or
unsupported files get one line."""

from __future__ import annotations

import pytest
import torch
from deployed_models import images

from flipsafe.campaign.targets import resolve
from flipsafe.cli import main
from flipsafe.errors import ModelError
from flipsafe.inject import Engine

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def ort_logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def test_float_and_qdq_onnx_models_compute_what_onnx_runtime_computes(onnx_pair):
    fp32, int8 = onnx_pair
    x, _ = images(64, seed=5)
    float_target, int8_target = resolve(f"onnx:{fp32}"), resolve(f"onnx:{int8}")
    assert not float_target.quantized and int8_target.quantized
    assert int8_target.input_shape == (None, 1, 8, 8)
    with torch.no_grad():
        got_fp32, got_int8 = float_target.load()(x), int8_target.load()(x)
    # fp32: the same sums in another order (a few float32 ulps of the logits)
    torch.testing.assert_close(got_fp32, ort_logits(fp32, x), rtol=1e-5, atol=1e-5)
    # int8: the logits are themselves quantized, so a sum landing on the other side of a
    # rounding boundary would move them by one output step at most
    step = float(dict(resolve(f"onnx:{int8}").load().named_modules())["fc_q"]
                 .flipsafe_stored["output"].scale)
    assert (got_int8 - ort_logits(int8, x)).abs().max() <= step
    assert torch.equal(got_int8.argmax(1), ort_logits(int8, x).argmax(1))


def test_qdq_onnx_sites_are_its_stored_codes(onnx_pair):
    _, int8 = onnx_pair
    engine = Engine(resolve(f"onnx:{int8}").load(), "native", input_shape=(1, 8, 8))
    assert [i.name for i in engine.layers("weights")] == ["conv1", "conv2", "conv3", "fc"]
    acts = [i.name for i in engine.layers("activations")]
    assert acts[0] == "input_q" and "add_q" in acts and acts[-1] == "fc_q"
    # the int32 biases are not 8-bit stored codes: no bias site
    with pytest.raises(Exception, match="bias"):
        engine.layers("biases", "conv1")


def _write(path, graph):
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_malformed_and_unsupported_onnx_get_one_line(tmp_path, capsys):
    T = onnx.TensorProto
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    inp = onnx.helper.make_tensor_value_info("input", T.FLOAT, ["batch", 1, 8, 8])
    out = onnx.helper.make_tensor_value_info("logits", T.FLOAT, ["batch", 64])
    erf = _write(tmp_path / "erf.onnx", onnx.helper.make_graph(
        [onnx.helper.make_node("Erf", ["input"], ["e"]),
         onnx.helper.make_node("Flatten", ["e"], ["logits"])], "g", [inp], [out]))
    dyn = onnx.helper.make_tensor_value_info("input", T.FLOAT, ["batch", 1, "h", "w"])
    dynamic = _write(tmp_path / "dynamic.onnx", onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["input"], ["logits"])], "g", [dyn], [out]))
    cases = {not_onnx: "is not an ONNX model", erf: "ONNX ops flipsafe cannot read: Erf",
             dynamic: "fixed channels and size"}
    for path, words in cases.items():
        with pytest.raises(ModelError, match=words):
            resolve(f"onnx:{path}").load()
        code = main(["plan", f"onnx:{path}", "--dataset", "digits"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (path, err)


def test_the_python_front_door_runs_a_quantized_onnx_campaign(onnx_pair, tmp_path):
    import flipsafe

    plan = flipsafe.FaultPlan(site="activations", format="native", n=5)
    results = flipsafe.Campaign(f"onnx:{onnx_pair[1]}", "digits", plan,
                                out=tmp_path / "r").run()
    assert set(results.by_layer) >= {"input_q", "add_q", "fc_q"}
    with pytest.raises(Exception, match="use format native"):
        flipsafe.Campaign(f"onnx:{onnx_pair[1]}", "digits", flipsafe.FaultPlan(n=5),
                          out=tmp_path / "fp32").run()
