"""Guards (what ranger/clip build on) and site values, against a model run by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F
from inject_reference import TinyNet

from flipsafe.errors import ConfigError, UnknownNameError
from flipsafe.inject import Engine


def data(n=8, side=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(classes, (n,), generator=g)


def limits(engine, images):
    """Half of each conv/linear/norm layer's profiled range: guards that bite clean runs."""
    ranges = engine.profile(images)
    return {n: 0.5 * ranges[n] for n in engine.sites("activations")
            if engine.kinds[n] in ("conv", "linear", "norm")}


def clamp_guards(lim):
    return {n: (lambda x, c=c: x.clamp(-c, c)) for n, c in lim.items()}


def by_hand(model, lim, images, fault=None):
    """Logits of `model` whose layers in `lim` clamp their outputs to +-lim, with
    `fault` = (layer, image, flat index, bit) flipping one fp32 output bit first."""
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    handles = []
    for name, c in lim.items():
        def hook(mod, inp, out, name=name, c=c):
            out = out.clone()
            if fault is not None and fault[0] == name:
                _, img, index, bit = fault
                row = out[img].reshape(-1)
                code = row[index:index + 1].view(torch.int32) ^ torch.tensor(
                    [1 << bit], dtype=torch.int64).to(torch.int32)
                row[index] = code.view(torch.float32)[0]
            return out.clamp(-c, c)
        handles.append(mods[name].register_forward_hook(hook))
    with torch.no_grad():
        return m(images)


@pytest.mark.parametrize("suffix", [True, False])
def test_guards_clamp_golden_and_faulty_runs_like_the_model_run_by_hand(suffix):
    model = TinyNet().eval()
    images, labels = data()
    engine = Engine(model, "fp32", suffix=suffix)
    lim = limits(engine, images)
    engine.set_guards(clamp_guards(lim))
    g = engine.golden(images, labels)
    assert torch.allclose(g.logits, by_hand(model, lim, images), rtol=1e-5, atol=1e-6)
    # The guards bite on clean runs: the logits differ from the unguarded model's.
    with torch.no_grad():
        assert not torch.allclose(g.logits, model(images), atol=1e-4)
    faults = engine.sample(60, "activations", generator=torch.Generator().manual_seed(1),
                           images=images.shape[0])
    out = engine.run(faults, images, labels, golden=g)
    bits = faults.bits()
    for i in range(len(faults)):
        f = (faults.layer_names[i], int(faults.image[i]), int(faults.index[i]), bits[i][0])
        want = by_hand(model, lim, images, f)[f[1]]
        assert int(out.faulty_top1[i]) == int(want.argmax()) or \
            float(want.topk(2).values.diff().abs()) < 1e-4
        loss = F.cross_entropy(want[None], labels[f[1]][None])
        assert torch.isclose(out.faulty_loss[i], loss, rtol=1e-4, atol=1e-5), i


def test_removing_guards_gives_the_unguarded_outcomes_back():
    model = TinyNet().eval()
    images, labels = data()
    plain = Engine(model, "bf16")
    plain.profile(images)
    guarded = Engine(model, "bf16", guards=None)
    lim = limits(guarded, images)
    faults = plain.sample(40, "activations", generator=torch.Generator().manual_seed(2),
                          images=images.shape[0])
    guarded.set_guards(clamp_guards(lim))
    a = guarded.run(faults, images, labels)
    guarded.set_guards(None)
    b = guarded.run(faults, images, labels)
    c = plain.run(faults, images, labels)
    assert torch.equal(b.faulty_top1, c.faulty_top1)
    assert torch.allclose(b.faulty_loss, c.faulty_loss, equal_nan=True)
    assert not torch.allclose(a.golden_loss, c.golden_loss)


def test_bad_guards_are_refused():
    engine = Engine(TinyNet(), "fp32", input_shape=(3, 8, 8))
    with pytest.raises(UnknownNameError):
        engine.set_guards({"nope": lambda x: x})
    with pytest.raises(ConfigError):
        engine.set_guards({"conv1": 3.0})


@pytest.mark.parametrize("site", ["activations", "weights"])
def test_site_values_are_the_layer_computed_by_hand(site):
    model = TinyNet().eval()
    images, labels = data()
    engine = Engine(model, "fp32")
    engine.set_guards(clamp_guards(limits(engine, images)))
    g = engine.golden(images, labels)
    faults = engine.sample(30, site, generator=torch.Generator().manual_seed(3),
                           images=images.shape[0])
    seen = 0
    mods = dict(model.named_modules())
    for sv in engine.site_values(faults, g, chunk=7):
        mod = mods[sv.layer]
        with torch.no_grad():
            assert torch.equal(mod(*sv.inputs), sv.golden)
        for j, row in enumerate(sv.rows.tolist()):
            bit = faults.bits()[row][0]
            index = int(faults.index[row])
            if site == "activations":
                want = sv.golden[j].clone().reshape(-1)
                want[index] = (want[index:index + 1].view(torch.int32)
                               ^ (1 << bit)).view(torch.float32)[0]
                want = want.reshape(sv.golden[j].shape)
            else:
                w = mod.weight.detach().clone().reshape(-1)
                w[index] = (w[index:index + 1].view(torch.int32) ^ (1 << bit)).view(
                    torch.float32)[0]
                m2 = copy.deepcopy(mod)
                m2.weight.data = w.reshape(mod.weight.shape)
                with torch.no_grad():
                    want = m2(*(a[j:j + 1] for a in sv.inputs))[0]
            got = sv.faulty[j]
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            ok = ~torch.isnan(want)
            assert torch.allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6), (sv.layer, row)
            seen += 1
    assert seen == len(faults)
