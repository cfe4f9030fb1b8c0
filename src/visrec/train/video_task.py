"""Video face training: learn per-frame fusion weights with a set-level loss on the fused feature.

Each sample is one video: ``clip`` frames drawn at random (with repetition when the video is shorter),
fused by the model's quality head (``visrec.models.quality``) and classified by PartialFC with a margin
loss over the training videos' identities. The model is ``quality_fusion`` (backbone frozen or not).
Validation: exact TPR@FPR between the validation videos, learned fusion and the mean baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from visrec.data.video import read_frames, read_video_list
from visrec.errors import ConfigError
from visrec.evaluate.video import score_videos
from visrec.losses import build_margin_loss
from visrec.losses.partial_fc import PartialFC
from visrec.models import build_backbone
from visrec.models.embed import images_to_tensor
from visrec.models.inference import video_features
from visrec.models.model_file import load_backbone
from visrec.train.task import TASKS, Task


class VideoData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    videos: Path = Field(description="video list (video_id,path,label), visrec.data.video")
    clip: int = Field(8, gt=0, description="frames drawn per video per step")
    val: Path | None = Field(None, description="video list of held-out identities for TPR@FPR")
    val_target: float = Field(1e-4, gt=0, lt=1)
    flip: bool = True


class VideoLoss(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "arcface"
    sample_rate: float = Field(1.0, gt=0, le=1)


class VideoClips(Dataset):
    """Items: (frames (clip, 3, 112, 112) in [-1, 1], identity index). Frames are decoded once and kept."""

    def __init__(self, list_path: Path, clip: int):
        items = read_video_list(list_path)
        names = sorted({it.label for it in items})
        index = {n: i for i, n in enumerate(names)}
        self.frames = [np.stack(read_frames(it.path, it.video_id)) for it in items]
        self.labels = np.array([index[it.label] for it in items], np.int64)
        self.num_classes = len(names)
        self.clip = clip

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        frames = self.frames[i]
        # torch's RNG (checkpointed by the Trainer) picks the frames, so resumed runs draw alike
        pick = torch.randint(0, len(frames), (self.clip,)) if len(frames) < self.clip else \
            torch.randperm(len(frames))[: self.clip]
        return images_to_tensor(frames[pick.numpy()]), int(self.labels[i])


@TASKS.register("faces_video")
class VideoTask(Task):
    DataOptions = VideoData
    LossOptions = VideoLoss
    local_modules = ("head",)

    def train_dataset(self):
        return VideoClips(self.data_opts.videos, self.data_opts.clip)

    def build_modules(self, num_classes):
        model = build_backbone(self.cfg.model.name, **self.cfg.model.kwargs)
        if not hasattr(model, "fuse"):
            raise ConfigError(f"task faces_video trains a fusion model (model.name: quality_fusion), "
                              f"got {self.cfg.model.name!r}")
        margin = build_margin_loss(self.loss_opts.name, **dict(self.loss_opts.model_extra or {}))
        dim = model.quality.mlp[0].in_features - 1
        return {"backbone": model, "head": PartialFC(margin, dim, int(num_classes), sample_rate=self.loss_opts.sample_rate)}

    def model_config(self):
        """Record the backbone's architecture instead of the checkpoint path it was loaded from, so the
        saved model rebuilds without that file (its weights are in the state dict)."""
        cfg = self.cfg.model.as_dict()
        src = cfg.get("backbone")
        if isinstance(src, (str, Path)):
            _, arch = load_backbone(src)
            cfg["backbone"] = arch
        return cfg

    def training_step(self, modules: dict[str, nn.Module], batch) -> torch.Tensor:
        frames, labels = batch
        if self.data_opts.flip:
            mask = (torch.rand(frames.shape[0]) < 0.5).to(frames.device)
            frames = torch.where(mask[:, None, None, None, None], frames.flip(4), frames)
        fused, _ = modules["backbone"].fuse(frames)
        return modules["head"](fused, labels)

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        if self.data_opts.val is None:
            return {}

        t = self.data_opts.val_target
        fusions = ("mean", "learned")
        feats, labels, ids = video_features(backbone, self.data_opts.val, fusions, self.ctx.device)
        res = score_videos(feats, labels, ids, fusions, (t,))
        return {f"val/{f}_tpr@{t:g}": float(r[t].tpr or 0.0) for f, r in res.results.items()}
