"""Landmark losses. Inputs are (B, P, 2) coordinates (any unit, typically normalised to [0, 1]) unless
stated; every loss returns the mean over the batch.

- ``l1`` / ``l2``: mean absolute / squared point-coordinate error.
- ``wing`` (Feng et al., CVPR 2018): per coordinate error x, w*ln(1 + |x|/eps) when |x| < w, else |x| - C
  with C = w - w*ln(1 + w/eps) (continuous at |x| = w); defaults w=10, eps=2 in pixels of the input size —
  pass w and eps in the unit of your coordinates.
- ``adaptive_wing`` (Wang et al., ICCV 2019) for heatmaps (B, P, H, W) in [0, 1]:
  A*ln(1 + (|y - y^|/eps)^(alpha - y)) when |y - y^| < theta, else A'|y - y^| - C', with A', C' making it
  continuous and smooth at theta; defaults alpha=2.1, omega=14, eps=1, theta=0.5.
- ``pfld`` (Guo et al., 2019): sum over points of the L2 error weighted by the sum of per-attribute class
  weights and by sum_k (1 - cos(angle error_k)) of the auxiliary head-pose branch (yaw, pitch, roll in
  radians): weight = (sum_c w_c * attr_c) * (base_weight + sum_k (1 - cos(pose_pred_k - pose_gt_k))).
  ``base_weight`` (default 0, the paper's formula) keeps a landmark gradient when the pose is exact.
"""

from __future__ import annotations

import math

import torch


def l1(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return (pred - gt).abs().mean()


def l2(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return ((pred - gt) ** 2).mean()


def wing(pred: torch.Tensor, gt: torch.Tensor, w: float = 10.0, eps: float = 2.0) -> torch.Tensor:
    x = (pred - gt).abs()
    c = w - w * math.log(1 + w / eps)
    return torch.where(x < w, w * torch.log1p(x / eps), x - c).sum(dim=(-1, -2)).mean()


def adaptive_wing(pred: torch.Tensor, gt: torch.Tensor, alpha: float = 2.1, omega: float = 14.0,
                  eps: float = 1.0, theta: float = 0.5) -> torch.Tensor:
    d = (pred - gt).abs()
    p = alpha - gt
    ratio = theta / eps
    a = omega * (1 / (1 + ratio ** p)) * p * ratio ** (p - 1) / eps
    c = theta * a - omega * torch.log1p(ratio ** p)
    small = omega * torch.log1p((d / eps) ** p)
    return torch.where(d < theta, small, a * d - c).mean()


def pfld(pred: torch.Tensor, gt: torch.Tensor, pose_pred: torch.Tensor, pose_gt: torch.Tensor,
         attributes: torch.Tensor | None = None, class_weights: torch.Tensor | None = None,
         base_weight: float = 0.0) -> torch.Tensor:
    angle_weight = base_weight + (1 - torch.cos(pose_pred - pose_gt)).sum(dim=1)  # (B,)
    if attributes is not None:
        cw = class_weights if class_weights is not None else torch.ones(attributes.shape[1], device=pred.device)
        attr_weight = (attributes.float() * cw).sum(dim=1).clamp(min=1.0)
    else:
        attr_weight = torch.ones_like(angle_weight)
    dist = ((pred - gt) ** 2).sum(dim=(-1, -2))
    return (attr_weight * angle_weight * dist).mean()


LANDMARK_LOSSES = {"l1": l1, "l2": l2, "wing": wing, "adaptive_wing": adaptive_wing, "awing": adaptive_wing}
