"""The one rule for seeds: whole numbers from 0 to 2^64 - 1 (what torch.Generator takes)."""

from __future__ import annotations

from flipsafe.errors import ConfigError

SEED_LIMIT = 2**64


def check_seed(value, what: str = "seed") -> int:
    """`value` if it is a whole number in [0, 2^64); ConfigError naming `what` else."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{what} must be a whole number from 0 to 2^64 - 1, got {value!r}")
    return value
