"""Run (or resume) a campaign into a results folder: lock it, record the plan, and have a
backend (local, or Ray) inject the missing parts."""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flipsafe.campaign.backends import BACKENDS, get_backend
from flipsafe.campaign.plan import CampaignPlan
from flipsafe.campaign.store import ResultsStore, read_cost
from flipsafe.campaign.work import (  # re-exported: the campaign API callers know
    DEVICES,
    GOLDEN_CACHE_BYTES,
    RANGES_FILE,
    Prepared,
    data_sha,
    estimate_seconds,
    fault_list,
    golden_cache,
    make_plan,
    model_sha,
    prepare,
    read_cached_ranges,
    refuse_other_data,
    resolve_device,
    run_part,
)
from flipsafe.errors import ConfigError, EnvironmentFailure, FlipsafeError, is_disk_full

__all__ = [
    "BACKENDS",
    "COST_IMAGES",
    "DEVICES",
    "GOLDEN_CACHE_BYTES",
    "RANGES_FILE",
    "CampaignRun",
    "Prepared",
    "campaign_cost",
    "data_sha",
    "estimate_seconds",
    "fault_list",
    "golden_cache",
    "make_plan",
    "model_sha",
    "prepare",
    "read_cached_ranges",
    "refuse_other_data",
    "resolve_device",
    "run_campaign",
    "run_part",
]
# Images the cost of a campaign's protections is measured on (flipsafe.protect.cost).
COST_IMAGES = 16


def _cache_ranges(out, plan: CampaignPlan, ranges: dict) -> None:
    from flipsafe import atomic

    path = Path(out) / RANGES_FILE.format(format=plan.format)
    try:
        atomic.write_json(path, {"model_sha": plan.model_sha, "dataset": plan.dataset,
                                 "split": "train", "ranges": ranges})
    except OSError:
        pass  # only a cache: the campaign profiles again next time


def campaign_cost(prep: Prepared, selection: dict | None = None) -> dict:
    """What the plan's protections cost on the campaign's model (protect.cost.for_plan, on a
    CPU copy and the first COST_IMAGES fault images): `selection` as for_plan takes it,
    default the whole layers each protection's `layers` option names. Model FLOPs and
    clean accuracy are recorded for unprotected plans too (the text-guided head's cost)."""
    from flipsafe.protect import cost

    items = prep.plan.protections
    if selection is None:
        selection = cost.layer_selection(prep.engine, items, prep.plan.site)
        # What the protector chose: abft's Conv/Linear layers, dup/tmr's budgeted channels.
        protector = getattr(prep, "protector", None)
        if protector is not None:
            selection.update(protector.cost_selection())
    ids = prep.image_ids[:COST_IMAGES].cpu()
    model = copy.deepcopy(prep.engine.model).cpu()
    # ranger/clip cost what the campaign guards with: the protector's [lo, hi] bounds.
    bounds = {layer: tuple(b.cpu() for b in pair) for layer, pair in
              getattr(getattr(prep, "protector", None), "bounds", {}).items()}
    return cost.for_plan(model, items, selection, prep.images[ids].cpu(),
                         prep.labels[ids].cpu(), ranges=prep.ranges, bounds=bounds,
                         format=prep.plan.format)


def _record_cost(prep: Prepared, store: ResultsStore) -> None:
    try:
        record = campaign_cost(prep)
    except (FlipsafeError, RuntimeError) as exc:  # a report shows n/a; the campaign runs on
        record = {"error": f"{type(exc).__name__}: {exc}"}
    store.write_cost(record)


def _refuse_other_channels(out, prep) -> None:
    """Refuse to resume a dup/tmr campaign whose map now selects other channels (the map's
    folder changed since the campaign started): its parts would mix two protections."""
    from flipsafe.campaign.store import read_model_info
    from flipsafe.errors import CampaignError

    was = ((read_model_info(out) or {}).get("protect") or {}).get("channels")
    now = (prep.model_info.get("protect") or {}).get("channels")
    if was is not None and now is not None and was != now:
        raise CampaignError(
            f"the vulnerability map of {prep.plan.protect} now selects other channels than "
            f"when the campaign in {out} started (its results folder changed); restore it, "
            "or choose another --out")


@dataclass
class CampaignRun:
    """What a finished (or resumed) campaign did."""

    out: Path
    total: int
    ran_parts: int
    kept_parts: int
    seconds: float
    injections_per_s: float


def run_campaign(plan: CampaignPlan, out, backend: str = "local", address: str | None = None,
                 show_progress: bool = True, workers: int | None = None, device: str = "cpu",
                 target=None, data=None, label: str | None = None,
                 log_inputs: bool = True) -> CampaignRun:
    """Run (or resume) `plan` into results folder `out`; finished parts are kept.

    The run holds the folder's writer lock, so a second campaign on the same folder is
    refused (CampaignError). A full disk raises EnvironmentFailure; the parts written
    until then are kept and the same call resumes. `device` (cpu, cuda, auto) is where
    the engine runs; `target` and `data` are as for prepare (the Ray backend rebuilds
    both from the plan, so it takes neither). `label` names the progress bar (default:
    site, format and fault); log_inputs=False leaves out the line saying which inputs the
    model gets (plan.json records them either way).
    """
    runner = get_backend(backend)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ConfigError(f"--workers must be a whole number of at least 1, got {workers!r}")
    resolve_device(device)
    if runner.rebuilds and (data is not None or not getattr(target, "portable", True)):
        raise ConfigError(f"the {runner.name} backend rebuilds the model and data from the "
                          "plan on each worker; a model or data given in Python runs with "
                          "backend='local'")
    cached = read_cached_ranges(out, plan)
    prep = prepare(plan, ranges=cached, target=target, data=data, device=device)
    plan = prep.plan  # with the data hash
    if prep.inputs is not None:
        if show_progress and log_inputs:
            print(prep.inputs.describe(), file=sys.stderr, flush=True)
        for warning in prep.inputs.warnings():
            print(f"flipsafe: warning: {warning}", file=sys.stderr)
    for warning in getattr(prep.protector, "warnings", ()):
        print(f"flipsafe: warning: {warning}", file=sys.stderr)
    refuse_other_data(plan, out)
    store = ResultsStore(out)
    prep.stages = _recorded_stages(store, plan, prep)
    faults = fault_list(prep)
    if _finished(store, plan, len(faults), prep):
        # Nothing to do and nothing written: a finished campaign resumes on a read-only folder.
        if show_progress:
            print(f"the campaign in {out} is complete ({store.n_parts} parts); nothing to run",
                  file=sys.stderr)
        return CampaignRun(Path(out), len(faults), 0, store.n_parts, 0.0, 0.0)
    if not os.access(out, os.W_OK) and Path(out).is_dir():
        raise ConfigError(f"cannot write --out '{out}': permission denied (the campaign there "
                          "is not finished); make the folder writable to resume it")
    try:
        with store.lock():
            # The strata estimates use: an adaptive campaign's stage 2 once it is known.
            store.create_or_resume(plan, total_rows=len(faults),
                                   strata=(prep.stages or [prep.strata])[-1])
            _refuse_other_channels(out, prep)
            if prep.ranges and cached is None:
                _cache_ranges(out, plan, prep.ranges)
            store.write_model_info(prep.model_info)
            if read_cost(out) is None:  # measured once: a resume keeps the first figures
                _record_cost(prep, store)
            todo = store.missing_parts()
            kept = store.n_parts - len(todo)
            started = time.perf_counter()
            runner.run(prep, faults, store, todo, show_progress=show_progress, label=label,
                       address=address, workers=workers, device=device)
            if plan.adaptive and len(store.stages) == 1:
                faults, later = _second_stage(prep, store)
                todo += later
                runner.run(prep, faults, store, later, show_progress=show_progress,
                           label=label, address=address, workers=workers, device=device)
            seconds = time.perf_counter() - started
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise EnvironmentFailure(
            f"no space left on the disk holding {out} ({exc.strerror}); the parts finished "
            "so far are kept there: free some space and run the same campaign again to resume"
        ) from None
    ran = sum(store.expected_rows(k) for k in todo)
    return CampaignRun(Path(out), len(faults), len(todo), kept, seconds, ran / max(seconds, 1e-9))


def _recorded_stages(store: ResultsStore, plan: CampaignPlan, prep) -> list | None:
    """The stages an adaptive campaign in `store` recorded for this very plan and pilot
    ([pilot, stage 2]), else None; reads only."""
    if not plan.adaptive:
        return None
    try:
        held = store.open()
    except FlipsafeError:
        return None
    if (held.fingerprint() != plan.fingerprint() or store.pilot is None
            or store.pilot != prep.strata):
        return None
    return [store.pilot, store.strata]


def _second_stage(prep: Prepared, store: ResultsStore):
    """Size the adaptive campaign's second stage from its pilot's rows (campaign.adaptive;
    the store holds only those yet), record it in `store` and return the whole fault list
    and the parts of stage 2 to run."""
    from flipsafe.campaign import adaptive

    plan, pilot = prep.plan, prep.strata
    stage2 = adaptive.second_stage(pilot, adaptive.counts_of(store.read(), pilot),
                                   plan.margin, plan.confidence, plan.budget)
    store.add_stage(sum(s.n for s in stage2), stage2, pilot)
    prep.stages = [pilot, stage2]
    return fault_list(prep), store.missing_parts()


def _finished(store: ResultsStore, plan: CampaignPlan, total_rows: int, prep) -> bool:
    """True when results folder `store` holds this very plan with every part whole and
    everything a resume would record (strata, cost, model record); reads only."""
    from flipsafe.campaign.store import read_model_info

    try:
        held = store.open()
    except FlipsafeError:
        return False
    info = read_model_info(store.out_dir)
    # Counting part files is cheap; reading and checking them (missing_parts) comes last.
    on_disk = sum(1 for _ in store.parts_dir.glob("part-*.parquet"))
    staged = not plan.adaptive or len(store.stages) > 1
    return (held.fingerprint() == plan.fingerprint() and store.total_rows == total_rows
            and staged and on_disk == store.n_parts
            and store.strata is not None and read_cost(store.out_dir) is not None
            and info is not None
            and info.get("protect", {}).get("channels") ==
            prep.model_info.get("protect", {}).get("channels")
            and not store.missing_parts() and not store.damaged)
