"""FaultSet: a columnar batch of faults (where, which bits, how, on which image)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flipsafe.errors import ConfigError, unknown
from flipsafe.faults.models import FLIP, OPS, mask_bits

# What a fault corrupts in its layer: the output (activation) element `index`, the weight
# or bias element `index`, or metadata code `index` of the output ("meta") or of the
# weight ("weight_meta"), which corrupts every element that code scales.
PARAMS = ("output", "weight", "bias", "meta", "weight_meta", "pe", "weight_word", "zero_point",
          "weight_zero_point")

_COLUMNS = ("layer", "param", "index", "mask", "op", "value", "image", "stratum")
# Columns indexing a list of names: (column, the FaultSet attribute holding the names).
_NAMED = (("layer", "layers"), ("stratum", "strata"))


def _column(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"FaultSet.{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64).reshape(-1)


def _param_codes(param) -> torch.Tensor:
    if isinstance(param, torch.Tensor):
        return _column(param, "param")
    names = [param] if isinstance(param, str) else list(param)
    bad = [p for p in names if p not in PARAMS]
    if bad:
        raise unknown("fault parameter", str(bad[0]), PARAMS)
    return _column([PARAMS.index(p) for p in names], "param")


@dataclass(frozen=True, eq=False)
class FaultSet:
    """Faults as int64 columns of equal length n; immutable (see `replace`).

    - `layers`: layer names (as in `named_modules()`); `layer[i]` indexes this list;
    - `param[i]`: index into PARAMS (built from a name, or one name per fault);
    - `index[i]`: flat index into the corrupted tensor: one image's output (batch dim
      excluded), the weight or bias, or the metadata tensor of the output or weight;
    - `mask[i]`: bit mask (bit 0 = LSB of the format code), `op[i]`: op code (faults.OPS),
      `value[i]`: replacement bits for non-flip ops;
    - `image[i]`: position of the image in the batch given to the engine;
    - `strata`: field names; `stratum[i]` indexes this list: the field of the fault's
      stratum (with its layer, the stratum the sampler drew it from: the field of its
      highest bit, or 'value'); "" for faults built by hand.
    Scalars broadcast to n.
    """

    layers: list[str]
    layer: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    op: torch.Tensor | int = FLIP
    value: torch.Tensor | int = 0
    image: torch.Tensor | int = 0
    param: torch.Tensor | str | Sequence[str] = "output"
    strata: list[str] = ("",)
    stratum: torch.Tensor | int = 0
    _n: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)  # frozen: set once, here

        for _, attr in _NAMED:
            names = getattr(self, attr)
            put(attr, [str(x) for x in ([names] if isinstance(names, str) else names)])
        cols = {c: _param_codes(self.param) if c == "param" else _column(getattr(self, c), c)
                for c in _COLUMNS}
        lengths = {t.numel() for t in cols.values()} - {1}
        if len(lengths) > 1:
            listed = ", ".join(f"{c}={t.numel()}" for c, t in cols.items())
            raise ConfigError(f"FaultSet columns must have equal lengths (or length 1); "
                              f"got {listed}")
        n = lengths.pop() if lengths else 1
        for c, t in cols.items():
            put(c, t.expand(n).clone() if t.numel() != n else t)
        put("_n", n)
        for c, limit, names in (("layer", len(self.layers), self.layers),
                                ("param", len(PARAMS), PARAMS), ("op", len(OPS), OPS),
                                ("stratum", len(self.strata), self.strata)):
            col = getattr(self, c)
            if n and (int(col.min()) < 0 or int(col.max()) >= limit):
                raise ConfigError(f"FaultSet.{c} must be in 0..{limit - 1} (indexing "
                                  f"{list(names)}), got values {col.min()}..{col.max()}")

    def replace(self, **changes) -> FaultSet:
        """A new FaultSet with the given columns (or name lists) replaced, validated anew."""
        allowed = (*_COLUMNS, *(names for _, names in _NAMED))
        bad = [k for k in changes if k not in allowed]
        if bad:
            raise unknown("FaultSet column", str(bad[0]), allowed)
        return dataclasses.replace(self, **changes)

    def with_image(self, image) -> FaultSet:
        """The same faults on other image positions (e.g. renumbered for a sub-batch)."""
        return self.replace(image=image)

    def __len__(self) -> int:
        return self._n

    @property
    def param_names(self) -> list[str]:
        return [PARAMS[i] for i in self.param.tolist()]

    @property
    def layer_names(self) -> list[str]:
        return [self.layers[i] for i in self.layer.tolist()]

    @property
    def stratum_names(self) -> list[str]:
        """Each fault's stratum field (what the campaign store records as `field`)."""
        return [self.strata[i] for i in self.stratum.tolist()]

    def bits(self) -> list[list[int]]:
        """Bit positions of each fault's mask."""
        return mask_bits(self.mask)

    def select(self, idx) -> FaultSet:
        """The faults at positions idx (a slice, index tensor or boolean mask)."""
        cols = {c: getattr(self, c)[idx] for c in _COLUMNS}
        return FaultSet(self.layers, strata=self.strata, **cols)

    @staticmethod
    def cat(sets: Sequence[FaultSet]) -> FaultSet:
        """Concatenate fault sets, merging their layer lists and their strata lists."""
        merged = {}
        for col, attr in _NAMED:
            names: list[str] = []
            for s in sets:
                names += [x for x in getattr(s, attr) if x not in names]
            merged[attr] = names
        cols = {c: [] for c in _COLUMNS}
        for s in sets:
            remaps = {col: torch.tensor([merged[attr].index(x) for x in getattr(s, attr)] or [0],
                                        dtype=torch.int64) for col, attr in _NAMED}
            for c in _COLUMNS:
                cols[c].append(remaps[c][getattr(s, c)] if c in remaps else getattr(s, c))
        empty = torch.zeros(0, dtype=torch.int64)
        return FaultSet(merged["layers"], strata=merged["strata"] or [""],
                        **{c: torch.cat(v) if v else empty for c, v in cols.items()})

    def to_dict(self) -> dict:
        """Plain columns (numpy arrays, layer and param names, bit lists) for storage."""
        return {
            "layer": self.layer_names,
            "param": self.param_names,
            "index": self.index.numpy(),
            "bits": self.bits(),
            "mask": self.mask.numpy(),
            "op": [OPS[i] for i in self.op.tolist()],
            "value": self.value.numpy(),
            "image": self.image.numpy(),
            "stratum": self.stratum_names,
        }
