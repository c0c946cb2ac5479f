"""`flipsafe attack`: the flips it reports reproduce its accuracy when applied by hand, it
resumes to the same flips, and bad flags are one line with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flipsafe.attack import ATTACK_FILE, AttackPlan, apply_flips, model_sha, run_attack
from flipsafe.checkpoint import load_checkpoint
from flipsafe.cli import main
from flipsafe.data import load

TARGET = 0.3


@pytest.fixture(scope="module")
def attacks(mlp_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("attack")
    out = {}
    for fmt in ("fp32", "int8"):
        plan = AttackPlan(model_sha=model_sha(mlp_checkpoint), format=fmt, budget=12,
                          target_accuracy=TARGET, seed=1)
        out[fmt] = (root / fmt, plan, run_attack(mlp_checkpoint, root / fmt, plan,
                                                 show_progress=False))
    return out


def _test_accuracy(model) -> float:
    x, y = load("digits").test.tensors()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _fp32_by_hand(model, flips):
    """Each flip XORs one bit of the float32 pattern of one weight (NumPy, no flipsafe)."""
    params = dict(model.named_parameters())
    for f in flips:
        w = params[f["layer"]].detach().numpy().reshape(-1).view(np.uint32)
        w[f["index"]] ^= np.uint32(1 << f["bit"])
    return model


def test_each_reported_flip_reproduces_its_accuracy_by_hand(attacks, mlp_checkpoint):
    _, _, record = attacks["fp32"]
    assert record["flips"], record
    for k in range(1, len(record["flips"]) + 1):
        model = _fp32_by_hand(load_checkpoint(mlp_checkpoint).model, record["flips"][:k])
        assert _test_accuracy(model) == pytest.approx(record["accuracy"][k - 1], abs=1e-12)
    # int8: the codes are the clean weights' (scale fixed), flipped, decoded.
    _, _, record = attacks["int8"]
    model = apply_flips(load_checkpoint(mlp_checkpoint).model, "int8", record["flips"])
    assert _test_accuracy(model) == pytest.approx(record["final_accuracy"], abs=1e-12)


def test_the_attack_breaks_the_model_and_fp32_breaks_first(attacks):
    fp32, int8 = attacks["fp32"][2], attacks["int8"][2]
    assert fp32["final_accuracy"] <= TARGET < fp32["clean_accuracy"]
    assert int8["final_accuracy"] < int8["clean_accuracy"] - 0.05
    for r in (fp32, int8):
        assert all(f["layer"].endswith(".weight") for f in r["flips"])
        assert r["evaluations"] > len(r["flips"]) and r["evaluations_per_s"] > 0
    assert fp32["flips_needed"] is not None
    assert int8["flips_needed"] is None or fp32["flips_needed"] <= int8["flips_needed"]
    # fp32's flips are exponent bits; int8's land in its 8 bits.
    assert all(23 <= f["bit"] <= 30 for f in fp32["flips"])
    assert all(0 <= f["bit"] <= 7 for f in int8["flips"])


def test_a_killed_attack_resumes_to_the_same_flips(attacks, mlp_checkpoint, tmp_path):
    folder, plan, whole = attacks["int8"]
    out = tmp_path / "killed"
    out.mkdir()
    partial = json.loads((folder / ATTACK_FILE).read_text())
    keep = 2
    for key in ("flips", "accuracy", "attack_loss"):
        partial[key] = partial[key][:keep]
    (out / ATTACK_FILE).write_text(json.dumps(partial))
    again = run_attack(mlp_checkpoint, out, plan, show_progress=False)
    assert again["flips"] == whole["flips"] and again["accuracy"] == whole["accuracy"]


def test_the_cli_prints_the_curve_and_writes_the_flips(mlp_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["attack", str(mlp_checkpoint), "--format", "fp32", "--budget", "3",
                 "--target-accuracy", str(TARGET), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    record = json.loads((out / ATTACK_FILE).read_text())
    assert "after each flip: " in text and f"{record['flips_needed']} flip(s)" in text
    assert set(record) >= {"flips", "accuracy", "final_accuracy"}


@pytest.mark.parametrize("flags, needle", [
    (["--budget", "0"], "--budget must be a whole number of flips"),
    (["--target-accuracy", "2"], "--target-accuracy must be a fraction"),
    (["--format", "int7.5"], "int7.5"),
])
def test_bad_attack_flags_are_one_line_and_exit_2(mlp_checkpoint, tmp_path, capsys, flags,
                                                  needle):
    capsys.readouterr()
    assert main(["attack", str(mlp_checkpoint), "--out", str(tmp_path / "a"), "--quiet",
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "a").exists()


def test_a_folder_of_another_attack_is_refused(attacks, mlp_checkpoint, capsys):
    folder, _, _ = attacks["fp32"]
    capsys.readouterr()
    assert main(["attack", str(mlp_checkpoint), "--out", str(folder), "--budget", "5",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds another attack" in err and "budget" in err


def test_the_census_equals_brute_force_on_a_layer(mlp_checkpoint):
    """Every weight of the classifier flipped alone (bit 30, fp32), the model run on the
    same images: the accuracies the census counts from equal a NumPy loop's."""
    from flipsafe.attack import census, default_census_bits, flip_accuracies
    from flipsafe.formats import get
    from flipsafe.inject import Engine

    model = load_checkpoint(mlp_checkpoint).model.eval()
    x, y = load("digits").test.tensors()
    x, y = x[:32], y[:32]
    assert default_census_bits(get("fp32")) == [30] and default_census_bits(get("int8")) == [7]
    engine = Engine(model, "fp32", input_shape=tuple(x.shape[1:]))
    golden = engine.golden(x, y)
    got, due = flip_accuracies(engine, "fc", model.fc.weight.numel(), 30, x, y, golden)
    want, want_due = [], []
    w = model.fc.weight.detach().numpy().reshape(-1).view(np.uint32)
    for i in range(w.size):
        w[i] ^= np.uint32(1 << 30)
        with torch.no_grad():
            logits = model(x)
        w[i] ^= np.uint32(1 << 30)
        finite = torch.isfinite(logits).all(1)
        want.append(float(((logits.argmax(1) == y) & finite).double().mean()))
        want_due.append(bool((~finite).any()))
    assert got.tolist() == pytest.approx(want, abs=1e-12) and due.tolist() == want_due
    assert (got < 0.5).any()  # the top exponent bit does break some weights
    whole = census(model, "fp32", x, y, show_progress=False)
    fc = next(r for r in whole["layers"] if r["layer"] == "fc")
    clean = whole["clean_accuracy"]
    assert fc["catastrophic"] == sum(clean - a > 0.1 for a in want)


def test_the_census_from_the_cli_prints_a_table_per_layer(mlp_checkpoint, tmp_path, capsys):
    out = tmp_path / "census"
    assert main(["attack", str(mlp_checkpoint), "--census", "--census-images", "4",
                 "--bits", "30", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    record = json.loads((out / "census.json").read_text())
    assert [r["layer"] for r in record["layers"]] == ["features.1", "features.3", "fc"]
    for r in record["layers"]:
        assert f"{r['layer']:<24}  30" in text
        assert 0 <= r["catastrophic"] <= r["weights"]


def test_the_report_has_a_worst_case_section(attacks, mlp_checkpoint, tmp_path):
    from flipsafe.campaign.runner import make_plan, run_campaign
    from flipsafe.report import write_report

    run_campaign(make_plan(mlp_checkpoint, n=20, margin=None), tmp_path / "c",
                 show_progress=False)
    census_dir = tmp_path / "census"
    assert main(["attack", str(mlp_checkpoint), "--census", "--census-images", "2",
                 "--out", str(census_dir), "--quiet"]) == 0
    protected = tmp_path / "protected"
    from dataclasses import replace

    run_attack(mlp_checkpoint, protected, replace(attacks["int8"][1], protect="ecc"),
               show_progress=False)
    folders = [attacks["fp32"][0], attacks["int8"][0], census_dir, protected]
    out = write_report([tmp_path / "c"], tmp_path / "r" / "report.md", fmt="md",
                       attacks=folders)
    text = out.read_text(encoding="utf-8")
    section = text[text.index("## Worst case"):]
    for fmt in ("fp32", "int8"):
        record = attacks[fmt][2]
        assert f"weights stored in {fmt}" in section
        for i, f in enumerate(record["flips"]):
            assert f"| {i + 1} | {f['layer']} | {f['index']:,} | {f['bit']} |" in section
    assert "**Catastrophic bits: census (fp32)**" in section
    assert "**Against memory codes**" in section and "| protected | ecc |" in section
    table = section[section.index("**Flips to break**"):].split("\n\n")[1]
    assert [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]] == [
        "fp32", "int8", "protected"]
    assert (out.parent / "report-attack.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.parent.glob("report-census-*.png"))) == 1
    with pytest.raises(Exception, match="holds no attack.json"):
        write_report([tmp_path / "c"], tmp_path / "r2.md", fmt="md", attacks=[tmp_path / "c"])


def test_flips_meet_ecc_and_parity_as_the_memory_decodes_them(mlp_checkpoint, tmp_path):
    """One flip: SECDED corrects it (accuracy back to clean, exactly), parity detects it;
    an attacker who rewrites the check bits pays 1 + the check bits that change (at least
    3 for SECDED's distance 4, exactly 1 for parity)."""
    from flipsafe.protect.ecc import CLEAN, decode, encode, pack, per_word

    plan = AttackPlan(model_sha=model_sha(mlp_checkpoint), format="fp32", budget=1,
                      target_accuracy=TARGET, seed=1, protect="ecc,parity")
    r = run_attack(mlp_checkpoint, tmp_path / "p", plan, show_progress=False)
    ecc, parity = r["protections"]
    assert (ecc["protection"], parity["protection"]) == ("ecc", "parity")
    assert ecc["naive"]["words_corrected"] == 1 and not ecc["naive"]["due"]
    assert ecc["naive"]["accuracy"] == r["clean_accuracy"]
    assert parity["naive"]["words_detected"] == 1 and parity["naive"]["due"]
    assert parity["physical_flips"] == [2]
    f = r["flips"][0]
    w = load_checkpoint(mlp_checkpoint).model.get_parameter(f["layer"]).detach().reshape(-1)
    codes = torch.from_numpy(w.numpy().view(np.int32).copy())
    k = per_word(32)
    word = f["index"] // k
    old = pack(codes[word * k:(word + 1) * k], 32)
    codes[f["index"]] ^= np.int32(-(1 << 31)) if f["bit"] == 31 else np.int32(1 << f["bit"])
    new = pack(codes[word * k:(word + 1) * k], 32)
    delta = encode(old) ^ encode(new)
    assert ecc["physical_flips"] == [1 + int(np.unpackbits(delta).sum())]
    assert ecc["physical_flips"][0] >= 4
    read, status = decode(new, encode(old) ^ delta)  # the check bits rewritten: silent
    assert status[0] == CLEAN and read[0] == new[0]


def test_an_unknown_or_non_memory_protection_is_one_line(mlp_checkpoint, tmp_path, capsys):
    capsys.readouterr()
    assert main(["attack", str(mlp_checkpoint), "--out", str(tmp_path / "x"), "--quiet",
                 "--budget", "1", "--protect", "abft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--protect abft" in err[0] and "ranger" in err[0]


def test_ranger_guards_the_whole_search(attacks, mlp_checkpoint, tmp_path):
    """With every output held to its profiled range during the search, the flips it
    reports reproduce its accuracy on a model guarded by hand, and they are not the open
    search's flips applied to an open model."""
    from dataclasses import replace

    from flipsafe.attack import guard_outputs
    from flipsafe.protect.registry import get

    open_run = attacks["fp32"][2]
    plan = replace(attacks["fp32"][1], protect="ranger")
    guarded = run_attack(mlp_checkpoint, tmp_path / "g", plan, show_progress=False)
    assert guarded["plan"]["protect"] == "ranger"
    train = load("digits").train.tensors()[0]
    model = load_checkpoint(mlp_checkpoint).model
    guard_outputs(model, [get("ranger")], train)  # bounds of the clean model, then flips
    _fp32_by_hand(model, guarded["flips"])
    assert _test_accuracy(model) == pytest.approx(guarded["final_accuracy"], abs=1e-12)
    # The guard acts: an exponent flip's huge output is held to the layer's profiled max.
    model = load_checkpoint(mlp_checkpoint).model
    guard_outputs(model, [get("ranger")], train)
    _fp32_by_hand(model, open_run["flips"][:1])
    seen = []
    model.fc.register_forward_hook(lambda m, i, out: seen.append(i[0].abs().max()))
    _test_accuracy(model)
    assert float(seen[0]) < 1e6


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_batched_candidate_evaluation_equals_one_by_one(mlp_checkpoint, fmt):
    """The vmapped evaluation of a layer's candidates gives each the misclassification
    count and non-finite verdict of making it alone, and its loss to float32 rounding
    (sums in another order: a few units in the last place of 24 bits)."""
    from flipsafe import attack
    from flipsafe.formats import get

    model = load_checkpoint(mlp_checkpoint).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights = attack.StoredWeights(model, get(fmt))
    for mod in weights.layers.values():
        mod.weight.requires_grad_(True)
    x, y = load("digits").train.tensors()
    x, y = x[:64], y[:64]
    cands = attack._candidates(model, weights, x, y, 5)
    one = attack._scores_one_by_one(model, weights, cands, x, y)
    batched = attack._scores_batched(model, weights, cands, x, y)
    assert len(cands) > 10 and [s is None for s in one] == [s is None for s in batched]
    for a, b in zip(one, batched):
        if a is not None:
            assert a[0] == b[0] and b[1] == pytest.approx(a[1], rel=1e-5)
