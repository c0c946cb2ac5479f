"""The Ray backend writes the same rows as the local one, resumes, and survives lost workers."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from flipsafe.campaign import ResultsStore, ray_backend
from flipsafe.campaign.runner import make_plan, run_campaign
from flipsafe.errors import CampaignError, FlipsafeError

N, PART, SEED = 40, 16, 11  # 3 layers x 40 faults -> 8 parts, the last one short


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray for the module; the backend must reuse it and leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def plan(mlp_checkpoint):
    return make_plan(mlp_checkpoint, n=N, part_size=PART, seed=SEED)


@pytest.fixture(scope="module")
def local_rows(plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_campaign(plan, out, backend="local", show_progress=False)
    return _rows(out)


def _rows(folder):
    store = ResultsStore(folder)
    store.open()
    return store.read()


def _assert_same_rows(a, b):
    assert a.schema.equals(b.schema) and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if a.schema.field(name).type == "double":
            # NaN-aware and bit-for-bit: assert_array_equal treats NaN == NaN.
            np.testing.assert_array_equal(np.array(x, float), np.array(y, float), err_msg=name)
        else:
            assert x == y, name


@pytest.fixture(scope="module")
def ray_run(plan, ray_instance, tmp_path_factory):
    """A finished two-worker Ray campaign; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("ray") / "r"
    run = run_campaign(plan, out, backend="ray", workers=2, show_progress=False)
    return out, run


def test_ray_rows_equal_local_rows(ray_run, local_rows):
    out, run = ray_run
    assert local_rows.num_rows == 3 * N
    assert run.ran_parts == 8 and run.kept_parts == 0 and run.total == 3 * N
    _assert_same_rows(_rows(out), local_rows)
    assert ray.is_initialized()  # a Ray it did not start is left running


def test_resume_reruns_only_the_missing_part(plan, ray_run, local_rows, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(ray_run[0], out)
    store = ResultsStore(out)
    store.open()
    kept = {k: store.part_path(k).stat().st_mtime_ns for k in range(store.n_parts) if k != 5}
    store.part_path(5).unlink()
    run = run_campaign(plan, out, backend="ray", workers=2, show_progress=False)
    assert run.ran_parts == 1 and run.kept_parts == 7
    assert {k: store.part_path(k).stat().st_mtime_ns for k in kept} == kept  # untouched
    _assert_same_rows(_rows(out), local_rows)


def _dying_worker(marker: str, part: int, deaths: int):
    """A worker class whose process exits while running `part`, the first `deaths` times."""

    class Dying(ray_backend._PartWorker):
        def run(self, k, start, stop):
            died = os.path.getsize(marker) if os.path.exists(marker) else 0
            if k == part and died < deaths:
                with open(marker, "a") as f:
                    f.write("x")
                os._exit(1)
            return super().run(k, start, stop)

    return Dying


def test_part_lost_with_its_worker_runs_again(plan, local_rows, ray_instance, tmp_path,
                                              monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(ray_backend, "_PartWorker", _dying_worker(str(marker), 3, deaths=1))
    run = run_campaign(plan, tmp_path / "r", backend="ray", workers=1, show_progress=False)
    assert marker.read_text() == "x"  # the worker really died
    assert run.ran_parts == 8
    _assert_same_rows(_rows(tmp_path / "r"), local_rows)


def test_part_that_always_kills_its_worker_fails_but_keeps_the_rest(
        plan, local_rows, ray_instance, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    out = tmp_path / "r"
    monkeypatch.setattr(ray_backend, "MAX_ATTEMPTS", 2)
    monkeypatch.setattr(ray_backend, "_PartWorker", _dying_worker(str(marker), 7, deaths=99))
    # One worker takes the parts in order, so parts 0-6 are written before part 7 fails.
    with pytest.raises(CampaignError, match="part 7 was lost with its Ray worker 2 times"):
        run_campaign(plan, out, backend="ray", workers=1, show_progress=False)
    assert marker.read_text() == "xx"
    store = ResultsStore(out)
    store.open()
    assert store.completed_parts() == set(range(7))
    run = run_campaign(plan, out, backend="local", show_progress=False)
    assert run.ran_parts == 1
    _assert_same_rows(_rows(out), local_rows)


def test_interrupt_keeps_written_parts_and_resumes(plan, local_rows, ray_instance, tmp_path,
                                                   monkeypatch):
    out = tmp_path / "r"
    real_write = ResultsStore.write_part
    calls = []

    def write_then_interrupt(self, k, table):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(k)
        return real_write(self, k, table)

    monkeypatch.setattr(ResultsStore, "write_part", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(plan, out, backend="ray", workers=1, show_progress=False)
    monkeypatch.undo()
    store = ResultsStore(out)
    store.open()
    assert store.completed_parts() == set(calls) and len(calls) == 3
    run = run_campaign(plan, out, backend="local", show_progress=False)
    assert run.ran_parts == 5 and run.kept_parts == 3
    _assert_same_rows(_rows(out), local_rows)


def test_worker_error_reaches_the_driver_as_itself(plan, ray_instance, tmp_path, monkeypatch):
    class Miscounting(ray_backend._PartWorker):
        def __init__(self, plan_json, total_rows, *args, **kwargs):
            super().__init__(plan_json, total_rows + 1, *args, **kwargs)  # as if another model

    monkeypatch.setattr(ray_backend, "_PartWorker", Miscounting)
    with pytest.raises(CampaignError, match=f"generated {3 * N} faults where the driver has"):
        run_campaign(plan, tmp_path / "r", backend="ray", workers=1, show_progress=False)
    store = ResultsStore(tmp_path / "r")
    store.open()
    assert store.completed_parts() == set()


def test_missing_ray_says_how_to_install(plan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(FlipsafeError, match=r"pip install -c constraints.txt 'flipsafe\[ray\]'"):
        run_campaign(plan, tmp_path / "r", backend="ray", show_progress=False)


def test_bad_worker_count_is_refused(plan, tmp_path):
    with pytest.raises(FlipsafeError, match="--workers must be a whole number of at least 1"):
        run_campaign(plan, tmp_path / "r", backend="ray", workers=0, show_progress=False)


def test_one_worker_by_cli_on_a_cluster_matches_two_workers(mlp_checkpoint, ray_run,
                                                              local_rows, tmp_path):
    # A second process runs the same campaign with one worker, joining the module's Ray by
    # --address as a driver on a cluster would, with the model path relative to its own
    # folder (the workers run elsewhere). It must disconnect and leave the cluster running.
    out = tmp_path / "cli"
    address = ray.get_runtime_context().gcs_address
    script = (
        "import sys, ray\n"
        "from flipsafe.cli import main\n"
        f"code = main(['campaign', {mlp_checkpoint.name!r}, '--n', '{N}', '--seed', '{SEED}',"
        f" '--part-size', '{PART}', '--out', {str(out)!r}, '--backend', 'ray',"
        f" '--address', {address!r}, '--workers', '1', '--quiet'])\n"
        "print('still connected' if ray.is_initialized() else 'disconnected')\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, cwd=mlp_checkpoint.parent)
    assert done.returncode == 0, done.stderr
    assert "disconnected" in done.stdout
    one = _rows(out)
    _assert_same_rows(one, _rows(ray_run[0]))  # the fault list ignores the worker count
    _assert_same_rows(one, local_rows)
    assert ray.cluster_resources().get("CPU") == 2  # the cluster outlived that driver


def test_workers_use_the_drivers_ranges(mlp_checkpoint, ray_instance, tmp_path):
    import json

    from flipsafe.campaign.runner import RANGES_FILE, prepare

    clamped = make_plan(mlp_checkpoint, n=N, part_size=PART, seed=SEED, clamp="profiled")
    # Cached ranges unlike what profiling gives: a worker profiling on its own would differ.
    halved = {k: v / 2 for k, v in prepare(clamped).ranges.items()}
    cache = {"model_sha": clamped.model_sha, "dataset": clamped.dataset, "ranges": halved}
    for name in ("local", "ray"):
        (tmp_path / name).mkdir()
        (tmp_path / name / RANGES_FILE.format(format="fp32")).write_text(json.dumps(cache))
    run_campaign(clamped, tmp_path / "local", backend="local", show_progress=False)
    run_campaign(clamped, tmp_path / "ray", backend="ray", workers=2, show_progress=False)
    run_campaign(clamped, tmp_path / "profiled", backend="local", show_progress=False)
    _assert_same_rows(_rows(tmp_path / "ray"), _rows(tmp_path / "local"))
    with pytest.raises(AssertionError):
        _assert_same_rows(_rows(tmp_path / "profiled"), _rows(tmp_path / "local"))


def test_raylet_messages_go_to_stderr_without_colour_codes(capsys):
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    restore = ray_backend._ray_output_to_stderr()
    try:
        # What Ray's error listener thread calls when a worker dies.
        ray_worker.print_to_stdstream({"lines": ["\x1b[33m(raylet)\x1b[0m A worker died"],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        restore()
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "ray (raylet): (raylet) A worker died\n"
    assert ray_worker.print_to_stdstream is original


def test_a_cli_run_whose_worker_dies_prints_no_ray_noise(mlp_checkpoint, tmp_path):
    marker, out = tmp_path / "died", tmp_path / "r"
    script = (
        "import os, sys\n"
        "from flipsafe.campaign import ray_backend\n"
        "from flipsafe.cli import main\n"
        "class Dying(ray_backend._PartWorker):\n"
        "    def run(self, k, start, stop):\n"
        f"        if k == 1 and not os.path.exists({str(marker)!r}):\n"
        f"            open({str(marker)!r}, 'w').close()\n"
        "            os._exit(1)\n"
        "        return super().run(k, start, stop)\n"
        "ray_backend._PartWorker = Dying\n"
        f"sys.exit(main(['campaign', {str(mlp_checkpoint)!r}, '--layers', 'last', '--n', '{N}',"
        f" '--part-size', '{PART}', '--out', {str(out)!r}, '--backend', 'ray',"
        " '--workers', '1', '--quiet']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # a worker really died
    assert "\x1b" not in done.stdout + done.stderr
    assert "Token authentication" not in done.stderr
    assert "worker died" not in done.stdout and done.stdout.startswith(f"{N:,} injections in")


def test_an_adaptive_campaign_on_ray_equals_the_local_one(mlp_checkpoint, ray_instance,
                                                          tmp_path):
    """Both stages run on Ray actors, each drawing the driver's stage-2 list."""
    plan = make_plan(mlp_checkpoint, margin=0.05, sampling="adaptive", part_size=400, seed=SEED)
    run_campaign(plan, tmp_path / "local", backend="local", show_progress=False)
    run_campaign(plan, tmp_path / "ray", backend="ray", workers=2, show_progress=False)
    stores = [ResultsStore(tmp_path / name) for name in ("local", "ray")]
    for store in stores:
        store.open()
    assert stores[0].stages == stores[1].stages and len(stores[0].stages) == 2
    _assert_same_rows(stores[0].read(), stores[1].read())
