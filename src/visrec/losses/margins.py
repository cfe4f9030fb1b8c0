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

# The options' ranges a config is checked against (``visrec.losses.margin_option_problem``; docs/training.md):
# (low, high, low excluded). s: the logit scale; angular margins in radians, up to a right angle (ArcFace
# uses 0.5); cosine margins in cosine units, up to 1 (CosFace uses 0.35-0.4).
SCALE = (0.0, 1024.0, True)
ANGLE = (0.0, math.pi / 2, False)
COSINE = (0.0, 1.0, False)


def _target(cos: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid rows mask, column index per row, target cosine per row) without a host sync: rows with
    label -1 point at column 0 and are masked out where results are written back."""
    valid = labels >= 0
    col = labels.clamp(min=0)[:, None]
    return valid, col, cos.gather(1, col)[:, 0]


def _put_target(logits: torch.Tensor, valid: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Write each valid row's target logit; rows with label -1 keep their column-0 value."""
    keep = logits.gather(1, col)[:, 0]
    return logits.scatter(1, col, torch.where(valid, value, keep)[:, None])


@MARGIN_LOSSES.register("softmax")
class ScaledSoftmax(nn.Module):
    """Plain normalised softmax: ``s * cos``."""

    OPTION_RANGES = {"s": SCALE}

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

    OPTION_RANGES = {"s": SCALE, "m1": (0.0, 10.0, True), "m2": ANGLE, "m3": COSINE}

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
        logits = cos.float()
        valid, col, target = _target(logits, labels)
        return _put_target(logits, valid, col, self.target_logit(target)) * self.s


@MARGIN_LOSSES.register("arcface")
class ArcFace(CombinedMargin):
    """Additive angular margin: ``s * cos(theta + m)`` on the target (m in radians)."""

    OPTION_RANGES = {"s": SCALE, "m": ANGLE}

    def __init__(self, s: float = 64.0, m: float = 0.5):
        super().__init__(s=s, m1=1.0, m2=m, m3=0.0)


@MARGIN_LOSSES.register("cosface")
class CosFace(nn.Module):
    """Additive cosine margin: ``s * (cos(theta) - m)`` on the target."""

    OPTION_RANGES = {"s": SCALE, "m": COSINE}

    def __init__(self, s: float = 64.0, m: float = 0.4):
        super().__init__()
        self.s, self.m = s, m

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = cos.float()
        valid, col, target = _target(logits, labels)
        return _put_target(logits, valid, col, target - self.m) * self.s


@MARGIN_LOSSES.register("arcnegface")
class ArcNegFace(nn.Module):
    """ArcNegFace (Liu et al., "Towards Flops-constrained Face Recognition", arXiv:1909.00632, the LFR'19
    light-track winner). Target: ``s * A_y`` with ``A_y = cos(theta_y + m)`` (the monotone extension
    ``cos(theta_y) - m*sin(m)`` once theta_y > pi - m). Each negative j is re-weighted by its closeness to
    the margin-shifted target, measured in cosines: ``s * (t_j * cos(theta_j) + t_j - 1)`` with
    ``t_j = a * exp(-(cos(theta_j) - A_y)^2 / sigma)``, t_j treated as a constant (no gradient), so hard
    negatives (cosine near the target's) count more. Vectorised over the batch.
    Sharding note: a row whose class lives on another rank (label -1) is left as ``s * cos``, so under
    PartialFC with several ranks the re-weighting applies on the owner rank only.
    """

    OPTION_RANGES = {"s": SCALE, "m": ANGLE, "scale": (0.0, 10.0, True), "sigma": (0.0, 100.0, True)}

    def __init__(self, s: float = 64.0, m: float = 0.5, scale: float = 1.2, sigma: float = 2.0):
        super().__init__()
        self.s, self.m, self.a, self.sigma = s, m, scale, sigma

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.float().clamp(-1 + EPS, 1 - EPS)
        valid, col, target = _target(cos, labels)
        theta_y = torch.acos(target)
        a_y = torch.where(theta_y + self.m <= math.pi, torch.cos(theta_y + self.m),
                          target - self.m * math.sin(self.m))[:, None]  # (B, 1)
        t = (self.a * torch.exp(-(cos - a_y) ** 2 / self.sigma)).detach()
        reweighted = self.s * (t * cos + t - 1)
        reweighted = reweighted.scatter(1, col, self.s * a_y)
        return torch.where(valid[:, None], reweighted, cos * self.s)


@MARGIN_LOSSES.register("curricularface")
class CurricularFace(nn.Module):
    """CurricularFace (Huang et al. 2020): ArcFace target; hard negatives (cos_j > cos(theta_y + m)) become
    ``cos_j * (t + cos_j)`` where ``t`` is an EMA (momentum 0.99) of the mean target cosine."""

    OPTION_RANGES = {"s": SCALE, "m": ANGLE, "momentum": COSINE}

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.99):
        super().__init__()
        self.s, self.m, self.momentum = s, m, momentum
        self.register_buffer("t", torch.zeros(1))

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.float().clamp(-1 + EPS, 1 - EPS)
        valid, col, cos_y = _target(cos, labels)
        angle = torch.acos(cos_y) + self.m
        target = torch.where(angle <= math.pi, torch.cos(angle), -1.0 - (angle - math.pi))
        if self.training:
            with torch.no_grad():
                n = valid.sum().clamp(min=1)
                mean_target = (cos_y * valid).sum() / n
                # rows of other ranks' classes (label -1) do not move t
                self.t.copy_(torch.where(valid.any(), self.t * self.momentum + (1 - self.momentum) * mean_target,
                                         self.t))
        hard = cos > target[:, None]
        out = torch.where(hard, cos * (self.t + cos), cos).scatter(1, col, target[:, None])
        return torch.where(valid[:, None], out, cos) * self.s
