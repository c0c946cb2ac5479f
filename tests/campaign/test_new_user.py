"""Defects an outside audit found by running the CLI as a new user (and an attacker) would:
each test runs `flipsafe` and checks the exit code and the first line it prints."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from flipsafe import cli
from flipsafe.campaign import ResultsStore
from flipsafe.campaign.runner import prepare
from flipsafe.data import load
from flipsafe.models import build


def _lenet(channels=1):
    torch.manual_seed(0)
    return build("lenet", 10, in_channels=channels, image_size=8).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An exported lenet, digits as tensors files (0..1, 0..255,
    3 channels), and a python: module whose callable calls sys.exit(0)."""
    d = tmp_path_factory.mktemp("new_user")
    x = torch.randn(2, 1, 8, 8)
    model = _lenet()
    torch.export.save(torch.export.export(
        model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b")}}), d / "lenet.pt2")
    bundle = load("digits")
    pixels, labels = bundle.test.pixels[:48].float(), bundle.test.labels[:48]
    save_file({"images": pixels, "labels": labels}, d / "unit.safetensors")
    save_file({"images": pixels * 255, "labels": labels}, d / "bytes.safetensors")
    save_file({"images": pixels.repeat(1, 3, 1, 1), "labels": labels}, d / "rgb.safetensors")
    (d / "i26_exits.py").write_text(textwrap.dedent("""
        import sys

        def build():
            sys.exit(0)
    """))
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("i26_exits", None)


def _run(capsys, *args):
    """Exit code, stdout and stderr lines of `flipsafe ARGS`."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def _campaign(spec, out, *extra):
    return ["campaign", spec, "--n", 3, "--images", "all", "--part-size", 5, "--out", out,
            *extra]


def test_user_mean_and_std_apply_to_an_hf_model_and_are_recorded(tmp_path, capsys):
    T = pytest.importorskip("transformers")
    config = T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         num_labels=10)
    torch.manual_seed(0)
    T.AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5], "image_std": [0.5], "do_normalize": True}))
    out = tmp_path / "r"
    code, _, err = _run(capsys, *_campaign(f"hf:{tmp_path / 'vit'}", out, "--dataset",
                                           "digits", "--mean", "0.25", "--std", "0.125"))
    assert code == 0, err
    # Said once at the start, with where each setting came from.
    said = [line for line in err if line.startswith("inputs:")]
    assert len(said) == 1 and "mean 0.25, std 0.125 (--mean/--std; the model's own: mean " \
        "0.5, std 0.5)" in said[0], err
    recorded = json.loads((out / "plan.json").read_text())["inputs"]
    assert (recorded["mean"], recorded["std"]) == ([0.25], [0.125])
    assert recorded["normalisation_source"].startswith("--mean/--std")
    # ... and they are what the model ran on: (p - 0.25) / 0.125 by hand.
    prep = prepare(ResultsStore(out).open())
    bundle = load("digits")
    torch.testing.assert_close(prep.images, (bundle.test.pixels.float() - 0.25) / 0.125,
                               rtol=0, atol=1e-6)


def test_a_checkpoints_inputs_are_printed_and_recorded(mlp_checkpoint, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = _run(capsys, "campaign", mlp_checkpoint, "--n", 3, "--layers", "last",
                        "--out", out)
    assert code == 0, err
    assert [line for line in err if line.startswith("inputs: ")] == [
        line for line in err if "the dataset's, as in training" in line], err
    recorded = json.loads((out / "plan.json").read_text())["inputs"]
    bundle = load("digits")
    assert recorded["mean"] == pytest.approx(bundle.test.mean.reshape(-1).tolist())
    assert recorded["pixel_range"] == [0.0, 1.0]


def test_pixels_off_the_unit_scale_are_warned_about(made, tmp_path, capsys):
    code, _, err = _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", tmp_path / "r",
                                           "--dataset", f"tensors:{made / 'bytes.safetensors'}",
                                           "--quiet"))
    assert code == 0
    warned = [line for line in err if line.startswith("flipsafe: warning: ")]
    assert len(warned) == 1 and "range from 0 to 255, not 0..1" in warned[0]
    assert "--mean/--std" in warned[0]
    # Pixels on the 0..1 scale, or a normalisation the user chose, draw no warning.
    for data, extra in (("unit", ()), ("bytes", ("--mean", "0", "--std", "255"))):
        code, _, err = _run(capsys, *_campaign(
            f"export:{made / 'lenet.pt2'}", tmp_path / data, "--dataset",
            f"tensors:{made / (data + '.safetensors')}", "--quiet", *extra))
        assert code == 0 and not [e for e in err if "warning" in e], err


@pytest.mark.parametrize("size", [100000, 16])
def test_an_image_size_an_export_program_cannot_take_is_one_line(made, tmp_path, capsys, size):
    code, _, err = _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", tmp_path / "r",
                                           "--dataset", "digits", "--image-size", size))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"flipsafe: error: --image-size {size} does not fit")
    assert "exported for inputs of shape [batch, 1, 8, 8]" in err[0]
    assert not (tmp_path / "r").exists()


def test_an_image_size_beyond_memory_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "i26_any.py").write_text("from flipsafe.models import build\n\n"
                                         "def lenet():\n"
                                         "    return build('lenet', 10, in_channels=1, "
                                         "image_size=8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = _run(capsys, *_campaign("python:i26_any:lenet", tmp_path / "r",
                                           "--dataset", "digits", "--image-size", 100000))
    assert code == 2 and len(err) == 1, err
    assert "--image-size 100000 would need" in err[0] and "GiB" in err[0]
    assert "the model does not say its size, and the data's images are 8x8" in err[0]


def test_wrong_channels_name_the_exported_shape(made, tmp_path, capsys):
    code, _, err = _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", tmp_path / "r",
                                           "--dataset", f"tensors:{made / 'rgb.safetensors'}"))
    assert code == 2 and len(err) == 1, err
    assert "3x8x8 images (3 channels) but the model takes 1 channels" in err[0]
    assert "exported for inputs of shape [batch, 1, 8, 8]" in err[0]
    assert "dynamic batch" not in err[0]


def test_user_code_that_exits_is_exit_2_naming_the_target(made, tmp_path, capsys):
    code, out, err = _run(capsys, *_campaign("python:i26_exits:build", tmp_path / "r",
                                             "--dataset", "digits"))
    assert code == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith("flipsafe: error: ") and "python:i26_exits:build" in err[0]
    assert "sys.exit(0)" in err[0]


def test_a_folder_of_another_models_campaign_says_which_model(made, mlp_checkpoint, tmp_path,
                                                              capsys):
    out = tmp_path / "r"
    assert _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", out, "--dataset",
                                   "digits", "--quiet"))[0] == 0
    before = sorted(p.name for p in (out / "parts").iterdir())
    code, _, err = _run(capsys, "campaign", mlp_checkpoint, "--n", 3, "--images", "all",
                        "--part-size", 5, "--out", out, "--quiet")
    assert code == 2 and len(err) == 1, err
    assert f"holds a campaign of another model: export:{made / 'lenet.pt2'}" in err[0]
    assert f"not {mlp_checkpoint}" in err[0] and "remove" in err[0]
    assert sorted(p.name for p in (out / "parts").iterdir()) == before


@pytest.mark.parametrize("flags, said", [
    (["--mean", "0.5"], "--mean was given without --std"),
    (["--std", "0.5"], "--std was given without --mean"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 2^64 - 1, got -1"),
    (["--seed", str(2**64)], f"seed must be a whole number from 0 to 2^64 - 1, got {2**64}"),
    (["--workers", "-1"], "--workers must be a whole number of at least 1, got -1"),
])
def test_bad_flags_are_one_line_and_write_nothing(made, tmp_path, capsys, flags, said):
    out = tmp_path / "r"
    code, _, err = _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", out, "--dataset",
                                           "digits", *flags))
    assert code == 2 and err == [f"flipsafe: error: {said}"] or said in err[0], err
    assert code == 2 and len(err) == 1
    assert not out.exists()


def test_a_non_empty_folder_without_a_campaign_is_refused(made, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    code, _, err = _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", out, "--dataset",
                                           "digits"))
    assert code == 2 and len(err) == 1, err
    assert "is not empty and holds no campaign" in err[0] and "notes.txt" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert _run(capsys, *_campaign(f"export:{made / 'lenet.pt2'}", tmp_path / "empty",
                                   "--dataset", "digits", "--quiet"))[0] == 0


def _read_only_mounts() -> bool:
    """True when this process may bind-mount a folder read-only in a private namespace
    (root on Linux with util-linux's unshare): the one way to make a folder unwritable for
    root, who ignores permission bits."""
    probe = shutil.which("unshare") and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind -o ro /tmp /tmp"], capture_output=True, check=False)
    return bool(probe) and probe.returncode == 0


@pytest.mark.skipif(not _read_only_mounts(), reason="needs unshare -m and mount (root)")
def test_a_finished_campaign_resumes_on_a_read_only_folder(made, tmp_path):
    out = tmp_path / "r"
    args = [sys.executable, "-m", "flipsafe", *map(str, _campaign(
        f"export:{made / 'lenet.pt2'}", out, "--dataset", "digits"))]
    first = subprocess.run([*args, "--quiet"], capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    script = f'mount --bind -o ro "{out}" "{out}" && exec "$@"'
    again = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args],
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"the campaign in {out} is complete" in again.stderr
    assert "injections in" in again.stdout  # the summary follows, as after any run
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    # A campaign that is not finished says it cannot write there, in one line.
    (out / "parts" / "part-000001.parquet").unlink()
    again = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args],
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(
        f"flipsafe: error: cannot write --out '{out}'"), again.stderr
