"""Fault-injection engine: exact, batched faulty runs of a model in an emulated format."""

from flipsafe.inject.emulate import CLAMPS
from flipsafe.inject.engine import SITES, Engine, Golden, LayerInfo
from flipsafe.inject.exhaustive import Exhaustive
from flipsafe.metrics.outcomes import Outcomes

__all__ = ["CLAMPS", "SITES", "Engine", "Exhaustive", "Golden", "LayerInfo", "Outcomes"]
