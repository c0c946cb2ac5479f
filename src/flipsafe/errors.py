"""Errors a user can cause; the CLI prints them on one line and exits 2."""


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


class CampaignError(FlipsafeError):
    """A campaign plan or results folder that cannot be used as asked."""


def install_hint(extra: str) -> str:
    """The command that installs optional extra `extra` without replacing the pinned torch."""
    return f"pip install -c constraints.txt 'flipsafe[{extra}]' (in the flipsafe source folder)"


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    """Build an UnknownNameError that lists the valid choices."""
    listed = ", ".join(sorted(str(c) for c in choices))
    return UnknownNameError(f"unknown {kind} {name!r}; choose one of: {listed}")
