"""Landmark training: JD-landmark directories -> face-box crops -> a landmark model, NME validation.

Losses (``loss.name``): ``l1``/``l2``/``wing`` on the normalised point coordinates (wing's ``w``/``eps`` in
crop pixels), ``awing`` on heatmaps (``heatmap_lite``), and ``pfld`` for models with a pose branch
(``forward_with_pose``, i.e. ``pfld``): it needs head-pose ground truth (the JD directory's ``pose/``
files, ``visrec.data.landmarks``; degrees on disk, radians in the loss) and trains
  (pfld_base + sum_k (1 - cos(pose error_k))) * sum over points of the squared error   (PFLD's weighting)
  + pose_weight * mean squared pose error in radians                                  (the pose branch).
The PFLD weight uses the pose prediction detached: the branch learns pose from its own term only, and the
``pfld_base`` floor keeps the landmark term alive once the pose is right (the paper's weight alone is 0
then). Validation reports NME with the sqrt_area normalisation (``visrec.evaluate.landmarks``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from visrec.config import Float
from visrec.data.landmark_crops import JDCrops  # noqa: F401 (moved to the data layer; imported here as before)
from visrec.errors import ConfigError
from visrec.evaluate.landmarks import auc, failure_rate, nme
from visrec.losses.landmark import LANDMARK_LOSSES, LandmarkStep
from visrec.models import build_backbone
from visrec.models.contract import MAX_CROP_MARGIN, MAX_INPUT_SIDE, MAX_POINTS, contract_from_config
from visrec.models.landmark_nets import predict_crop_set
from visrec.train.task import TASKS, Task


class LandmarkData(BaseModel):
    """The ``data:`` section of a landmark config. Each bound is the model contract's (``visrec.models.contract``),
    so a value the saved model could not describe is a ``ConfigError`` naming the field before any work."""

    model_config = ConfigDict(extra="forbid")
    train: Path = Field(description="JD-landmark dir (picture/, landmark/, rect/)")
    val: Path | None = None
    points: int = Field(106, ge=1, le=MAX_POINTS, description="points per face (the landmark files' count)")
    size: int = Field(112, ge=1, le=MAX_INPUT_SIDE, description="side of the square face crop, pixels")
    margin: Float = Field(0.15, ge=0, le=MAX_CROP_MARGIN, allow_inf_nan=False,
                          description="added to each side of the face box's square, a fraction of its side")
    augment: bool = True


class LandmarkLoss(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("wing", description="a registered landmark loss (visrec.losses.landmark.LANDMARK_LOSSES): "
                                          "l1 | l2 | wing | adaptive_wing / awing (heatmap models) | pfld (needs pose/)")
    # wing's C = w - w*ln(1 + w/eps) divides by eps and takes its log: 0 or less was a bare traceback
    w: Float = Field(10.0, gt=0, allow_inf_nan=False, description="wing: width of the log part, crop pixels")
    eps: Float = Field(2.0, gt=0, allow_inf_nan=False, description="wing: curvature of the log part, crop pixels")
    pose_weight: Float = Field(1.0, ge=0, allow_inf_nan=False,
                               description="pfld: weight of the pose-branch MSE (radians^2)")
    pfld_base: Float = Field(1.0, ge=0, allow_inf_nan=False,
                             description="pfld: added to the PFLD pose weight of each face")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in LANDMARK_LOSSES:
            raise ValueError(f"unknown landmark loss {name!r}; known: {', '.join(LANDMARK_LOSSES.names())}")
        return name


@TASKS.register("landmarks")
class LandmarkTask(Task):
    DataOptions = LandmarkData
    LossOptions = LandmarkLoss

    def train_dataset(self):
        d = self.data_opts
        pfld = self.loss_opts.name == "pfld"
        if pfld and not (Path(d.train) / "pose").is_dir():
            raise ConfigError(f"loss.name: pfld needs head-pose ground truth, but {Path(d.train) / 'pose'} does "
                              f"not exist (pose/<image>.txt: 'yaw pitch roll' in degrees, see "
                              f"visrec.data.landmarks; visrec.data.synth.write_synthetic_jd writes it)")
        return JDCrops(d.train, d.points, d.size, d.margin, d.augment, self.cfg.seed, with_pose=pfld)

    def build_modules(self, num_classes):
        spec = self.cfg.model
        net = build_backbone(spec.name, **{"num_points": self.data_opts.points, **spec.kwargs})
        if self.loss_opts.name == "pfld" and not hasattr(net, "forward_with_pose"):
            raise ConfigError(f"loss.name: pfld needs a model with a pose branch (pfld); {spec.name!r} has none")
        return {"backbone": net}

    def model_config(self):
        return {"num_points": self.data_opts.points, **self.cfg.model.as_dict()}

    def model_contract(self, backbone):
        """Landmarks: the crop this task trains on (``data.margin`` per side, ``data.size`` pixels, inputs in
        [-1, 1]) and the point count, so every caller crops as the model was trained."""
        d = self.data_opts
        return contract_from_config(self.model_config(), crop_margin=d.margin, crop_size=d.size)

    def training_step(self, modules: dict[str, nn.Module], batch) -> torch.Tensor:
        pose = batch[2] if len(batch) > 2 else None  # (B, 3) yaw, pitch, roll in radians (pfld data)
        step = LandmarkStep(modules["backbone"], batch[0], batch[1], pose, int(self.data_opts.size), self.loss_opts)
        return LANDMARK_LOSSES.get(self.loss_opts.name)(step)

    _val_set = None  # what prepare_validation opened

    def prepare_validation(self) -> None:
        """Open ``data.val`` (every picture with its landmark file and box) before the first step."""
        d = self.data_opts
        if d.val is not None:
            self._val_set = JDCrops(d.val, d.points, d.size, d.margin, augment=False)

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        if self.data_opts.val is None:
            return {}

        d = self.data_opts
        ds = self._val_set or JDCrops(d.val, d.points, d.size, d.margin, augment=False)
        pred, gt = predict_crop_set(backbone, ds, self.ctx.device)
        n = nme(pred, gt)
        return {"val/nme": float(n.mean()), "val/auc@0.08": auc(n), "val/fr@0.08": failure_rate(n)}
