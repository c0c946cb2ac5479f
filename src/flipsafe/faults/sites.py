"""Fault site names: what a fault corrupts, and which FaultSet param each one names."""

from __future__ import annotations

from flipsafe.errors import ConfigError, unknown
from flipsafe.faults.faultset import PARAMS

# Site name -> the FaultSet param it corrupts; the params are site names too.
SITES = {"activations": "output", "weights": "weight", "biases": "bias",
         "metadata": "meta", "weight_metadata": "weight_meta", **{p: p for p in PARAMS}}
# The sites a campaign plan runs (`--site`); metadata is the outputs' shared scales.
CAMPAIGN_SITES = ("activations", "weights", "metadata")
# Campaign sites that hold stored weight codes (what ecc and parity guard).
WEIGHT_SITES = ("weights",)


def site_param(site) -> str:
    """The FaultSet param that `site` corrupts; an unknown site lists the choices."""
    if not isinstance(site, str) or site not in SITES:
        raise unknown("site", str(site), list(SITES))
    return SITES[site]


def check_campaign_site(site) -> str:
    """`site` in its one spelling (any case given) if a campaign can run it, else
    ConfigError naming the choices."""
    site = site.lower() if isinstance(site, str) else site
    if site not in CAMPAIGN_SITES:
        raise ConfigError(f"site must be one of: {', '.join(CAMPAIGN_SITES)}; got {site!r}")
    return site
