"""Tiny campaign results folders with known counts per stratum, written as the runner does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pyarrow as pa

from flipsafe.campaign import ROW_SCHEMA, CampaignPlan, ResultsStore, Stratum

IMAGES = 10


@dataclass(frozen=True)
class Cell:
    """One stratum: `elements` codes of `width` bits, n injections, sdc and due of them."""

    layer: str
    field: str
    elements: int
    width: int
    n: int
    sdc: int
    due: int = 0


def rows(cells: list[Cell], site: str, fmt: str) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    for c in cells:
        for i in range(c.n):
            sdc, due = i < c.sdc, c.sdc <= i < c.sdc + c.due
            cols["layer"].append(c.layer)
            cols["field"].append(c.field)
            cols["site"].append(site)
            cols["param"].append("weight" if site == "weights" else
                                 "meta" if site == "metadata" else "output")
            cols["index"].append(i % c.elements)
            cols["bits"].append([0])
            cols["fault_model"].append("bitflip")
            cols["format"].append(fmt)
            cols["image_id"].append(i % IMAGES)
            cols["golden_top1"].append(1)
            cols["faulty_top1"].append(2 if sdc else 1)
            cols["sdc"].append(sdc)
            cols["due"].append(due)
            cols["nonfinite"].append(due)
            cols["golden_loss"].append(0.1)
            cols["faulty_loss"].append(math.inf if due else 0.1 + sdc)
            cols["delta_loss"].append(math.inf if due else float(sdc))
            cols["golden_top2diff"].append(50.0)
            cols["faulty_top2diff"].append(0.0 if sdc else 50.0)
            cols["detected"].append(False)  # no protection
            cols["corrected"].append(False)
            cols["decided"].append(False)
    cols["fault_id"] = list(range(len(cols["layer"])))
    return pa.table(cols).cast(ROW_SCHEMA)


def write_folder(out, cells: list[Cell], site: str = "weights", fmt: str = "fp32",
                 model_sha: str = "a" * 64, n="counts", record_strata: bool = True,
                 unwritten: tuple[Cell, ...] = ()):
    """A results folder holding `cells`; n "counts" records the largest per-layer count.

    `unwritten` strata are planned but their rows are missing (an interrupted campaign).
    """
    if n == "counts":
        per_layer: dict[str, int] = {}
        for c in cells:
            per_layer[c.layer] = per_layer.get(c.layer, 0) + c.n
        n = max(per_layer.values())
    table = rows(cells, site, fmt)
    plan = CampaignPlan(model="/nonexistent/model", model_sha=model_sha, dataset="digits",
                        format=fmt, site=site, n=n, part_size=table.num_rows)
    per_image = 1 if n == "all" else IMAGES
    strata = [Stratum(c.layer, c.field, c.elements * c.width * per_image, c.n, c.elements,
                      c.width) for c in (*cells, *unwritten)]
    store = ResultsStore(out)
    store.create_or_resume(plan, total_rows=table.num_rows + sum(c.n for c in unwritten),
                           strata=strata if record_strata else None)
    store.write_part(0, table)
    return out


def wilson(k: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson's score interval written out from its textbook formula (k, n may be arrays)."""
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)
