import subprocess
import sys

import pytest

from flipsafe.cli import main


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "flipsafe", *args], check=False, capture_output=True, text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--arch", "resnet9000", "--out", "{tmp}/m", "--epochs", "1", "--quiet"], "resnet20"),
        (["train", "--dataset", "imagefolder:{tmp}/nothing", "--out", "{tmp}/m", "--quiet"], "nothing"),
        (["evaluate", "{tmp}/no-such-model"], "does not exist"),
        (["embed", "--descriptions", "{tmp}/missing.json", "--out", "{tmp}/e.safetensors"], "missing.json"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, needle):
    proc = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flipsafe: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "mlp"
    code = main(["train", "--arch", "mlp", "--epochs", "2", "--out", str(out), "--quiet"])
    assert code == 0
    trained = capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert main(["evaluate", str(out)]) == 0
    evaluated = capsys.readouterr().out
    # The accuracy printed by evaluate is the one measured at the end of training.
    acc_train = trained.split("test accuracy ")[1].split("%")[0]
    acc_eval = evaluated.split("accuracy on digits ")[1].split("%")[0]
    assert acc_train == acc_eval


@pytest.mark.parametrize("args, needle", [
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--lr", "1e30"], "training diverged: the loss became nan"),
])
def test_broken_recipes_exit_2_and_save_no_checkpoint(tmp_path, capsys, args, needle):
    out = tmp_path / "m"
    code = main(["train", "--arch", "mlp", "--epochs", "2", "--out", str(out), "--quiet", *args])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flipsafe: error:") and needle in lines[0]
    assert not out.exists() or not any(out.iterdir())
def test_train_refuses_an_existing_checkpoint_unless_forced(tmp_path, capsys, monkeypatch):
    import flipsafe.workflow

    out = tmp_path / "mlp"
    assert main(["train", "--arch", "mlp", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    saved = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the checkpoint is refused")

    with monkeypatch.context() as m:
        m.setattr(flipsafe.workflow, "train", no_training)
        # Even another architecture: refused before any training, the checkpoint untouched.
        assert main(["train", "--arch", "resnet20", "--epochs", "1", "--out", str(out),
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a trained checkpoint" in err[0], err
    assert "--force" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    assert main(["train", "--arch", "mlp", "--epochs", "1", "--seed", "1", "--out", str(out),
                 "--quiet", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != saved["model.safetensors"]


OUT_COMMANDS = {
    "train": (["train", "--arch", "mlp", "--epochs", "1", "--quiet"], True),
    "campaign": (["campaign", "{tmp}/no-model", "--quiet"], True),
    "demo": (["demo", "--quick"], True),
    "report": (["report", "{tmp}/no-results"], False),
    "describe": (["describe", "--dataset", "digits"], False),
    "embed": (["embed", "--descriptions", "{tmp}/d.json"], False),
}


def _one_error_line(capsys, code):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flipsafe: error:"), err
    return lines[0]


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_under_a_file_is_one_line(tmp_path, capsys, command):
    args, _ = OUT_COMMANDS[command]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = _one_error_line(capsys, main([*args, "--out", "/dev/null/x"]))
    assert "'/dev/null' is" in line and "not a folder" in line
    (tmp_path / "file").write_text("keep")
    line = _one_error_line(capsys, main([*args, "--out", str(tmp_path / "file" / "x")]))
    assert "not a folder" in line
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_of_the_wrong_kind_is_one_line(tmp_path, capsys, command):
    args, folder = OUT_COMMANDS[command]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "file").write_text("keep")
    (tmp_path / "dir").mkdir()
    out = tmp_path / ("file" if folder else "dir")
    line = _one_error_line(capsys, main([*args, "--out", str(out)]))
    assert str(out) in line
    assert (tmp_path / "file").read_text() == "keep"


def test_out_under_a_file_from_a_subprocess(tmp_path):
    proc = _run("train", "--arch", "mlp", "--epochs", "1", "--quiet", "--out", "/dev/null/x")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flipsafe: error:"), proc.stderr


def _fake_cifar10(root):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                         "labels": list(range(10))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def test_dataset_of_the_wrong_image_shape_is_one_line(tmp_path, capsys):
    # Ten classes like digits, but 3x32x32 images where the model takes 1x8x8.
    model = tmp_path / "mlp"
    assert main(["train", "--arch", "mlp", "--epochs", "1", "--out", str(model), "--quiet"]) == 0
    capsys.readouterr()
    spec = f"cifar10:{_fake_cifar10(tmp_path / 'cifar')}"
    for command in (["evaluate", str(model)], ["plan", str(model), "--n", "5"]):
        line = _one_error_line(capsys, main([*command, "--dataset", spec]))
        assert "3x32x32" in line and "1x8x8" in line, line
    proc = _run("evaluate", str(model), "--dataset", spec)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("flipsafe: error:") and "1x8x8" in proc.stderr


@pytest.mark.parametrize("command", [
    ["embed", "--descriptions", "{bad}", "--out", "{tmp}/e.safetensors"],
    ["describe", "--dataset", "digits", "--source", "file:{bad}", "--out", "{tmp}/d.json"],
])
def test_a_description_file_that_is_not_utf8_is_one_line(tmp_path, command):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"zero": ["z\xe9ro, a round loop"]}'.encode("latin-1"))
    proc = _run(*[a.replace("{bad}", str(bad)).replace("{tmp}", str(tmp_path)) for a in command])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flipsafe: error:"), proc.stderr
    assert "UTF-8" in lines[0] and str(bad) in lines[0]


def test_a_huge_imagefolder_size_is_refused_fast(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / cls / f"{i}.png")
    proc = _run("train", "--dataset", f"imagefolder:{tmp_path / 'imgs'}?size=100000",
                "--arch", "mlp", "--out", str(tmp_path / "m"), "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flipsafe: error:") and "size" in lines[0]


def run_with_stdout_closed(*args, cwd=None):
    """Run flipsafe with a stdout pipe whose reader is gone before anything is written,
    as in `flipsafe ... | head -0`."""
    proc = subprocess.Popen([sys.executable, "-m", "flipsafe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=300), err


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    code, err = run_with_stdout_closed("describe", "--dataset", "digits", "--out",
                                       str(tmp_path / "d.json"))
    assert err == "" and code == 141, err
    assert (tmp_path / "d.json").is_file()  # the work was done; only the message was lost


def _subparsers():
    import argparse

    from flipsafe.cli import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_of_every_subcommand_has_help():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.dest)


def test_help_shows_defaults_and_choices_from_their_owners():
    from flipsafe.faults import CAMPAIGN_SITES as SITES
    from flipsafe.faults import FAULT_MODELS as FAULTS
    from flipsafe.inject.emulate import CLAMPS
    from flipsafe.models import ARCHITECTURES

    subs = _subparsers()
    campaign = " ".join(subs["campaign"].format_help().split())
    for name in (*SITES, *FAULTS, *CLAMPS):
        assert name in campaign
    assert "(default: 0.99)" in campaign and "(default: 0.01)" in campaign
    assert "(default: fp32; native for a quantized model" in campaign
    assert "(default: activations)" in campaign
    assert "(default: 4096)" in campaign and "seed of the fault draw (default: 0)" in campaign
    assert "object at 0x" not in campaign
    assert "replaces --margin" in campaign
    train = " ".join(subs["train"].format_help().split())
    assert all(a in train for a in ARCHITECTURES)
    # Falsy defaults are still defaults: --seed 0, --label-smoothing 0.0.
    assert "seed for initialisation and data order (default: 0)" in train
    assert "in [0, 1) (default: 0.0)" in train
    assert "(default: None)" not in train and "(default: None)" not in campaign


@pytest.mark.parametrize("text, needle", [
    ('{"a": 1}', "not a JSON object"),
    ('["cat", 3]', "non-string"),
    ('"cat"', "JSON list"),
    ("[cat", "not valid JSON"),
])
def test_a_class_list_must_be_a_json_list_of_strings(tmp_path, capsys, text, needle):
    path = tmp_path / "classes.json"
    path.write_text(text)
    assert main(["describe", "--classes", str(path), "--source", "template",
                 "--out", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "d.json").exists()


def test_a_json_class_list_of_strings_is_read(tmp_path, capsys):
    path = tmp_path / "classes.json"
    path.write_text('["cat", "dog"]')
    assert main(["describe", "--classes", str(path), "--source", "template",
                 "--out", str(tmp_path / "d.json")]) == 0
    assert "for 2 classes" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["0", "-1"])
def test_part_size_below_one_is_refused(monkeypatch, capsys, size):
    # The checkpoint is not what is tested: a plan for a stand-in model.
    from flipsafe.campaign import runner, targets
    from flipsafe.campaign.plan import CampaignPlan

    monkeypatch.setattr(targets, "resolve", lambda spec: spec)
    monkeypatch.setattr(runner, "make_plan", lambda model_dir, **fields: CampaignPlan(
        model=model_dir, model_sha="x", **{"dataset": "digits", "format": "fp32", **fields}))
    assert main(["plan", "m", "--part-size", size]) == 2
    assert f"part_size must be at least 1, got {size}" in capsys.readouterr().err


def test_one_class_is_counted_in_the_singular(tmp_path, capsys):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n")
    assert main(["describe", "--classes", str(path), "--source", "template",
                 "--out", str(tmp_path / "d.json")]) == 0
    assert "descriptions for 1 class to" in capsys.readouterr().out


def test_a_resume_with_nothing_left_prints_no_rate(monkeypatch, capsys, tmp_path):
    from pathlib import Path

    from flipsafe import cli
    from flipsafe.campaign import runner, targets
    from flipsafe.campaign.plan import CampaignPlan

    monkeypatch.setattr(targets, "resolve", lambda spec: spec)
    monkeypatch.setattr(runner, "make_plan", lambda model_dir, **fields: CampaignPlan(
        model=model_dir, model_sha="x", **{"dataset": "digits", "format": "fp32", **fields}))
    monkeypatch.setattr(runner, "run_campaign", lambda plan, out, **kw: runner.CampaignRun(
        Path(out), 9000, 0, 3, 0.01, 0.0))
    monkeypatch.setattr(cli, "cmd_summary", lambda args: None)
    assert main(["campaign", "m", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out == f"9,000 injections in {tmp_path / 'r'} (3 parts kept, 0 run)\n"


def test_n_and_margin_together_are_refused(capsys):
    assert main(["plan", "m", "--n", "5", "--margin", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n and --margin are alternatives" in err[0]


def test_a_file_given_as_checkpoint_folder_is_named_as_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a checkpoint folder" in err and "does not exist" not in err
