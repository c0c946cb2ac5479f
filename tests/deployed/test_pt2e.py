"""PT2E-quantized programs: stored int8 codes, scales and activation codes as fault sites,
checked against the saved program itself run with the same bit flipped."""

from __future__ import annotations

import pytest
import torch
from deployed_models import images
from inject_reference import outcome
from test_inject_reference import check
from torch import fx

from flipsafe.campaign.targets import resolve
from flipsafe.errors import ConfigError
from flipsafe.formats import AffineFormat
from flipsafe.inject import Engine

pytest.importorskip("torchao")


def ops():
    from flipsafe.deployed.pt2e import register_ops

    register_ops()
    return torch.ops.quantized_decomposed


def _path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else v for v in stack.values()]
    return next((p for p in reversed(paths) if p), "")


class FaultyProgram(fx.Interpreter):
    """The saved program's own graph, run with one stored code or scale changed."""

    def __init__(self, gm, change, watch):
        super().__init__(gm)
        self.change = change  # {node: fn(value) -> value} or {node: fn(args) -> args}
        self.watch, self.nonfinite = watch, False  # dequantizes of the changed values

    def run_node(self, n):
        fn = self.change.get(n)
        if fn is not None and n.op == "call_function" and fn.__name__ == "args":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = n.target(*fn(args), **kwargs)
        else:
            out = super().run_node(n)
            out = fn(out) if fn is not None else out
        if n in self.watch:
            self.nonfinite |= not bool(torch.isfinite(out).all())
        return out


def xor(t: torch.Tensor, index: int, mask: int) -> torch.Tensor:
    """t with the bits of `mask` flipped in element `index` (its own dtype's bit pattern)."""
    t = t.clone()
    flat = t.reshape(-1)
    view = {torch.int8: torch.uint8, torch.float32: torch.int32}.get(t.dtype, t.dtype)
    bits = flat.view(view)
    bits[index] = bits[index] ^ torch.tensor(mask, dtype=torch.int64).to(view)
    return t


def reference(program, x1, layer_nodes, param, index, mask):
    """Logits of the saved program on one image with the fault applied to its graph, and
    whether a value the fault changed became NaN or infinite."""
    gm = program.module()
    nodes = {n.name: n for n in gm.graph.nodes}
    _, name = layer_nodes
    node = nodes[name]
    if param == "weight":
        change = {node.args[0]: lambda t: xor(t, index, mask)}
    elif param == "weight_meta":
        change = {node.args[1]: lambda t: xor(t, index, mask)}
    elif param == "output":
        change = {node: lambda t: xor(t, index, mask)}
    else:  # the activation scale every dequantize of the codes reads

        def args(a):
            s = torch.tensor(a[1], dtype=torch.float32).view(torch.int32) ^ mask
            return (a[0], float(s.view(torch.float32)), *a[2:])
        change = {dq: args for dq in node.users}
    watch = {node} if param.startswith("weight") else set(node.users)
    run = FaultyProgram(gm, change, watch)
    with torch.no_grad():
        return run.run(x1), run.nonfinite


def original_nodes(program):
    """{lifted layer name: original node name}: each weight's dequantize, each activation
    quantize (in graph order, as lifting names them)."""
    gm = program.module()
    weights, acts = {}, []
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("aten.") and \
                n.target.name() in ("aten::conv2d", "aten::linear"):
            weights[_path(n)] = ("weight", n.args[1].name)
        if n.op == "call_function" and "quantize_per_tensor" == n.target.name().split("::")[-1]:
            acts.append(("output", n.name))
    return weights, acts


def test_the_stored_format_computes_what_the_pt2e_ops_compute():
    """Decode equals dequantize_per_tensor / _per_channel bit for bit; quantize equals
    quantize_per_tensor (x * (1 / scale), ties to even), on random and boundary values."""
    qd = ops()
    g = torch.Generator().manual_seed(0)
    for dtype, lo, hi in ((torch.uint8, 0, 255), (torch.int8, -128, 127)):
        scale, zp = 0.0123456789, 7 if dtype == torch.uint8 else 0
        fmt = AffineFormat(dtype, scale, zp, lo, hi)
        codes = torch.randint(lo, hi + 1, (4096,), generator=g).to(dtype)
        want = qd.dequantize_per_tensor(codes, scale, zp, lo, hi, dtype)
        enc = fmt.encode(want)
        assert torch.equal(fmt.decode(enc).view(torch.int32), want.view(torch.int32))
        x = torch.cat([torch.randn(4096, generator=g) * 2, (torch.arange(-300, 300) + 0.5)
                       * scale, torch.tensor([1e30, -1e30, float("nan")])])
        q = qd.quantize_per_tensor(x, scale, zp, lo, hi, dtype)
        assert torch.equal(fmt.quantize(x), qd.dequantize_per_tensor(q, scale, zp, lo, hi,
                                                                     dtype))
    scales = torch.rand(6, generator=g) / 50 + 1e-3
    zps = torch.zeros(6, dtype=torch.int64)
    codes = torch.randint(-128, 128, (6, 27), generator=g).to(torch.int8)
    want = qd.dequantize_per_channel(codes, scales, zps, 0, -128, 127, torch.int8)
    fmt = AffineFormat(torch.int8, scales, zps, -128, 127)
    assert torch.equal(fmt.decode(fmt.encode(want)).view(torch.int32), want.view(torch.int32))
    assert torch.equal(fmt.encode(want).codes, codes.to(torch.int32) & 0xFF)


def test_a_pt2e_program_loads_with_its_stored_codes_as_sites(pt2e_file):
    target = resolve(f"export:{pt2e_file}")
    assert target.quantized
    model = target.load()
    engine = Engine(model, "native", input_shape=(1, 8, 8))
    weights = [info.name for info in engine.layers("weights")]
    assert weights == ["conv1", "conv2", "conv3", "fc"]
    acts = engine.layers("activations")
    assert all(info.kind == "quant" for info in acts) and len(acts) >= 4
    assert engine.layers("weight_metadata")[0].numel == 6  # a scale per output channel
    assert {info.numel for info in engine.layers("metadata")} == {1}  # one scale per image
    assert engine.suffix
    # Biases and float outputs are not stored codes: no site, and the reason says so.
    with pytest.raises(Exception, match="keeps its bias in float"):
        engine.layers("biases", "conv1")
    with pytest.raises(Exception, match="keeps its output in float"):
        engine.layers("activations", "conv1")
    # The lifted model computes what the program computes.
    x, _ = images(16)
    assert torch.equal(model(x), target.program.module()(x))


def test_emulated_formats_are_refused_on_a_quantized_model(pt2e_file):
    model = resolve(f"export:{pt2e_file}").load()
    with pytest.raises(ConfigError, match="use format native"):
        Engine(model, "int8", input_shape=(1, 8, 8))


@pytest.mark.parametrize("site", ["weights", "weight_metadata", "activations", "metadata"])
def test_engine_outcomes_equal_the_program_run_with_the_bit_flipped(pt2e_file, site):
    target = resolve(f"export:{pt2e_file}")
    program = target.program
    engine = Engine(target.load(), "native", chunk=16, input_shape=(1, 8, 8))
    x, y = images(12, seed=3)
    gen = torch.Generator().manual_seed(4)
    faults = engine.sample(60, site, "all", "bitflip", images=len(x), generator=gen)
    got = engine.run(faults, x, y)
    weights, acts = original_nodes(program)
    act_names = [info.name for info in engine.layers("activations")]
    assert len(act_names) == len(acts)
    expected, golden = [], {}
    for i in range(len(faults)):
        layer, img = faults.layers[int(faults.layer[i])], int(faults.image[i])
        where = weights[layer] if site.startswith("weight") else acts[act_names.index(layer)]
        x1 = x[img:img + 1]
        if img not in golden:
            with torch.no_grad():
                golden[img] = outcome(program.module()(x1), int(y[img]))
        logits, nonfinite = reference(program, x1, where, faults.param_names[i],
                                      int(faults.index[i]), int(faults.mask[i]))
        o = outcome(logits, int(y[img]))
        g = golden[img]
        expected.append({"golden_top1": g["top1"], "faulty_top1": o["top1"], "due": o["due"],
                         "sdc": (o["top1"] != g["top1"]) and not o["due"],
                         "golden_loss": g["loss"], "faulty_loss": o["loss"],
                         "faulty_top2diff": o["top2diff"],
                         "nonfinite": nonfinite})
    check(got, expected, "int8")
    assert (got.delta_loss > 1e-4).sum() >= len(faults) // 10  # the faults did something
