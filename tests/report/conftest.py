"""Small real checkpoints and hand-built campaign results folders for the report tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
from report_rows import (
    BASELINE_LAYERS,
    COSINE_LAYERS,
    N_PER_LAYER,
    make_rows,
    weights_sha,
    write_campaign,
)

from flipsafe.campaign import CampaignPlan


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two real one-epoch MLPs on digits: a linear head and a cosine head."""
    from flipsafe.train import TrainConfig
    from flipsafe.workflow import train_classifier

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, head in (("baseline", "linear"), ("cosine", "cosine:32")):
        train_classifier("digits", arch="mlp", head=head, out=root / name,
                         config=TrainConfig(epochs=1), show_progress=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def base_plan(checkpoints):
    return CampaignPlan(model=str(checkpoints["baseline"]), model_sha=weights_sha(checkpoints,
                        "baseline"), dataset="digits", format="fp32", n=N_PER_LAYER,
                        part_size=512)


@pytest.fixture(scope="session")
def campaigns(tmp_path_factory, checkpoints, base_plan):
    """Results folders for baseline and cosine with the same plan (but for the model)."""
    root = tmp_path_factory.mktemp("campaigns")
    write_campaign(root / "baseline", base_plan, make_rows(BASELINE_LAYERS, N_PER_LAYER, 1))
    cosine_plan = replace(base_plan, model=str(checkpoints["cosine"]),
                          model_sha=weights_sha(checkpoints, "cosine"))
    write_campaign(root / "cosine", cosine_plan, make_rows(COSINE_LAYERS, N_PER_LAYER, 2))
    return {"baseline": root / "baseline", "cosine": root / "cosine"}
