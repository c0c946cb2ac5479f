"""Bit-exact number formats (fp32 to MX) with vectorised bit-fault primitives."""

from flipsafe.formats.base import Encoded, Format, MetaLayout
from flipsafe.formats.bits import bit_mask, flip_bits, force_bits, write_bits
from flipsafe.formats.blocks import BlockFormat, ScaledInt
from flipsafe.formats.floats import FloatFormat
from flipsafe.formats.integers import FixedFormat, IntFormat
from flipsafe.formats.registry import canonical, get, names
from flipsafe.formats.stored import NATIVE_FIELDS, AffineFormat, NativeFormat

__all__ = [
    "NATIVE_FIELDS",
    "AffineFormat",
    "BlockFormat",
    "Encoded",
    "FixedFormat",
    "FloatFormat",
    "Format",
    "IntFormat",
    "MetaLayout",
    "NativeFormat",
    "ScaledInt",
    "bit_mask",
    "canonical",
    "flip_bits",
    "force_bits",
    "get",
    "names",
    "write_bits",
]
