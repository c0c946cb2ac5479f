"""Format names: ``get(name, **options)``, ``canonical(name)`` and ``names()``."""

from __future__ import annotations

import inspect
import re

from flipsafe.errors import ConfigError, unknown
from flipsafe.formats.base import Format
from flipsafe.formats.blocks import BlockFormat, ScaledInt
from flipsafe.formats.floats import FloatFormat
from flipsafe.formats.integers import FixedFormat, IntFormat
from flipsafe.formats.stored import NativeFormat

_SUFFIX_SPECIALS = {"": "ieee", "fn": "fn", "fin": "finite"}


def _flag(name: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: option {key} must be True or False, got {value!r}; "
                          "choose one of: True, False")
    return value


def _float(e: int, m: int, specials: str):
    def make(name, saturate=False):
        return FloatFormat(name, e, m, specials, _flag(name, "saturate", saturate))
    return make


def _int(bits: int, per_channel: bool = False):
    def make(name, amax=None):
        return IntFormat(name, bits, per_channel, amax)
    return make


def _mx(element):
    def make(name, block_size=32):
        return BlockFormat(name, element(), block_size, "scale")
    return make


def _mx_float(e: int, m: int, specials: str):
    # OCP MX elements saturate: V / X is clamped to the element's largest normal.
    return _mx(lambda: FloatFormat(f"e{e}m{m}", e, m, specials, saturate=True))


_NAMED = {
    "fp32": _float(8, 23, "ieee"),
    "native": NativeFormat,  # a quantized model's own stored codes, layer by layer
    "fp16": _float(5, 10, "ieee"),
    "bf16": _float(8, 7, "ieee"),
    "fp8_e4m3": _float(4, 3, "fn"),
    "fp8_e5m2": _float(5, 2, "ieee"),
    "int8": _int(8),
    "int4": _int(4),
    "int8_channel": _int(8, per_channel=True),
    "mxfp8_e4m3": _mx_float(4, 3, "fn"),
    "mxfp8_e5m2": _mx_float(5, 2, "ieee"),
    "mxfp6_e2m3": _mx_float(2, 3, "finite"),
    "mxfp6_e3m2": _mx_float(3, 2, "finite"),
    "mxfp4_e2m1": _mx_float(2, 1, "finite"),
    "mxint8": _mx(lambda: ScaledInt(8)),
}


def _generic_float(name, match, saturate=False):
    e, m = int(match["e"]), int(match["m"])
    return FloatFormat(name, e, m, _SUFFIX_SPECIALS[match["kind"]],
                       _flag(name, "saturate", saturate))


def _fixed(name, match):
    return FixedFormat(name, int(match["i"]), int(match["f"]))


def _bfp(name, match, block_size=16):
    m = int(match["m"])
    if not 2 <= m <= 24:
        raise ConfigError(f"{name}: {m}-bit mantissas are impossible; choose 2 to 24 bits "
                          "(sign included)")
    return BlockFormat(name, ScaledInt(m), block_size, "exponent")


_PATTERNS = [
    (re.compile(r"float_e(?P<e>\d+)m(?P<m>\d+)(?P<kind>|fn|fin)"), _generic_float),
    (re.compile(r"fixed_q(?P<i>\d+)\.(?P<f>\d+)"), _fixed),
    (re.compile(r"bfp(?P<m>\d+)"), _bfp),
]
_PATTERN_NAMES = ["float_e{E}m{M}", "float_e{E}m{M}fn", "float_e{E}m{M}fin", "fixed_q{I}.{F}",
                  "bfp{M}"]


def names() -> list[str]:
    """Known format names; ``{X}`` marks a number to fill in (``float_e{E}m{M}`` takes a
    suffix ``fn`` for no infinities with an all-ones NaN, or ``fin`` for no infinities
    and no NaN)."""
    return [*_NAMED, *_PATTERN_NAMES]


def _factory(name):
    """A format name's canonical spelling, its factory and that factory's regex match."""
    if not isinstance(name, str):
        raise unknown("format", repr(name), names())
    key = name.strip().lower()
    if key in _NAMED:
        return key, _NAMED[key], ()
    for regex, factory in _PATTERNS:
        match = regex.fullmatch(key)
        if match:
            return key, factory, (match,)
    raise unknown("format", name, names())


def canonical(name: str) -> str:
    """The one spelling of a format name (``"FP16 "`` -> ``"fp16"``); unknown names raise.

    Plans, caches and reports store this, so names that ``get`` treats alike compare equal.
    """
    return _factory(name)[0]


def get(name: str, **options) -> Format:
    """The format called ``name`` (see :func:`names`).

    Options: ``saturate`` (float formats: overflow to ±max instead of inf/NaN),
    ``amax`` (int8, int4, int8_channel: calibration range, as ``calibrate``),
    ``block_size`` (bfp, default 16; MX, default 32).
    """
    key, make, args = _factory(name)
    allowed = list(inspect.signature(make).parameters)[1 + len(args):]
    bad = sorted(set(options) - set(allowed))
    if bad:
        choices = ", ".join(allowed) if allowed else "none (this format takes no options)"
        raise ConfigError(f"{key}: unknown option {', '.join(bad)}; choose one of: {choices}")
    return make(key, *args, **options)
