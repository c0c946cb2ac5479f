"""Per-injection outcomes from golden and faulty logits: top-1, SDC, DUE, loss, top2diff."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

FIELDS = ("golden_top1", "faulty_top1", "sdc", "due", "golden_loss", "faulty_loss",
          "delta_loss", "golden_top2diff", "faulty_top2diff", "nonfinite", "ran")


@dataclass
class Outcomes:
    """Outcome columns, one entry per injection (tensors of equal shape).

    - golden/faulty_top1: argmax of the logits, NaN ignored (first index on ties; 0 if
      every logit is NaN);
    - sdc: the faulty top-1 differs from the golden top-1 and the run is not a DUE;
    - due: some faulty logit is NaN or +-Inf (detectable, counted, never dropped);
    - golden/faulty_loss: cross-entropy with the label (torch's: NaN when a logit is NaN
      or +Inf); delta_loss = |faulty - golden|;
    - golden/faulty_top2diff: 100 * (softmax top-1 - top-2), NaN for non-finite logits;
    - nonfinite: a corrupted value was NaN/Inf before any clamping;
    - ran: a forward pass computed the outcome (False: decided without one, exactly, e.g.
      a fault that left the stored code unchanged or whose change provably cannot reach
      the logits, or the closed-form classifier analysis).
    """

    golden_top1: torch.Tensor
    faulty_top1: torch.Tensor
    sdc: torch.Tensor
    due: torch.Tensor
    golden_loss: torch.Tensor
    faulty_loss: torch.Tensor
    delta_loss: torch.Tensor
    golden_top2diff: torch.Tensor
    faulty_top2diff: torch.Tensor
    nonfinite: torch.Tensor
    ran: torch.Tensor

    def __len__(self) -> int:
        return self.sdc.shape[0] if self.sdc.dim() else 1

    def select(self, idx) -> Outcomes:
        return Outcomes(**{f: getattr(self, f)[idx] for f in FIELDS})

    def flatten(self) -> Outcomes:
        """Every column broadcast to the common shape and flattened."""
        shape = torch.broadcast_shapes(*(getattr(self, f).shape for f in FIELDS))
        return Outcomes(**{f: getattr(self, f).expand(shape).reshape(-1) for f in FIELDS})

    @staticmethod
    def cat(parts) -> Outcomes:
        return Outcomes(**{f: torch.cat([getattr(p, f) for p in parts]) for f in FIELDS})

    def to(self, device) -> Outcomes:
        return Outcomes(**{f: getattr(self, f).to(device) for f in FIELDS})

    def to_dict(self) -> dict[str, np.ndarray]:
        flat = self.flatten()
        return {f: getattr(flat, f).cpu().numpy() for f in FIELDS}


assert tuple(f.name for f in fields(Outcomes)) == FIELDS


def top1(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim with NaN ignored (torch.argmax would pick the NaN)."""
    return torch.where(torch.isnan(logits), float("-inf"), logits).argmax(-1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy as torch computes it: NaN if any logit is NaN or +Inf, +Inf if
    the label's logit alone is -Inf."""
    return F.cross_entropy(logits, labels, reduction="none")


def top2diff(logits: torch.Tensor) -> torch.Tensor:
    """100 * (largest - second largest softmax probability); NaN if any logit is not finite."""
    if logits.shape[-1] < 2:
        return torch.full(logits.shape[:-1], 100.0, device=logits.device)
    p = torch.softmax(logits, -1).topk(2, -1).values
    diff = (p[..., 0] - p[..., 1]) * 100.0
    return torch.where(torch.isfinite(logits).all(-1), diff, float("nan"))


@dataclass
class GoldenOutcomes:
    """Golden outcome columns for a batch of images (one entry per image)."""

    top1: torch.Tensor
    loss: torch.Tensor
    top2diff: torch.Tensor
    due: torch.Tensor

    @staticmethod
    def of(logits: torch.Tensor, labels: torch.Tensor) -> GoldenOutcomes:
        logits = logits.float()
        return GoldenOutcomes(top1(logits), cross_entropy(logits, labels), top2diff(logits),
                      ~torch.isfinite(logits).all(-1))

    def select(self, idx) -> GoldenOutcomes:
        return GoldenOutcomes(self.top1[idx], self.loss[idx], self.top2diff[idx], self.due[idx])


def compute_outcomes(golden: GoldenOutcomes, faulty_logits: torch.Tensor, labels: torch.Tensor,
            nonfinite: torch.Tensor | None = None) -> Outcomes:
    """Outcomes of faulty logits [n, C] against the golden columns of their images [n]."""
    faulty_logits = faulty_logits.float()
    f_top1 = top1(faulty_logits)
    due = ~torch.isfinite(faulty_logits).all(-1)
    f_loss = cross_entropy(faulty_logits, labels)
    if nonfinite is None:
        nonfinite = torch.zeros_like(due)
    return Outcomes(
        golden_top1=golden.top1,
        faulty_top1=f_top1,
        sdc=(f_top1 != golden.top1) & ~due,
        due=due,
        golden_loss=golden.loss,
        faulty_loss=f_loss,
        delta_loss=(f_loss - golden.loss).abs(),
        golden_top2diff=golden.top2diff,
        faulty_top2diff=top2diff(faulty_logits),
        nonfinite=nonfinite.bool(),
        ran=torch.ones_like(due),
    )


def column_outcomes(v: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                    gold: GoldenOutcomes) -> dict[str, torch.Tensor]:
    """The faulty columns of compute_outcomes in closed form, for many faults at once.

    v [b, k, C] holds faulty scores of b images: v[i, j, c] is class c's score with every
    other class at its golden score `logits[i]` [b, C] (what one fault in a classifier
    weight of class c does). Returns faulty_top1, sdc, due, faulty_loss, delta_loss and
    faulty_top2diff [b, k, C], each as compute_outcomes gives it for that full row, from
    the two best other classes and the sum of their exponentials (no row is built)."""
    b, _, C = v.shape
    dev = v.device
    eye = torch.eye(C, dtype=torch.bool, device=dev)
    others = logits[:, None, :].expand(b, C, C).masked_fill(eye, float("-inf"))
    others = torch.where(torch.isnan(others), float("-inf"), others)
    idx1 = others.argmax(-1)  # best other class (first on ties)
    m1 = others.gather(-1, idx1[..., None])
    m2 = others.scatter(-1, idx1[..., None], float("-inf")).amax(-1)
    m1 = m1[..., 0]
    s = torch.exp(others - m1[..., None]).sum(-1)
    m1, m2, s, idx1 = (t[:, None, :] for t in (m1, m2, s, idx1))
    cls = torch.arange(C, device=dev)
    due = ~torch.isfinite(v) | gold.due[:, None, None]
    top1 = torch.where((v > m1) | ((v == m1) & (cls < idx1)), cls, idx1)
    big = torch.maximum(m1, v)
    lse = big + torch.log(s * torch.exp(m1 - big) + torch.exp(v - big))
    label_score = logits.gather(1, labels[:, None])[:, :, None]
    label_score = torch.where(cls == labels[:, None, None], v, label_score)
    loss = lse - label_score
    t1 = torch.maximum(v, m1)
    t2 = torch.where(v >= m1, m1, torch.maximum(v, m2))
    diff = (torch.exp(t1 - lse) - torch.exp(t2 - lse)) * 100.0
    diff = torch.where(due, float("nan"), diff)
    return {
        "faulty_top1": top1,
        "sdc": (top1 != gold.top1[:, None, None]) & ~due,
        "due": due,
        "faulty_loss": loss,
        "delta_loss": (loss - gold.loss[:, None, None]).abs(),
        "faulty_top2diff": diff,
    }


def unchanged_outcomes(golden: GoldenOutcomes, nonfinite: torch.Tensor | None = None) -> Outcomes:
    """Outcomes of injections that provably left the logits equal to the golden ones."""
    n = golden.top1.shape
    return Outcomes(
        golden_top1=golden.top1,
        faulty_top1=golden.top1.clone(),
        sdc=torch.zeros(n, dtype=torch.bool, device=golden.top1.device),
        due=golden.due.clone(),
        golden_loss=golden.loss,
        faulty_loss=golden.loss.clone(),
        delta_loss=torch.where(torch.isfinite(golden.loss), 0.0, float("nan")),
        golden_top2diff=golden.top2diff,
        faulty_top2diff=golden.top2diff.clone(),
        nonfinite=(torch.zeros(n, dtype=torch.bool, device=golden.top1.device)
                   if nonfinite is None else nonfinite.bool()),
        ran=torch.zeros(n, dtype=torch.bool, device=golden.top1.device),
    )


__all__ = ["FIELDS", "GoldenOutcomes", "Outcomes", "column_outcomes", "compute_outcomes",
           "cross_entropy", "top1", "top2diff", "unchanged_outcomes"]
