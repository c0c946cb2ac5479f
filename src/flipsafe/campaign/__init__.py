"""Fault-injection campaigns: plans, fault-space allocation and the results folder."""

from flipsafe.campaign.plan import (
    ALLOCATIONS,
    IMAGES,
    PLAN_VERSION,
    CampaignPlan,
    FaultPlan,
    Stratum,
    allocate,
    n_from_plan,
    plan_strata,
)
from flipsafe.campaign.store import ROW_SCHEMA, ResultsStore, content_checksum
from flipsafe.faults import CAMPAIGN_SITES as SITES
from flipsafe.faults import FAULT_MODELS as FAULTS
from flipsafe.inject.emulate import CLAMPS

__all__ = [
    "ALLOCATIONS",
    "CLAMPS",
    "FAULTS",
    "IMAGES",
    "PLAN_VERSION",
    "ROW_SCHEMA",
    "SITES",
    "CampaignPlan",
    "FaultPlan",
    "ResultsStore",
    "Stratum",
    "allocate",
    "content_checksum",
    "make_plan",
    "n_from_plan",
    "plan_strata",
    "prepare",
    "resolve_target",
    "run_campaign",
]

# The runner and the targets import torch: loaded on first use.
_LAZY = {"make_plan": "runner", "prepare": "runner", "run_campaign": "runner",
         "resolve_target": "targets"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"flipsafe.campaign.{_LAZY[name]}")
        return getattr(module, "resolve" if name == "resolve_target" else name)
    raise AttributeError(f"module 'flipsafe.campaign' has no attribute {name!r}")
