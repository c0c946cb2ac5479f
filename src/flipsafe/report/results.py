"""Campaign results folders read back with their plan, model facts and summaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flipsafe.campaign import adaptive
from flipsafe.campaign.plan import CampaignPlan, Stratum, is_flipsafe_spec
from flipsafe.campaign.store import PLAN_FILE, ResultsStore, read_cost, read_model_info
from flipsafe.errors import CampaignError, ConfigError, FlipsafeError
from flipsafe.metrics.stats import Summary, summarise

# Fields that may differ between campaigns being compared: which model, and how the
# rows were split into files (part_size changes no result).
# protect may differ too: a protected campaign is compared with the unprotected one on the
# very same faults (tables.protection_table pairs them row by row).
MAY_DIFFER = ("model", "model_sha", "part_size", "data_sha", "preprocess", "protect", "inputs")
LAST = "last"
BACKBONE_PREFIX = "backbone."


@dataclass(frozen=True)
class CleanEval:
    """Softmax outputs of the unfaulted model on the test split of the plan's dataset."""

    probs: np.ndarray
    labels: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.probs.argmax(axis=1) == self.labels))


@dataclass
class Results:
    """One campaign's rows and what a report needs about them.

    by_layer, by_field and by_bit are summaries grouped by ("layer",), ("layer", "field")
    and ("layer", "bit"); "bit" is the highest bit position a fault touched (-1 for
    faults without bits, which by_bit leaves out). classifier_layer is the layer whose
    outputs are the class scores, None when the checkpoint cannot be read.
    """

    dir: Path
    name: str
    plan: CampaignPlan
    table: pa.Table
    by_layer: Summary
    by_field: Summary
    by_bit: Summary
    config: dict | None
    classifier_layer: str | None
    clean: CleanEval | None = None
    notes: list[str] = field(default_factory=list)
    strata: list[Stratum] | None = None
    complete: bool = True
    planned_rows: int = 0
    # Injections spent (all rows, an adaptive pilot's too; None: the table's) and the
    # adaptive pilot's rows, which only allocated (0 without one).
    spent_rows: int | None = None
    pilot_rows: int = 0
    # What the results folder records about its model (store.MODEL_FILE): spec, kind,
    # sha256, description, clean accuracy; None for folders written before it existed.
    model_info: dict | None = None
    # What the campaign's protections cost on its model (protect.cost.for_plan, manifest key
    # "cost"): FLOPs, memory, CPU latency and accuracy; None for folders without it.
    cost: dict | None = None

    @property
    def n(self) -> int:
        """Injections spent: every row, an adaptive pilot's included (`table` holds the rows
        estimates use)."""
        return self.table.num_rows if self.spent_rows is None else self.spent_rows

    @property
    def accuracy(self) -> float | None:
        """Test accuracy recorded when the model was trained, or for a model flipsafe did
        not train the campaign's clean accuracy on its evaluation images (None if unknown)."""
        if self.config is not None and self.config.get("accuracy") is not None:
            return float(self.config["accuracy"])
        value = (self.model_info or {}).get("accuracy")
        return float(value) if isinstance(value, (int, float)) and self.config is None else None

    @property
    def arch(self) -> str | None:
        """A checkpoint's architecture, or the kind of a model flipsafe did not train (hf,
        torchscript, export, python, module); None when unknown."""
        if self.config is not None:
            return self.config.get("arch")
        kind = (self.model_info or {}).get("kind")
        return str(kind) if kind and not is_flipsafe_spec(self.plan.model) else None

    @property
    def source(self) -> str:
        """The model's source and content hash, as a report's model card names them."""
        info = self.model_info or {}
        what = info.get("description") or (
            f"flipsafe checkpoint {self.plan.model}" if is_flipsafe_spec(self.plan.model)
            else self.plan.model)
        return f"{what} (sha256 {self.plan.model_sha[:16]})"

    @property
    def head(self) -> str:
        return "unknown" if self.config is None else str(self.config.get("head", "linear"))

    def match_name(self, layer: str) -> str:
        """The name layers are matched by across models: "last" for the classifier layer,
        and a text-guided model's backbone layers without their "backbone." prefix."""
        if layer == self.classifier_layer:
            return LAST
        if self.head not in ("linear", "unknown") and layer.startswith(BACKBONE_PREFIX):
            return layer[len(BACKBONE_PREFIX):]
        return layer

    def real_name(self, match: str) -> str:
        """The layer name that match_name() turned into `match`."""
        for key in self.by_layer.groups:
            if self.match_name(key[0]) == match:
                return key[0]
        return match

    def matched_table(self) -> pa.Table:
        """The rows with layer replaced by match_name(layer), for side-by-side comparisons."""
        column = self.table["layer"].combine_chunks().dictionary_encode()
        names = pa.array([self.match_name(v) for v in column.dictionary.to_pylist()], pa.string())
        layers = names.take(column.indices)
        return self.table.set_column(self.table.schema.get_field_index("layer"), "layer", layers)

    def sizes(self, matched: bool = False) -> dict[tuple[str, str], int] | None:
        """Fault-space size of each (layer, field) stratum (layers by match_name if matched);
        None for folders written before flipsafe recorded them."""
        if self.strata is None:
            return None
        name = self.match_name if matched else (lambda layer: layer)
        return {(name(s.layer), s.field): s.size for s in self.strata}

    @cached_property
    def matched(self) -> Summary:
        """Summary by matched layer name (see match_name), at the same confidence as by_layer."""
        return summarise(self.matched_table(), ("layer",), self.by_layer.confidence,
                         sizes=self.sizes(matched=True), interval=self.by_layer.interval)


def bit_positions(table: pa.Table) -> np.ndarray:
    """Highest bit position in each row's bits list, -1 where the list is empty."""
    bits = table["bits"].combine_chunks()
    top = np.full(len(bits), -1, dtype=np.int64)
    flat = bits.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if flat.size:
        parents = pc.list_parent_indices(bits).to_numpy(zero_copy_only=False)
        np.maximum.at(top, parents, flat)
    return top


def with_bit_column(table: pa.Table) -> pa.Table:
    """The rows with a "bit" column (see bit_positions) appended."""
    return table.append_column("bit", pa.array(bit_positions(table), pa.int64()))


def _read_checkpoint(plan: CampaignPlan, notes: list[str], info: dict | None):
    from flipsafe.checkpoint import WEIGHTS, load_checkpoint
    from flipsafe.textguided import classifier_layer_name

    if not is_flipsafe_spec(plan.model):
        # Not a `flipsafe train` folder: what the campaign recorded stands in for it.
        if info is None or info.get("sha256") != plan.model_sha:
            notes.append(f"The model {plan.model} is not a flipsafe checkpoint and the folder "
                         "records nothing about it; accuracy and the classifier layer are "
                         "unknown.")
            return None, None
        return None, info.get("classifier")

    try:
        ckpt = load_checkpoint(plan.model)
    except FlipsafeError as exc:
        notes.append(
            f"The checkpoint named by the plan could not be read ({exc}); accuracy, "
            "calibration and the classifier layer are unknown for this model."
        )
        return None, None
    if ckpt.config["files"].get(WEIGHTS) != plan.model_sha:
        # Facts about other weights would be presented as facts about this campaign's model.
        notes.append(
            f"The checkpoint at {plan.model} holds other weights than the campaign ran on "
            "(its hash differs from the plan's model_sha); accuracy, calibration and the "
            "classifier layer are not shown. Point the plan's model at the original checkpoint."
        )
        return None, None
    return ckpt, classifier_layer_name(ckpt.model)


def _clean_eval(model, plan: CampaignPlan) -> CleanEval:
    import torch

    from flipsafe.data import load as load_data
    from flipsafe.train import predict

    logits, labels = predict(model, load_data(plan.dataset, seed=plan.seed).test)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    return CleanEval(probs, labels.numpy())


def _folder_notes(store: ResultsStore, spent: pa.Table) -> tuple[list[str], bool]:
    """What a report must say about a results folder (damaged parts, an incomplete campaign,
    strata not recorded), and whether the campaign is complete."""
    plan = store.plan
    notes: list[str] = []
    if store.damaged:
        # Reading never changes the folder; the campaign's writer sets these aside on resume.
        names = ", ".join(p.name for p in store.damaged)
        notes.append(
            f"Skipped {len(store.damaged)} damaged part file(s) in {store.parts_dir} ({names}); "
            "resume the campaign to set them aside and redo their rows."
        )
    complete = spent.num_rows >= store.total_rows and (
        not plan.adaptive or store.pilot is not None)
    if not complete:
        notes.append(
            f"The campaign is incomplete: {spent.num_rows:,} of {store.total_rows:,} planned "
            "rows; resume it for the planned precision. Its overall rates cover only the "
            "strata it has rows in, and comparisons use only what both sides have."
        )
    if store.strata is None:
        notes.append(
            "This folder was written before flipsafe recorded the fault-space size of each "
            "stratum, so its overall rates pool the rows instead of weighting each stratum by "
            "its share of the fault space; resume the campaign once to record them."
        )
    return notes, complete


def load_results(
    directory, name: str | None = None, evaluate: bool = False, confidence: float | None = None
) -> Results:
    """Read a campaign results folder and summarise it by layer, by (layer, field) and by bit.

    name defaults to the folder's name (as `flipsafe fit` names it). evaluate=True also runs the model on the
    clean test split (for calibration). confidence defaults to the plan's.
    """
    folder = Path(directory)
    if not folder.exists():
        raise CampaignError(
            f"results folder {str(folder)!r} does not exist; give the --out folder of a campaign"
        )
    if not folder.is_dir():
        raise CampaignError(f"{str(folder)!r} is a file; give the folder a campaign wrote")
    if not (folder / PLAN_FILE).is_file():
        raise CampaignError(
            f"{folder} has no {PLAN_FILE}, so it is not a campaign results folder; "
            "give the --out folder of `flipsafe campaign`"
        )
    store = ResultsStore(folder)
    plan = store.open()
    spent = store.read()
    table = adaptive.estimation_rows(store, spent)
    if table.num_rows == 0:
        damaged = f" ({len(store.damaged)} damaged part file(s) skipped)" if store.damaged else ""
        raise CampaignError(
            f"{folder} holds no result rows yet{damaged}; run or resume the campaign before "
            "reporting"
        )
    notes, complete = _folder_notes(store, spent)
    strata = store.strata
    sizes = None if strata is None else {(s.layer, s.field): s.size for s in strata}
    # No campaign is exhaustive in the statistical sense: `--n all` lists every (element,
    # bit) once, but each on one randomly drawn image, so its rates still carry sampling error.
    confidence = plan.confidence if confidence is None else confidence
    info = read_model_info(folder)
    ckpt, classifier = _read_checkpoint(plan, notes, info)
    interval = adaptive.interval(plan)
    with_bits = with_bit_column(table)
    with_bits = with_bits.filter(pc.greater_equal(with_bits["bit"], 0))
    return Results(
        dir=folder,
        name=name or folder.resolve().name,
        plan=plan,
        table=table,
        by_layer=summarise(table, ("layer",), confidence, sizes=sizes, interval=interval),
        by_field=summarise(table, ("layer", "field"), confidence, sizes=sizes,
                           interval=interval),
        by_bit=summarise(with_bits, ("layer", "bit"), confidence),
        config=None if ckpt is None else ckpt.config,
        classifier_layer=classifier,
        clean=_clean_eval(ckpt.model, plan) if evaluate and ckpt is not None else None,
        notes=notes,
        strata=strata,
        complete=complete,
        planned_rows=int(store.total_rows),
        spent_rows=int(spent.num_rows),
        pilot_rows=int(store.stages[0]) if store.pilot is not None else 0,
        model_info=info,
        cost=read_cost(folder),
    )


def with_unique_names(models: Sequence[Results], names: Sequence[str] | None = None
                      ) -> list[Results]:
    """Copies of the results carrying the given names (default: their own), made unique by
    numbering repeats ("base", "base-2") so tables and verdicts never compare "base" with
    "base"."""
    if names is not None and len(names) != len(models):
        raise ConfigError(
            f"got {len(names)} names for {len(models)} results folders; give one per folder"
        )
    wanted = [r.name for r in models] if names is None else [str(n) for n in names]
    seen: dict[str, int] = {}
    out = []
    for r, name in zip(models, wanted):
        seen[name] = seen.get(name, 0) + 1
        out.append(replace(r, name=name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return out


def check_same_plan(reference: Results, other: Results) -> None:
    """Refuse to compare campaigns whose plans differ in anything but the model."""
    mine, theirs = reference.plan.to_dict(), other.plan.to_dict()
    differing = [k for k in mine if k not in MAY_DIFFER and mine[k] != theirs.get(k)]
    if differing:
        diffs = "; ".join(
            f"{k}: {mine[k]!r} in {reference.dir}, {theirs.get(k)!r} in {other.dir}"
            for k in differing
        )
        raise CampaignError(
            f"{other.dir} comes from a different plan than {reference.dir} ({diffs}); "
            "compare campaigns run with the same settings on different models"
        )
