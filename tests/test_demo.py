"""The demo reuses the models an earlier run trained, and refuses others before training."""

import pytest
from rich.console import Console

import flipsafe.workflow
from flipsafe import demo
from flipsafe.errors import ConfigError
from flipsafe.train import TrainConfig


@pytest.fixture
def small_demo(monkeypatch):
    # Two small models instead of the demo's three ResNet-20s, so the test takes seconds.
    monkeypatch.setattr(demo, "DEMO_ARCH", "mlp")
    monkeypatch.setattr(demo, "DEMO_MODELS", (("baseline", "linear"), ("cosine-control", "cosine")))
    return Console(quiet=True)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_training(*args, **kwargs):
    raise AssertionError("trained although the models should be reused or refused")


def test_rerun_reuses_models_trained_with_the_same_settings(tmp_path, small_demo, monkeypatch):
    first = demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo)
    saved = _files(tmp_path / "models")
    with monkeypatch.context() as m:
        m.setattr(flipsafe.workflow, "train", _no_training)
        again = demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo)
    assert again == first
    assert _files(tmp_path / "models") == saved
    # A model missing (say, an interrupted first run) is trained; the other is kept.
    for f in (tmp_path / "models" / "cosine-control").iterdir():
        f.unlink()
    demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo)
    assert _files(tmp_path / "models" / "baseline") == {
        k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("baseline/")}


def test_models_trained_otherwise_are_refused_before_any_training(tmp_path, small_demo,
                                                                  monkeypatch):
    demo.demo_models(tmp_path, TrainConfig(epochs=1, seed=0), small_demo)
    saved = _files(tmp_path / "models")
    monkeypatch.setattr(flipsafe.workflow, "train", _no_training)
    with pytest.raises(ConfigError, match=r"other settings \(epochs 1 there, 2 now\)"):
        demo.demo_models(tmp_path, TrainConfig(epochs=2, seed=0), small_demo)
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
    first = demo.run_demo(tmp_path, quick=True, console=small_demo, threads=1)
    models = _files(tmp_path / "models")
    monkeypatch.setattr(flipsafe.workflow, "train", _no_training)
    again = demo.run_demo(tmp_path, quick=True, console=small_demo, threads=2)
    assert _files(tmp_path / "models") == models
    assert again["report"] == first["report"] and again["report"].is_file()
