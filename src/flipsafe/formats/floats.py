"""Binary floating-point formats from fp32 down to fp4, rounded with bit tricks on tensors."""

from __future__ import annotations

import torch

from flipsafe.errors import ConfigError
from flipsafe.formats.base import (
    ABS32,
    CHUNK,
    INF32,
    NAN32,
    SIGN32,
    Encoded,
    Format,
    as_codes,
    as_float32,
    bit_range,
    chunked,
)

SPECIALS = ("ieee", "fn", "finite")
EXP32 = 0x7F800000
NATIVE = {(5, 10): torch.float16, (8, 7): torch.bfloat16}


class FloatFormat(Format):
    """Sign, ``exp_bits`` exponent bits (bias 2**(E-1) - 1), ``man_bits`` mantissa bits,
    with subnormals; values round to nearest, ties to even.

    ``specials`` says what the all-ones exponent holds:

    - ``"ieee"``: ±inf (mantissa 0) and NaNs, as in IEEE 754 (fp32, fp16, bf16, OCP fp8_e5m2);
    - ``"fn"``: ordinary numbers, except that S.1…1.1…1 is NaN; no infinities (OCP fp8_e4m3);
    - ``"finite"``: ordinary numbers only; no infinities, no NaN (OCP MX FP6/FP4 elements).

    Overflow (a value whose rounding, with unbounded exponent, exceeds the largest finite
    value ``max``): with ``saturate=False`` (the default; IEEE 754 and the OCP FP8
    non-saturating mode, and what ``ml_dtypes`` casts do) it becomes ±inf for ``ieee``
    formats and NaN for ``fn`` formats, and ±inf inputs do likewise. With ``saturate=True``
    (the OCP FP8 saturating mode) finite overflow and ±inf both become ±max. ``finite``
    formats always saturate. NaN inputs stay NaN (the quiet NaN code S.1…1.10…0 for
    ``ieee``, S.1…1.1…1 for ``fn``, keeping the NaN's sign; fp16/bf16 give the NaN code
    PyTorch's conversion gives), except in ``finite`` formats, which have none: there NaN
    becomes a zero of the NaN's sign (``ml_dtypes`` also gives a zero, of the opposite
    sign).

    Codes are int32 holding the low ``bits`` bits; fp32 codes are the float32 bit pattern
    (negative when the sign bit is set). fp16 and bf16 use PyTorch's own conversions, which
    round the same way; the other formats use integer and float bit tricks, vectorised and
    device-agnostic.
    """

    def __init__(self, name: str, exp_bits: int, man_bits: int, specials: str = "ieee",
                 saturate: bool = False):
        if specials not in SPECIALS:
            raise ConfigError(f"{name}: unknown specials {specials!r}; choose one of: "
                              f"{', '.join(SPECIALS)}")
        if not 2 <= exp_bits <= 8:
            raise ConfigError(f"{name}: {exp_bits} exponent bits is impossible; choose 2 to 8")
        if not 1 <= man_bits <= 23:
            raise ConfigError(f"{name}: {man_bits} mantissa bits is impossible; choose 1 to 23")
        if exp_bits == 8 and specials != "ieee":
            raise ConfigError(f"{name}: without infinities an 8-bit exponent exceeds the float32 "
                              "range; choose 2 to 7 exponent bits, or the IEEE-style format")
        self.name, self.exp_bits, self.man_bits = name, exp_bits, man_bits
        self.specials = specials
        self.saturate = bool(saturate) or specials == "finite"
        self.meta_fields = {}
        e, m = exp_bits, man_bits
        self.bits = n = 1 + e + m
        self.fields = {"sign": (n - 1,), "exponent": bit_range(m, m + e),
                       "mantissa": bit_range(0, m)}
        self.bias = bias = 2 ** (e - 1) - 1
        top = 2**e - 1
        self._shift = s = 23 - m
        self._inf_code = top << m
        if specials == "ieee":
            self.max_code = ((top - 1) << m) | (2**m - 1)
            self.nan_code = self._inf_code | (1 << (m - 1))
        elif specials == "fn":
            self.max_code = (top << m) | (2**m - 2)
            self.nan_code = (top << m) | (2**m - 1)
        else:
            self.max_code = (top << m) | (2**m - 1)
            self.nan_code = None
        self.emax = emax = (self.max_code >> m) - bias
        self.emin = emin = 1 - bias
        self.max = self._value(self.max_code)
        self.min_normal = 2.0**emin
        self.min_subnormal = 2.0 ** (emin - m)
        self._sign_code = SIGN32 if n == 32 else 1 << (n - 1)
        self._native = None if self.saturate else NATIVE.get((e, m))
        self._identity = s == 0 and not self.saturate
        # The float32 exponent fields between which the rounding constant C is clamped:
        # subnormals round at the spacing of the smallest normal binade, and values past
        # the format's range only need to round to something that still overflows.
        self._c_lo = (emin + 127) << 23
        self._c_hi = (min(emax + 1, 127 - s) + 127) << 23
        self._down = 2.0 ** (bias - 127)  # rescales a value so its float32 bits are a code
        self._up = 2.0 ** (127 - bias)
        # The rounded magnitude is clamped to `_top` (whose code is the overflow code) and
        # NaN is replaced by `_nan_value` (whose code is the NaN code), so no select is needed.
        if self.saturate:
            self._top = self.max
        elif specials == "ieee":
            self._top = 2.0 ** (emax + 1)
        else:
            self._top = self._value(self.nan_code)
        self._nan_value = 0.0 if self.nan_code is None else self._value(self.nan_code)

    def _value(self, code: int) -> float:
        """The magnitude a positive code would have if it were an ordinary number."""
        exp, man = code >> self.man_bits, code & (2**self.man_bits - 1)
        if exp == 0:
            return man * 2.0 ** (self.emin - self.man_bits)
        return (1 + man * 2.0**-self.man_bits) * 2.0 ** (exp - self.bias)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable values (ties to even) as float32; overflow as documented
        on the class."""
        x = as_float32(x, f"{self.name}.quantize")
        if self._identity:
            return x
        if self._native is not None:
            return x.to(self._native).to(torch.float32)
        return chunked(self._quantize_flat, CHUNK, x.reshape(-1)).view(x.shape)

    def _quantize_flat(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.encode_codes(x))

    def encode(self, x: torch.Tensor) -> Encoded:
        x = as_float32(x, f"{self.name}.encode")
        if self._identity:
            return Encoded(x.view(torch.int32).clone())
        return Encoded(chunked(self.encode_codes, CHUNK, x.reshape(-1)).view(x.shape))

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Int32 codes of a float32 tensor, without input checks or chunking."""
        bits = x.view(torch.int32)
        if self._identity:
            return bits.clone()
        if self._native is not None:
            return x.to(self._native).view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
        if self.exp_bits == 8:
            code = self._encode_e8(bits)
            sign = bits >> (32 - self.bits)
        else:
            ax = x.abs()
            # Adding C = 2**(exponent of |x| + s) makes the float adder round |x| to m
            # mantissa bits, ties to even, at the spacing of its binade (or of the
            # smallest normal binade for subnormals); subtracting C again is exact.
            c = (ax.view(torch.int32) & EXP32).clamp_(self._c_lo, self._c_hi)
            c = c.add_(self._shift << 23).view(torch.float32)
            r = ax.add_(c).sub_(c).clamp_(max=self._top).nan_to_num_(nan=self._nan_value)
            # Scaling by 2**(bias - 127) re-biases the exponent, so the float32 bits shifted
            # down by s are the code; format subnormals land on float32 subnormals, exactly.
            code = r.mul_(self._down).view(torch.int32).bitwise_right_shift_(self._shift)
            # (In-place operations throughout: fresh buffers cost more than the arithmetic.)
            sign = torch.bitwise_right_shift(bits, 32 - self.bits, out=c.view(torch.int32))
        return code.bitwise_or_(sign.bitwise_and_(self._sign_code))

    def _encode_e8(self, bits: torch.Tensor) -> torch.Tensor:
        """Codes for 8-bit exponents: the float32 exponent is the format's, so rounding the
        bits to m mantissa bits (ties to even) is the whole conversion, subnormals included;
        overflow carries into the infinity code by itself."""
        a = bits & ABS32
        a = torch.where(a > INF32, NAN32, a)  # one NaN pattern, so that rounding cannot wrap
        s = self._shift
        if s:
            a = (a + ((a >> s) & 1)).add_((1 << (s - 1)) - 1) >> s
        if self.saturate:
            a = torch.where(a > self._inf_code, self.nan_code, a.clamp(max=self.max_code))
        return a

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of the next magnitude down, same sign (sign-magnitude codes: the magnitude
        code minus one; from an overflow code (inf, or NaN in ``fn`` formats) that is
        ±max)."""
        magnitude = (1 << (self.bits - 1)) - 1
        return (codes & magnitude).sub_(1).clamp_(min=0).bitwise_or_(codes & ~magnitude)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Float32 values of the codes; bits above ``bits`` are ignored."""
        c = as_codes(enc.codes, f"{self.name}.decode")
        if self._shift == 0:
            return c.view(torch.float32).clone()
        return chunked(self.decode_codes, CHUNK, c.reshape(-1)).view(c.shape)

    def decode_codes(self, c: torch.Tensor) -> torch.Tensor:
        """Float32 values of int32 codes, without input checks or chunking."""
        if self.exp_bits == 8:
            # Shifted left by s, an 8-bit-exponent code is a float32 bit pattern; the shift
            # also drops any bits above the code width.
            return (c << self._shift).view(torch.float32)
        if self._native is not None:
            return c.to(torch.int16).view(self._native).to(torch.float32)
        n = self.bits
        ca = c & ((1 << (n - 1)) - 1)
        # The inverse of encoding: code bits as float32 bits, re-biased by 2**(127 - bias);
        # exact, since format subnormals are float32 subnormals there.
        v = (ca << self._shift).view(torch.float32).mul_(self._up).view(torch.int32)
        special = {"ieee": (self._inf_code, EXP32), "fn": (self.nan_code, NAN32)}
        if self.specials in special:
            # (first - 1 - ca) >> 31 is all ones exactly for codes from `first` up, so OR-ing
            # the masked flag turns the exponent all ones: inf for a zero mantissa, else NaN.
            first, pattern = special[self.specials]
            v.bitwise_or_(ca.neg_().add_(first - 1).bitwise_right_shift_(31).bitwise_and_(pattern))
        sign = torch.bitwise_left_shift(c, 32 - n, out=ca).bitwise_and_(SIGN32)
        return v.bitwise_or_(sign).view(torch.float32)
