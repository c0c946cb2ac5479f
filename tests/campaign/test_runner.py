import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from flipsafe import CampaignError
from flipsafe.campaign import ResultsStore
from flipsafe.campaign.runner import fault_list, make_plan, prepare, run_campaign


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


def test_clamped_campaign_uses_cached_ranges_identically(mlp_checkpoint, tmp_path):
    from flipsafe.campaign.runner import RANGES_FILE

    cache = mlp_checkpoint / RANGES_FILE.format(format="fp32")
    cache.unlink(missing_ok=True)
    plan = _plan(mlp_checkpoint, n=30, clamp="profiled")
    run_campaign(plan, tmp_path / "first", show_progress=False)  # profiles and caches
    assert cache.is_file()
    run_campaign(plan, tmp_path / "second", show_progress=False)  # reads the cache
    _assert_same_rows(_store(tmp_path / "first").read(), _store(tmp_path / "second").read())


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
