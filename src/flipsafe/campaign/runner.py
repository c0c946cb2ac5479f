"""Run a campaign plan: select images, generate the seeded fault list, inject part by part."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from flipsafe.campaign.plan import CampaignPlan, Stratum, plan_strata
from flipsafe.campaign.store import ROW_SCHEMA, ResultsStore
from flipsafe.errors import CampaignError, ConfigError
from flipsafe.progress import progress_bar

# Fault models whose effect does not depend on which bits they pick: one stratum per layer.
_WHOLE_VALUE = ("random", "zero")
RANGES_FILE = "ranges-{format}.json"


def model_sha(model_dir) -> str:
    """The checkpoint's weights hash, as recorded in its config.json."""
    from flipsafe.checkpoint import WEIGHTS, read_config

    return read_config(model_dir)["files"][WEIGHTS]


def make_plan(model_dir, **fields) -> CampaignPlan:
    """A CampaignPlan for the checkpoint at `model_dir` (dataset defaults to its own)."""
    from flipsafe.checkpoint import read_config

    config = read_config(model_dir)
    fields.setdefault("dataset", config.get("dataset", "digits"))
    fields.setdefault("format", "fp32")
    return CampaignPlan(model=str(model_dir), model_sha=model_sha(model_dir), **fields)


@dataclass
class Prepared:
    """Everything the plan implies before any fault runs; cheap to rebuild on any worker."""

    plan: CampaignPlan
    engine: object
    images: torch.Tensor  # the whole evaluation split, so image_id indexes it directly
    labels: torch.Tensor
    image_ids: torch.Tensor  # the images faults may land on (plan.images)
    classifier: str
    layers: list  # engine LayerInfo, in engine order
    strata: list[Stratum]

    @property
    def total(self) -> int:
        return sum(s.n for s in self.strata)


def _stratum_seed(seed: int, layer: str, field: str) -> int:
    """A seed per stratum that depends on nothing but the plan, so any worker agrees."""
    digest = hashlib.sha256(f"{seed}\x00{layer}\x00{field}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _field_bits(fields: dict, field: str) -> int:
    return len(fields[field]) if field in fields else 1


def _strata_sizes(plan: CampaignPlan, layers, n_images: int) -> dict[tuple[str, str], int]:
    """Fault-space size of each (layer, field) stratum.

    A fault is an (element, bit, image) triple, so sampled plans size the population
    with the images included. `--n all` enumerates every (element, bit) pair once, each
    on a seeded random image, so there the images are left out.
    """
    per_image = 1 if plan.n == "all" else n_images
    sizes = {}
    for info in layers:
        if plan.fault in _WHOLE_VALUE:
            sizes[(info.name, "value")] = info.numel * per_image
            continue
        for field, bits in info.fields.items():
            width = bits if isinstance(bits, int) else len(bits)
            sizes[(info.name, field)] = info.numel * width * per_image
    return sizes


def _profiled_ranges(ckpt, bundle, engine, fmt: str) -> dict:
    """Activation ranges on the training split, cached beside the checkpoint's weights."""
    path = Path(ckpt.path) / RANGES_FILE.format(format=fmt)
    sha = ckpt.config["files"]["model.safetensors"]
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("model_sha") == sha:
                return cached["ranges"]
        except (json.JSONDecodeError, KeyError):
            pass  # recomputed and rewritten below
    images, _ = bundle.train.tensors()
    ranges = engine.profile(images.split(256))
    from flipsafe import atomic

    atomic.write_json(path, {"model_sha": sha, "split": "train", "ranges": ranges})
    return ranges


def prepare(plan: CampaignPlan) -> Prepared:
    """Load model and data, profile ranges, pick images and size every stratum."""
    from flipsafe.checkpoint import load_checkpoint
    from flipsafe.data import load
    from flipsafe.inject import Engine

    ckpt = load_checkpoint(plan.model)
    if ckpt.config["files"]["model.safetensors"] != plan.model_sha:
        raise CampaignError(
            f"the checkpoint at {plan.model} is not the model this plan was made for "
            "(its weights hash differs); use a new --out folder for a new model"
        )
    bundle = load(plan.dataset)
    if len(bundle.classes) != ckpt.config["num_classes"]:
        raise ConfigError(
            f"{plan.dataset} has {len(bundle.classes)} classes but the model has "
            f"{ckpt.config['num_classes']}; run the campaign on the model's own dataset"
        )
    images, labels = bundle.test.tensors()
    engine = Engine(ckpt.model, format=plan.format, clamp=plan.clamp,
                    input_shape=tuple(images.shape[1:]))
    engine.set_ranges(_profiled_ranges(ckpt, bundle, engine, plan.format))
    golden = engine.golden(images, labels, layers=[])
    g = golden.outcomes
    if plan.images == "correct":
        keep = (g.top1 == labels) & (g.top2diff > 0)
    else:
        keep = torch.ones_like(labels, dtype=torch.bool)
    image_ids = torch.nonzero(keep).reshape(-1)
    if image_ids.numel() == 0:
        raise CampaignError(
            f"no {plan.images} images to inject into: the model classifies none of the "
            f"{len(labels)} evaluation images correctly; check the model and dataset"
        )
    # "all" follows GoldenEye: the Conv and Linear layers (normalisations are usually
    # folded into them on deployment); a regex selects anything else.
    select = "conv|linear" if plan.layers == "all" else plan.layers
    layers = engine.layers(plan.site, select)
    strata = plan_strata(plan, _strata_sizes(plan, layers, int(image_ids.numel())))
    return Prepared(plan, engine, images, labels, image_ids, engine.classifier(), layers, strata)


def fault_list(prep: Prepared):
    """The plan's whole fault list (a FaultSet) and each fault's stratum field, in order.

    Each stratum draws from its own generator seeded by (seed, layer, field), so the list
    is the same on any machine and however the work is later split.
    """
    from flipsafe.faults import FaultSet, draw

    plan, engine = prep.plan, prep.engine
    numel = {info.name: info.numel for info in prep.layers}
    names = [info.name for info in prep.layers]
    meta = plan.site == "metadata"
    sets, fields = [], []
    for s in prep.strata:
        if s.n == 0:
            continue
        gen = torch.Generator().manual_seed(_stratum_seed(plan.seed, s.layer, s.field))
        field = None if s.field == "value" else s.field
        if plan.n == "all" and plan.fault == "bitflip":
            index, mask = _every_fault(engine.fmt, numel[s.layer], field, meta)
            d = draw(plan.fault, engine.fmt, s.n, field, gen, meta=meta)
            d.mask = mask
        else:
            index = torch.randint(numel[s.layer], (s.n,), generator=gen)
            d = draw(plan.fault, engine.fmt, s.n, field, gen, meta=meta)
        image = prep.image_ids[torch.randint(prep.image_ids.numel(), (s.n,), generator=gen)]
        sets.append(FaultSet(names, layer=torch.full((s.n,), names.index(s.layer)), index=index,
                             mask=d.mask, op=d.op, value=d.value, image=image,
                             param=_ENGINE_PARAM[plan.site]))
        fields += [s.field] * s.n
    if not sets:
        raise CampaignError("the plan allocates no faults; raise --n or lower the confidence")
    return FaultSet.cat(sets), fields


_ENGINE_PARAM = {"activations": "output", "weights": "weight", "metadata": "meta"}


def _every_fault(fmt, numel: int, field, meta: bool):
    """Every (element, bit) pair of a stratum: the exhaustive fault space, element-major."""
    from flipsafe.faults import positions

    bits = torch.tensor(positions(fmt, field, meta), dtype=torch.int64)
    index = torch.arange(numel).repeat_interleave(bits.numel())
    mask = (torch.ones((), dtype=torch.int64) << bits).repeat(numel)
    return index, mask


def run_part(prep: Prepared, faults, fields: list[str], start: int, stop: int) -> pa.Table:
    """Inject faults [start, stop) and return their rows, ready for the store."""
    part = faults.select(slice(start, stop))
    used, image_pos = torch.unique(part.image, return_inverse=True)
    local = part.select(slice(None))
    local.image = image_pos
    images, labels = prep.images[used], prep.labels[used]
    out = prep.engine.run(local, images, labels)
    plan = prep.plan
    n = len(part)
    return pa.table({
        "fault_id": pa.array(np.arange(start, stop, dtype=np.int64)),
        "layer": pa.array(part.layer_names, pa.string()),
        "field": pa.array(fields[start:stop], pa.string()),
        "site": pa.array([plan.site] * n, pa.string()),
        "param": pa.array(part.param_names, pa.string()),
        "index": pa.array(part.index.numpy()),
        "bits": pa.array(part.bits(), pa.list_(pa.int16())),
        "fault_model": pa.array([plan.fault] * n, pa.string()),
        "format": pa.array([plan.format] * n, pa.string()),
        "image_id": pa.array(part.image.numpy()),
        "golden_top1": pa.array(out.golden_top1.numpy().astype(np.int32)),
        "faulty_top1": pa.array(out.faulty_top1.numpy().astype(np.int32)),
        "sdc": pa.array(out.sdc.numpy()),
        "due": pa.array(out.due.numpy()),
        "nonfinite": pa.array(out.nonfinite.numpy()),
        "golden_loss": pa.array(out.golden_loss.double().numpy()),
        "faulty_loss": pa.array(out.faulty_loss.double().numpy()),
        "delta_loss": pa.array(out.delta_loss.double().numpy()),
        "golden_top2diff": pa.array(out.golden_top2diff.double().numpy()),
        "faulty_top2diff": pa.array(out.faulty_top2diff.double().numpy()),
    }, schema=ROW_SCHEMA)


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
                 show_progress: bool = True, workers: int | None = None) -> CampaignRun:
    """Run (or resume) `plan` into results folder `out`; finished parts are kept."""
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; choose local or ray")
    prep = prepare(plan)
    faults, fields = fault_list(prep)
    store = ResultsStore(out)
    store.create_or_resume(plan, total_rows=len(faults))
    todo = store.missing_parts()
    kept = store.n_parts - len(todo)
    started = time.perf_counter()
    if backend == "ray":
        from flipsafe.campaign.ray_backend import run_parts_on_ray

        run_parts_on_ray(plan, store, todo, address=address, workers=workers,
                         show_progress=show_progress)
    else:
        _run_parts_locally(prep, faults, fields, store, todo, show_progress)
    seconds = time.perf_counter() - started
    ran = sum(store.expected_rows(k) for k in todo)
    return CampaignRun(Path(out), len(faults), len(todo), kept, seconds, ran / max(seconds, 1e-9))


def part_bounds(store: ResultsStore, k: int, part_size: int) -> tuple[int, int]:
    start = k * part_size
    return start, start + store.expected_rows(k)


def _run_parts_locally(prep, faults, fields, store, todo, show_progress) -> None:
    total = sum(store.expected_rows(k) for k in todo)
    sdc = done = 0
    desc = f"{prep.plan.site} {prep.plan.format} {prep.plan.fault}"
    with progress_bar(desc, total=total, unit="inj", enabled=show_progress) as bar:
        for k in todo:
            start, stop = part_bounds(store, k, prep.plan.part_size)
            # One engine call per part: its golden run is shared by every fault in it
            # (measured: twice the rate of 256-fault slices, each with its own golden run).
            table = run_part(prep, faults, fields, start, stop)
            store.write_part(k, table)
            done += table.num_rows
            sdc += int(np.count_nonzero(table.column("sdc").to_numpy()))
            bar.advance(table.num_rows, info=f"SDC {100 * sdc / done:.2f}%")


def estimate_seconds(prep: Prepared, sample: int = 64) -> float:
    """Rough run time: the plan's injections at the clean-inference rate of this machine.

    Faulty runs mostly execute only the graph after the faulty layer, so the real rate
    is usually higher; treat this as an upper estimate.
    """
    ids = prep.image_ids[:sample]
    images, labels = prep.images[ids], prep.labels[ids]
    prep.engine.golden(images, labels, layers=[])  # warm-up
    started = time.perf_counter()
    prep.engine.golden(images, labels, layers=[])
    per_image = (time.perf_counter() - started) / max(len(ids), 1)
    return prep.total * per_image
