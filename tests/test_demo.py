"""The demo reuses the models an earlier run trained, and refuses others before training."""

import pytest
from rich.console import Console

import flipsafe.workflow
from flipsafe import demo
from flipsafe.errors import ConfigError
from flipsafe.train import TrainConfig

SMALL = demo.DemoStudy(arch="mlp")


@pytest.fixture
def small_demo(monkeypatch):
    # Two small models instead of the demo's three ResNet-20s, so the test takes seconds.
    monkeypatch.setattr(demo, "DEMO_MODELS", (("baseline", "linear"), ("cosine-control", "cosine")))
    return Console(quiet=True)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_training(*args, **kwargs):
    raise AssertionError("trained although the models should be reused or refused")


def test_rerun_reuses_models_trained_with_the_same_settings(tmp_path, small_demo, monkeypatch):
    first = demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo, SMALL)
    saved = _files(tmp_path / "models")
    with monkeypatch.context() as m:
        m.setattr(flipsafe.workflow, "train", _no_training)
        again = demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo, SMALL)
    assert again == first
    assert _files(tmp_path / "models") == saved
    # A model missing (say, an interrupted first run) is trained; the other is kept.
    for f in (tmp_path / "models" / "cosine-control").iterdir():
        f.unlink()
    demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo, SMALL)
    assert _files(tmp_path / "models" / "baseline") == {
        k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("baseline/")}


def test_models_trained_otherwise_are_refused_before_any_training(tmp_path, small_demo,
                                                                  monkeypatch):
    demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo, SMALL)
    saved = _files(tmp_path / "models")
    monkeypatch.setattr(flipsafe.workflow, "train", _no_training)
    with pytest.raises(ConfigError, match=r"other settings \(epochs 1 there, 2 now\)"):
        demo.demo_models(tmp_path, TrainConfig(epochs=2, seed=0), small_demo, SMALL)
    assert _files(tmp_path / "models") == saved


def test_run_demo_pins_and_restores_the_thread_count(tmp_path, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    demo.run_demo(tmp_path, threads=3)
    assert seen == [3] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="--threads"):
        demo.run_demo(tmp_path, threads=0)


def test_demo_rerun_with_another_thread_count_resumes(tmp_path, small_demo, monkeypatch):
    # The audit's case: a second run with another thread count retrained, overwrote the
    # models, then failed on its campaigns. Now it reuses the models and resumes.
    monkeypatch.setattr(demo, "demo_campaigns", lambda quick: (
        demo.DemoCampaign("last-layer", "last", 20, "none"),
        demo.DemoCampaign("all-layers", "all", 5, "profiled"),
    ))
    monkeypatch.setattr(demo, "demo_hardening", lambda quick: ())
    import flipsafe.report

    # Report rendering is tested elsewhere; a stub keeps this test short.
    monkeypatch.setattr(flipsafe.report, "write_report",
                        lambda dirs, out, **kw: out.write_text("report") and out)
    first = demo.run_demo(tmp_path, quick=True, console=small_demo, threads=1, study=SMALL)
    models = _files(tmp_path / "models")
    monkeypatch.setattr(flipsafe.workflow, "train", _no_training)
    again = demo.run_demo(tmp_path, quick=True, console=small_demo, threads=2, study=SMALL)
    assert _files(tmp_path / "models") == models
    assert again["report"] == first["report"] and again["report"].is_file()


def _cli(*argv):
    from flipsafe.cli import main

    return main([str(a) for a in argv])


def test_the_study_runs_on_a_users_data_backbone_and_text_encoder(tmp_path, tiny_clip,
                                                                  monkeypatch, capsys):
    """`flipsafe demo --dataset --arch --encoder`: the three models are trained on the
    user's data with the user's backbone, the text head from the user's encoder, and the
    log fits 80 columns with every progress line naming its model."""
    from safetensors.torch import save_file

    from flipsafe import checkpoint
    from flipsafe import textguided as tg
    from flipsafe.workflow import embed_classes

    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    images = (torch.rand(60, 1, 8, 8, generator=gen) * 0.3 + labels[:, None, None, None] * 0.3)
    data = tmp_path / "mine.safetensors"
    save_file({"images": images, "labels": labels}, str(data),
              metadata={"classes": '["cat", "dog", "ship"]'})
    monkeypatch.setattr(demo, "demo_campaigns", lambda quick: (
        demo.DemoCampaign("last-layer", "last", 30, "none"),))
    monkeypatch.setattr(demo, "demo_hardening", lambda quick: ())
    import flipsafe.report

    monkeypatch.setattr(flipsafe.report, "write_report",
                        lambda dirs, out, **kw: out.write_text("report") and out)
    out, clip = tmp_path / "study", f"clip:{tmp_path / 'clip'}"
    capsys.readouterr()
    assert _cli("demo", "--quick", "--threads", 1, "--dataset", f"tensors:{data}", "--arch",
                "mlp", "--encoder", clip, "--out", out) == 0
    log = capsys.readouterr()
    for name in ("baseline", "text-guided", "cosine-control"):
        config = checkpoint.read_config(out / "models" / name)
        assert config["dataset"] == f"tensors:{data}" and config["arch"] == "mlp"
    text = checkpoint.read_config(out / "models" / "text-guided")
    path = out / "models" / demo.CLASS_EMBEDDINGS
    assert text["head_spec"] == f"text:{path}"
    emb, want = tg.load_embeddings(path), embed_classes(f"tensors:{data}", ["cat", "dog", "ship"],
                                                        clip)
    assert emb.classes == ["cat", "dog", "ship"] and torch.equal(emb.vectors, want.vectors)
    lines = (log.out + log.err).splitlines()
    assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)
    runs = [line for line in log.err.splitlines() if " inj " in line or "inj (" in line]
    assert runs and all(any(n in line for n in ("baseline", "text-guided", "cosine-control"))
                        for line in runs)
    assert not [line for line in log.err.splitlines() if line.startswith("inputs:")]


def test_demo_flags_that_cannot_work_are_one_line_and_train_nothing(tmp_path, capsys,
                                                                     monkeypatch):
    import torch

    monkeypatch.setattr(flipsafe.workflow, "train", _no_training)
    assert _cli("demo", "--arch", "nosuchnet", "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuchnet" in err[0]
    if not torch.cuda.is_available():
        assert _cli("demo", "--device", "CUDA", "--out", tmp_path / "b") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA GPU" in err[0]
    assert _cli("demo", "--encoder", "nosuch", "--out", tmp_path / "c") == 2
    assert "nosuch" in capsys.readouterr().err
