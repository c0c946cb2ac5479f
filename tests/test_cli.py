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
