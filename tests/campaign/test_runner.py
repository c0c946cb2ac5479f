import dataclasses
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flipsafe import CampaignError, atomic
from flipsafe.campaign import ResultsStore
from flipsafe.campaign.runner import fault_list, make_plan, prepare, run_campaign
from flipsafe.inject import Engine


def _store(folder) -> ResultsStore:
    store = ResultsStore(folder)
    store.open()
    return store


def _assert_same_rows(a, b):
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name.endswith(("loss", "top2diff")):
            np.testing.assert_array_equal(np.array(x, float), np.array(y, float), err_msg=name)
        else:
            assert x == y, name


def _plan(ckpt, **kw):
    kw.setdefault("n", 60)
    kw.setdefault("seed", 5)
    kw.setdefault("part_size", 50)
    return make_plan(ckpt, **kw)


def _columns(faults):
    return {c: getattr(faults, c).clone() for c in ("layer", "index", "mask", "op", "image")}


def test_same_plan_same_fault_list(mlp_checkpoint):
    a = fault_list(prepare(_plan(mlp_checkpoint)))
    b = fault_list(prepare(_plan(mlp_checkpoint)))
    assert a.layers == b.layers and a.stratum_names == b.stratum_names
    for name, col in _columns(a).items():
        assert torch.equal(col, getattr(b, name)), name
    c = fault_list(prepare(_plan(mlp_checkpoint, seed=6)))
    assert not torch.equal(a.index, c.index)


def test_fault_list_is_stratified_and_on_selected_images(mlp_checkpoint):
    prep = prepare(_plan(mlp_checkpoint, n=200))
    faults = fault_list(prep)
    assert len(faults) == prep.total == 200 * len(prep.layers)
    bits = faults.bits()
    exponent = set(prep.engine.fmt.fields["exponent"])
    for f, b in zip(faults.stratum_names, bits):
        assert len(b) == 1
        assert (b[0] in exponent) == (f == "exponent")
    # Only correctly classified images with a positive margin are used.
    g = prep.engine.golden(prep.images, prep.labels, layers=[]).outcomes
    ok = (g.top1 == prep.labels) & (g.top2diff > 0)
    assert ok[faults.image].all()


def test_outcomes_in_store_match_direct_engine_calls(mlp_checkpoint, tmp_path):
    from flipsafe.checkpoint import load
    from flipsafe.data import load as load_data
    from flipsafe.faults import FaultSet
    from flipsafe.inject import Engine

    plan = _plan(mlp_checkpoint, n=40)
    run_campaign(plan, tmp_path / "r", show_progress=False)
    table = _store(tmp_path / "r").read()
    assert table.num_rows == plan.n * 3
    assert table.column("fault_id").to_pylist() == list(range(table.num_rows))
    # Rebuild every fault from its stored row and run it alone through a fresh engine.
    images, labels = load_data("digits").test.tensors()
    engine = Engine(load(mlp_checkpoint), format="fp32", input_shape=(1, 8, 8))
    rows = table.to_pylist()
    layers = sorted({r["layer"] for r in rows})
    masks = [sum(1 << b for b in r["bits"]) for r in rows]
    faults = FaultSet(layers, layer=[layers.index(r["layer"]) for r in rows],
                      index=[r["index"] for r in rows], mask=masks,
                      image=list(range(len(rows))), param="output")
    ids = torch.tensor([r["image_id"] for r in rows])
    out = engine.run(faults, images[ids], labels[ids])
    assert out.faulty_top1.tolist() == [r["faulty_top1"] for r in rows]
    assert out.sdc.tolist() == [r["sdc"] for r in rows]
    assert out.due.tolist() == [r["due"] for r in rows]
    np.testing.assert_allclose(out.delta_loss.double().numpy(),
                               [r["delta_loss"] for r in rows], rtol=1e-6)
    # Losses are cross-entropy against the image's true label.
    assert all(labels[r["image_id"]].item() == labels[ids][i].item() for i, r in enumerate(rows))


def test_n_all_enumerates_the_last_layer_fault_space(mlp_checkpoint, tmp_path):
    plan = _plan(mlp_checkpoint, site="weights", layers="last", n="all", part_size=4096)
    run_campaign(plan, tmp_path / "all", show_progress=False)
    table = _store(tmp_path / "all").read()
    prep = prepare(plan)
    (info,) = prep.layers
    assert table.num_rows == info.numel * 32
    pairs = set(zip(table.column("index").to_pylist(),
                    [b[0] for b in table.column("bits").to_pylist()]))
    assert pairs == {(i, b) for i in range(info.numel) for b in range(32)}
    # The manifest records each stratum's fault space: exhaustive, so images are not counted.
    strata = _store(tmp_path / "all").strata
    assert [(s.layer, s.field, s.size, s.n, s.elements, s.width) for s in strata] == [
        (info.name, f, info.numel * w, info.numel * w, info.numel, w)
        for f, w in (("sign", 1), ("exponent", 8), ("mantissa", 23))]


def test_manifest_records_sampled_fault_space_with_images(mlp_checkpoint, tmp_path):
    plan = _plan(mlp_checkpoint, n=30)
    run_campaign(plan, tmp_path / "r", show_progress=False)
    prep = prepare(plan)
    images = prep.image_ids.numel()
    got = {(s.layer, s.field): (s.size, s.n, s.elements, s.width)
           for s in _store(tmp_path / "r").strata}
    numel = {info.name: info.numel for info in prep.layers}
    assert len(got) == 3 * len(numel)
    for (layer, field), (size, n, elements, width) in got.items():
        assert width == {"sign": 1, "exponent": 8, "mantissa": 23}[field]
        assert elements == numel[layer] and size == elements * width * images
    assert sum(v[1] for v in got.values()) == 30 * len(numel)


def test_different_plan_on_same_folder_is_refused(mlp_checkpoint, tmp_path):
    run_campaign(_plan(mlp_checkpoint, n=20), tmp_path / "r", show_progress=False)
    before = _store(tmp_path / "r").read()
    with pytest.raises(CampaignError, match="seed"):
        run_campaign(_plan(mlp_checkpoint, n=20, seed=99), tmp_path / "r", show_progress=False)
    _assert_same_rows(_store(tmp_path / "r").read(), before)


def test_corrupt_part_is_detected_and_redone(mlp_checkpoint, tmp_path):
    plan = _plan(mlp_checkpoint, n=40)
    run_campaign(plan, tmp_path / "r", show_progress=False)
    store = _store(tmp_path / "r")
    before = store.read()
    victim = store.part_path(1)
    victim.write_bytes(victim.read_bytes()[:200])
    run = run_campaign(plan, tmp_path / "r", show_progress=False)
    assert run.ran_parts == 1 and run.kept_parts == store.n_parts - 1
    _assert_same_rows(_store(tmp_path / "r").read(), before)


def test_killed_campaign_resumes_to_exactly_the_planned_rows(mlp_checkpoint, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "flipsafe", "campaign", str(mlp_checkpoint), "--n", "3000",
            "--part-size", "40", "--seed", "3", "--out", str(out), "--quiet"]
    from killing import kill_after_two_parts

    assert 0 < kill_after_two_parts(args, out / "parts") < 150
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    total = prepare(_plan(mlp_checkpoint, n=3000, seed=3, part_size=40)).total
    table = _store(out).read()
    assert table.num_rows == total
    assert sorted(table.column("fault_id").to_pylist()) == list(range(total))


def _listing(folder):
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_clamped_campaign_caches_ranges_in_its_results_folder(mlp_checkpoint, tmp_path):
    from flipsafe.campaign.runner import RANGES_FILE

    checkpoint_files = _listing(mlp_checkpoint)
    plan = _plan(mlp_checkpoint, n=30, clamp="profiled")
    run_campaign(plan, tmp_path / "first", show_progress=False)  # profiles and caches
    cache = tmp_path / "first" / RANGES_FILE.format(format="fp32")
    assert cache.is_file()
    # The cached ranges are what profiling the training split gives.
    cached = json.loads(cache.read_text())
    profiled = prepare(plan).ranges
    assert cached["ranges"].keys() == profiled.keys()
    assert cached["model_sha"] == plan.model_sha
    # A resume reads the cache instead of profiling again.
    (cache.parent / "parts" / "part-000000.parquet").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "profile", _no_profiling)
        run_campaign(plan, tmp_path / "first", show_progress=False)
    run_campaign(plan, tmp_path / "second", show_progress=False)
    _assert_same_rows(_store(tmp_path / "first").read(), _store(tmp_path / "second").read())
    # Nothing was written into the checkpoint folder (it may be read-only or shared).
    assert _listing(mlp_checkpoint) == checkpoint_files


def _field_of(fmt_name="fp32"):
    from flipsafe import formats

    return {b: name for name, bits in formats.get(fmt_name).fields.items() for b in bits}


@pytest.mark.parametrize("fault, per_element", [("stuck1", 32), ("stuck0", 32), ("zero", 1)])
def test_n_all_lists_every_fault_once_for_every_model(mlp_checkpoint, tmp_path, fault,
                                                      per_element):
    plan = _plan(mlp_checkpoint, layers="last", n="all", fault=fault, part_size=4096)
    run_campaign(plan, tmp_path / "all", show_progress=False)
    table = _store(tmp_path / "all").read()
    (info,) = prepare(plan).layers
    assert table.num_rows == info.numel * per_element
    bits = table.column("bits").to_pylist()
    if fault == "zero":
        assert all(b == list(range(32)) for b in bits)
        assert sorted(table.column("index").to_pylist()) == list(range(info.numel))
    else:
        pairs = list(zip(table.column("index").to_pylist(), [b[0] for b in bits]))
        assert len(set(pairs)) == len(pairs)
        assert set(pairs) == {(i, b) for i in range(info.numel) for b in range(32)}


@pytest.mark.parametrize("fault", ["bitflip2", "burst2"])
def test_multi_bit_campaigns_stratify_by_the_highest_bit(mlp_checkpoint, tmp_path, fault):
    plan = _plan(mlp_checkpoint, fault=fault, n=60)
    prep = prepare(plan)
    # Per element: C(32, 2) = 496 pairs or 31 runs of two, over the selected images.
    per_element = 496 if fault == "bitflip2" else 31
    for info in prep.layers:
        space = sum(s.size for s in prep.strata if s.layer == info.name)
        assert space == info.numel * per_element * prep.image_ids.numel()
    run_campaign(plan, tmp_path / "r", show_progress=False)
    rows = _store(tmp_path / "r").read().to_pylist()
    assert len(rows) == 60 * len(prep.layers)
    field_of = _field_of()
    for r in rows:
        assert len(r["bits"]) == 2 and r["bits"][0] < r["bits"][1]
        if fault == "burst2":
            assert r["bits"][1] == r["bits"][0] + 1
        assert r["field"] == field_of[max(r["bits"])]
    if fault == "bitflip2":  # most exponent-topped pairs reach into the mantissa
        assert any(len({field_of[b] for b in r["bits"]}) == 2 for r in rows)


def test_n_all_burst2_lists_every_run_once(mlp_checkpoint):
    prep = prepare(_plan(mlp_checkpoint, layers="last", n="all", fault="burst2"))
    faults = fault_list(prep)
    (info,) = prep.layers
    assert len(faults) == info.numel * 31
    rows = set(zip(faults.index.tolist(), map(tuple, faults.bits())))
    assert rows == {(i, (b, b + 1)) for i in range(info.numel) for b in range(31)}
    field_of = _field_of()
    assert faults.stratum_names == [field_of[max(b)] for b in faults.bits()]


def test_format_names_are_normalised_in_plans_and_range_caches(mlp_checkpoint, tmp_path):
    from flipsafe.campaign.runner import RANGES_FILE

    upper, lower = _plan(mlp_checkpoint, format="FP16"), _plan(mlp_checkpoint, format="fp16")
    assert upper.format == "fp16" and upper.fingerprint() == lower.fingerprint()
    out = tmp_path / "r"
    run_campaign(dataclasses.replace(upper, clamp="profiled", n=5), out, show_progress=False)
    caches = {p.name for p in out.iterdir() if p.name.startswith("ranges-")}
    assert RANGES_FILE.format(format="fp16") in caches
    assert RANGES_FILE.format(format="FP16") not in caches


def _image_folder(root, per_class):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / cls / f"{i}.png")


def test_resume_on_changed_data_is_refused_naming_the_dataset(tmp_path, capsys):
    from flipsafe.cli import main
    from flipsafe.train import TrainConfig
    from flipsafe.workflow import train_classifier

    _image_folder(tmp_path / "imgs", 5)
    spec = f"imagefolder:{tmp_path / 'imgs'}?size=8&channels=1"
    train_classifier(spec, arch="mlp", out=tmp_path / "m", config=TrainConfig(epochs=1),
                     show_progress=False)
    args = ["campaign", str(tmp_path / "m"), "--n", "6", "--layers", "last", "--images", "all",
            "--out", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 0
    before = _store(tmp_path / "r").read()
    assert _store(tmp_path / "r").plan.data_sha is not None
    assert main(args) == 0  # same data: resumes
    capsys.readouterr()
    from PIL import Image

    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(tmp_path / "imgs/cat/new.png")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the dataset's contents changed" in err[0] and spec in err[0]
    _assert_same_rows(_store(tmp_path / "r").read(), before)


def test_folders_without_a_data_hash_are_read_but_not_resumed(mlp_checkpoint, tmp_path):
    plan = _plan(mlp_checkpoint, n=20)
    assert plan.data_sha is None  # as every plan written before the hash was recorded
    ResultsStore(tmp_path / "old").create_or_resume(plan, total_rows=60)
    assert _store(tmp_path / "old").plan == plan
    with pytest.raises(CampaignError, match="older flipsafe"):
        run_campaign(plan, tmp_path / "old", show_progress=False)


def test_prepare_refuses_a_plan_made_for_other_data(mlp_checkpoint):
    import dataclasses

    plan = prepare(_plan(mlp_checkpoint, n=20)).plan
    assert len(plan.data_sha) == 64
    with pytest.raises(CampaignError, match="dataset's contents changed.*digits"):
        prepare(dataclasses.replace(plan, data_sha="0" * 64))


def _no_profiling(self, batches):
    raise AssertionError("profiled although no ranges were needed")


def test_unclamped_fp32_campaign_neither_profiles_nor_writes_beside_the_checkpoint(
        mlp_checkpoint, tmp_path, monkeypatch):
    checkpoint_files = _listing(mlp_checkpoint)
    monkeypatch.setattr(Engine, "profile", _no_profiling)
    # A write anywhere in the checkpoint folder fails, as on a read-only folder.
    real_write_json = atomic.write_json

    def guarded(path, data):
        if Path(path).resolve().parent == mlp_checkpoint.resolve():
            raise PermissionError(13, "Read-only file system", str(path))
        real_write_json(path, data)

    monkeypatch.setattr(atomic, "write_json", guarded)
    plan = _plan(mlp_checkpoint, n=20, clamp="none")
    run_campaign(plan, tmp_path / "r", show_progress=False)
    assert _store(tmp_path / "r").read().num_rows == 20 * 3
    assert _listing(mlp_checkpoint) == checkpoint_files
    assert not list((tmp_path / "r").glob("ranges-*.json"))


def test_unwritable_ranges_cache_is_skipped(mlp_checkpoint, tmp_path, monkeypatch):
    real_write_json = atomic.write_json

    def refuse_ranges(path, data):
        if Path(path).name.startswith("ranges-"):
            raise PermissionError(13, "Permission denied", str(path))
        real_write_json(path, data)

    monkeypatch.setattr(atomic, "write_json", refuse_ranges)
    plan = _plan(mlp_checkpoint, n=20, clamp="profiled")
    run_campaign(plan, tmp_path / "r", show_progress=False)
    assert _store(tmp_path / "r").read().num_rows == 20 * 3


def test_disk_full_keeps_finished_parts_and_says_how_to_resume(mlp_checkpoint, tmp_path,
                                                                 monkeypatch, capsys):
    from flipsafe.cli import main

    out = tmp_path / "full"
    real_write_part = ResultsStore.write_part
    written = []

    def fill_up(self, k, table):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.part_path(k)))
        written.append(k)
        return real_write_part(self, k, table)

    monkeypatch.setattr(ResultsStore, "write_part", fill_up)
    args = ["campaign", str(mlp_checkpoint), "--n", "60", "--seed", "5", "--part-size", "50",
            "--out", str(out), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flipsafe: error: no space left"), err
    assert "kept" in err[0] and "run the same campaign again to resume" in err[0]
    assert sorted(_store(out).completed_parts()) == sorted(written)
    monkeypatch.undo()
    assert main(args) == 0  # resumes: only the missing parts run
    assert _store(out).read().num_rows == 60 * 3


def test_second_campaign_on_a_folder_in_use_is_refused(mlp_checkpoint, tmp_path, capsys):
    from flipsafe.cli import main

    out = tmp_path / "busy"
    plan = _plan(mlp_checkpoint, n=20)
    run_campaign(plan, out, show_progress=False)
    in_flight = out / "parts" / ".part-000001.parquet.tmp-4242"
    first = ResultsStore(out)
    with first.lock():  # the first campaign, still running
        in_flight.write_bytes(b"half a part")
        args = ["campaign", str(mlp_checkpoint), "--n", "20", "--seed", "5", "--part-size", "50",
                "--out", str(out), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another campaign" in err[0], err
        assert in_flight.read_bytes() == b"half a part"


def test_rgb_imagefolder_conv_model_campaign_end_to_end(tmp_path):
    from PIL import Image

    from flipsafe.report import load_results
    from flipsafe.train import TrainConfig
    from flipsafe.workflow import train_classifier

    g = np.random.default_rng(0)
    for cls in ("red", "blue"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            pixels = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            pixels[..., 0 if cls == "red" else 2] = 255
            Image.fromarray(pixels, "RGB").save(tmp_path / "imgs" / cls / f"{i}.png")
    spec = f"imagefolder:{tmp_path / 'imgs'}?size=8"
    ckpt = tmp_path / "lenet"
    train_classifier(spec, arch="lenet", head="linear", out=ckpt,
                     config=TrainConfig(epochs=1), show_progress=False)
    plan = make_plan(ckpt, n=20, seed=1, images="all", layers="all")
    run = run_campaign(plan, tmp_path / "res", show_progress=False)
    assert run.total == load_results(tmp_path / "res").n > 0


def test_campaign_and_summary_into_a_closed_pipe_end_quietly(mlp_checkpoint, tmp_path):
    # As in `flipsafe campaign ... | head -3`: the reader is gone before the summary prints.
    def run_with_stdout_closed(*args):
        proc = subprocess.Popen([sys.executable, "-m", "flipsafe", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return proc.wait(timeout=300), err

    out = tmp_path / "r"
    code, err = run_with_stdout_closed("campaign", str(mlp_checkpoint), "--n", "4",
                                       "--layers", "last", "--out", str(out), "--quiet")
    assert err == "" and code == 141, err
    code, err = run_with_stdout_closed("summary", str(out))
    assert err == "" and code == 141, err


def test_protocol_goldeneye_from_the_cli_sets_its_conventions_and_is_named(mlp_checkpoint,
                                                                          tmp_path, capsys):
    from flipsafe.cli import main

    out = tmp_path / "ge"
    assert main(["campaign", str(mlp_checkpoint), "--protocol", "goldeneye", "--n", "4",
                 "--clamp", "goldeneye", "--out", str(out), "--quiet"]) == 0
    plan = _store(out).plan
    assert plan.protocol == "goldeneye"
    assert (plan.site, plan.layers, plan.images, plan.clamp, plan.fault) == (
        "activations", "all", "correct", "goldeneye", "bitflip")
    # Flags left out keep the plan's own defaults.
    assert (plan.format, plan.seed, plan.confidence, plan.margin, plan.n) == (
        "fp32", 0, 0.99, None, 4)
    assert "plan: protocol goldeneye (GoldenEye's conventions:" in capsys.readouterr().out
    python = make_plan(mlp_checkpoint, protocol="goldeneye", n=4, margin=None)
    assert python == dataclasses.replace(plan, data_sha=None, inputs=None,
                                         model=str(mlp_checkpoint))


@pytest.mark.parametrize("spelling", ["goldeneye", "GoldenEye"])
def test_protocol_goldeneye_on_the_last_layer_is_the_papers_headline(mlp_checkpoint, tmp_path,
                                                                     capsys, spelling):
    from flipsafe.cli import main

    out = tmp_path / "ge-last"
    assert main(["campaign", str(mlp_checkpoint), "--protocol", spelling, "--layers", "last",
                 "--n", "4", "--out", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "plan.json").read_text())
    assert (recorded["protocol"], recorded["layers"], recorded["clamp"]) == (
        "goldeneye", "last", "goldeneye")
    assert {r["layer"] for r in _store(out).read().to_pylist()} == {"fc"}


@pytest.mark.parametrize("flags, name, value", [
    (["--clamp", "none"], "clamp", "none"),
    (["--images", "all"], "images", "all"), (["--fault", "stuck1"], "fault", "stuck1"),
    (["--site", "weights"], "site", "weights"),
])
def test_protocol_goldeneye_refuses_a_conflicting_flag_in_one_line(mlp_checkpoint, tmp_path,
                                                                   capsys, flags, name, value):
    from flipsafe.cli import main

    out = tmp_path / "refused"
    assert main(["campaign", str(mlp_checkpoint), "--protocol", "goldeneye", *flags,
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    wanted = {"clamp": "goldeneye", "layers": "all", "images": "correct", "fault": "bitflip",
              "site": "activations"}[name]
    line = (f"flipsafe: error: protocol goldeneye sets {name} {wanted}, but {name} {value} "
            f"was given; leave {name} out or drop the protocol")
    assert err == [line]
    assert not (out / "plan.json").exists()


@pytest.mark.parametrize("fault", ["burst20", "bitflip17"])
def test_a_fault_wider_than_the_codes_is_refused_by_name(mlp_checkpoint, fault):
    from flipsafe.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{fault} flips .* bits, but the fp16 codes at the "
                                          "activations site hold 16"):
        prepare(_plan(mlp_checkpoint, fault=fault, layers="last", format="fp16"))


@pytest.mark.parametrize("fault", ["burst33", "bitflip40"])
def test_a_fault_wider_than_any_code_is_refused_by_the_plan(mlp_checkpoint, fault):
    from flipsafe.errors import FlipsafeError

    with pytest.raises(FlipsafeError, match=f"{fault}.*K from 1 to 32"):
        _plan(mlp_checkpoint, fault=fault, layers="last")
