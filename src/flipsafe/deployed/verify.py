"""`flipsafe verify`: replay a finished campaign's faults in the runtime the model ships in.

flipsafe's engine runs a lifted copy of a deployed model (deployed.modules). `verify`
draws a seeded sample of a campaign's rows and recomputes each one with the model file
itself: ONNX Runtime on the ONNX file with the stored code (or scale) changed in the
file's own tensors, or the saved PT2E program's own graph run by torch. It then compares
every outcome column with what the campaign recorded.

- ONNX Runtime, weights and their scales: the initializer is edited and the model run.
- ONNX Runtime, activation codes: the QuantizeLinear is cut out, and its codes (tapped
  from a clean run, one bit flipped) are fed in as a graph input.
- ONNX Runtime, activation scales: the DequantizeLinears of those codes read a private
  copy of the scale, which is flipped.
- torch: the same changes on the program's graph, through an fx.Interpreter.

ONNX Runtime runs with its default graph optimizations, as a deployed session does: QDQ
pairs around a Conv become fused integer kernels that fold the scales into one
requantisation multiplier. Faults in stored activation scales then come out differently
from the QDQ graph as written (measured on the tests' tiny CNN: 2-9 % of rows), and
verify says so; `optimize=False` (`--no-optimizations`) replays the graph as written.

SDC, DUE and the faulty top-1 must agree exactly. Losses must agree within
LOSS_RTOL * |loss| + LOSS_ATOL: the engine sums convolutions in another order than the
runtime, and a sum on a rounding boundary of the next quantisation moves one code by one
step. This is the same tolerance the engine's own reference tests use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from flipsafe.deployed.modules import sources
from flipsafe.errors import ConfigError
from flipsafe.faults import parse as parse_fault
from flipsafe.metrics.outcomes import GoldenOutcomes, compute_outcomes

LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-3
RUNTIMES = ("onnxruntime", "torch")
COLUMNS = ("sdc", "due", "faulty_top1", "golden_top1", "faulty_loss")
_PARAM = {"weight": "weight", "weight_meta": "weight", "output": "output", "meta": "output",
          "zero_point": "output", "weight_zero_point": "weight"}


def _zero_point(z: int, mask: int, signed: bool) -> int:
    """A zero point with `mask` flipped in its stored 8-bit pattern (the codes' type)."""
    u = (int(z) & 0xFF) ^ (mask & 0xFF)
    return u - 256 if signed and u >= 128 else u


def _xor(array: np.ndarray, index: int, mask: int) -> np.ndarray:
    """A copy of `array` with the bits of `mask` flipped in flat element `index`."""
    out = np.array(array, copy=True)
    bits = out.reshape(-1).view({1: np.uint8, 4: np.uint32}[out.dtype.itemsize])
    bits[index] ^= bits.dtype.type(mask)
    return out


def _mask(bits) -> int:
    return sum(1 << int(b) for b in bits)


@dataclass
class Fault:
    layer: str
    param: str  # weight, weight_meta, output, meta
    index: int
    mask: int
    image: int


class OrtReplay:
    """Faults replayed by ONNX Runtime on the ONNX file (see the module docstring)."""

    def __init__(self, path, model, optimize: bool = True):
        self.optimize = optimize
        try:
            import onnx
            import onnxruntime as ort
            from onnx import numpy_helper
        except ImportError:
            from flipsafe.deployed.pt2e import missing

            raise missing("onnxruntime") from None
        self.onnx, self.ort, self.nh = onnx, ort, numpy_helper
        self.proto = onnx.load(str(path))
        self.sources = sources(model)
        self.input = next(i.name for i in self.proto.graph.input
                          if i.name not in {t.name for t in self.proto.graph.initializer})
        self.inits = {t.name: t for t in self.proto.graph.initializer}
        self.base = self._session(self.proto)
        self.cut: dict = {}  # layer -> (tap session, feed session)

    def _session(self, proto):
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        if not self.optimize:  # the QDQ graph as written, no fused integer kernels
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return self.ort.InferenceSession(proto.SerializeToString(), opts,
                                         providers=["CPUExecutionProvider"])

    def _run(self, session, feeds) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session.run(None, feeds)[0]))

    def golden(self, x: np.ndarray) -> torch.Tensor:
        return self._run(self.base, {self.input: x})

    def _with_init(self, name: str, array: np.ndarray):
        proto = self.onnx.ModelProto()
        proto.CopyFrom(self.proto)
        for t in proto.graph.initializer:
            if t.name == name:
                t.CopyFrom(self.nh.from_array(array, name))
        return proto

    def _weight(self, src: dict, f: Fault, shape) -> torch.Tensor:
        name = {"weight": src["codes"], "weight_meta": src["scale"],
                "weight_zero_point": src.get("zero_point")}[f.param]
        if name is None:
            raise ConfigError(f"{f.layer}'s weights have no stored zero point to fault")
        array = self.nh.to_array(self.inits[name])
        index = f.index
        if src.get("transposed") and f.param == "weight":  # the file holds [in, out]
            out_dim, in_dim = shape
            index = (f.index % in_dim) * out_dim + f.index // in_dim
        return self._with_init(name, _xor(array, index, f.mask))

    def _readers(self, proto, tensor: str) -> list:
        return [n for n in proto.graph.node if tensor in n.input]

    def _cut(self, src: dict):
        """(tap, feed) sessions around the QuantizeLinear making `src['codes']`."""
        codes = src["codes"]
        tap = self.onnx.ModelProto()
        tap.CopyFrom(self.proto)
        tap.graph.output.insert(0, self.onnx.helper.make_empty_tensor_value_info(codes))
        feed = self.onnx.ModelProto()
        feed.CopyFrom(self.proto)
        node = next(n for n in feed.graph.node if codes in n.output)
        feed.graph.node.remove(node)
        zp = self.nh.to_array(self.inits[node.input[2]])
        elem = self.onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
        feed.graph.input.append(self.onnx.helper.make_tensor_value_info(codes, elem, None))
        return self._session(tap), self._session(feed)

    def faulty(self, f: Fault, x: np.ndarray, shape) -> torch.Tensor:
        src = self.sources[(f.layer, _PARAM[f.param])]
        if f.param in ("weight", "weight_meta", "weight_zero_point"):
            return self._run(self._session(self._weight(src, f, shape)), {self.input: x})
        if f.param == "output":
            if f.layer not in self.cut:
                self.cut[f.layer] = self._cut(src)
            tap, feed = self.cut[f.layer]
            codes = np.asarray(tap.run([src["codes"]], {self.input: x})[0])
            return self._run(feed, {self.input: x, src["codes"]: _xor(codes, f.index, f.mask)})
        # the scale (or zero point) of the activation codes, in a private copy their
        # dequantizes read
        slot, name = (1, src["scale"]) if f.param == "meta" else (2, src.get("zero_point"))
        if name is None:
            raise ConfigError(f"{f.layer}'s codes have no stored zero point to fault")
        proto = self.onnx.ModelProto()
        proto.CopyFrom(self.proto)
        private = f"{name}__flipsafe_fault"
        for n in self._readers(proto, src["codes"]):
            n.input[slot] = private
        value = self.nh.to_array(self.inits[name])
        proto.graph.initializer.append(self.nh.from_array(_xor(value, f.index, f.mask),
                                                          private))
        return self._run(self._session(proto), {self.input: x})


class _Faulty(fx.Interpreter):
    """A graph run with some values (or some calls' arguments) changed."""

    def __init__(self, gm, values: dict, arguments: dict):
        super().__init__(gm)
        self.values, self.arguments = values, arguments

    def run_node(self, n):
        if n in self.arguments:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return n.target(*self.arguments[n](args), **kwargs)
        out = super().run_node(n)
        return self.values[n](out) if n in self.values else out


def _flip_tensor(t: torch.Tensor, index: int, mask: int) -> torch.Tensor:
    return torch.from_numpy(_xor(t.detach().cpu().numpy(), index, mask))


class TorchReplay:
    """Faults replayed on a saved PT2E program's own graph (see the module docstring)."""

    def __init__(self, program, model):
        self.gm = program.module()
        self.sources = sources(model)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.attrs = {n.target: n for n in self.gm.graph.nodes if n.op == "get_attr"}
        # zero-point attributes of int8 codes (their faults flip a signed 8-bit pattern)
        self.signed = {n.args[2].target: n.args[-1] == torch.int8 for n in self.gm.graph.nodes
                       if n.op == "call_function" and len(n.args) > 2
                       and isinstance(n.args[2], fx.Node) and n.args[2].op == "get_attr"}

    def golden(self, x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.gm(torch.from_numpy(x))

    def faulty(self, f: Fault, x: np.ndarray, shape) -> torch.Tensor:
        src = self.sources[(f.layer, _PARAM[f.param])]
        values, arguments = {}, {}
        if f.param == "weight_zero_point":
            node = self.attrs[src["zero_point"]]
            signed = self.signed[src["zero_point"]]

            def shifted(t):
                t = t.clone()
                t.view(-1)[f.index] = _zero_point(int(t.view(-1)[f.index]), f.mask, signed)
                return t
            values[node] = shifted
        elif f.param in ("weight", "weight_meta"):
            node = self.attrs[src["codes"] if f.param == "weight" else src["scale"]]
            values[node] = lambda t: _flip_tensor(t, f.index, f.mask)
        elif f.param == "output":
            values[self.nodes[src["node"]]] = lambda t: _flip_tensor(t, f.index, f.mask)
        else:  # the scale or zero point every dequantize of the codes reads
            def flipped(args):
                if f.param == "meta":
                    s = np.float32(args[1]).reshape(1)
                    return (args[0], float(_xor(s, 0, f.mask)[0]), *args[2:])
                signed = args[5] == torch.int8
                return (*args[:2], _zero_point(args[2], f.mask, signed), *args[3:])
            arguments = {u: flipped for u in self.nodes[src["node"]].users}
        with torch.no_grad():
            return _Faulty(self.gm, values, arguments).run(torch.from_numpy(x))


@dataclass
class Verification:
    """Agreement of each outcome column between the campaign and the runtime."""

    runtime: str
    rows: int
    agree: dict = field(default_factory=dict)  # column -> rows that agree
    worst: dict = field(default_factory=dict)  # column -> first disagreeing row (dict)

    @property
    def ok(self) -> bool:
        return all(v == self.rows for v in self.agree.values())


def _loss_close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= LOSS_ATOL + LOSS_RTOL * abs(b)


def replayer(target, runtime: str, model, optimize: bool = True):
    """The replay of `target`'s faults in `runtime` (onnxruntime for onnx:, torch for a
    PT2E export:); `optimize` False runs ONNX Runtime without its graph optimizations
    (no fused integer kernels: the QDQ graph as written)."""
    kind = target.kind
    allowed = {"onnx": "onnxruntime", "export": "torch"}.get(kind)
    if runtime == "auto":
        runtime = allowed
    if allowed is None or runtime != allowed or not getattr(target, "quantized", False):
        raise ConfigError(f"verify replays quantized deployed models: onnx:<file> in "
                          f"onnxruntime, a PT2E export:<file> in torch; this campaign's "
                          f"model is {target.spec} (runtime {runtime!r} asked)")
    if runtime == "onnxruntime":
        return runtime, OrtReplay(target.path, model, optimize)
    return runtime, TorchReplay(target.program, model)


def compare(recorded: dict, golden: torch.Tensor, faulty: torch.Tensor, label: int) -> dict:
    """{column: agrees} for one row: its recorded columns against runtime logits."""
    lab = torch.tensor([label])
    got = compute_outcomes(GoldenOutcomes.of(golden.float(), lab), faulty.float(), lab)
    out = {}
    for col in COLUMNS:
        mine = getattr(got, col)[0].item()
        if col == "faulty_loss":
            out[col] = _loss_close(float(recorded[col]), float(mine))
        else:
            out[col] = bool(recorded[col]) == bool(mine) if col in ("sdc", "due") else \
                int(recorded[col]) == int(mine)
    return out


FLIP_KINDS = ("flip", "burst")  # fault kinds that flip bits: replayed by xor in the file


def run(results_dir, runtime: str = "auto", n: int | None = 200, seed: int = 0,
        optimize: bool = True, progress=None) -> Verification:
    """Replay a seeded sample of `n` rows (None: all) of the campaign in `results_dir`
    (`optimize`: see replayer)."""
    from flipsafe.campaign.store import ResultsStore
    from flipsafe.campaign.targets import resolve

    store = ResultsStore(results_dir)
    plan = store.open()
    target = resolve(plan.model)
    if target.sha != plan.model_sha:
        raise ConfigError(f"the model at {plan.model} is not the one the campaign ran on "
                          "(its hash differs)")
    if parse_fault(plan.fault).kind not in FLIP_KINDS:
        raise ConfigError(f"verify replays bit flips (bitflip, bitflipK, burstK); this "
                          f"campaign's fault model is {plan.fault}")
    if n is not None and n < 1:
        raise ConfigError(f"--n must be a positive number of rows, got {n}")
    model = target.load()
    runtime, replay = replayer(target, runtime, model, optimize)
    if runtime == "onnxruntime":
        runtime += " (graph optimizations on: as deployed)" if optimize else \
            " (graph optimizations off: the QDQ graph as written)"
    table = store.read().to_pylist()
    if not table:
        raise ConfigError(f"{results_dir} has no rows yet; run the campaign first")
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [table[i] for i in sorted(order[: n or len(table)])]
    ev = target.evaluation(plan)
    images, labels = ev.images.numpy(), ev.labels
    shapes = {n_: tuple(m.weight.shape) for n_, m in model.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    result = Verification(runtime, len(rows), {c: 0 for c in COLUMNS})
    golden: dict = {}
    for k, row in enumerate(rows):
        img = int(row["image_id"])
        x = images[img:img + 1]
        if img not in golden:
            golden[img] = replay.golden(x)
        f = Fault(row["layer"], row["param"], int(row["index"]), _mask(row["bits"]), img)
        faulty = replay.faulty(f, x, shapes.get(f.layer))
        for col, same in compare(row, golden[img], faulty, int(labels[img])).items():
            result.agree[col] += same
            if not same and col not in result.worst:
                result.worst[col] = row
        if progress is not None:
            progress(k + 1, len(rows))
    return result


def text(v: Verification) -> str:
    """The agreement table `flipsafe verify` prints."""
    lines = [f"replayed {v.rows} rows in {v.runtime}",
             f"{'column':<12} {'agree':>7} {'of':>5}  {'%':>7}"]
    for col in COLUMNS:
        lines.append(f"{col:<12} {v.agree[col]:>7} {v.rows:>5}  "
                     f"{100 * v.agree[col] / v.rows:>6.2f}%")
    lines.append(f"losses agree within {LOSS_RTOL:g} x |loss| + {LOSS_ATOL:g}; the other "
                 "columns exactly")
    for col, row in v.worst.items():
        lines.append(f"first disagreement in {col}: fault {row['fault_id']} "
                     f"({row['layer']} {row['param']} index {row['index']} bits {row['bits']}, "
                     f"image {row['image_id']}); campaign recorded {row[col]}")
    lines.append("verify: every row agrees" if v.ok else "verify: DISAGREEMENT (exit 1)")
    return "\n".join(lines)
