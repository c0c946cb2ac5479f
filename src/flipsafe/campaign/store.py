"""A campaign results folder: plan, manifest and checksummed Parquet parts, written atomically."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import platform
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flipsafe import atomic
from flipsafe.campaign.plan import CampaignPlan, Stratum
from flipsafe.errors import CampaignError

ROW_SCHEMA = pa.schema(
    [
        pa.field("fault_id", pa.int64(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("field", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),  # output, weight, bias or meta
        pa.field("index", pa.int64(), nullable=False),
        pa.field("bits", pa.list_(pa.int16()), nullable=False),
        pa.field("fault_model", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("golden_top1", pa.int32(), nullable=False),
        pa.field("faulty_top1", pa.int32(), nullable=False),
        pa.field("sdc", pa.bool_(), nullable=False),
        pa.field("due", pa.bool_(), nullable=False),
        pa.field("nonfinite", pa.bool_(), nullable=False),
        pa.field("golden_loss", pa.float64(), nullable=False),
        pa.field("faulty_loss", pa.float64(), nullable=False),
        pa.field("delta_loss", pa.float64(), nullable=False),
        pa.field("golden_top2diff", pa.float64(), nullable=False),
        pa.field("faulty_top2diff", pa.float64(), nullable=False),
        # What the plan's protection (plan.protect) did to the fault: flagged it, or
        # restored the stored value exactly. Parts written before these columns read as
        # False (nothing protected then).
        pa.field("detected", pa.bool_(), nullable=False),
        pa.field("corrected", pa.bool_(), nullable=False),
        # The outcome was decided exactly without a forward pass (the stored code did not
        # change, the change provably cannot reach the logits, ...); False in parts written
        # before flipsafe recorded it.
        pa.field("decided", pa.bool_(), nullable=False),
    ]
)
# Columns added after results were first written, each read as False where a part lacks it.
ADDED_COLUMNS = ("detected", "corrected", "decided")

PLAN_FILE = "plan.json"
# What a results folder records about its model (source, sha256, classifier layer, clean
# accuracy), so reports can describe models flipsafe did not train and cannot reload.
MODEL_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
LOCK_FILE = ".lock"
_PART_NAME = re.compile(r"^part-(\d{6})\.parquet$")
_META_ROWS = b"flipsafe.rows"
_META_FINGERPRINT = b"flipsafe.fingerprint"
_META_PART = b"flipsafe.part"
_META_CHECKSUM = b"flipsafe.checksum"


def read_model_info(folder) -> dict | None:
    """What results folder `folder` records about its model (MODEL_FILE), or None."""
    try:
        info = json.loads((Path(folder) / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


# The manifest key holding what the campaign's protections cost (protect.cost.for_plan).
COST_KEY = "cost"


def read_cost(folder) -> dict | None:
    """What results folder `folder` records its protections cost (manifest key COST_KEY,
    written by ResultsStore.write_cost), or None (folders written before it, or unprotected)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = manifest.get(COST_KEY) if isinstance(manifest, dict) else None
    return value if isinstance(value, dict) else None


def content_checksum(table: pa.Table) -> str:
    """sha256 over a table's column names and values, independent of how it is chunked."""
    h = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns):
        h.update(name.encode("utf-8") + b"\0")
        arr = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
        if pa.types.is_list(arr.type):
            # Lengths keep [1, 2], [3] apart from [1], [2, 3].
            h.update(arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            arr = arr.flatten()
        if pa.types.is_string(arr.type):
            values = arr.to_pylist()
            h.update(np.array([len(v.encode("utf-8")) for v in values], np.int64).tobytes())
            h.update("".join(values).encode("utf-8"))
        else:
            h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).tobytes())
    return h.hexdigest()


def _with_added_columns(table: pa.Table) -> pa.Table:
    """A part written before some of ADDED_COLUMNS, with each it lacks False (no protection
    ran, nothing recorded as decided without a forward pass), in ROW_SCHEMA's order."""
    false = pa.array(np.zeros(table.num_rows, dtype=bool))
    for name in ADDED_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(ROW_SCHEMA.field(name), false)
    return table.select(ROW_SCHEMA.names)


def conform(table: pa.Table) -> pa.Table:
    """`table` as ROW_SCHEMA (columns added since first written filled in); CampaignError
    naming what does not fit."""
    names = set(table.column_names)
    if set(ADDED_COLUMNS) - names and not names - set(ROW_SCHEMA.names):
        table = _with_added_columns(table)  # e.g. rows of a campaign without protection
        names = set(table.column_names)
    missing = [f.name for f in ROW_SCHEMA if f.name not in names]
    extra = sorted(names - set(ROW_SCHEMA.names))
    if missing or extra:
        raise CampaignError(
            f"rows do not match ROW_SCHEMA: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    table = table.select(ROW_SCHEMA.names)
    with_nulls = [name for name in ROW_SCHEMA.names if table[name].null_count]
    if with_nulls:
        raise CampaignError(
            f"columns {', '.join(with_nulls)} have missing values; use NaN for undefined "
            "floats and -1 for undefined classes"
        )
    try:
        return table.cast(ROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise CampaignError(f"rows cannot be converted to ROW_SCHEMA: {exc}") from None


def load_part(path: Path, k: int, rows: int, fingerprint: str) -> pa.Table | None:
    """The part file at `path` as a ROW_SCHEMA table if it is part k of the plan with this
    `fingerprint`, holds `rows` rows and its checksum matches; else None."""
    try:
        table = pq.read_table(path, page_checksum_verification=True)
        meta = table.schema.metadata or {}
        ok = (
            meta.get(_META_FINGERPRINT) == fingerprint.encode()
            and meta.get(_META_PART) == str(k).encode()
            and meta.get(_META_ROWS) == str(table.num_rows).encode()
            and table.num_rows == rows
            and _is_row_schema(table.schema.names)
        )
        # Parquet may rename the list child ("item" -> "element"); the cast undoes it.
        table = table.replace_schema_metadata(None)
        legacy = table.schema.names != ROW_SCHEMA.names
        schema = pa.schema([f for f in ROW_SCHEMA if f.name in table.schema.names])
        table = table.cast(schema)
        if ok and meta.get(_META_CHECKSUM) == content_checksum(table).encode():
            return _with_added_columns(table) if legacy else table
    except (OSError, pa.ArrowException):
        pass
    return None


def _is_row_schema(names: list[str]) -> bool:
    """ROW_SCHEMA's columns in order, of this flipsafe or of one before some ADDED_COLUMNS."""
    return names == [n for n in ROW_SCHEMA.names if n in names or n not in ADDED_COLUMNS]


def other_model_error(out_dir, held: CampaignPlan, plan: CampaignPlan) -> CampaignError:
    """The refusal of results folder `out_dir`, which holds a campaign of another model."""
    return CampaignError(
        f"{out_dir} holds a campaign of another model: {held.model} (sha256 "
        f"{held.model_sha[:12]}…), not {plan.model} (sha256 {plan.model_sha[:12]}…); choose a "
        f"new --out for this model, or remove {out_dir} to start afresh (its results are lost)"
    )


# What a results folder may hold before its plan.json is written: the writer's lock, the
# parts folder, the manifest (written first), the model record and cached ranges.
CAMPAIGN_ENTRIES = re.compile(r"^(\.lock|parts|manifest\.json|model\.json|ranges-.+\.json)$")


def stratum_counts(table: pa.Table) -> dict[tuple[str, str], tuple[int, int, int]]:
    """{(layer, field): (rows, SDCs, DUEs)} of campaign rows (ROW_SCHEMA columns)."""
    grouped = table.group_by(["layer", "field"]).aggregate(
        [("sdc", "count"), ("sdc", "sum"), ("due", "sum")]).to_pydict()
    return {(lay, fld): (int(n), int(sdc or 0), int(due or 0)) for lay, fld, n, sdc, due in zip(
        grouped["layer"], grouped["field"], grouped["sdc_count"], grouped["sdc_sum"],
        grouped["due_sum"])}


def different_campaign_error(out_dir, existing: CampaignPlan, plan: CampaignPlan
                             ) -> CampaignError:
    """Why folder `out_dir`, holding plan `existing`, refuses plan `plan` (fingerprints differ)."""
    if (existing.model_sha != plan.model_sha
            and Path(existing.model).resolve() != Path(plan.model).resolve()):
        return other_model_error(out_dir, existing, plan)
    if existing.differing_fields(plan) == ["model_sha"]:
        return CampaignError(
            f"{out_dir} holds this campaign run on other weights: the "
            f"checkpoint at {plan.model} changed since (retrained or replaced; its "
            f"weights hash is now {plan.model_sha[:12]}…, the campaign ran on "
            f"{existing.model_sha[:12]}…); restore the original checkpoint to "
            "resume, or choose another --out for the new model"
        )
    diffs = ", ".join(
        f"{name} ({getattr(existing, name)!r} there, {getattr(plan, name)!r} now)"
        for name in existing.differing_fields(plan)
    )
    return CampaignError(
        f"{out_dir} holds a different campaign: {diffs}; choose another --out "
        "to start a new campaign, or rerun with the same settings to resume"
    )


def refuse_foreign_folder(out_dir) -> None:
    """Refuse results folder `out_dir` when it holds files and no campaign: results must not
    be mixed with a user's own files. An empty or missing folder, or a campaign's, passes."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / PLAN_FILE).exists():
        return
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                    if not CAMPAIGN_ENTRIES.match(p.name))
    if others:
        listed = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
        raise CampaignError(
            f"{out_dir} is not empty and holds no campaign ({len(others)} other "
            f"entr{'y' if len(others) == 1 else 'ies'}: {listed}); give a new or empty "
            "folder for --out, so no file of yours is mixed with results")


def read_manifest(out_dir) -> dict | None:
    """The manifest of results folder `out_dir` (None without one); CampaignError when damaged."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        manifest = exc
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("total_rows"), int)
        and isinstance(manifest.get("fingerprint"), str)
    ):
        raise CampaignError(
            f"{path} is damaged ({manifest}); choose another --out (the results there are kept)"
        )
    return manifest

def read_strata(records, path: Path) -> list[Stratum] | None:
    """Strata from a manifest's list of records (None: not recorded)."""
    if records is None:
        return None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CampaignError(f"{path} has a damaged strata list; resume the campaign with "
                            "its original settings to rewrite it")
    try:
        return [Stratum.from_dict(r) for r in records]
    except CampaignError as exc:
        raise CampaignError(f"{path}: {exc}; resume the campaign with its original "
                            "settings to rewrite it") from None


def write_manifest(out_dir, plan: CampaignPlan, total_rows: int,
                   strata: list[Stratum] | None = None, stages: list[int] | None = None,
                   pilot: list[Stratum] | None = None) -> None:
    """Write the manifest of `out_dir` atomically, keeping a cost already recorded."""
    stages = stages or [total_rows]
    manifest = {
        "fingerprint": plan.fingerprint(),
        "total_rows": total_rows,
        "part_size": plan.part_size,
        "parts": n_parts(stages, plan.part_size),
    }
    if len(stages) > 1:
        manifest["stages"] = stages
    if strata is not None:
        manifest["strata"] = [s.to_dict() for s in strata]
    if pilot is not None:
        manifest["pilot"] = [s.to_dict() for s in pilot]
    kept = read_cost(out_dir)  # measured once: a rewrite keeps it
    if kept is not None:
        manifest[COST_KEY] = kept
    atomic.write_text(Path(out_dir) / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def n_parts(stages, part_size: int) -> int:
    """Parts of a campaign of `stages` rows per stage (or one int), each stage cut alone."""
    stages = [stages] if isinstance(stages, int) else stages
    return sum(math.ceil(n / part_size) for n in stages)


def stage_part_bounds(stages: list[int], part_size: int, k: int) -> tuple[int, int]:
    """Rows [start, stop) of part k: part_size rows, except the last part of each stage,
    which takes the stage's rest."""
    first = start = 0
    for rows in stages:
        parts = math.ceil(rows / part_size)
        if k < first + parts:
            lo = start + (k - first) * part_size
            return lo, min(lo + part_size, start + rows)
        first, start = first + parts, start + rows
    raise CampaignError(f"part {k} is out of range; this campaign has {n_parts(stages, part_size)}")


@contextlib.contextmanager
def writer_lock(out_dir: Path):
    """Hold the writer lock of results folder `out_dir` (created if need be): an advisory
    lock on its LOCK_FILE, which names the holder; CampaignError at once while another
    process holds it. Yields the open lock file; closing it releases the lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, so run unguarded
        fcntl = None
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held open
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise  # a filesystem without locks is not a second writer
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise CampaignError(
                    f"{out_dir} is in use by another campaign ({holder}); wait for it "
                    "to finish, or choose another --out"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}\n")
        f.flush()
        yield f
    finally:
        f.close()


def move_aside(path: Path) -> Path:
    """Rename a damaged part file to corrupt-<name>-<i>.parquet beside it, a name the loader
    skips: results are never deleted, a bad part keeps its bytes."""
    i = 0
    while (target := path.parent / f"corrupt-{path.stem}-{i}{path.suffix}").exists():
        i += 1
    os.replace(path, target)
    return target


class ResultsStore:
    """Results of one campaign in out_dir: plan.json, manifest.json and parts/part-NNNNNN.parquet.

    Part k holds rows [k * part_size, (k + 1) * part_size) of the campaign's total_rows;
    the runner decides which faults those are. Parts are written whole or not at all. An
    adaptive campaign's rows come in stages (`stages`: rows per stage, recorded in the
    manifest once there is more than one) and each stage is cut into parts of its own, so
    a stage added later never changes a part already written.

    One writer at a time: a campaign holds lock() while it runs. Only the lock's holder
    changes files it did not write itself (clears temporary files left by a killed
    writer, moves damaged parts aside); any other store only reads, skipping damaged
    parts and listing them in `damaged`.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / PARTS_DIR
        self.plan: CampaignPlan | None = None
        self.total_rows: int | None = None
        # The plan's strata with their fault-space sizes; None for folders written before
        # flipsafe recorded them (their overall rates can only pool the rows).
        self.strata: list[Stratum] | None = None
        # Rows per stage ([total_rows] for one stage) and the adaptive pilot's strata (the
        # first stage's; None unless the campaign is adaptive and has a second stage).
        self.stages: list[int] = []
        self.pilot: list[Stratum] | None = None
        # Part files found damaged by the last scan (moved aside when this store is the writer).
        self.damaged: list[Path] = []
        self._lock_file = None

    # -- the writer lock -----------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """True while this store holds the folder's writer lock."""
        return self._lock_file is not None

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's writer lock (creating the folder) for the body; refuses at once
        with a CampaignError while another process holds it (writer_lock)."""
        if self.is_writer:
            yield self
            return
        with writer_lock(self.out_dir) as f:
            self._lock_file = f
            try:
                yield self
            finally:
                self._lock_file = None

    # -- opening -------------------------------------------------------------

    def _read_plan(self) -> CampaignPlan:
        path = self.out_dir / PLAN_FILE
        try:
            return CampaignPlan.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, CampaignError, ValueError) as exc:
            raise CampaignError(
                f"{path} cannot be used ({exc}); choose another --out (the results there are kept)"
            ) from None

    def create_or_resume(self, plan: CampaignPlan, total_rows: int,
                         strata: list[Stratum] | None = None) -> bool:
        """Start a campaign in out_dir, or resume the same one; returns True when resuming.

        A folder holding a different plan (other fingerprint) is refused with the
        differing fields named. total_rows is the number of outcome rows the whole
        campaign will produce; on resume it must match what was recorded. strata (the
        plan's strata with fault-space sizes) are recorded in the manifest for the
        whole-model estimates; a folder from before they were recorded gains them on resume.
        """
        if isinstance(total_rows, bool) or not isinstance(total_rows, int) or total_rows < 0:
            raise CampaignError(f"total_rows must be an integer >= 0, got {total_rows!r}")
        plan_path = self.out_dir / PLAN_FILE
        if plan_path.exists():
            existing = self._read_plan()
            if existing.fingerprint() != plan.fingerprint():
                raise different_campaign_error(self.out_dir, existing, plan)
            manifest = read_manifest(self.out_dir)
            if manifest is None:
                write_manifest(self.out_dir, plan, total_rows, strata)
            elif manifest["fingerprint"] != plan.fingerprint():
                raise CampaignError(
                    f"{self.out_dir / MANIFEST_FILE} belongs to another plan than {plan_path}; "
                    "the folder was altered, so choose another --out"
                )
            elif manifest["total_rows"] != total_rows:
                raise CampaignError(
                    f"{self.out_dir} was started for {manifest['total_rows']} result rows but "
                    f"this run expects {total_rows} with the same plan; the model or dataset "
                    "must have changed, so choose another --out"
                )
            elif strata is not None and manifest.get("strata") is None:
                write_manifest(self.out_dir, plan, total_rows, strata)
            self.plan = plan
            self._adopt(read_manifest(self.out_dir))  # its stages and pilot, as recorded
            if strata is not None:
                self.strata = strata
            self.parts_dir.mkdir(exist_ok=True)
            if self.is_writer:
                self._remove_stale_temps()
            return True
        if self.parts_dir.exists() and any(self.parts_dir.iterdir()):
            # plan.json is gone but manifest.json holds the fingerprint: the same plan
            # proves the parts are its own, so plan.json is restored and the run resumes.
            manifest = read_manifest(self.out_dir)
            if (manifest is not None and manifest["fingerprint"] == plan.fingerprint()
                    and manifest["total_rows"] == total_rows):
                atomic.write_text(plan_path, plan.to_json())
                return self.create_or_resume(plan, total_rows)
            raise CampaignError(
                f"{self.parts_dir} has files but {plan_path} is missing and "
                f"{MANIFEST_FILE} does not match this plan, so they cannot be checked; rerun "
                "with the campaign's original settings to restore plan.json, or choose "
                "another --out (nothing there is deleted)"
            )
        refuse_foreign_folder(self.out_dir)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        # The manifest goes first: plan.json is what marks the folder as a campaign.
        write_manifest(self.out_dir, plan, total_rows, strata)
        atomic.write_text(plan_path, plan.to_json())
        self.plan, self.total_rows, self.strata = plan, total_rows, strata
        self.stages = [total_rows]
        return False

    def _adopt(self, manifest: dict) -> None:
        """Take total rows, stages, strata and pilot from a manifest that is this plan's."""
        path = self.out_dir / MANIFEST_FILE
        stages = manifest.get("stages") or [manifest["total_rows"]]
        if not (isinstance(stages, list) and all(isinstance(n, int) and n >= 0 for n in stages)
                and sum(stages) == manifest["total_rows"]):
            raise CampaignError(f"{path} has a damaged stages list; choose another --out "
                                "(the results there are kept)")
        self.total_rows, self.stages = int(manifest["total_rows"]), list(stages)
        self.strata = read_strata(manifest.get("strata"), path)
        pilot = manifest.get("pilot")
        self.pilot = None if pilot is None else read_strata(pilot, path)

    def add_stage(self, rows: int, strata: list[Stratum], pilot: list[Stratum]) -> None:
        """Record a second stage of `rows` rows after the first (the adaptive pilot, whose
        strata are `pilot`); `strata` are the new stage's, which estimates use."""
        plan = self._require_open()
        if len(self.stages) > 1:
            raise CampaignError(f"{self.out_dir} has its second stage already")
        if not self.is_writer:
            raise CampaignError("only the campaign holding the folder's lock adds a stage")
        stages = [self.stages[0], rows]
        write_manifest(self.out_dir, plan, sum(stages), list(strata), stages, list(pilot))
        self.total_rows, self.stages = sum(stages), stages
        self.strata, self.pilot = list(strata), list(pilot)

    def open(self) -> CampaignPlan:
        """Open an existing campaign folder for reading, without a plan to compare against."""
        if not (self.out_dir / PLAN_FILE).exists():
            if (self.out_dir / MANIFEST_FILE).exists():
                raise CampaignError(
                    f"{self.out_dir} has no {PLAN_FILE}; rerun its `flipsafe campaign` command "
                    f"with the original settings to restore it (checked against {MANIFEST_FILE})"
                )
            raise CampaignError(
                f"{self.out_dir} has no {PLAN_FILE}; point at a folder a campaign wrote"
            )
        plan = self._read_plan()
        manifest = read_manifest(self.out_dir)
        if manifest is None or manifest["fingerprint"] != plan.fingerprint():
            raise CampaignError(
                f"{self.out_dir / MANIFEST_FILE} is missing or belongs to another plan; "
                "resume the campaign with its original settings to rebuild it"
            )
        self.plan = plan
        self._adopt(manifest)
        return plan

    def write_cost(self, cost: dict) -> None:
        """Record what the campaign's protections cost (a JSON-able dict, as
        protect.cost.for_plan returns) in the manifest under COST_KEY; the folder must be
        open (create_or_resume) and this store its writer."""
        self._require_open()
        if not self.is_writer:
            raise CampaignError("only the campaign holding the folder's lock records its cost")
        manifest = read_manifest(self.out_dir) or {}
        manifest[COST_KEY] = cost
        atomic.write_text(self.out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")

    def _remove_stale_temps(self) -> None:
        # Left by a writer killed before its rename; incomplete by construction. Only the
        # lock's holder may do this: another writer's temporary files are in flight.
        for path in self.parts_dir.glob(".part-*.tmp-*"):
            path.unlink(missing_ok=True)

    # -- parts ---------------------------------------------------------------

    def _require_open(self) -> CampaignPlan:
        if self.plan is None:
            raise CampaignError("results store is not open; call create_or_resume() or open()")
        return self.plan

    @property
    def n_parts(self) -> int:
        plan = self._require_open()
        return n_parts(self.stages, plan.part_size)

    def part_bounds(self, k: int) -> tuple[int, int]:
        """Rows [start, stop) part k holds (stage_part_bounds)."""
        plan = self._require_open()
        if not 0 <= k < self.n_parts:
            raise CampaignError(f"part {k} is out of range; this campaign has {self.n_parts}")
        return stage_part_bounds(self.stages, plan.part_size, k)

    def expected_rows(self, k: int) -> int:
        """Rows part k must hold (see part_bounds)."""
        start, stop = self.part_bounds(k)
        return stop - start

    def part_path(self, k: int) -> Path:
        return self.parts_dir / f"part-{k:06d}.parquet"

    def write_model_info(self, info: dict) -> None:
        """Record `info` about the campaign's model in MODEL_FILE (atomically)."""
        self._require_open()
        atomic.write_json(self.out_dir / MODEL_FILE, info)

    def write_part(self, k: int, table: pa.Table) -> Path:
        """Write part k atomically, with rows, plan fingerprint, part id and checksum attached."""
        plan = self._require_open()
        expected = self.expected_rows(k)
        table = conform(table)
        if table.num_rows != expected:
            raise CampaignError(f"part {k} must have {expected} rows, got {table.num_rows}")
        metadata = {
            _META_ROWS: str(table.num_rows).encode(),
            _META_FINGERPRINT: plan.fingerprint().encode(),
            _META_PART: str(k).encode(),
            _META_CHECKSUM: content_checksum(table).encode(),
        }
        table = table.replace_schema_metadata(metadata)
        path = self.part_path(k)
        atomic.write_bytes(path, lambda f: pq.write_table(table, f, write_page_checksum=True))
        return path

    def _load_valid(self, k: int, path: Path) -> pa.Table | None:
        """Part k as a table if it is complete and belongs to this plan, else None."""
        if not k < self.n_parts:
            return None
        return load_part(path, k, self.expected_rows(k), self.plan.fingerprint())

    def _valid_parts(self) -> dict[int, tuple[Path, pa.Table]]:
        self._require_open()
        valid, damaged = {}, []
        for path in sorted(self.parts_dir.glob("part-*.parquet")):
            match = _PART_NAME.match(path.name)
            k = int(match.group(1)) if match else -1
            table = self._load_valid(k, path) if k >= 0 else None
            if table is None:
                damaged.append(move_aside(path) if self.is_writer else path)
            else:
                valid[k] = (path, table)
        self.damaged = damaged
        return valid

    def completed_parts(self) -> set[int]:
        """Ids of the parts on disk that are whole and belong to this plan.

        Any other part file (truncated, corrupt, wrong row count, another plan's) counts
        as not done and is listed in `damaged`; the writer (holding lock()) also moves it
        to parts/corrupt-<name>-<i>.parquet, keeping its bytes.
        """
        return set(self._valid_parts())

    def missing_parts(self) -> list[int]:
        """Part ids still to be written, in order."""
        done = self.completed_parts()
        return [k for k in range(self.n_parts) if k not in done]

    def read(self) -> pa.Table:
        """All valid parts as one table with ROW_SCHEMA, sorted by fault_id (damaged parts
        are skipped and listed in `damaged`)."""
        tables = [table for _, (_, table) in sorted(self._valid_parts().items())]
        if not tables:
            return ROW_SCHEMA.empty_table()
        return pa.concat_tables(tables).sort_by("fault_id").combine_chunks()
