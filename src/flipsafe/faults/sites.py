"""Fault site names: what a fault corrupts, and which FaultSet param each one names."""

from __future__ import annotations

from dataclasses import dataclass

from flipsafe.errors import ConfigError, unknown
from flipsafe.faults.faultset import PARAMS


@dataclass(frozen=True)
class SiteSpec:
    """A fault site as every part of flipsafe reads it: the one table of sites."""

    name: str  # what users call it (--site)
    param: str  # the FaultSet param it corrupts (the engine's site class)
    campaign: bool = False  # a campaign plan runs it
    stored: bool = False  # stored weight codes (what ecc and parity guard)
    raw_rate: str = "memory"  # the raw FIT rate its bits take: "memory" or "datapath"
    transient: bool = False  # its values live for one inference (FIT residency applies)
    channels: bool = False  # its rows name output channels of one image (vulnerability maps)
    array: bool = False  # a unit of a PE of the accelerator (flipsafe.accel): --array etc.
    words: bool = False  # stored codes packed into memory words (formats.words): --word-bits
    bits_of: str | None = None  # the site whose bits these are too (a FIT counts them once)
    fit: bool = True  # its bits are elements of their own (False: registers shared in time)


SITE_SPECS: dict[str, SiteSpec] = {s.name: s for s in (
    SiteSpec("activations", "output", campaign=True, raw_rate="datapath", transient=True,
             channels=True),
    SiteSpec("weights", "weight", campaign=True, stored=True),
    SiteSpec("biases", "bias"),
    # The outputs' shared scales, stored with the activation blocks.
    SiteSpec("metadata", "meta", campaign=True, transient=True),
    # The weights' shared scales (per tensor or per output channel), stored with the codes.
    SiteSpec("weight_metadata", "weight_meta", campaign=True),
    # A unit of one processing element of a systolic array (flipsafe.accel), stuck at a
    # bit for the whole layer: every output the PE computes changes.
    SiteSpec("pe", "pe", campaign=True, raw_rate="datapath", array=True, fit=False),
    # A memory word of stored weights (several codes side by side): multi-bit upsets.
    SiteSpec("weight_words", "weight_word", campaign=True, words=True, bits_of="weights"),
    # A quantized model's stored zero points (format native): the activation codes' (one
    # per tensor) and the weights' (one per output channel).
    SiteSpec("zero_points", "zero_point", campaign=True),
    SiteSpec("weight_zero_points", "weight_zero_point", campaign=True),
)}
# Site name -> the FaultSet param it corrupts; the params are site names too.
SITES = {**{s.name: s.param for s in SITE_SPECS.values()}, **{p: p for p in PARAMS}}
# The sites a campaign plan runs (`--site`).
CAMPAIGN_SITES = tuple(s.name for s in SITE_SPECS.values() if s.campaign)
# Campaign sites that hold stored weight codes (what ecc and parity guard).
WEIGHT_SITES = tuple(s.name for s in SITE_SPECS.values() if s.campaign and s.stored)


def site_spec(site) -> SiteSpec:
    """The SiteSpec of a site name; an unknown site lists the choices."""
    if not isinstance(site, str) or site not in SITE_SPECS:
        raise unknown("site", str(site), list(SITE_SPECS))
    return SITE_SPECS[site]


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
