"""Fault-injection engine: exact, batched faulty runs of a model in an emulated format."""

from flipsafe.inject.emulate import CLAMPS
from flipsafe.inject.engine import Engine
from flipsafe.inject.executors import Golden
from flipsafe.inject.exhaustive import Exhaustive
from flipsafe.inject.sites import SITES, LayerInfo
from flipsafe.metrics.outcomes import Outcomes

__all__ = ["CLAMPS", "SITES", "Engine", "Exhaustive", "Golden", "LayerInfo", "Outcomes"]
