"""A campaign's work, whatever runs it: prepare a plan, list its seeded faults, inject a part."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from flipsafe.campaign.plan import CampaignPlan, FaultPlan, Stratum, plan_strata
from flipsafe.campaign.store import PLAN_FILE, ROW_SCHEMA, ResultsStore, other_model_error
from flipsafe.errors import (
    CampaignError,
    ConfigError,
    DataError,
    FlipsafeError,
)
from flipsafe.faults import VALUE, Sampler, site_param, site_spec

# Activation ranges a campaign profiled, kept in its results folder (never the checkpoint's,
# which may be read-only or shared) so a resume uses the very same ranges.
RANGES_FILE = "ranges-{format}.json"
DEVICES = ("cpu", "cuda", "auto")


def model_sha(model_dir) -> str:
    """The checkpoint's weights hash, as recorded in its config.json."""
    from flipsafe.checkpoint import WEIGHTS, read_config

    return read_config(model_dir)["files"][WEIGHTS]


def make_plan(model, faults: FaultPlan | None = None, **fields) -> CampaignPlan:
    """A CampaignPlan running `faults` (a FaultPlan; or give its fields as keywords) on
    `model`: a `flipsafe train` folder, a target spec (hf:, torchscript:, export:, onnx:,
    python:, see flipsafe.campaign.targets), an nn.Module or a target. The dataset
    defaults to a checkpoint's own; other models need one."""
    from flipsafe.campaign.targets import resolve

    target = resolve(model)
    if faults is not None:
        # Only the fault fields: a CampaignPlan is a FaultPlan too, but its model is not this one.
        fields = {**faults.fault_plan.to_dict(), **fields}
    if fields.get("dataset") is None:
        if not target.flipsafe:
            raise ConfigError(f"this {target.kind}: model needs a dataset to run on: give "
                              "--dataset (digits, imagefolder:<dir>, cifar10:<dir>, "
                              "cifar100:<dir>, tensors:<file.safetensors>)")
        fields["dataset"] = target.config.get("dataset", "digits")
    if fields.get("preprocess") and target.flipsafe:
        raise ConfigError("--image-size/--mean/--std are for models flipsafe did not train; a "
                          "flipsafe checkpoint knows its own inputs")
    # A quantized model runs in the codes it stores; a float one in fp32.
    fields.setdefault("format", "native" if getattr(target, "quantized", False) else "fp32")
    return CampaignPlan(model=target.spec, model_sha=target.sha, **fields)


@dataclass
class Prepared:
    """Everything the plan implies before any fault runs; cheap to rebuild on any worker.

    `plan` is the plan given, completed with the data_sha of the images and labels.
    """

    plan: CampaignPlan
    engine: object
    images: torch.Tensor  # the whole evaluation split, so image_id indexes it directly
    labels: torch.Tensor
    image_ids: torch.Tensor  # the images faults may land on (plan.images)
    classifier: str | None
    layers: list  # engine LayerInfo, in engine order
    strata: list[Stratum]
    # Activation ranges the engine uses; empty when neither the clamp nor the format needs them.
    ranges: dict = dataclasses.field(default_factory=dict)
    # What reports say about the model (see store.MODEL_FILE): source, hash, clean accuracy.
    model_info: dict = dataclasses.field(default_factory=dict)
    # The plan's protections, built on `engine` (its guards already set); None without.
    protector: object = None
    # How the dataset's pixels became the model's inputs (targets.Inputs); None for data
    # given in Python, which the model takes as it is.
    inputs: object = None
    # The strata of each stage of an adaptive campaign once its second stage is known
    # ([pilot, stage 2]; see campaign.adaptive); None: one stage, `strata`.
    stages: list | None = None

    @property
    def total(self) -> int:
        return sum(s.n for s in self.strata)

    @property
    def data_sha(self) -> str:
        return self.plan.data_sha


def _sampler(plan: CampaignPlan, engine, layers):
    """The one fault sampler (faults.Sampler) over the plan's layers at its site."""
    return Sampler(layers, plan.fault, engine.codes(plan.site), site_param(plan.site))


def _check_fault_width(plan: CampaignPlan, layers) -> None:
    """Refuse a fault model that flips more bits than the codes at this site hold."""
    from flipsafe.faults import parse

    k = parse(plan.fault).k
    width = max(sum(_width(bits) for bits in info.fields.values()) for info in layers)
    if not parse(plan.fault).whole_value and k > width:
        raise ConfigError(f"{plan.fault} flips {k} bits, but the {plan.format} codes at the "
                          f"{plan.site} site hold {width}; choose a fault of at most {width} bits")


def _with_exposure(plan: CampaignPlan, layers, strata: list[Stratum]) -> list[Stratum]:
    """The strata with what each puts at risk: the layer's codes and the field's bit width."""
    info = {layer.name: layer for layer in layers}
    out = []
    for s in strata:
        fields = info[s.layer].fields
        width = (sum(_width(bits) for bits in fields.values()) if s.field == VALUE
                 else _width(fields[s.field]))
        out.append(dataclasses.replace(s, elements=info[s.layer].numel, width=width))
    return out


def _width(bits) -> int:
    return bits if isinstance(bits, int) else len(bits)


def data_sha(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of evaluation images and labels as the model sees them (shapes, dtypes,
    bytes), so a campaign notices when its dataset's contents change."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype.str}{list(array.shape)}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _data_changed(dataset: str, was: str, now: str, where: str) -> CampaignError:
    return CampaignError(
        f"the dataset's contents changed since {where}: {dataset} now hashes to {now[:12]}, "
        f"not {was[:12]}; restore the data to resume, or choose another --out for a new "
        "campaign"
    )


def read_cached_ranges(out, plan: CampaignPlan) -> dict | None:
    """The ranges a campaign in results folder `out` profiled for this plan's model, format
    and dataset, or None when there are none (or they are unreadable)."""
    path = Path(out) / RANGES_FILE.format(format=plan.format)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict):
        return None
    ranges = cached.get("ranges")
    if (
        cached.get("model_sha") != plan.model_sha
        or cached.get("dataset") != plan.dataset
        or not isinstance(ranges, dict)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ranges.values())
    ):
        return None
    return ranges


def resolve_device(device: str) -> str:
    """'cpu', 'cuda' or 'auto' (cuda when torch sees a GPU) as a torch device name."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of: {', '.join(DEVICES)}; got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here; use --device cpu or auto")
    return device


def prepare(plan: CampaignPlan, ranges: dict | None = None, target=None, data=None,
            device: str = "cpu") -> Prepared:
    """Load model and data, pick images and size every stratum.

    `target` is the plan's model already resolved (default: resolved from plan.model);
    `data` is (images, labels) the model takes as they are, instead of plan.dataset
    (Python callers). When the clamp or the format needs activation ranges they are
    `ranges` if given, else profiled on the training split (on the evaluation images
    with `data`). `device` is cpu, cuda or auto. prepare writes no file.
    """
    from flipsafe.campaign.targets import Evaluation, check_model, resolve

    target = resolve(plan.model) if target is None else target
    if target.sha != plan.model_sha:
        hint = getattr(target, "sha_hint", "")
        raise CampaignError(
            f"the model at {plan.model} is not the model this plan was made for "
            f"(its weights hash differs{hint}); use a new --out folder for a new model"
        )
    ev = Evaluation.given(*data) if data is not None else target.evaluation(plan)
    _check_finite(plan, ev.images)
    plan = _pinned(plan, ev)
    model = ev.model if ev.model is not None else check_model(
        target, target.load(ev.images[:2]), ev.images, ev.labels, ev.classes)
    engine, ranges = _engine(plan, model, ev, ranges, device)
    top1, image_ids = _chosen_images(plan, engine, ev)
    # The engine owns layer selection; its "all" (Conv and Linear, GoldenEye's convention)
    # is the one meaning of "all" for campaigns and Engine.sample alike.
    layers = engine.layers(plan.site, plan.layers)
    _check_fault_width(plan, layers)
    # A fault is a (fault, element, image) triple, so sampled plans size the population
    # with the images included; `--n all` enumerates every fault of every element once,
    # each on a seeded random image, so there the images are left out.
    sizes = _sampler(plan, engine, layers).sizes(
        images=1 if plan.n == "all" else int(image_ids.numel()))
    strata = _with_exposure(plan, layers, plan_strata(plan, sizes))
    if plan.adaptive:  # the pilot first; the runner adds stage 2 from its rows
        from flipsafe.campaign import adaptive

        strata = adaptive.pilot(strata)
        adaptive.check_budget(plan.budget, strata)
    try:
        classifier = engine.classifier()
    except FlipsafeError:
        if target.flipsafe or plan.layers == "last":
            raise
        classifier = None  # a model without a final Linear: 'last' cannot be chosen
    info = _model_info(plan, target, classifier, layers,
                       float((top1 == ev.labels).double().mean()))
    protector = None
    if plan.protect is not None:
        protector = _protector(plan, engine, layers, ev, given=data is not None)
        info["protect"] = protector.to_dict()
    return Prepared(plan, engine, ev.images, ev.labels, image_ids, classifier, layers, strata,
                    dict(ranges), info, protector, ev.inputs)


def _check_finite(plan: CampaignPlan, images: torch.Tensor) -> None:
    bad = (~torch.isfinite(images)).flatten(1).any(1) if images.numel() else torch.zeros(0)
    if bad.any():
        ids = torch.nonzero(bad).reshape(-1).tolist()
        listed = ", ".join(str(i) for i in ids[:10]) + (", …" if len(ids) > 10 else "")
        raise DataError(f"{plan.dataset} has {len(ids)} image(s) with NaN or infinite values "
                        f"as the model takes them (ids {listed}); a fault campaign needs "
                        "finite inputs (its golden runs would be DUEs): remove or repair them")


def _pinned(plan: CampaignPlan, ev) -> CampaignPlan:
    """`plan` with its inputs pipeline and data hash recorded (a changed dataset refused)."""
    sha = data_sha(ev.images, ev.labels)
    if ev.inputs is not None and plan.inputs is None:
        plan = dataclasses.replace(plan, inputs=ev.inputs.to_dict())
    if plan.data_sha is None:
        plan = dataclasses.replace(plan, data_sha=sha)
    elif plan.data_sha != sha:
        raise _data_changed(plan.dataset, plan.data_sha, sha, "this campaign's plan was made")
    return plan


def _engine(plan: CampaignPlan, model, ev, ranges, device: str):
    """(the engine of `model` in the plan's format, its activation ranges: `ranges`, else
    profiled on the training images, {} when the format needs none)."""
    from flipsafe.inject import Engine

    engine = Engine(model, format=plan.format, clamp=plan.clamp,
                    device=resolve_device(device), input_shape=tuple(ev.images.shape[1:]),
                    accelerator=plan.accelerator, word_bits=plan.word_bits or 32)
    if not engine.needs_ranges:
        return engine, {}
    if ranges is None:
        ranges = engine.profile(ev.train().split(256))
    engine.set_ranges(ranges)
    return engine, ranges


def _chosen_images(plan: CampaignPlan, engine, ev):
    """(golden top-1 of every evaluation image, ids of the images faults may land on)."""
    g = engine.golden(ev.images, ev.labels, layers=[]).outcomes
    top1, top2diff = g.top1.cpu(), g.top2diff.cpu()
    if plan.images == "correct":
        keep = (top1 == ev.labels) & (top2diff > 0)
    else:
        keep = torch.ones_like(ev.labels, dtype=torch.bool)
    image_ids = torch.nonzero(keep).reshape(-1)
    if image_ids.numel() == 0:
        raise CampaignError(
            f"no {plan.images} images to inject into: the model classifies none of the "
            f"{len(ev.labels)} evaluation images correctly; check the model and dataset"
        )
    return top1, image_ids


def _model_info(plan: CampaignPlan, target, classifier, layers, accuracy: float) -> dict:
    """What model.json records about the campaign's model."""
    info = {"spec": target.spec, "kind": target.kind, "sha256": target.sha,
            "description": target.description, "classes": target.classes,
            "classifier": classifier, "accuracy": accuracy}
    if site_spec(plan.site).channels:
        # What a per-channel vulnerability map of these rows needs (metrics.vulnerability).
        info["layers"] = {i.name: {"kind": i.kind, "output_shape": list(i.output_shape)}
                          for i in layers}
    return info


def _protector(plan: CampaignPlan, engine, layers, ev, given: bool):
    """The plan's protections built and set on `engine`. Built after the images are chosen
    on the unprotected model, so the fault list (and each fault's image) is the
    unprotected campaign's."""
    from flipsafe.protect.apply import Protector

    protector = Protector.build(
        plan.protections, engine, plan.site,
        bound_batches=lambda: ev.train().split(256),
        bound_source="evaluation (no training split given)" if given else "training",
        channel_rates=lambda item: _map_rates(item, plan, engine),
        fault_layers=[i.name for i in layers])
    protector.set_on(engine)
    return protector


def _map_rates(item, plan: CampaignPlan, engine):
    """The ChannelRates of the vulnerability map protection `item` names (map=RESULTS, an
    activation campaign's folder) and a warning when that campaign ran the same faults.
    Channels follow the output shapes the map's folder recorded (those of `engine`'s
    layers for a folder written before they were recorded)."""
    from flipsafe.campaign.store import read_model_info
    from flipsafe.metrics.vulnerability import channel_map
    from flipsafe.protect.apply import ChannelRate

    folder = Path(item.get("map"))
    if not (folder / PLAN_FILE).is_file():
        raise ConfigError(f"{item.name}:map={folder} is not a campaign results folder; give "
                          "the --out folder of an activation campaign")
    store = ResultsStore(folder)
    mplan = store.open()
    if not site_spec(mplan.site).channels:
        raise ConfigError(f"{item.name}:map={folder} is a campaign on the {mplan.site} site; "
                          "a channel map comes from an activation campaign")
    if mplan.model_sha != plan.model_sha:
        raise ConfigError(f"{item.name}:map={folder} was made on another model (sha256 "
                          f"{mplan.model_sha[:12]}…, this campaign's is {plan.model_sha[:12]}…); "
                          "map an activation campaign of this very model")
    shapes = (read_model_info(folder) or {}).get("layers") or {
        i.name: {"kind": i.kind, "output_shape": list(i.output_shape)}
        for i in engine.layers("activations", "all")}
    table = channel_map(store.read(), shapes, mplan.confidence)
    rates = [ChannelRate(lay, int(c), float(r), float(lo)) for lay, c, r, lo in
             zip(table.column("layer").to_pylist(), table.column("channel").to_pylist(),
                 table.column("rate").to_pylist(), table.column("low").to_pylist())]
    same = {**mplan.fault_plan.to_dict(), "part_size": 0} == \
        {**plan.fault_plan.to_dict(), "part_size": 0}
    warning = None
    if same and mplan.model_sha == plan.model_sha:
        warning = (f"{item.name}:map={folder} ran this very plan and seed, so its channels are "
                   "chosen and judged on the same faults (optimistic); map with another --seed")
    return rates, warning


def fault_list(prep: Prepared):
    """The plan's whole fault list: a FaultSet whose `stratum` column holds each fault's
    stratum field, strata in prep.strata order.

    faults.Sampler.stratified draws it: each stratum from its own generator seeded by
    (seed, layer, field), so the list is the same on any machine and however the work is
    later split. A stratum holds the faults whose highest bit lies in its field; `--n all`
    lists each of them once per element (random and zero: each element once).
    An adaptive campaign's list is its stages one after the other (prep.stages, the strata
    of each; else [prep.strata]); stage i draws with adaptive.stage_seed(seed, i).
    """
    from flipsafe.campaign.adaptive import stage_seed
    from flipsafe.faults import FaultSet

    plan = prep.plan
    sampler = _sampler(plan, prep.engine, prep.layers)
    lists = []
    for i, strata in enumerate(prep.stages or [prep.strata]):
        counts = {(s.layer, s.field): s.n for s in strata}
        try:
            lists.append(sampler.stratified(counts, stage_seed(plan.seed, i), prep.image_ids,
                                            every=plan.n == "all"))
        except ConfigError as exc:  # the stratum sizes and the sampler disagree
            raise CampaignError(f"internal error: {exc}") from None
    faults = lists[0] if len(lists) == 1 else FaultSet.cat(lists)
    if not len(faults):
        raise CampaignError("the plan allocates no faults; raise --n or lower the confidence")
    return faults


def run_part(prep: Prepared, faults, start: int, stop: int, golden=None) -> pa.Table:
    """Inject faults [start, stop) and return their rows, ready for the store.

    `golden` (from golden_cache) is the golden run of every image faults land on, reused
    by every part; without it the part makes the golden runs of its own images."""
    part = faults.select(slice(start, stop))
    out = _inject(prep, part, golden)
    plan = prep.plan
    n = len(part)
    corrected, detected = _protected(prep, part, out, golden)
    return pa.table({
        "fault_id": pa.array(np.arange(start, stop, dtype=np.int64)),
        "layer": pa.array(part.layer_names, pa.string()),
        "field": pa.array(part.stratum_names, pa.string()),
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
        "detected": pa.array(detected),
        "corrected": pa.array(corrected),
        "decided": pa.array(~out.ran.numpy()),
    }, schema=ROW_SCHEMA)


def _inject(prep: Prepared, part, golden=None):
    """Outcomes (on the CPU) of the faults of `part`, whose images index prep.images."""
    if golden is not None:
        ids, gold = golden
        local = part.with_image(torch.searchsorted(ids, part.image))
        out = prep.engine.run(local, gold.images, gold.labels, golden=gold)
    else:
        used, image_pos = torch.unique(part.image, return_inverse=True)
        local = part.with_image(image_pos)
        images, labels = prep.images[used], prep.labels[used]
        out = prep.engine.run(local, images, labels)
    return _on_cpu(out)


def _protected(prep: Prepared, part, out, golden=None):
    """(corrected, detected) of each fault of `part` under the plan's protections (all False
    without one), with `out` changed in place to what the protected model gives (guards,
    ranger and clip, already act in the engine's runs): a corrected fault (ecc, tmr) has
    the golden outcome (masked), a detected one (ecc, parity, abft, dup) is no SDC, and
    corrected overrides detected. A fault the code miscorrected within its element is run
    again with the code the model then reads (one whose miscorrection lands in another
    element of the word keeps its injected outcome)."""
    n = len(part)
    corrected, detected = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    p = prep.protector
    if p is None:
        return corrected, detected
    for name, layers in p.weight.items():
        c, d = _weight_protected(prep, name, layers, part, out, golden)
        corrected |= c
        detected |= d
    if p.checks:
        c, d = p.output_verdicts(prep.engine, *_local_golden(prep, part, p.checks, golden))
        corrected |= c
        detected |= d
    detected &= ~corrected
    fix = torch.from_numpy(corrected)
    out.faulty_top1[fix] = out.golden_top1[fix]
    out.faulty_loss[fix] = out.golden_loss[fix]
    out.delta_loss[fix] = 0.0
    out.faulty_top2diff[fix] = out.golden_top2diff[fix]
    for flag in (out.sdc, out.due, out.nonfinite):
        flag[fix] = False
    out.sdc[torch.from_numpy(detected)] = False
    return corrected, detected


def _local_golden(prep: Prepared, part, layers, golden=None):
    """(faults of `part` with images indexing the golden run, that golden run)."""
    if golden is not None:
        ids, gold = golden
        return part.with_image(torch.searchsorted(ids, part.image)), gold
    used, image = torch.unique(part.image, return_inverse=True)
    local = part.with_image(image)
    return local, prep.engine.golden(prep.images[used], prep.labels[used], layers=set(layers))


def _weight_protected(prep: Prepared, name: str, layers, part, out, golden=None):
    """(corrected, detected) of weight protection `name` (ecc, parity) on the faults of
    `part` in `layers` (None: all), rerunning the faults it miscorrected (see _protected)."""
    from flipsafe.faults.models import FLIP
    from flipsafe.protect import weight_verdicts, word_verdicts

    words = site_spec(prep.plan.site).words  # faults on memory words, not on codes

    n = len(part)
    corrected, detected = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    reread, flip = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
    names = np.array(part.layer_names, dtype=object)
    for layer in dict.fromkeys(part.layer_names):
        if layers is not None and layer not in layers:
            continue
        rows = np.nonzero(names == layer)[0]
        codes = prep.engine.params[(layer, "weight")]
        sel = torch.from_numpy(rows)
        cols = [_rows_of(col, sel, n) for col in (part.index, part.mask, part.op, part.value)]
        v = (word_verdicts(name, codes.codes, codes.coder.fmt.bits, prep.plan.word_bits, *cols)
             if words else weight_verdicts(name, codes.codes, codes.coder.fmt.bits, *cols))
        corrected[rows], detected[rows] = v.corrected, v.detected
        reread[rows], flip[rows] = v.reread, v.flip
    if reread.any():
        rows = torch.from_numpy(np.nonzero(reread)[0])
        again = part.select(rows).replace(mask=torch.from_numpy(flip[reread]), op=FLIP, value=0)
        res = _inject(prep, again, golden)
        for name_ in vars(res):
            column = getattr(out, name_, None)
            if isinstance(column, torch.Tensor):
                column[rows] = getattr(res, name_)
    return corrected, detected


def _rows_of(column, sel: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `sel` of a FaultSet column (a scalar column stands for every row)."""
    column = torch.as_tensor(column).cpu()
    return column[sel] if column.dim() and column.shape[0] == n else column.expand(len(sel))


def _on_cpu(outcomes):
    """Outcomes with every tensor column on the CPU (the engine may run on a GPU)."""
    for name, value in list(vars(outcomes).items()):
        if isinstance(value, torch.Tensor):
            setattr(outcomes, name, value.cpu())
    return outcomes


# Bytes of cached golden values a campaign may keep for all its parts (golden_cache).
GOLDEN_CACHE_BYTES = 1 << 30


def golden_cache(prep: Prepared, faults, budget: int | None = None):
    """(image ids, Golden) of every image the faults land on, for run_part to share across
    parts, or None when its cached values would exceed `budget` bytes (default
    GOLDEN_CACHE_BYTES; estimated as four
    copies of each injected layer's float32 output per image: outputs, inputs and graph
    values); then each part makes its own golden runs, as before."""
    budget = GOLDEN_CACHE_BYTES if budget is None else budget
    ids = torch.unique(faults.image)
    per_image = sum(4 * 4 * math.prod(info.output_shape or (1,)) for info in prep.layers)
    if per_image * ids.numel() > budget:
        return None
    layers = {info.name for info in prep.layers}
    return ids, prep.engine.golden(prep.images[ids], prep.labels[ids], layers=layers)


def refuse_other_data(plan: CampaignPlan, out) -> None:
    """Refuse to resume a campaign in `out` on data other than that it started on."""
    path = Path(out) / PLAN_FILE
    try:
        recorded = CampaignPlan.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, CampaignError):
        return  # no campaign there yet, or one the store refuses with its own message
    if recorded.model_sha != plan.model_sha and \
            Path(recorded.model).resolve() != Path(plan.model).resolve():
        raise other_model_error(out, recorded, plan)
    if recorded.data_sha is None:
        raise CampaignError(
            f"{out} was started by an older flipsafe that did not record a hash of the "
            "dataset, so a resume cannot check the data is unchanged; summary and report "
            "still read it; choose another --out to run the campaign again"
        )
    # Other preprocessing (--image-size/--mean/--std) is another plan: the store says so.
    if (recorded.dataset == plan.dataset and recorded.preprocess == plan.preprocess
            and recorded.data_sha != plan.data_sha):
        raise _data_changed(plan.dataset, recorded.data_sha, plan.data_sha,
                            f"the campaign in {out} started")


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
