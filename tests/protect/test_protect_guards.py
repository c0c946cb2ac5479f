"""ranger and clip in campaigns: bounds of the held outputs, guarded outputs never leave
them, and a campaign's outcomes equal a clamped copy of the model run by hand."""

import math

import pytest
import torch
from protect_models import FAULT_COLUMNS, data, flip, hooked, rows, tiny

from flipsafe.inject import Engine
from flipsafe.protect import ranger


def _outputs(model, x):
    seen = {}
    m = hooked(model, {})
    mods = dict(m.named_modules())
    for name in ("0", "3"):
        mods[name].register_forward_hook(lambda mod, i, o, n=name: seen.__setitem__(n, o))
    with torch.no_grad():
        m(x)
    return seen


@pytest.mark.parametrize("per_channel", [False, True])
def test_bounds_are_the_extremes_of_the_held_outputs(per_channel):
    model = tiny()
    x, _ = data(model)
    engine = Engine(model, "bf16")
    bounds = ranger.profile_bounds(engine, ["0", "3"], x.split(7), per_channel=per_channel)
    # The bf16 model by hand: weights and Conv/Linear outputs rounded to bf16.
    bf16 = hooked(model, {n: (lambda o: o.to(torch.bfloat16).float()) for n in ("0", "3")})
    with torch.no_grad():
        for p in bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    out = _outputs(bf16, x)
    for name, dims, shape in (("0", (0, 2, 3), (3, 1, 1)), ("3", (0,), (4,))):
        held = out[name]
        lo, hi = bounds[name]
        if per_channel:
            assert lo.shape == shape and hi.shape == shape
            assert torch.equal(lo.reshape(-1), held.amin(dims))
            assert torch.equal(hi.reshape(-1), held.amax(dims))
        else:
            assert float(lo) == float(held.min()) and float(hi) == float(held.max())


@pytest.mark.parametrize("mode", ["ranger", "clip"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_guarded_outputs_never_leave_the_profiled_range(mode, per_channel):
    model = tiny()
    x, y = data(model)
    engine = Engine(model, "fp32")
    bounds = ranger.profile_bounds(engine, ["0", "3"], [x], per_channel=per_channel)
    engine.set_guards(ranger.guards(bounds, getattr(ranger, f"{mode}_guard")))
    g = torch.Generator().manual_seed(0)
    for name, shape in (("0", (6, 3, 5, 5)), ("3", (6, 4))):
        raw = torch.randn(shape, generator=g) * 1e30
        nans = torch.tensor([0x7FC00000, -0x00400000], dtype=torch.int32).view(torch.float32)
        raw.view(-1)[:2] = nans  # a NaN without and with its sign bit
        raw.view(-1)[2:4] = torch.tensor([math.inf, -math.inf])
        held = engine.held_output(name, raw)
        lo, hi = bounds[name]
        assert torch.isfinite(held).all()
        inside = (held >= lo) & (held <= hi)
        assert inside.all() if mode == "ranger" else (inside | (held == 0)).all()
        assert torch.equal(engine.held_output(name, held), held)  # idempotent
        if mode == "ranger":
            # NaN to the bound on its sign bit's side, infinities to their side.
            flat = held.reshape(-1)
            lo_b, hi_b = lo.expand(shape).reshape(-1), hi.expand(shape).reshape(-1)
            assert flat[0] == hi_b[0] and flat[1] == lo_b[1]
            assert flat[2] == hi_b[2] and flat[3] == lo_b[3]
        else:
            assert (held.reshape(-1)[:4] == 0).all()
    # And in the engine's own faulty runs: what the layer hands on stays within bounds.
    faults = engine.sample(40, "activations", generator=torch.Generator().manual_seed(1),
                           images=x.shape[0])
    gold = engine.golden(x, y)
    for sv in engine.site_values(faults, gold):
        handed = engine.held_output(sv.layer, sv.faulty)
        lo, hi = bounds[sv.layer]
        ok = (handed >= lo) & (handed <= hi)
        assert (ok if mode == "ranger" else ok | (handed == 0)).all()


def _clamp_by_hand(lo, hi, fault=None, mode="ranger"):
    def fn(out):
        out = out.clone()
        if fault is not None:
            img, index, bits = fault
            row = out[img].reshape(-1)
            row[index] = flip(row[index], bits)
        if mode == "clip":
            return torch.where((out >= lo) & (out <= hi), out, torch.zeros(()))
        nan = torch.isnan(out)
        side = torch.where(torch.signbit(out), lo, hi)
        out = torch.where(nan, side, out.clamp(lo, hi))
        return out
    return fn


@pytest.mark.parametrize("mode", ["ranger", "clip"])
def test_a_ranger_campaign_equals_the_clamped_model_run_by_hand(tmp_path, mode):
    model = tiny()
    xy = data(model)
    x = xy[0]
    bare = rows(model, xy, tmp_path / "bare", n=40)
    prot = rows(model, xy, tmp_path / "r", protect=mode, n=40)
    for c in FAULT_COLUMNS:  # the same faults, replayed
        assert bare.column(c).to_pylist() == prot.column(c).to_pylist(), c
    # Bounds by hand: no training split given, so profiled on the evaluation images.
    out = _outputs(model, x)
    lim = {n: (out[n].min(), out[n].max()) for n in ("0", "3")}
    layer = prot.column("layer").to_pylist()
    index = prot.column("index").to_pylist()
    image = prot.column("image_id").to_pylist()
    bits = prot.column("bits").to_pylist()
    top1 = prot.column("faulty_top1").to_pylist()
    gtop1 = prot.column("golden_top1").to_pylist()
    clean = hooked(model, {n: _clamp_by_hand(*lim[n], mode=mode) for n in lim})
    with torch.no_grad():
        assert gtop1 == clean(x).argmax(1)[torch.tensor(image)].tolist()
    checked = 0
    for i in range(0, len(layer), 4):
        hooks = {n: _clamp_by_hand(*lim[n], (image[i], index[i], bits[i]) if n == layer[i]
                                   else None, mode) for n in lim}
        with torch.no_grad():
            logits = hooked(model, hooks)(x)[image[i]]
        top2 = logits.topk(2).values
        if float(top2[0] - top2[1]) > 1e-4:
            assert top1[i] == int(logits.argmax()), i
            checked += 1
    assert checked >= 10
