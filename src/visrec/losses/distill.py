"""Knowledge-distillation losses between a student's and a frozen teacher's face embeddings.

Every loss is an ``nn.Module`` called as ``loss(student (B, Ds), teacher (B, Dt), centres=None)`` and returns
a scalar (mean over the batch). The teacher input is always detached: gradients reach the student (and the
loss's own projector) only. Embeddings are L2-normalised inside each loss, so raw backbone outputs go in.
When ``Ds != Dt`` a loss that compares vectors owns a learnable ``nn.Linear(Ds, Dt, bias=False)`` projector
(``self.projector``; ``nn.Identity`` when the dimensions agree) which must be optimised and checkpointed
with the student. A new loss is one class here plus one ``@DISTILL_LOSSES.register("name")`` line.

  feature     FeatureDistill    cosine: mean(1 - cos(s, t)) in [0, 2]; l2: mean ||s/|s| - t/|t| ||^2 =
                                2 * mean(1 - cos) in [0, 4] (squared distance between unit vectors).
  logits      LogitDistill      T^2 * KL(p_t || p_s), p = softmax(scale * cos(x, centres) / T) over shared
                                class centres (nats per sample).
  relational  RelationalDistill mean over off-diagonal pairs (i != j) of the error between the students'
                                and the teacher's pairwise cosine matrices (MSE or smooth L1, in cos units).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from visrec.registry import Registry

DISTILL_LOSSES: Registry = Registry("distillation loss")


def make_projector(student_dim: int, teacher_dim: int) -> nn.Module:
    """``nn.Linear(student_dim, teacher_dim, bias=False)`` when the dimensions differ, else identity."""
    if student_dim == teacher_dim:
        return nn.Identity()
    return nn.Linear(student_dim, teacher_dim, bias=False)


@DISTILL_LOSSES.register("feature")
class FeatureDistill(nn.Module):
    """Pull each student embedding (projected to the teacher's space when needed) onto its teacher's.

    ``kind="cosine"``: mean over the batch of ``1 - cos(s, t)`` (0 when aligned, 2 when opposite).
    ``kind="l2"``: mean over the batch of the squared Euclidean distance between the L2-normalised
    embeddings, ``||s_hat - t_hat||^2 = 2 (1 - cos)`` (the per-sample sum, not a per-element mean).
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: Literal["cosine", "l2"] = "cosine"):
        super().__init__()
        if kind not in ("cosine", "l2"):
            raise ValueError(f"kind must be 'cosine' or 'l2', got {kind!r}")
        self.kind = kind
        self.projector = make_projector(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, centres=None) -> torch.Tensor:
        s = F.normalize(self.projector(student.float()), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        if self.kind == "cosine":
            return (1.0 - (s * t).sum(dim=1)).mean()
        return (s - t).pow(2).sum(dim=1).mean()


@DISTILL_LOSSES.register("logits")
class LogitDistill(nn.Module):
    """Hinton's soft-target loss on shared class centres: ``T^2 * KL(p_t || p_s)`` averaged over the batch.

    Both embeddings (the student projected to the centres' dimension when needed) are scored against the
    SAME L2-normalised centres (C, Dt): logits ``z = scale * cos(x, centres)``, ``p = softmax(z / T)``. The
    centres are passed at call time (the teacher's PartialFC centres, or the student's own head detached)
    and receive no gradient. Units: nats per sample, scaled by T^2 so the gradient magnitude does not shrink
    with the temperature.
    """

    def __init__(self, student_dim: int, teacher_dim: int, temperature: float = 4.0, scale: float = 64.0):
        super().__init__()
        if temperature <= 0 or scale <= 0:
            raise ValueError("temperature and scale must be > 0")
        self.temperature, self.scale = float(temperature), float(scale)
        self.projector = make_projector(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, centres: torch.Tensor | None = None):
        if centres is None:
            raise ValueError("LogitDistill needs the shared class centres (C, D)")
        w = F.normalize(centres.detach().float(), dim=1)
        s = F.normalize(self.projector(student.float()), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        if s.shape[1] != w.shape[1]:
            raise ValueError(f"centres have dimension {w.shape[1]}, embeddings {s.shape[1]}")
        T = self.temperature
        log_ps = F.log_softmax(self.scale * (s @ w.T) / T, dim=1)
        log_pt = F.log_softmax(self.scale * (t @ w.T) / T, dim=1)
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * T * T


@DISTILL_LOSSES.register("relational")
class RelationalDistill(nn.Module):
    """Angular/relational KD: match the batch's pairwise cosine-similarity matrices.

    ``S_ij = cos(s_i, s_j)``, ``T_ij = cos(t_i, t_j)``; the loss is the mean over the B(B-1) off-diagonal
    entries of ``(S_ij - T_ij)^2`` (``kind="mse"``) or smooth-L1(S_ij - T_ij, beta) (``"smooth_l1"``).
    Dimension-free (each side's own cosines), so no projector. A batch of one gives 0.
    """

    def __init__(self, student_dim: int = 0, teacher_dim: int = 0, kind: Literal["mse", "smooth_l1"] = "mse",
                 beta: float = 0.1):
        super().__init__()
        if kind not in ("mse", "smooth_l1"):
            raise ValueError(f"kind must be 'mse' or 'smooth_l1', got {kind!r}")
        self.kind, self.beta = kind, float(beta)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, centres=None) -> torch.Tensor:
        s = F.normalize(student.float(), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        b = s.shape[0]
        if b < 2:
            return s.sum() * 0.0
        off = ~torch.eye(b, dtype=torch.bool, device=s.device)
        diff_s, diff_t = (s @ s.T)[off], (t @ t.T)[off]
        if self.kind == "mse":
            return F.mse_loss(diff_s, diff_t)
        return F.smooth_l1_loss(diff_s, diff_t, beta=self.beta)


class DistillLosses(nn.Module):
    """The weighted sum of several distillation losses; holds their projectors (one checkpointable module).

    ``terms``: {registry name: (weight, kwargs)}; terms with weight 0 are not built. ``forward`` returns
    ``(total, {name: unweighted value})``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, terms: dict[str, tuple[float, dict]]):
        super().__init__()
        self.weights = {n: float(w) for n, (w, _) in terms.items() if w > 0}
        self.losses = nn.ModuleDict({
            n: DISTILL_LOSSES.build(n, student_dim=student_dim, teacher_dim=teacher_dim, **kw)
            for n, (w, kw) in terms.items() if w > 0})

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, centres: torch.Tensor | None = None):
        values = {n: loss(student, teacher, centres) for n, loss in self.losses.items()}
        total = sum((self.weights[n] * v for n, v in values.items()), student.new_zeros((), dtype=torch.float32))
        return total, values
