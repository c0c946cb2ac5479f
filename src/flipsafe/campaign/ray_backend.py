"""Run a campaign's parts on Ray actors while the driver alone writes the results store."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
from collections import Counter, deque

import numpy as np

from flipsafe.campaign.plan import CampaignPlan
from flipsafe.campaign.store import ResultsStore
from flipsafe.errors import CampaignError, ConfigError, FlipsafeError, install_hint
from flipsafe.progress import progress_bar

# How often one part may be lost with its worker before the campaign gives up on it.
MAX_ATTEMPTS = 4
# How long a cluster address may take to accept a connection and answer; ray.init itself
# retries an unreachable address for minutes.
CONNECT_TIMEOUT_S = 5.0
# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, or its
# client server behind ray://) answers with a SETTINGS frame of its own.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"the ray backend needs Ray, which is not installed; run {install_hint('ray')} "
            "or use --backend local"
        ) from None
    return ray


class _PartWorker:
    """One Ray actor: rebuilds the plan's model and fault list once, then runs parts on request.

    Errors while preparing are kept and raised by run(), so they reach the driver as the
    task's error (with their own message) instead of as an anonymous dead actor.
    """

    def __init__(self, plan_json: str, total_rows: int, cwd: str | None = None,
                 ranges: dict | None = None, device: str = "cpu", stages: list | None = None):
        import torch

        from flipsafe.campaign.work import fault_list, golden_cache, prepare

        # Relative model and dataset paths in the plan are relative to the driver's folder;
        # Ray starts workers elsewhere. The actor owns its process, so changing it is safe.
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        # Each actor holds one CPU; more threads would only fight the other actors.
        torch.set_num_threads(1)
        self._error = None
        try:
            # The driver's ranges: profiling again on another node could differ slightly.
            self.prep = prepare(CampaignPlan.from_json(plan_json), ranges=ranges, device=device)
            if stages is not None:  # an adaptive campaign's stages, as the driver sized them
                self.prep.stages = stages
            self.faults = fault_list(self.prep)
            # The same golden runs as a local campaign makes (all images at once when they
            # fit GOLDEN_CACHE_BYTES), so the rows are identical to the local run's.
            self.golden = golden_cache(self.prep, self.faults)
            if len(self.faults) != total_rows:
                raise CampaignError(
                    f"a Ray worker on {os.uname().nodename} generated {len(self.faults)} faults "
                    f"where the driver has {total_rows}; every node needs the same flipsafe, "
                    f"checkpoint ({self.prep.plan.model}) and dataset"
                )
        except Exception as exc:  # noqa: BLE001 - kept and re-raised by run()
            self._error = exc

    def run(self, k: int, start: int, stop: int):
        from flipsafe.campaign.work import run_part

        if self._error is not None:
            raise self._error
        return k, run_part(self.prep, self.faults, start, stop, self.golden)


# --address values Ray itself resolves (an existing cluster, a fresh local one): no
# host:port to check. Ray's vocabulary, not flipsafe's backend names.
RAY_OWN_ADDRESSES = ("auto", "local")


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConfigError unless `address` (host:port or ray://host:port) accepts a connection
    and answers like a Ray cluster (gRPC) within `timeout` seconds each; 'auto' and 'local'
    are left to Ray, and so is the answer when RAY_USE_TLS is set."""
    if address in RAY_OWN_ADDRESSES:
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port (or ray://host:port), "
                          "as in 127.0.0.1:6379; leave it out to start a local Ray")
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:  # refused, unreachable, unknown host, or no answer in time
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc or 'timed out'}); "
            "check --address, or leave it out to start a local Ray"
        ) from None
    head = b""
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() not in ("0", "false", ""):
            return
        try:
            conn.sendall(_HTTP2_HELLO)
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:  # timed out or reset: not a Ray server either way
            pass
    if len(head) < 9 or head[3] != _SETTINGS:
        raise ConfigError(
            f"{address} accepts connections but does not answer like a Ray cluster within "
            f"{timeout:g} s; check the host and port (a head node's GCS listens on 6379 by "
            "default)"
        )


def _ray_output_to_stderr():
    """Until the returned function is called: no token-authentication notice, and the
    raylet's messages (e.g. "A worker died ...", printed by Ray's driver thread to stdout
    with colour codes) go to stderr as plain lines, so stdout holds only results.

    Ray has no switch for the latter (log_to_driver covers worker output only), so its
    printer is replaced meanwhile; if a Ray version lacks it, nothing changes.
    """
    from flipsafe.compat import RAY_AUTH_LOGGER, ray_worker

    # Ray's per-run notice that token authentication is on (its default): not news to a user.
    logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    ray_worker = ray_worker()
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        return lambda: None

    def to_stderr(data, ignore_prefix=False):  # Ray's signature
        for line in data.get("lines", []):
            text = _ANSI.sub("", str(line)).strip()
            if text:
                print(f"ray ({data.get('pid', 'worker')}): {text}", file=sys.stderr, flush=True)

    def restore():
        ray_worker.print_to_stdstream = original

    ray_worker.print_to_stdstream = to_stderr
    return restore


def _connect(ray, address, workers):
    """Initialise Ray unless it already is; returns True when this call started the connection."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ConfigError(
                f"cannot reach the Ray cluster at {address} ({exc}); check --address, "
                "or leave it out to start a local Ray"
            ) from None
    else:
        ray.init(num_cpus=workers or os.cpu_count() or 1, ignore_reinit_error=True, **quiet)
    return True


def _actor_factory(ray, plan: CampaignPlan, store: ResultsStore, parts: int, workers,
                   device: str, ranges, stages):
    """(a function making one part worker, how many to make): one per CPU Ray reports (or
    `workers`), at most one per part, CPUs shared when there are more actors than CPUs;
    with cuda (or auto on a cluster with GPUs) each asks for an equal share of the GPUs."""
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    n_actors = max(1, min(workers or int(cpus) or 1, parts))
    # More actors than CPUs would leave some pending forever; share the CPUs instead.
    per_actor = min(1.0, cpus / n_actors) if cpus > 0 else 0
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    on_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if on_gpu and gpus <= 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPUs; use --device cpu")
    options = {"num_gpus": min(1.0, gpus / n_actors)} if on_gpu else {}
    actor_cls = ray.remote(_PartWorker).options(num_cpus=per_actor, max_restarts=0, **options)
    worker_device = "cuda" if on_gpu else "cpu"
    plan_json = plan.to_json()

    def new_actor():
        return actor_cls.remote(plan_json, store.total_rows, os.getcwd(), ranges,
                                worker_device, stages)
    return new_actor, n_actors


class _Pool:
    """The part workers, the parts queued and the one part each is running."""

    def __init__(self, ray, factory, store: ResultsStore, todo: list[int]):
        self.ray, (self.new_actor, n_actors), self.store = ray, factory, store
        self.actors = [self.new_actor() for _ in range(n_actors)]
        self.queue = deque(todo)
        self.running: dict = {}  # ref -> (part, actor slot)
        self.attempts: Counter = Counter()
        for slot in range(n_actors):
            self.feed(slot)

    def feed(self, slot: int) -> None:
        if self.queue:
            k = self.queue.popleft()
            ref = self.actors[slot].run.remote(k, *self.store.part_bounds(k))
            self.running[ref] = (k, slot)

    def retry(self, k: int, slot: int, exc: Exception) -> None:
        """Part k was lost with the actor in `slot`: it goes first to a fresh actor there,
        unless it was lost MAX_ATTEMPTS times (CampaignError)."""
        self.attempts[k] += 1
        if self.attempts[k] >= MAX_ATTEMPTS:
            raise CampaignError(
                f"part {k} was lost with its Ray worker {self.attempts[k]} times "
                f"(last: {type(exc).__name__}); the parts already written are "
                "kept, so check the workers' memory and rerun to resume"
            ) from None
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self.new_actor()
        self.queue.appendleft(k)
        self.feed(slot)


def run_parts_on_ray(plan: CampaignPlan, store: ResultsStore, todo: list[int],
                     address: str | None = None, workers: int | None = None,
                     show_progress: bool = True, ranges: dict | None = None,
                     device: str = "cpu", label: str | None = None, stages=None) -> None:
    """Run parts `todo` of `plan` on Ray actors and write each into `store` as it arrives.

    Uses the Ray already initialised in this process if there is one (and leaves it
    running); otherwise connects to `address`, or starts a local Ray with `workers`
    CPUs, and shuts that down afterwards. Each of the `workers` actors (default: the
    CPUs Ray reports, at most one per part) rebuilds the model and the seeded fault list
    from the plan, so every node needs flipsafe, the checkpoint at plan.model and the
    dataset (relative paths are taken from the driver's working folder). Parts lost with
    a dead actor run again on a fresh one; parts already written stay written whatever
    happens, so an interrupted run resumes where it was. Actors run the engine on
    `device`; with cuda (or auto on a driver that sees a GPU) each asks Ray for an equal
    share of the cluster's GPUs, else for none. `ranges` (the driver's Prepared.ranges)
    go to every actor, so none profiles activation ranges of its own, and `stages` (an
    adaptive campaign's Prepared.stages), so each draws the driver's fault list."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    todo = list(todo)
    if not todo:
        return
    ray = _import_ray()
    from ray.exceptions import (
        ObjectLostError,
        OutOfMemoryError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )

    lost_errors = (RayActorError, ObjectLostError, WorkerCrashedError, OutOfMemoryError)
    restore_output = _ray_output_to_stderr()
    started = False
    pool = None
    try:
        started = _connect(ray, address, workers)
        pool = _Pool(ray, _actor_factory(ray, plan, store, len(todo), workers, device, ranges,
                                         stages), store, todo)
        total = sum(store.expected_rows(k) for k in todo)
        done = sdc = 0
        desc = f"{label or plan.progress_label} (ray x{len(pool.actors)})"
        with progress_bar(desc, total=total, unit="inj", enabled=show_progress) as bar:
            while pool.running:
                [ref], _ = ray.wait(list(pool.running), num_returns=1)
                k, slot = pool.running.pop(ref)
                try:
                    part, table = ray.get(ref)
                except lost_errors as exc:
                    pool.retry(k, slot, exc)
                    continue
                except RayTaskError as exc:
                    if isinstance(exc.cause, FlipsafeError):
                        raise exc.cause from None
                    raise
                del ref  # frees the result in Ray's object store
                pool.feed(slot)
                store.write_part(part, table)
                done += table.num_rows
                sdc += int(np.count_nonzero(table.column("sdc").to_numpy()))
                bar.advance(table.num_rows, info=f"SDC {100 * sdc / done:.2f}%")
    finally:
        # Stops work still queued on a Ray that outlives this call (reused or a cluster).
        for actor in (pool.actors if pool is not None else []):
            with contextlib.suppress(Exception):  # best effort while unwinding
                ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
        restore_output()
