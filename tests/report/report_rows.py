"""Synthetic campaign rows and results folders, built the way the campaign runner leaves them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flipsafe.campaign import ROW_SCHEMA, CampaignPlan, ResultsStore, Stratum


@dataclass(frozen=True)
class Behaviour:
    """How often a synthetic fault in one layer ends as SDC / DUE, by bit."""

    p_top: float  # SDC probability for the top exponent bit (30)
    p_exp: float  # for exponent bits 24..29
    p_other: float
    p_due: float  # DUE probability for bit 30
    huge_loss: bool  # whether bit-30 flips give a ~1e35 delta loss


def make_rows(layers: dict[str, Behaviour], n: int, seed: int) -> pa.Table:
    """n rows per layer with random bits 0..31 and outcomes drawn from each layer's Behaviour."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    for layer, b in layers.items():
        bit = rng.integers(0, 32, n)
        field = np.where(bit == 31, "sign", np.where(bit >= 23, "exponent", "mantissa"))
        margin = 100 * rng.beta(4, 1, n)
        p = np.where(bit == 30, b.p_top, np.where((bit >= 24) & (bit < 30), b.p_exp, b.p_other))
        # Low-margin images fail more often, as they do in real campaigns.
        p = np.clip(p * (1.6 - margin / 100), 0, 1)
        due = (bit == 30) & (rng.random(n) < b.p_due)
        sdc = ~due & (rng.random(n) < p)
        masked = ~sdc & ~due & (rng.random(n) < 0.6)
        dloss = np.where(masked, 0.0, rng.lognormal(-6, 2, n))
        dloss = np.where(sdc, rng.lognormal(1, 1, n), dloss)
        if b.huge_loss:
            dloss = np.where((bit == 30) & ~due, rng.uniform(1e34, 1e36, n), dloss)
        dloss = np.where(due, np.inf, dloss)
        golden_top1 = rng.integers(0, 10, n)
        golden_loss = rng.uniform(0.001, 0.1, n)
        cols["layer"] += [layer] * n
        cols["field"] += field.tolist()
        cols["site"] += ["activations"] * n
        cols["param"] += ["output"] * n
        cols["index"] += rng.integers(0, 64, n).tolist()
        cols["bits"] += [[int(x)] for x in bit]
        cols["fault_model"] += ["bitflip"] * n
        cols["format"] += ["fp32"] * n
        cols["image_id"] += rng.integers(0, 360, n).tolist()
        cols["golden_top1"] += golden_top1.tolist()
        cols["faulty_top1"] += np.where(sdc, (golden_top1 + 1) % 10, golden_top1).tolist()
        cols["sdc"] += sdc.tolist()
        cols["due"] += due.tolist()
        cols["nonfinite"] += due.tolist()
        cols["golden_loss"] += golden_loss.tolist()
        cols["faulty_loss"] += (golden_loss + dloss).tolist()
        cols["delta_loss"] += dloss.tolist()
        cols["golden_top2diff"] += margin.tolist()
        cols["faulty_top2diff"] += np.where(sdc, 0.0, margin).tolist()
    cols["fault_id"] = list(range(len(cols["layer"])))
    # No protection, and nothing recorded as decided without a forward pass.
    cols["detected"] = cols["corrected"] = cols["decided"] = [False] * len(cols["layer"])
    return pa.table(cols).cast(ROW_SCHEMA)


ELEMENTS, IMAGES = 64, 360  # what make_rows draws index and image_id from
WIDTHS = {"sign": 1, "exponent": 8, "mantissa": 23}


def strata_of(table: pa.Table) -> list[Stratum]:
    """The strata the runner would record for make_rows' rows: each layer's 64 fp32 outputs
    on 360 images, n the rows drawn in each (layer, field)."""
    rows = table.select(["layer", "field"]).to_pylist()
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(r["layer"], r["field"])] = counts.get((r["layer"], r["field"]), 0) + 1
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    return [Stratum(layer, f, ELEMENTS * w * IMAGES, counts.get((layer, f), 0), ELEMENTS, w)
            for layer in layers for f, w in WIDTHS.items()]


def write_campaign(out, plan: CampaignPlan, table: pa.Table | None,
                   legacy: bool = False) -> None:
    """A results folder as the runner leaves it; table None leaves every part unwritten.
    legacy=True writes it as flipsafe did before strata were recorded."""
    store = ResultsStore(out)
    total = 1000 if table is None else table.num_rows
    strata = None if legacy or table is None else strata_of(table)
    store.create_or_resume(plan, total_rows=total, strata=strata)
    if table is None:
        return
    for k in range(store.n_parts):
        store.write_part(k, table.slice(k * plan.part_size, plan.part_size))


BASELINE_LAYERS = {
    "features.1": Behaviour(0.30, 0.02, 0.001, 0.05, True),
    "features.3": Behaviour(0.35, 0.02, 0.001, 0.05, True),
    "fc": Behaviour(0.25, 0.01, 0.0, 0.3, True),
}
# A cosine head bounds its scores, so no layer gives a 1e35 loss, but its last layer has
# more SDCs: the case where a mean delta loss would rank the models the wrong way round.
COSINE_LAYERS = {
    "backbone.features.1": Behaviour(0.30, 0.02, 0.001, 0.05, False),
    "backbone.features.3": Behaviour(0.35, 0.02, 0.001, 0.05, False),
    "backbone.fc": Behaviour(0.20, 0.02, 0.001, 0.05, False),
    "head.fc": Behaviour(0.90, 0.40, 0.002, 0.0, False),
}
N_PER_LAYER = 400


def weights_sha(checkpoints, name: str) -> str:
    """The hash a campaign records as model_sha: the one in the checkpoint's config.json."""
    config = json.loads((checkpoints[name] / "config.json").read_text())
    return config["files"]["model.safetensors"]
