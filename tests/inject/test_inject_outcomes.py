"""Outcome columns against a plain per-row computation, NaN and Inf included."""

import math

import torch
from inject_reference import outcome

from flipsafe.metrics.outcomes import FIELDS, GoldenOutcomes, Outcomes, compute_outcomes


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
