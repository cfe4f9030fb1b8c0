"""Landmark training: JD-landmark directories -> face-box crops -> a landmark model, NME validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from visrec.train.task import TASKS, Task


class LandmarkData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Path = Field(description="JD-landmark dir (picture/, landmark/, rect/)")
    val: Path | None = None
    points: int = 106
    size: int = 112
    margin: float = 0.15
    augment: bool = True


class LandmarkLoss(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("wing", description="l1 | l2 | wing | awing (heatmap models)")
    w: float = 10.0
    eps: float = 2.0


class JDCrops(Dataset):
    """Face-box crops of a JD-landmark set; items: (image tensor in [-1, 1], points normalised to [0, 1])."""

    def __init__(self, root: Path, points: int, size: int, margin: float, augment: bool, seed: int = 0):
        from visrec.data.landmarks import read_jd_dir
        from visrec.data.schemes import get_scheme

        self.paths, self.points, self.boxes = read_jd_dir(root, points)
        self.size, self.margin, self.augment = size, margin, augment
        self.flip_perm = get_scheme(points).flip_perm
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def crop(self, i: int):
        from visrec.data.augment import crop_face
        from visrec.data.images import read_image

        return crop_face(read_image(self.paths[i]), self.points[i], self.boxes[i], self.size, self.margin)

    def __getitem__(self, i: int):
        from visrec.data.augment import random_augment

        img, pts = self.crop(i)
        if self.augment:
            # drawn from torch's RNG (checkpointed by the Trainer), so resumed runs augment alike
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
            img, pts = random_augment(img, pts, self.flip_perm, rng, max_angle=15, p_occlude=0.2)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1)
        return x, torch.from_numpy(pts / self.size).float()


@TASKS.register("landmarks")
class LandmarkTask(Task):
    DataOptions = LandmarkData
    LossOptions = LandmarkLoss

    def train_dataset(self):
        d = self.data_opts
        return JDCrops(d.train, d.points, d.size, d.margin, d.augment, self.cfg.seed)

    def build_modules(self, num_classes):
        from visrec.models import build_backbone

        spec = self.cfg.model
        return {"backbone": build_backbone(spec.name, **{"num_points": self.data_opts.points, **spec.kwargs})}

    def model_config(self):
        return {"num_points": self.data_opts.points, **self.cfg.model.as_dict()}

    def training_step(self, modules: dict[str, nn.Module], batch) -> torch.Tensor:
        from visrec.losses import landmark as L

        images, target = batch
        model = modules["backbone"]
        name = self.loss_opts.name
        if name == "awing":
            net = getattr(model, "module", model)
            heat = net.forward_heatmaps(images)
            return L.adaptive_wing(torch.sigmoid(heat.float()), _gaussian_heatmaps(target, heat.shape[-1])) \
                + L.l1(net.decode(heat), target)
        pred = model(images).float()
        scale = float(self.data_opts.size)  # wing's w/eps are in pixels of the crop
        if name == "wing":
            return L.wing(pred * scale, target * scale, self.loss_opts.w, self.loss_opts.eps) / target.shape[1]
        if name in ("l1", "l2"):
            return getattr(L, name)(pred, target)
        raise ValueError(f"loss.name {name!r}: use l1, l2, wing or awing")

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        if self.data_opts.val is None:
            return {}
        from visrec.evaluate.landmarks import auc, failure_rate, nme

        d = self.data_opts
        ds = JDCrops(d.val, d.points, d.size, d.margin, augment=False)
        pred, gt = predict(backbone, ds, self.ctx.device)
        n = nme(pred, gt)
        return {"val/nme": float(n.mean()), "val/auc@0.08": auc(n), "val/fr@0.08": failure_rate(n)}


def _gaussian_heatmaps(points: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    grid = torch.arange(size, device=points.device, dtype=torch.float32) + 0.5
    px, py = points[..., 0:1] * size, points[..., 1:2] * size  # (B, P, 1)
    gx = torch.exp(-((grid - px) ** 2) / (2 * sigma ** 2))
    gy = torch.exp(-((grid - py) ** 2) / (2 * sigma ** 2))
    return gy[..., :, None] * gx[..., None, :]


@torch.no_grad()
def predict(model: nn.Module, ds: JDCrops, device="cpu", batch: int = 64):
    """(pred, gt) in crop pixels for every face of a JDCrops set."""
    model.eval().to(device)
    preds, gts = [], []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(len(ds), start + batch))]
        x = torch.stack([it[0] for it in items]).to(device)
        preds.append(model(x).float().cpu().numpy() * ds.size)
        gts.append(np.stack([it[1].numpy() for it in items]) * ds.size)
    return np.concatenate(preds), np.concatenate(gts)
