"""Errors a user can cause (the CLI prints one line and exits 2) and failures of the
machine itself, such as a full disk (one line, exit 1)."""

import errno

# errno values that mean "no room left to write": a full disk or an exhausted quota.
DISK_FULL = tuple(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if e)


class FlipsafeError(Exception):
    """Base class for every error caused by user input or configuration."""


class UnknownNameError(FlipsafeError, ValueError):
    """A name (architecture, format, encoder, layer, ...) that is not known."""


class ConfigError(FlipsafeError, ValueError):
    """Parameters that are impossible or inconsistent with each other."""


class DataError(FlipsafeError):
    """A dataset, description or embedding file that is missing or malformed."""


class CheckpointError(FlipsafeError):
    """A checkpoint folder that is missing, incomplete or altered."""


class InjectionError(FlipsafeError):
    """A fault request the engine cannot carry out on this model."""


class TrainingError(FlipsafeError):
    """Training that failed on the user's recipe or data (e.g. a loss that diverged)."""


class ModelError(FlipsafeError):
    """A model given to a campaign that cannot be loaded, or does not fit its data
    (class count, image shape, outputs that are not logits)."""


class CampaignError(FlipsafeError):
    """A campaign plan or results folder that cannot be used as asked."""


class EnvironmentFailure(Exception):
    """The machine refused what flipsafe asked (a full disk), not the user's input; the
    message says what was kept and how to go on."""


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError that means the disk (or quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def install_hint(extra: str) -> str:
    """The command that installs optional extra `extra` without replacing the pinned torch."""
    return f"pip install -c constraints.txt 'flipsafe[{extra}]' (in the flipsafe source folder)"


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    """Build an UnknownNameError that lists the valid choices."""
    listed = ", ".join(sorted(str(c) for c in choices))
    return UnknownNameError(f"unknown {kind} {name!r}; choose one of: {listed}")
