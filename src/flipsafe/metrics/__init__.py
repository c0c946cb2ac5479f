"""Statistics over campaign outcomes: intervals, sample sizes, summaries and comparisons."""

import importlib

from flipsafe.metrics.stats import (
    DEFAULT_QUANTILES,
    OVERALL,
    Comparison,
    GroupComparison,
    GroupSummary,
    MeanEstimate,
    PairedRatio,
    RateEstimate,
    RateRatio,
    RatioEstimate,
    Summary,
    clopper_pearson_interval,
    compare,
    mcnemar_exact,
    mean_interval,
    median_quantiles,
    paired_ratio,
    rate_estimate,
    rate_ratio,
    ratio_of_means,
    sample_size,
    summarise,
    wilson_interval,
    z_value,
)

__all__ = [
    "DEFAULT_QUANTILES",
    "OVERALL",
    "Comparison",
    "GroupComparison",
    "GroupSummary",
    "MeanEstimate",
    "PairedRatio",
    "RateEstimate",
    "RateRatio",
    "RatioEstimate",
    "Summary",
    "clopper_pearson_interval",
    "compare",
    "mcnemar_exact",
    "mean_interval",
    "median_quantiles",
    "paired_ratio",
    "rate_estimate",
    "rate_ratio",
    "ratio_of_means",
    "sample_size",
    "summarise",
    "wilson_interval",
    "z_value",
]


def __getattr__(name):
    # Per-injection outcomes live in flipsafe.metrics.outcomes (written separately);
    # its public names are served from here on first use, if that module exists.
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        outcomes = importlib.import_module("flipsafe.metrics.outcomes")
    except ModuleNotFoundError as exc:
        if exc.name != "flipsafe.metrics.outcomes":
            raise
        raise AttributeError(f"module 'flipsafe.metrics' has no attribute {name!r}") from None
    if name == "outcomes":
        return outcomes
    if name in getattr(outcomes, "__all__", [n for n in vars(outcomes) if not n.startswith("_")]):
        return getattr(outcomes, name)
    raise AttributeError(f"module 'flipsafe.metrics' has no attribute {name!r}")
