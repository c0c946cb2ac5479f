"""Ranger keeps every protected output within its profiled range, on a copy."""

import pytest
import torch
from torch import nn

from flipsafe.errors import ConfigError
from flipsafe.inject import Engine
from flipsafe.protect import ranger


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _outputs(model, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_outputs_never_leave_the_profiled_range_even_under_huge_faults():
    model = _model()
    x = torch.randn(16, 1, 8, 8)
    ranges = Engine(model).profile(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guarded = ranger.protect(model, ranges)
    # Clean inputs inside the profiled data: the protected model computes the same logits.
    with torch.no_grad():
        assert torch.equal(guarded(x), model(x))
    # Corrupt the copy's weights far beyond anything profiled (and NaN/Inf in some).
    with torch.no_grad():
        guarded[0].weight[0, 0, 0, 0] = 3e38
        guarded[0].weight[1, 0, 1, 1] = float("nan")
        guarded[3].weight[2, 7] = float("-inf")
    out = _outputs(guarded, torch.randn(16, 1, 8, 8) * 100)
    for name in ("0", "3"):
        assert torch.isfinite(out[name]).all()
        assert float(out[name].abs().max()) <= ranges[name]
    # The user's model is untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model[0]._forward_hooks


def test_flops_count_two_per_protected_value_and_bad_selection_is_refused():
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    ranges = Engine(model).profile(x)
    assert ranger.flops(model, ranges, x) == 2 * (4 * 6 * 6 + 5)
    assert ranger.flops(model, ranges, x, select="^3$") == 2 * 5
    with pytest.raises(ConfigError, match="no profiled layer"):
        ranger.protect(model, ranges, select="nothing")
