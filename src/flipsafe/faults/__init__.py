"""Fault models on format bits and the columnar FaultSet the injection engine consumes."""

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

__all__ = [
    "FAULT_MODELS",
    "FLIP",
    "OPS",
    "PARAMS",
    "RANDOM",
    "SET0",
    "SET1",
    "ZERO",
    "Draw",
    "FaultModel",
    "FaultSet",
    "apply",
    "bits_mask",
    "draw",
    "every_fault",
    "mask_bits",
    "parse",
    "positions",
    "stratum_size",
]
