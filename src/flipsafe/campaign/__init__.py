"""Fault-injection campaigns: plans, fault-space allocation and the results folder."""

from flipsafe.campaign.plan import (
    ALLOCATIONS,
    CLAMPS,
    FAULTS,
    IMAGES,
    PLAN_VERSION,
    SITES,
    CampaignPlan,
    Stratum,
    allocate,
    n_from_plan,
    plan_strata,
)
from flipsafe.campaign.store import ROW_SCHEMA, ResultsStore, content_checksum

__all__ = [
    "ALLOCATIONS",
    "CLAMPS",
    "FAULTS",
    "IMAGES",
    "PLAN_VERSION",
    "ROW_SCHEMA",
    "SITES",
    "CampaignPlan",
    "ResultsStore",
    "Stratum",
    "allocate",
    "content_checksum",
    "n_from_plan",
    "plan_strata",
]
