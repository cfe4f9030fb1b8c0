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
from dataclasses import dataclass
from typing import Any

import torch

from visrec.errors import ConfigError
from visrec.registry import Registry


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


def gaussian_heatmaps(points: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """(B, P, size, size) Gaussians (``sigma`` in heatmap pixels) at points normalised to [0, 1]; a point at x
    sits on heatmap pixel centre x * size - 0.5."""
    grid = torch.arange(size, device=points.device, dtype=torch.float32) + 0.5
    px, py = points[..., 0:1] * size, points[..., 1:2] * size  # (B, P, 1)
    gx = torch.exp(-((grid - px) ** 2) / (2 * sigma ** 2))
    gy = torch.exp(-((grid - py) ** 2) / (2 * sigma ** 2))
    return gy[..., :, None] * gx[..., None, :]



# ------------------------------------------------------------------------- training objectives by name
# ``loss.name`` of a landmark run picks one of these. An objective takes the step's :class:`LandmarkStep` and
# returns the loss to minimise; a new landmark loss is one function registered here (or by a plugin).


@dataclass
class LandmarkStep:
    """What one training step gives an objective. ``model``: the (maybe DDP-wrapped) landmark model;
    ``images`` (B, 3, S, S); ``target`` (B, P, 2) points normalised to [0, 1] of the crop; ``pose`` (B, 3) yaw,
    pitch, roll in radians when the data has it; ``crop_size`` S in pixels; ``options`` the run's ``loss``
    section (``w``, ``eps``, ``pose_weight``, ``pfld_base``)."""

    model: torch.nn.Module
    images: torch.Tensor
    target: torch.Tensor
    pose: torch.Tensor | None
    crop_size: int
    options: Any


LANDMARK_LOSSES: Registry = Registry("landmark loss")


@LANDMARK_LOSSES.register("l1")
def l1_objective(step: LandmarkStep) -> torch.Tensor:
    return l1(step.model(step.images).float(), step.target)


@LANDMARK_LOSSES.register("l2")
def l2_objective(step: LandmarkStep) -> torch.Tensor:
    return l2(step.model(step.images).float(), step.target)


@LANDMARK_LOSSES.register("wing")
def wing_objective(step: LandmarkStep) -> torch.Tensor:
    """Wing on crop pixels (``w``/``eps`` in pixels), per point."""
    s = float(step.crop_size)
    pred = step.model(step.images).float()
    return wing(pred * s, step.target * s, step.options.w, step.options.eps) / step.target.shape[1]


@LANDMARK_LOSSES.register("adaptive_wing", "awing")
def adaptive_wing_objective(step: LandmarkStep) -> torch.Tensor:
    """Adaptive wing on the model's heatmaps (against Gaussians at the target points) plus L1 on the points
    it decodes from them: for heatmap models (``heatmaps=True``, ``decode``)."""
    net = getattr(step.model, "module", step.model)
    if not hasattr(net, "decode"):
        raise ConfigError(f"loss.name: adaptive_wing trains heatmap models; {type(net).__name__} gives points only")
    heat = step.model(step.images, heatmaps=True)  # through forward, so DDP synchronises the gradients
    return adaptive_wing(torch.sigmoid(heat.float()), gaussian_heatmaps(step.target, heat.shape[-1])) \
        + l1(net.decode(heat), step.target)


@LANDMARK_LOSSES.register("pfld")
def pfld_objective(step: LandmarkStep) -> torch.Tensor:
    """PFLD's weighted loss plus ``pose_weight`` x the pose branch's MSE (the pose prediction is detached in
    the weight: the branch learns pose from its own term only)."""
    if step.pose is None:
        raise ConfigError("loss.name: pfld needs head-pose ground truth (the data's pose/ files)")
    pred, pose = (t.float() for t in step.model(step.images, with_pose=True))
    opts = step.options
    return pfld(pred, step.target, pose.detach(), step.pose.float(), base_weight=opts.pfld_base) \
        + opts.pose_weight * l2(pose, step.pose.float())
