"""Fault models on format bits, the columnar FaultSet the injection engine consumes, and the
one sampler that draws FaultSets (uniform or stratified by layer and highest-bit field)."""

from flipsafe.faults.faultset import PARAMS, FaultSet
from flipsafe.faults.models import (
    FAULT_MODELS,
    FLIP,
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

__all__ = [
    "FAULT_MODELS",
    "FLIP",
    "OPS",
    "PARAMS",
    "RANDOM",
    "SET0",
    "SET1",
    "VALUE",
    "ZERO",
    "Draw",
    "FaultModel",
    "FaultSet",
    "Sampler",
    "apply",
    "bits_mask",
    "draw",
    "every_fault",
    "mask_bits",
    "parse",
    "positions",
    "stratum_seed",
    "stratum_size",
]
