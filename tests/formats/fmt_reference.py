"""Scalar references for the formats tests, written from the format definitions."""

from __future__ import annotations

import bisect
import math
from fractions import Fraction


def float_grid(e: int, m: int, specials: str) -> list[tuple[Fraction, int]]:
    """(value, code) of every non-negative ordinary number of a small float, ascending."""
    bias = 2 ** (e - 1) - 1
    out = []
    for code in range(2 ** (e + m)):
        exp, man = code >> m, code % 2**m
        if specials == "ieee" and exp == 2**e - 1:
            continue
        if specials == "fn" and exp == 2**e - 1 and man == 2**m - 1:
            continue
        if exp == 0:
            value = Fraction(man, 2**m) * Fraction(2) ** (1 - bias)
        else:
            value = (1 + Fraction(man, 2**m)) * Fraction(2) ** (exp - bias)
        out.append((value, code))
    return out


def nearest_even(grid: list[tuple[Fraction, int]], v: Fraction) -> tuple[Fraction, int]:
    """Round |v| to the grid: nearest value, ties to the even code, saturating at the top."""
    values = [g[0] for g in grid]
    i = bisect.bisect_left(values, v)
    if i == len(grid):
        return grid[-1]
    if values[i] == v or i == 0:
        return grid[i]
    lo, hi = grid[i - 1], grid[i]
    dlo, dhi = v - lo[0], hi[0] - v
    if dlo != dhi:
        return lo if dlo < dhi else hi
    return lo if lo[1] % 2 == 0 else hi


def round_half_even(v: Fraction) -> int:
    floor = math.floor(v)
    frac = v - floor
    if frac != Fraction(1, 2):
        return floor + (frac > Fraction(1, 2))
    return floor + (floor % 2)


class MXReference:
    """OCP MX v1.0 §6.3 conversion of one block, one scalar at a time.

    element: ("float", E, M, specials) or ("int", bits). Returns (scale code, element codes,
    decoded values as Python floats or NaN).
    """

    def __init__(self, element):
        self.element = element
        if element[0] == "float":
            _, e, m, specials = element
            self.bits = 1 + e + m
            self.grid = float_grid(e, m, specials)
            top = self.grid[-1][0]
            self.emax = math.floor(math.log2(top))
            self.nan_code = {"ieee": ((2**e - 1) << m) | (1 << (m - 1)),
                             "fn": 2 ** (e + m) - 1, "finite": None}[specials]
        else:
            self.bits = element[1]
            self.emax = 0

    def element_code(self, v: float, x: Fraction) -> int:
        sign = 1 << (self.bits - 1)
        if self.element[0] == "int":
            qmax = 2 ** (self.bits - 1) - 1
            if math.isnan(v):
                return 0
            if math.isinf(v):
                q = qmax if v > 0 else -qmax
            else:
                q = max(-qmax, min(qmax, round_half_even(Fraction(v) / x * 2 ** (self.bits - 2))))
            return q % 2**self.bits
        neg = math.copysign(1.0, v) < 0
        if math.isnan(v):
            code = self.nan_code if self.nan_code is not None else 0
        elif math.isinf(v):
            code = self.grid[-1][1]
        else:
            code = nearest_even(self.grid, abs(Fraction(v)) / x)[1]
        return code | (sign if neg else 0)

    def element_value(self, code: int) -> Fraction:
        sign = 1 << (self.bits - 1)
        if self.element[0] == "int":
            q = code - 2**self.bits if code & sign else code
            return Fraction(q, 2 ** (self.bits - 2))
        mag = {c: v for v, c in self.grid}[code & (sign - 1)]
        return -mag if code & sign else mag

    def block(self, values: list[float]):
        finite = [abs(v) for v in values if math.isfinite(v)]
        bad = len(finite) != len(values)
        amax = max(finite, default=0.0)
        if amax == 0:
            shared = -127
        else:
            shared = max(-127, math.frexp(amax)[1] - 1 - self.emax)
        x = Fraction(2) ** shared
        codes = [self.element_code(v, x) for v in values]
        scale = 255 if bad else shared + 127
        decoded = [math.nan if bad else float(self.element_value(c) * x) for c in codes]
        return scale, codes, decoded


# The element type of each block format, as MXReference takes it.
ELEMENTS = {
    "mxfp8_e4m3": ("float", 4, 3, "fn"),
    "mxfp8_e5m2": ("float", 5, 2, "ieee"),
    "mxfp6_e2m3": ("float", 2, 3, "finite"),
    "mxfp6_e3m2": ("float", 3, 2, "finite"),
    "mxfp4_e2m1": ("float", 2, 1, "finite"),
    "mxint8": ("int", 8),
    "bfp8": ("int", 8),
    "bfp4": ("int", 4),
    "bfp12": ("int", 12),
}
