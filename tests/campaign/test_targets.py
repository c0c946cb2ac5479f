"""Campaigns on models flipsafe did not train: hf:, torchscript:, export:, python: and
nn.Modules in Python; their checks, and results that equal direct engine runs."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

import flipsafe
from flipsafe import cli
from flipsafe.campaign import ResultsStore
from flipsafe.campaign import runner as runner_mod
from flipsafe.campaign.runner import fault_list, make_plan, prepare
from flipsafe.campaign.targets import model_inputs, resolve
from flipsafe.inject import Engine
from flipsafe.models import build

N = 4  # faults per layer
PART = 7


def _lenet(seed=0, num_classes=10, image_size=8):
    torch.manual_seed(seed)
    return build("lenet", num_classes, in_channels=1, image_size=image_size).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A lenet saved as a torch.export program, a TorchScript file, and a python: module."""
    d = tmp_path_factory.mktemp("targets")
    model = _lenet()
    x = torch.randn(2, 1, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    torch.export.save(program, d / "lenet.pt2")
    torch.jit.save(torch.jit.script(model), d / "lenet.pt")
    (d / "i12_user_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from flipsafe.models import build

        def lenet(seed=0, classes=10, size=8):
            torch.manual_seed(seed)
            return build("lenet", classes, in_channels=1, image_size=size).eval()

        def other():
            return lenet(seed=1)

        def five_classes():
            return lenet(classes=5)

        def big_images():
            return lenet(size=16)

        def not_a_module():
            return 42

        class Pairs(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)

            def forward(self, x):
                return {"scores": self.fc(x.flatten(1))}

        def pairs():
            return Pairs()

        class NoLayers(nn.Module):
            def forward(self, x):
                return x.flatten(1)[:, :10] * 2

        def no_layers():
            return NoLayers()
    """))
    sys.path.insert(0, str(d))
    yield {"model": model, "export": d / "lenet.pt2", "torchscript": d / "lenet.pt", "dir": d}
    sys.path.remove(str(d))
    sys.modules.pop("i12_user_models", None)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny random-init Hugging Face classifiers for 1-channel 8x8 images, saved offline."""
    T = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    configs = {
        "vit": T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        "resnet": T.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                 depths=[1, 1]),
        "convnext": T.ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16],
                                     depths=[1, 1]),
    }
    out = {}
    for name, config in configs.items():
        config.num_labels = 10
        config.id2label = {i: f"digit{i}" for i in range(10)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        torch.manual_seed(0)
        T.AutoModelForImageClassification.from_config(config).save_pretrained(d / name)
        out[name] = d / name
    return out


def _cli(*args) -> int:
    return cli.main([str(a) for a in args])


def _campaign(spec, out, *extra) -> int:
    return _cli("campaign", spec, "--dataset", "digits", "--n", N, "--images", "all",
                "--part-size", PART, "--quiet", "--out", out, *extra)


def _rows(out):
    store = ResultsStore(out)
    store.open()
    return store.read().sort_by("fault_id")


def _assert_same_rows(a, b):
    """Equal faults and outcomes; losses equal to float32 rounding (golden runs of other
    batch sizes may round a logit differently)."""
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        if name.endswith(("loss", "top2diff")):
            np.testing.assert_allclose(a.column(name).to_numpy(), b.column(name).to_numpy(),
                                       rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


def _assert_rows_equal_engine(out, engine_model):
    """The stored outcomes equal a direct run of a fresh engine on `engine_model` with the
    campaign's own fault list and images."""
    store = ResultsStore(out)
    plan = store.open()
    prep = prepare(plan)
    faults = fault_list(prep)
    engine = Engine(engine_model, format=plan.format, clamp=plan.clamp)
    direct = engine.run(faults, prep.images, prep.labels)
    rows = _rows(out)
    assert rows.num_rows == len(faults)
    for col in ("faulty_top1", "golden_top1", "sdc", "due"):
        np.testing.assert_array_equal(rows.column(col).to_numpy(),
                                      getattr(direct, col).numpy(), err_msg=col)
    # Losses are float32 sums over logits from batches of other sizes: equal to rounding.
    for col in ("golden_loss", "delta_loss"):
        np.testing.assert_allclose(rows.column(col).to_numpy(),
                                   getattr(direct, col).double().numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=col)


@pytest.mark.parametrize("kind", ["export", "torchscript"])
def test_graph_files_run_the_original_model(files, kind, tmp_path):
    # The lifted graph has the original layer names, so a fresh engine on the original
    # lenet, given the campaign's faults, must give the stored outcomes exactly.
    out = tmp_path / kind
    assert _campaign(f"{kind}:{files[kind]}", out) == 0
    _assert_rows_equal_engine(out, files["model"])
    info = json.loads((out / "model.json").read_text())
    assert info["kind"] == kind and info["classifier"] == "fc"
    assert len(info["sha256"]) == 64
    # The same file through the Python front door: the same rows.
    api = flipsafe.Campaign(f"{kind}:{files[kind]}", "digits",
                            flipsafe.FaultPlan(n=N, images="all", part_size=PART),
                            out=tmp_path / "api").run()
    assert api.results.n == _rows(out).num_rows
    _assert_same_rows(_rows(tmp_path / "api"), _rows(out))


def test_python_spec_and_python_api_equal_the_engine(files, tmp_path):
    assert _campaign("python:i12_user_models:lenet", tmp_path / "cli") == 0
    _assert_rows_equal_engine(tmp_path / "cli", files["model"])
    # The same model and images through the Python front door: the same outcomes.
    from flipsafe.data import load

    bundle = load("digits")
    plan = flipsafe.FaultPlan(n=N, images="all", part_size=PART)
    results = flipsafe.Campaign(_lenet(), bundle.test.tensors(), plan,
                                out=tmp_path / "api").run()
    a, b = _rows(tmp_path / "cli"), _rows(tmp_path / "api")
    for col in ("layer", "index", "bits", "image_id", "faulty_top1", "sdc", "due"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert set(results.by_layer) == {"features.0", "features.3", "hidden.0", "hidden.2", "fc"}
    assert "fc (last)" in results.summary()


def test_api_takes_a_dataset_and_reports(files, tmp_path):
    from torch.utils.data import TensorDataset

    from flipsafe.data import load

    images, labels = load("digits").test.tensors()
    plan = flipsafe.FaultPlan(n=3, images="all", layers="last")
    a = flipsafe.Campaign(_lenet(), TensorDataset(images, labels), plan, out=tmp_path / "a",
                          data_name="digits-test").run()
    b = flipsafe.Campaign(_lenet(seed=1), (images, labels), plan, out=tmp_path / "b",
                          data_name="digits-test").run()
    text = a.compare(b)
    assert "a" in text and "b" in text and "fc (last)" in text
    path = a.report(tmp_path / "r.md", b)
    md = path.read_text()
    assert "LeNet given in Python (sha256" in md


@pytest.mark.parametrize("name", ["vit", "resnet", "convnext"])
def test_hf_classifiers(hf, name, tmp_path):
    out = tmp_path / name
    assert _campaign(f"hf:{hf[name]}", out) == 0
    # The campaign ran on the exported, lifted graph (the engine's fast path); a fresh
    # engine on the model as transformers builds it gives the same outcomes.
    target = resolve(f"hf:{hf[name]}")
    assert not isinstance(target.load(torch.zeros(2, 1, 8, 8)), type(target.eager()))
    _assert_rows_equal_engine(out, target.eager())
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == [f"digit{i}" for i in range(10)]
    if name == "vit":
        # And through Python, with the spec string and a dataset spec.
        r = flipsafe.Campaign(f"hf:{hf[name]}", "digits",
                              flipsafe.FaultPlan(n=N, images="all", part_size=PART),
                              out=tmp_path / "api").run()
        assert r.results.n == _rows(out).num_rows
        assert _rows(tmp_path / "api").column("sdc").to_pylist() == \
            _rows(out).column("sdc").to_pylist()


def test_hf_preprocessor_config_sets_size_and_normalisation(hf, tmp_path):
    import shutil

    folder = tmp_path / "vit"
    shutil.copytree(hf["vit"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 8, "width": 8}, "image_mean": [0.5], "image_std": [0.25],
         "do_normalize": True}))
    from flipsafe.data import load

    bundle = load("digits")
    x = model_inputs(resolve(f"hf:{folder}"), bundle.test, bundle, None)
    # digits pixels are on the 0..1 scale already: (p - 0.5) / 0.25 by hand.
    torch.testing.assert_close(x, (bundle.test.pixels - 0.5) / 0.25, rtol=0, atol=1e-6)


def test_image_size_mean_std_flags(files, tmp_path):
    # A python: model for 16x16 images on 8x8 digits: resized by --image-size.
    assert _campaign("python:i12_user_models:big_images", tmp_path / "a", "--image-size",
                     16, "--mean", "0.5", "--std", "0.25") == 0
    plan = ResultsStore(tmp_path / "a").open()
    assert plan.preprocess == {"image_size": 16, "mean": [0.5], "std": [0.25]}
    from flipsafe.data import load

    bundle = load("digits")
    x = model_inputs(resolve("python:i12_user_models:big_images"), bundle.test, bundle,
                     plan.preprocess)
    assert x.shape[1:] == (1, 16, 16)
    # A constant image stays constant when resized: normalised by hand.
    flat = bundle.test.pixels[:1] * 0 + 0.75
    bundle.test.pixels = flat
    x = model_inputs(resolve("python:i12_user_models:big_images"), bundle.test, bundle,
                     plan.preprocess)
    torch.testing.assert_close(x, torch.full((1, 1, 16, 16), (0.75 - 0.5) / 0.25))


def test_same_fault_plan_on_two_models_compares(files, tmp_path, capsys):
    assert _campaign("python:i12_user_models:lenet", tmp_path / "A") == 0
    assert _campaign("python:i12_user_models:other", tmp_path / "B") == 0
    capsys.readouterr()
    assert _cli("summary", tmp_path / "A", "--vs", tmp_path / "B") == 0
    out = capsys.readouterr().out
    assert "A" in out and "B" in out and "python" in out
    assert _cli("report", tmp_path / "A", "--vs", tmp_path / "B", "--format", "md",
                "--out", tmp_path / "r.md") == 0
    md = (tmp_path / "r.md").read_text()
    sha = make_plan("python:i12_user_models:other", dataset="digits", n=1).model_sha
    assert f"(sha256 {sha[:16]})" in md


def test_tensors_dataset(files, tmp_path):
    from safetensors.torch import save_file

    from flipsafe.data import load

    bundle = load("digits")
    pixels = (bundle.test.pixels[:40] * 255).round().to(torch.uint8)
    save_file({"images": pixels, "labels": bundle.test.labels[:40]}, tmp_path / "d.safetensors",
              metadata={"classes": json.dumps([str(i) for i in range(10)])})
    spec = f"tensors:{tmp_path / 'd.safetensors'}"
    loaded = load(spec)
    assert len(loaded.test) == 40 and loaded.classes_known
    torch.testing.assert_close(loaded.test.pixels, pixels)
    assert _cli("campaign", f"export:{files['export']}", "--dataset", spec, "--n", 2,
                "--images", "all", "--quiet", "--out", tmp_path / "out") == 0
    assert _rows(tmp_path / "out").column("image_id").to_numpy().max() < 40


def test_golden_runs_shared_across_parts_give_the_same_rows(files, tmp_path, monkeypatch):
    plan = make_plan("python:i12_user_models:lenet", dataset="digits", n=6, images="all",
                     part_size=5)
    runner_mod.run_campaign(plan, tmp_path / "shared", show_progress=False)
    from flipsafe.campaign import work

    monkeypatch.setattr(work, "GOLDEN_CACHE_BYTES", 0)  # each part its own golden runs
    prep = prepare(plan)
    assert runner_mod.golden_cache(prep, fault_list(prep)) is None
    runner_mod.run_campaign(plan, tmp_path / "per-part", show_progress=False)
    _assert_same_rows(_rows(tmp_path / "shared"), _rows(tmp_path / "per-part"))


BAD = {
    "channels": ("hf:{vit3}", "3 channels"),
    "import": ("python:no_such_module_i12:build", "cannot import 'no_such_module_i12'"),
    "not a module": ("python:i12_user_models:not_a_module", "not a torch nn.Module"),
    "classes": ("python:i12_user_models:five_classes", "scores 5 classes but the dataset has 10"),
    "logits": ("python:i12_user_models:pairs", "returns dict, not a logits tensor"),
    "shape": ("python:i12_user_models:big_images", "fails on 1x8x8 images"),
    "export file": ("export:{torchscript}", "is not a saved torch.export program"),
    "torchscript file": ("torchscript:{notes}", "is not a TorchScript file"),
    "no layers": ("python:i12_user_models:no_layers", "has no Conv or Linear layer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_models_are_one_line_errors(files, hf, case, tmp_path, capsys):
    notes = tmp_path / "notes.pt"
    notes.write_text("not a model")
    vit3 = tmp_path / "vit3"
    if case == "channels":
        import transformers as T

        config = T.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             num_labels=10)
        T.AutoModelForImageClassification.from_config(config).save_pretrained(vit3)
    spec, message = BAD[case]
    spec = spec.format(vit3=vit3, torchscript=files["torchscript"], notes=notes)
    # A finished campaign in the folder first: a refused model must not lose it.
    out = tmp_path / "out"
    assert _campaign("python:i12_user_models:lenet", out) == 0
    before = _rows(out)
    capsys.readouterr()
    assert _campaign(spec, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("flipsafe: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _rows(out).equals(before)


def test_another_model_in_the_same_folder_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _campaign("python:i12_user_models:lenet", out) == 0
    capsys.readouterr()
    # Same architecture, other weights: the plan fingerprint (model_sha) refuses it.
    assert _campaign("python:i12_user_models:other", out) == 2
    assert "flipsafe: error:" in capsys.readouterr().err


def test_foreign_models_need_a_dataset(files, tmp_path, capsys):
    assert _cli("campaign", f"export:{files['export']}", "--quiet", "--out", tmp_path) == 2
    assert "needs a dataset" in capsys.readouterr().err


def test_flipsafe_checkpoints_refuse_preprocessing_flags(mlp_checkpoint, tmp_path, capsys):
    assert _cli("plan", mlp_checkpoint, "--image-size", 16) == 2
    assert "--image-size" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(files, tmp_path, capsys):
    assert _campaign(f"export:{files['export']}", tmp_path / "o", "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_device_auto_runs(files, tmp_path):
    assert _campaign(f"export:{files['export']}", tmp_path / "o", "--device", "auto") == 0


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Campaigns on your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    assert (tmp_path / "report.html").is_file()
    assert (tmp_path / "results" / "lenet" / "plan.json").is_file()


def test_killed_campaign_on_an_exported_model_resumes_to_the_uninterrupted_rows(files,
                                                                                 tmp_path):
    import os
    import subprocess

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "flipsafe", "campaign", f"export:{files['export']}",
            "--dataset", "digits", "--images", "all", "--n", "150", "--part-size", "10",
            "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    from killing import kill_after_two_parts

    assert 0 < kill_after_two_parts(args, out / "parts", env) < 75
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    plan = make_plan(f"export:{files['export']}", dataset="digits", images="all", n=150,
                     part_size=10)
    runner_mod.run_campaign(plan, tmp_path / "whole", show_progress=False)
    _assert_same_rows(_rows(out), _rows(tmp_path / "whole"))


@pytest.mark.parametrize("kind", ["export", "torchscript"])
def test_graph_files_keep_batch_norm_emulated(kind, tmp_path):
    # resnet20's BatchNorm outputs are rounded to bf16 in the original model; the lifted
    # graph must hold them as torch.nn BatchNorm layers so the engine rounds them too.
    torch.manual_seed(0)
    model = build("resnet20", 10, in_channels=1, image_size=8).eval()
    x = torch.randn(2, 1, 8, 8)
    if kind == "export":
        path = tmp_path / "r.pt2"
        torch.export.save(torch.export.export(
            model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b")}}), path)
    else:
        path = tmp_path / "r.pt"
        torch.jit.save(torch.jit.script(model), path)
    out = tmp_path / "out"
    assert _cli("campaign", f"{kind}:{path}", "--dataset", "digits", "--n", 2, "--images",
                "all", "--format", "bf16", "--quiet", "--out", out) == 0
    _assert_rows_equal_engine(out, model)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_hf_lifted_norms_are_emulated_like_the_eager_model(hf, name, tmp_path):
    # In bf16 the outputs of BatchNorm (resnet) and LayerNorm (convnext) are rounded too:
    # the lifted graph must hold them as norm layers, as the eager model does.
    out = tmp_path / name
    assert _campaign(f"hf:{hf[name]}", out, "--format", "bf16") == 0
    _assert_rows_equal_engine(out, resolve(f"hf:{hf[name]}").eager())


def test_non_finite_images_are_refused_in_one_line(files, tmp_path, capsys):
    from safetensors.torch import save_file

    from flipsafe.data import load

    bundle = load("digits")
    pixels = bundle.test.pixels[:20].clone().float()
    pixels[3, 0, 2, 2] = float("nan")
    save_file({"images": pixels, "labels": bundle.test.labels[:20]}, tmp_path / "nan.safetensors")
    capsys.readouterr()
    assert _cli("campaign", f"export:{files['export']}", "--dataset",
                f"tensors:{tmp_path / 'nan.safetensors'}", "--n", 2, "--images", "all",
                "--quiet", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Named, not "20 images": the NaN must not spread through the dataset's statistics.
    assert len(err) == 1 and "1 of 20 images hold NaN or infinite pixels (index 3)" in err[0], err
    assert not (tmp_path / "out" / "parts").exists()


def test_module_sha_covers_zero_dim_buffers():
    """A model with BatchNorm (its num_batches_tracked is a 0-dim buffer) hashes like any
    other: sha256 over each state entry's name, dtype, shape and bytes, in order."""
    import hashlib

    from flipsafe.campaign.targets import state_sha

    model = build("resnet20", 10, in_channels=1, image_size=8)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}\x00{tensor.dtype}\x00{list(tensor.shape)}\x00".encode())
        digest.update(tensor.numpy().tobytes())
    assert resolve(model).sha == state_sha(model) == digest.hexdigest()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.num_batches_tracked.fill_(3)
    assert state_sha(model) != digest.hexdigest()
