import errno
import json
import os
import signal
import subprocess
import sys
import time
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
    a, fa = fault_list(prepare(_plan(mlp_checkpoint)))
    b, fb = fault_list(prepare(_plan(mlp_checkpoint)))
    assert a.layers == b.layers and fa == fb
    for name, col in _columns(a).items():
        assert torch.equal(col, getattr(b, name)), name
    c, _ = fault_list(prepare(_plan(mlp_checkpoint, seed=6)))
    assert not torch.equal(a.index, c.index)


def test_fault_list_is_stratified_and_on_selected_images(mlp_checkpoint):
    prep = prepare(_plan(mlp_checkpoint, n=200))
    faults, fields = fault_list(prep)
    assert len(faults) == prep.total == 200 * len(prep.layers)
    bits = faults.bits()
    exponent = set(prep.engine.fmt.fields["exponent"])
    for f, b in zip(fields, bits):
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
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    parts = out / "parts"
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the campaign finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(parts.glob("part-*.parquet")))
    assert 0 < written < 150
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
