"""Fault models on format bits, the columnar FaultSet the injection engine consumes, and the
one sampler that draws FaultSets (uniform or stratified by layer and highest-bit field)."""

from flipsafe.faults.faultset import PARAMS, FaultSet
from flipsafe.faults.models import (
    FAULT_MODELS,
    FLIP,
    MAX_FAULT_BITS,
    OPS,
    RANDOM,
    SET0,
    SET1,
    ZERO,
    Draw,
    FaultModel,
    apply,
    bits_mask,
    draw,
    every_fault,
    mask_bits,
    parse,
    positions,
    stratum_size,
)
from flipsafe.faults.sample import VALUE, Sampler, stratum_seed
from flipsafe.faults.sites import (
    CAMPAIGN_SITES,
    SITES,
    WEIGHT_SITES,
    check_campaign_site,
    site_param,
)

__all__ = [
    "CAMPAIGN_SITES",
    "FAULT_MODELS",
    "FLIP",
    "MAX_FAULT_BITS",
    "OPS",
    "PARAMS",
    "RANDOM",
    "SET0",
    "SET1",
    "SITES",
    "VALUE",
    "WEIGHT_SITES",
    "ZERO",
    "Draw",
    "FaultModel",
    "FaultSet",
    "Sampler",
    "apply",
    "bits_mask",
    "check_campaign_site",
    "draw",
    "every_fault",
    "mask_bits",
    "parse",
    "positions",
    "site_param",
    "stratum_seed",
    "stratum_size",
]
