"""flipsafe: text-guided classifiers and bit-exact fault-injection campaigns."""

from flipsafe.errors import (
    CampaignError,
    CheckpointError,
    ConfigError,
    DataError,
    EnvironmentFailure,
    FlipsafeError,
    InjectionError,
    ModelError,
    TrainingError,
    UnknownNameError,
)

__version__ = "0.1.0"

__all__ = [
    "Campaign",
    "CampaignError",
    "CampaignResults",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EnvironmentFailure",
    "FaultPlan",
    "FlipsafeError",
    "InjectionError",
    "ModelError",
    "TrainingError",
    "UnknownNameError",
    "__version__",
    "load",
]


def load(path, map_location="cpu"):
    """Rebuild a model saved by `flipsafe train` (see flipsafe.checkpoint.load)."""
    from flipsafe.checkpoint import load as _load

    return _load(path, map_location=map_location)


# The Python front door (flipsafe.api), imported on first use so `import flipsafe` stays light.
_API = ("Campaign", "CampaignResults", "FaultPlan")


def __getattr__(name):
    if name in _API:
        from flipsafe import api

        return getattr(api, name)
    raise AttributeError(f"module 'flipsafe' has no attribute {name!r}")
