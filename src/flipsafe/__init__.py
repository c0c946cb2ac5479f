"""flipsafe: text-guided classifiers and bit-exact fault-injection campaigns."""

from flipsafe.errors import (
    CampaignError,
    CheckpointError,
    ConfigError,
    DataError,
    EnvironmentFailure,
    FlipsafeError,
    InjectionError,
    TrainingError,
    UnknownNameError,
)

__version__ = "0.1.0"

__all__ = [
    "CampaignError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EnvironmentFailure",
    "FlipsafeError",
    "InjectionError",
    "TrainingError",
    "UnknownNameError",
    "__version__",
    "load",
]


def load(path, map_location="cpu"):
    """Rebuild a model saved by `flipsafe train` (see flipsafe.checkpoint.load)."""
    from flipsafe.checkpoint import load as _load

    return _load(path, map_location=map_location)
