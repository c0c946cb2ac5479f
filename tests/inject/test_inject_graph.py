"""Suffix programs compute only the rows that matter, with the full path's outcomes: the
one row the classifier reads (a ViT's class token) and the one row (token) a fault changes,
up to the next node that mixes rows."""

import pytest
import torch
from test_inject_engine import assert_same_outcomes, format_tolerance
from torch import nn

from flipsafe.faults import FaultSet
from flipsafe.inject import Engine


class TokenNet(nn.Module):
    """Patch tokens, a per-token residual Linear, one token-mixing Linear, then a per-token
    MLP and the class token (token 0) read by the head, as in a ViT's last layer."""

    def __init__(self, tokens=16, dim=8):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.pre = nn.Linear(dim, dim)
        self.mix = nn.Linear(tokens, tokens)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))  # [B, 16, 8]
        t = t + self.pre(self.act(t))
        h = t + self.mix(t.transpose(1, 2).contiguous()).transpose(1, 2).contiguous()
        h = h + self.fc2(self.act(self.fc1(self.norm(h))))
        return self.head(h[:, 0])


def data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(5, (n,), generator=g)


def token_engine():
    """TokenNet (seeded), six images, an fp32 engine on it and their golden run."""
    torch.manual_seed(0)
    model = TokenNet().eval()
    x, y = data()
    engine = Engine(model, "fp32", chunk=4)
    return model, x, y, engine, engine.golden(x, y)


def shapes_seen(engine, name):
    seen = []
    dict(engine.model.named_modules())[name].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape))
    return seen


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_one_row_tail_equals_the_full_path(fmt):
    torch.manual_seed(0)
    model = TokenNet().eval()
    x, y = data()
    fast = Engine(model, fmt, chunk=4)
    ranges = fast.profile(x)
    full = Engine(model, fmt, ranges=ranges, suffix=False)
    gen = torch.Generator().manual_seed(1)
    faults = FaultSet.cat([fast.sample(48, s, "all", m, images=6, generator=gen)
                           for s in ("activations", "weights") for m in ("bitflip", "random")])
    a, b = fast.run(faults, x, y), full.run(faults, x, y)
    assert_same_outcomes(a, b, tol=format_tolerance(fast.fmt))
    assert (a.delta_loss.abs() > 1e-6).sum() >= len(faults) // 8


def test_suffix_runs_compute_only_the_token_the_head_reads():
    _, x, y, engine, g = token_engine()
    seen = shapes_seen(engine, "fc2")
    # Faults in the token mixer's output change every token after it; fc2 sees token 0.
    faults = engine.sample(8, "activations", "mix", "bitflip", images=6,
                           generator=torch.Generator().manual_seed(2))
    engine.run(faults, x, y, g)
    assert seen and all(s[1] == 1 for s in seen)


def test_faults_off_the_token_the_head_reads_change_nothing():
    _, x, y, engine, g = token_engine()
    # fc1's output [16 tokens, 16]: index 16 * token + feature.
    index = torch.tensor([16 * 3 + 2, 16 * 15 + 0, 16 * 0 + 5, 16 * 7 + 9])
    faults = FaultSet(["fc1"], layer=0, index=index, mask=1 << 30, image=torch.arange(4))
    out = engine.run(faults, x, y, g)
    off = torch.tensor([True, True, False, True])
    assert torch.equal(out.faulty_loss[off], out.golden_loss[off])
    assert torch.equal(out.faulty_top1[off], out.golden_top1[off])
    assert float(out.delta_loss[2].abs()) > 0  # exponent flip on the class token


def test_a_fault_in_one_token_is_followed_on_that_token_up_to_the_mixer():
    model, x, y, engine, g = token_engine()
    pre, mix = shapes_seen(engine, "pre"), shapes_seen(engine, "mix")
    faults = engine.sample(8, "activations", "embed", "bitflip", images=6,
                           generator=torch.Generator().manual_seed(3))
    out = engine.run(faults, x, y, g)
    # pre runs on each fault's token (rows padded to 16); the mixer on whole images.
    assert pre and all(s[1:] == (1, 8) for s in pre)
    assert mix and all(s[1:] == (8, 16) for s in mix)
    full = Engine(model, "fp32", suffix=False).run(faults, x, y)
    assert_same_outcomes(out, full)
    # A weight fault changes every token: pre sees whole images.
    pre.clear()
    weights = engine.sample(4, "weights", "embed", "bitflip", images=6,
                            generator=torch.Generator().manual_seed(4))
    engine.run(weights, x, y, g)
    assert pre and all(s[1:] == (16, 8) for s in pre)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_weight_faults_on_every_image_leave_the_golden_cache_intact(fmt):
    """Faults on images 0..B-1 read the cached values in place (no gather): the suffix
    runs must not write into them, and outcomes equal the full path's."""
    torch.manual_seed(0)
    model = TokenNet().eval()
    x, y = data()
    engine = Engine(model, fmt, chunk=6)
    ranges = engine.profile(x)
    base = engine.sample(6, "weights", "all", "bitflip", images=1,
                         generator=torch.Generator().manual_seed(5))
    faults = base.select(torch.arange(6).repeat_interleave(6))
    faults = faults.with_image(torch.arange(6).repeat(6))
    g = engine.golden(x, y)
    before = {n: v.clone() for n, v in g.nodes.items() if isinstance(v, torch.Tensor)}
    out = engine.run(faults, x, y, g)
    assert all(torch.equal(g.nodes[n], v) for n, v in before.items())
    full = Engine(model, fmt, ranges=ranges, suffix=False).run(faults, x, y)
    assert_same_outcomes(out, full, tol=format_tolerance(engine.fmt))
