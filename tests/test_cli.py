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
    from flipsafe.campaign.plan import CLAMPS, FAULTS, SITES
    from flipsafe.models import ARCHITECTURES

    subs = _subparsers()
    campaign = " ".join(subs["campaign"].format_help().split())
    for name in (*SITES, *FAULTS, *CLAMPS):
        assert name in campaign
    assert "(default: 0.99)" in campaign and "(default: 0.01)" in campaign
    assert "(default: fp32)" in campaign and "(default: activations)" in campaign
    assert "(default: 4096)" in campaign and "seed of the fault draw (default: 0)" in campaign
    assert "object at 0x" not in campaign
    assert "overrides --margin" in campaign
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
    from flipsafe.campaign import runner
    from flipsafe.campaign.plan import CampaignPlan

    # The checkpoint is not what is tested: a plan for a stand-in model.
    monkeypatch.setattr(runner, "make_plan", lambda model_dir, **fields: CampaignPlan(
        model=model_dir, model_sha="x", dataset="digits", **fields))
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
    from flipsafe.campaign import runner
    from flipsafe.campaign.plan import CampaignPlan

    monkeypatch.setattr(runner, "make_plan", lambda model_dir, **fields: CampaignPlan(
        model=model_dir, model_sha="x", dataset="digits", **fields))
    monkeypatch.setattr(runner, "run_campaign", lambda plan, out, **kw: runner.CampaignRun(
        Path(out), 9000, 0, 3, 0.01, 0.0))
    monkeypatch.setattr(cli, "cmd_summary", lambda args: None)
    assert main(["campaign", "m", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out == f"9,000 injections in {tmp_path / 'r'} (3 parts kept, 0 run)\n"
