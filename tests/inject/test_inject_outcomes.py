"""Outcome columns against a plain per-row computation, NaN and Inf included."""

import math

import torch
from inject_reference import outcome

from flipsafe.metrics.outcomes import (
    FIELDS,
    GoldenOutcomes,
    Outcomes,
    column_outcomes,
    compute_outcomes,
)


def test_outcomes_match_plain_computation():
    g = torch.Generator().manual_seed(0)
    golden = torch.randn(40, 5, generator=g)
    faulty = golden + torch.randn(40, 5, generator=g) * torch.rand(40, 1, generator=g) * 3
    faulty[3, 1] = float("nan")
    faulty[4, 2] = float("inf")
    faulty[5, 0] = float("-inf")
    faulty[6] = float("nan")
    faulty[7, 3] = faulty[7].max()  # a tie: the first index wins
    labels = torch.randint(5, (40,), generator=g)
    out = compute_outcomes(GoldenOutcomes.of(golden, labels), faulty, labels)
    for i in range(40):
        e = outcome(faulty[i:i + 1], int(labels[i]))
        gold = outcome(golden[i:i + 1], int(labels[i]))
        assert out.faulty_top1[i] == e["top1"] and out.golden_top1[i] == gold["top1"]
        assert bool(out.due[i]) == e["due"]
        assert bool(out.sdc[i]) == (e["top1"] != gold["top1"] and not e["due"])
        for got, want in ((out.faulty_loss[i], e["loss"]), (out.golden_loss[i], gold["loss"]),
                          (out.faulty_top2diff[i], e["top2diff"]),
                          (out.golden_top2diff[i], gold["top2diff"])):
            got = float(got)
            if math.isnan(want) or math.isinf(want):
                assert got == want or (math.isnan(got) and math.isnan(want))
            else:
                assert abs(got - want) <= 1e-4 * (1 + abs(want))
        d = float(out.delta_loss[i])
        want = abs(e["loss"] - gold["loss"])
        assert (math.isnan(d) and math.isnan(want)) or abs(d - want) <= 1e-4 * (1 + want)
    assert out.due[[3, 4, 5, 6]].all() and not out.due[:3].any()


def test_outcome_containers():
    cols = {f: torch.arange(6).reshape(2, 3) for f in FIELDS}
    cols["golden_top1"] = torch.tensor([[7], [8]])
    o = Outcomes(**cols)
    flat = o.flatten()
    assert flat.golden_top1.tolist() == [7, 7, 7, 8, 8, 8]
    assert flat.sdc.tolist() == list(range(6))
    both = Outcomes.cat([flat, flat.select(slice(0, 2))])
    assert len(both) == 8
    d = o.to_dict()
    assert set(d) == set(FIELDS) and d["golden_top1"].shape == (6,)


def test_closed_form_column_outcomes_agree_with_compute_outcomes_on_the_full_rows():
    """column_outcomes (one class score changed, the others golden) gives what
    compute_outcomes gives for the same logits built as full rows: ties, NaN and Inf too."""
    g = torch.Generator().manual_seed(1)
    b, k, C = 6, 4, 5
    logits = torch.randn(b, C, generator=g) * 3
    labels = torch.randint(C, (b,), generator=g)
    v = logits[:, None, :] + torch.randn(b, k, C, generator=g) * 4
    v[0, 0, 1], v[1, 1, 2], v[2, 2, 3] = float("nan"), float("inf"), float("-inf")
    v[3, 3] = logits[3].max()  # ties with the best class: the first index wins
    v[4, 0] = logits[4].min() - 1  # below every other class
    gold = GoldenOutcomes.of(logits, labels)
    cols = column_outcomes(v, logits, labels, gold)
    rows = logits[:, None, None, :].expand(b, k, C, C).clone()
    cls = torch.arange(C)
    rows[:, :, cls, cls] = v
    img = torch.arange(b).repeat_interleave(k * C)
    full = compute_outcomes(gold.select(img), rows.reshape(-1, C), labels[img])
    for f, got in cols.items():
        want = getattr(full, f).reshape(b, k, C)
        if got.dtype.is_floating_point:
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True), f
        else:
            assert torch.equal(got, want), f
    assert cols["due"][[0, 1, 2], [0, 1, 2], [1, 2, 3]].all()
