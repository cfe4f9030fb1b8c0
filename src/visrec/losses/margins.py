"""Margin softmax losses on cosine logits (the arcface_torch convention).

Each module maps ``(cos (B, C), labels (B,))`` to the scaled logits fed to cross-entropy. ``cos`` is the
cosine between L2-normalised embeddings and class centres; angles are in radians. A label of -1 marks a
sample whose class is not among this rank's sampled centres (PartialFC): its row only gets the scale.
All margin arithmetic runs in float32 whatever the autocast dtype, with cos clamped to [-1+eps, 1-eps]
so arccos and its gradient stay finite at theta = 0 and pi.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from visrec.losses import MARGIN_LOSSES

EPS = 1e-7  # cos clamp: keeps d(arccos)/d(cos) finite; moves theta by at most ~5e-4 rad


def _positive_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.nonzero(labels != -1, as_tuple=True)[0]
    return rows, labels[rows]


@MARGIN_LOSSES.register("softmax")
class ScaledSoftmax(nn.Module):
    """Plain normalised softmax: ``s * cos``."""

    def __init__(self, s: float = 64.0):
        super().__init__()
        self.s = s

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cos.float() * self.s


@MARGIN_LOSSES.register("combined", "combined_margin")
class CombinedMargin(nn.Module):
    """``s * (cos(m1*theta + m2) - m3)`` on the target class, ``s * cos`` elsewhere.

    (1, 0.5, 0) is ArcFace, (1, 0, 0.35) CosFace, (m1, 0, 0) SphereFace-style. Every combination is valid:
    when ``m1*theta + m2`` passes pi the target logit would stop decreasing with theta, so it is replaced by
    the monotone extension ``cos(pi) - (m1*theta + m2 - pi) * sin(pi... )``, i.e. the linear continuation
    ``-1 - (m1*theta + m2 - pi)`` (keeps the penalty growing, like the papers' "easy margin" fallback).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0):
        super().__init__()
        if m1 <= 0:
            raise ValueError("m1 must be > 0")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_t.clamp(-1 + EPS, 1 - EPS))
        angle = self.m1 * theta + self.m2
        return torch.where(angle <= math.pi, torch.cos(angle), -1.0 - (angle - math.pi)) - self.m3

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = cos.float().clone()
        rows, cols = _positive_rows(labels)
        if rows.numel():
            logits[rows, cols] = self.target_logit(logits[rows, cols])
        return logits * self.s


@MARGIN_LOSSES.register("arcface")
class ArcFace(CombinedMargin):
    """Additive angular margin: ``s * cos(theta + m)`` on the target (m in radians)."""

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__(s=s, m1=1.0, m2=m, m3=0.0)


@MARGIN_LOSSES.register("cosface")
class CosFace(nn.Module):
    """Additive cosine margin: ``s * (cos(theta) - m)`` on the target."""

    def __init__(self, s: float = 64.0, m: float = 0.4):
        super().__init__()
        self.s, self.m = s, m

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = cos.float().clone()
        rows, cols = _positive_rows(labels)
        logits[rows, cols] -= self.m
        return logits * self.s


@MARGIN_LOSSES.register("arcnegface")
class ArcNegFace(nn.Module):
    """ArcNegFace (Liu et al., "Towards Flops-constrained Face Recognition", LFR'19 winning light entry).

    Target: ``s * cos(theta_y + m)``. Negatives are re-weighted by their closeness to the margin-shifted
    target: ``s * (t * cos(theta_j) + t - 1)`` with ``t = a * exp(-(theta_j - (theta_y + m))^2 / sigma)``,
    so hard negatives (angle near the target's) count more. Vectorised over the batch.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, scale: float = 1.2, sigma: float = 2.0):
        super().__init__()
        self.s, self.m, self.a, self.sigma = s, m, scale, sigma

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.float().clamp(-1 + EPS, 1 - EPS)
        logits = cos * self.s
        rows, cols = _positive_rows(labels)
        if rows.numel() == 0:
            return logits
        theta = torch.acos(cos[rows])  # (P, C)
        theta_y = theta.gather(1, cols[:, None])  # (P, 1)
        target_angle = (theta_y + self.m).clamp(max=math.pi)
        t = self.a * torch.exp(-(theta - target_angle) ** 2 / self.sigma)
        neg = self.s * (t * cos[rows] + t - 1)
        pos = self.s * torch.cos(target_angle)
        neg = neg.scatter(1, cols[:, None], pos)
        logits = logits.index_put((rows,), neg)
        return logits


@MARGIN_LOSSES.register("curricularface")
class CurricularFace(nn.Module):
    """CurricularFace (Huang et al. 2020): ArcFace target; hard negatives (cos_j > cos(theta_y + m)) become
    ``cos_j * (t + cos_j)`` where ``t`` is an EMA (momentum 0.99) of the mean target cosine."""

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.99):
        super().__init__()
        self.s, self.m, self.momentum = s, m, momentum
        self.register_buffer("t", torch.zeros(1))

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.float().clamp(-1 + EPS, 1 - EPS)
        logits = cos.clone()
        rows, cols = _positive_rows(labels)
        if rows.numel() == 0:
            return logits * self.s
        cos_y = cos[rows, cols]
        theta = torch.acos(cos_y)
        angle = theta + self.m
        target = torch.where(angle <= math.pi, torch.cos(angle), -1.0 - (angle - math.pi))
        if self.training:
            with torch.no_grad():
                self.t.mul_(self.momentum).add_((1 - self.momentum) * cos_y.mean())
        sub = cos[rows]
        hard = sub > target[:, None]
        sub = torch.where(hard, sub * (self.t + sub), sub)
        sub = sub.scatter(1, cols[:, None], target[:, None])
        logits = logits.index_put((rows,), sub)
        return logits * self.s
