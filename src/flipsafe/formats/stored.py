"""Codes a quantized model stores itself: affine 8-bit integers with the model's own scale
and zero point, and the `native` format that stands for "each layer as the model stores it".

An emulated format (int8, mxfp8_e4m3, ...) is flipsafe's choice of quantisation applied to a
float model. A deployed model (a PT2E program, a QDQ ONNX file) arrives quantized: its
weight codes, scales, zero points and activation quantisers are the model's. `AffineFormat`
holds one such tensor's quantisation exactly as the runtime computes it, and `native`
is the engine-wide name under which every layer uses its own.
"""

from __future__ import annotations

import torch

from flipsafe.errors import ConfigError
from flipsafe.formats.base import Encoded, Format, MetaLayout, as_codes, as_float32, bit_range
from flipsafe.formats.integers import sign_extend

# Every stored code is 8 bits wide (int8 or uint8). The fields are named by what bit 7 is
# in both types - the top bit (the sign of an int8 code) - so the strata are one set
# across a model whose weights are int8 and whose activations are uint8.
STORED_BITS = 8
NATIVE_FIELDS = {"msb": (STORED_BITS - 1,), "low": bit_range(0, STORED_BITS - 1)}
SCALE_FIELDS = {"scale": 32}  # the float32 scale is the metadata a fault may hit
STORED_DTYPES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


class AffineFormat(Format):
    """One tensor's stored quantisation: value = (code - zero_point) * scale in float32.

    `scale` and `zero_point` are per tensor (scalars) or per dim-0 channel (1-D, as the
    engine holds parameters [out, fan_in]); codes are `dtype` (int8 or uint8) in
    [qmin, qmax]. `encode` rounds x / scale half to even (`divide=True`, ONNX
    QuantizeLinear) or x * (1 / scale) (PT2E's quantize_per_tensor), adds the zero point
    and saturates; on values the model itself produced both give back the stored codes.
    The scale is the metadata: float32 bit patterns (int32) in meta["scale"].
    """

    needs_calibration = False

    def __init__(self, dtype: torch.dtype, scale, zero_point, qmin: int | None = None,
                 qmax: int | None = None, divide: bool = False):
        if dtype not in STORED_DTYPES:
            raise ConfigError(f"stored codes of type {dtype} are not supported; flipsafe "
                              f"reads int8 and uint8 codes")
        lo, hi = STORED_DTYPES[dtype]
        self.dtype, self.divide = dtype, divide
        self.name = f"stored_{str(dtype).removeprefix('torch.')}"
        self.bits = STORED_BITS
        self.fields, self.meta_fields = dict(NATIVE_FIELDS), dict(SCALE_FIELDS)
        self.qmin = lo if qmin is None else int(qmin)
        self.qmax = hi if qmax is None else int(qmax)
        scale = torch.as_tensor(scale).detach()
        self.scale = scale.to(torch.float32).clone()
        # PT2E multiplies by 1 / scale computed from the scale as given (a Python float)
        self.inverse = (1.0 / scale.to(torch.float64)).to(torch.float32)
        zp = torch.as_tensor(zero_point).detach().to(torch.int64).reshape(-1)
        if self.scale.dim() > 1 or zp.numel() == 0:
            raise ConfigError("stored scales must be a scalar or 1-D per channel, with a "
                              "zero point")
        # Only the scale travels with a code as its metadata, so one zero point serves
        # every channel (symmetric weights have 0 throughout).
        if not bool((zp == zp[0]).all()):
            raise ConfigError("per-channel zero points that differ between channels are "
                              "not supported; flipsafe reads one zero point per tensor")
        self.zero_point = zp[0].clone()
        self.per_channel = self.scale.dim() == 1

    def meta_layout(self, shape) -> MetaLayout:
        return MetaLayout("channel" if self.per_channel else "tensor", shape, "scale")

    def _column(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device)
        if t.dim() == 0 or x.dim() == 0:
            return t
        if t.numel() != x.shape[0]:
            raise ConfigError(f"{self.name}: {t.numel()} channel parameters for a tensor of "
                              f"shape {tuple(x.shape)}; dim 0 must match")
        return t.reshape(-1, *([1] * (x.dim() - 1)))

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        q = (torch.div(x, self._column(self.scale, x)) if self.divide
             else x * self._column(self.inverse, x))
        return (q.round() + self.zero_point.to(x.device)).clamp(self.qmin, self.qmax).nan_to_num(nan=0.0).to(torch.int32)

    def ints(self, codes: torch.Tensor) -> torch.Tensor:
        """The integers 8-bit codes (or zero-point patterns) stand for: two's complement
        for int8, unsigned for uint8."""
        return sign_extend(codes, STORED_BITS) if self.dtype == torch.int8 else codes & 0xFF

    def _values(self, codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = self.ints(codes)
        return (v.to(torch.float32) - self.zero_point.to(v.device)) * self._column(s, v)

    def step_toward_zero(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes one step closer to the zero point (the code of value 0)."""
        v = self.ints(codes)
        zp = self.zero_point.to(v.device)
        return (v - torch.sign(v - zp)).bitwise_and_(0xFF)

    def zero_point_pattern(self) -> torch.Tensor:
        """The zero point's stored 8-bit pattern (two's complement for int8 codes)."""
        return self.zero_point & 0xFF

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
               ) -> torch.Tensor:
        """(code - zero point) * scale with per-row zero points [n] and scales [n] for rows
        of codes [n, G] (decode with another zero point)."""
        v = self.ints(codes)
        return (v.to(torch.float32) - zero_point[:, None].to(torch.float32)) * scale[:, None]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x = as_float32(x, f"{self.name}.quantize")
        return self._values(self._codes(x), self.scale)

    def encode(self, x: torch.Tensor) -> Encoded:
        x = as_float32(x, f"{self.name}.encode")
        codes = self._codes(x).bitwise_and_(0xFF)  # checks per-channel scales against dim 0
        return Encoded(codes, {"scale": self.scale.to(x.device).view(torch.int32).clone()})

    def decode(self, enc: Encoded) -> torch.Tensor:
        who = f"{self.name}.decode"
        if "scale" not in enc.meta:
            raise ConfigError(f"{who} needs meta['scale']; choose one of: scale")
        codes = as_codes(enc.codes, who)
        s = as_codes(enc.meta["scale"], who).view(torch.float32)
        return self._values(codes, s)


class NativeFormat(Format):
    """`--format native`: every layer in the codes the model stores (its AffineFormat);
    layers the model keeps in float have no stored codes to corrupt. The fields and the
    metadata are those of the stored 8-bit codes, the same in every layer."""

    needs_calibration = False
    native = True

    def __init__(self, name: str = "native"):
        self.name, self.bits = name, STORED_BITS
        self.fields, self.meta_fields = dict(NATIVE_FIELDS), dict(SCALE_FIELDS)

    def _per_layer(self, *_):
        raise ConfigError("format native has no codes of its own: each layer of a quantized "
                          "model uses the quantisation it stores")

    quantize = encode = decode = calibrate = calibrated_for = _per_layer
