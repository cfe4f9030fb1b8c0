"""Video face training: learn per-frame fusion weights with a set-level loss on the fused feature.

Each sample is one video: ``clip`` frames drawn at random (with repetition when the video is shorter),
fused by the model's quality head (``visrec.models.quality``) and classified by PartialFC with a margin
loss over the training videos' identities. The model is ``quality_fusion`` (backbone frozen or not).
Validation: exact TPR@FPR between the validation videos, learned fusion and the mean baseline.

A frozen backbone (``freeze_backbone: true``, the default) gives each frame the same embedding at every step
(eval mode, no gradient), so the task embeds every training frame once when training starts — and its mirror
image, with ``data.flip`` — and the steps train the quality head on those embeddings: a frame is embedded
once or twice instead of once per step that draws it (8 to 16 times over in the shipped config), and the
decoded frames are released. The draws (frames, flips) come from the same RNG calls as when the frames
go through the backbone at every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from visrec.config import Float
from visrec.data.video import read_frames, read_video_list
from visrec.errors import ConfigError
from visrec.evaluate.video import score_videos
from visrec.losses import build_margin_loss
from visrec.losses.partial_fc import PartialFC
from visrec.models import build_backbone
from visrec.models.embed import embed_images, images_to_tensor
from visrec.models.inference import video_features
from visrec.models.model_file import load_backbone
from visrec.models.quality import FREEZE_BACKBONE_DEFAULT
from visrec.train.task import TASKS, MarginLossOptions, Task


class VideoData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    videos: Path = Field(description="video list (video_id,path,label), visrec.data.video")
    clip: int = Field(8, gt=0, description="frames drawn per video per step")
    val: Path | None = Field(None, description="video list of held-out identities for TPR@FPR")
    val_target: Float = Field(1e-4, gt=0, lt=1)
    flip: bool = True


class VideoLoss(MarginLossOptions):
    """``name`` picks the margin loss from visrec.losses; other keys are its kwargs (range-checked)."""


class VideoClips(Dataset):
    """Items: (frames (clip, 3, 112, 112) in [-1, 1], identity index); with ``frame_ids``, (the drawn frames'
    indices (clip,) into the training set's frames, in list order, identity index) instead. Frames are decoded
    once and kept until :meth:`release_frames`."""

    def __init__(self, list_path: Path, clip: int, frame_ids: bool = False):
        items = read_video_list(list_path)
        names = sorted({it.label for it in items})
        index = {n: i for i, n in enumerate(names)}
        self.frames: list[np.ndarray] | None = [np.stack(read_frames(it.path, it.video_id)) for it in items]
        self.counts = np.array([len(f) for f in self.frames], np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.labels = np.array([index[it.label] for it in items], np.int64)
        self.num_classes = len(names)
        self.clip = clip
        self.frame_ids = frame_ids

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int):
        n = int(self.counts[i])
        # torch's RNG (checkpointed by the Trainer) picks the frames, so resumed runs draw alike
        pick = torch.randint(0, n, (self.clip,)) if n < self.clip else torch.randperm(n)[: self.clip]
        if self.frame_ids:
            return pick + int(self.first[i]), int(self.labels[i])
        return images_to_tensor(self.frames[i][pick.numpy()]), int(self.labels[i])

    def release_frames(self) -> None:
        """Drop the decoded frames (items must be frame indices by then)."""
        if not self.frame_ids:
            raise RuntimeError("items are frames: they cannot be released")
        self.frames = None


def embed_frames(backbone: nn.Module, videos: list[np.ndarray], device: torch.device, *, flip: bool,
                 batch_size: int = 256) -> torch.Tensor:
    """(F, 2 with ``flip`` else 1, D) float32 raw embeddings of every frame of ``videos`` (in order) and of its
    mirror image, on ``device``; the backbone in eval mode (``embed_images``)."""
    frames = [f for video in videos for f in video]  # views into each video's array, no copy
    sides = [frames] + ([[f[:, ::-1] for f in frames]] if flip else [])
    return torch.stack([torch.from_numpy(embed_images(backbone, side, batch_size=batch_size, device=device))
                        for side in sides], dim=1).to(device)


@TASKS.register("faces_video")
class VideoTask(Task):
    DataOptions = VideoData
    LossOptions = VideoLoss
    local_modules = ("head",)

    frame_embeddings: torch.Tensor | None = None  # (F, 1 or 2, D): a frozen backbone's, see the module docstring

    def frozen_backbone(self) -> bool:
        return bool(self.cfg.model.kwargs.get("freeze_backbone", FREEZE_BACKBONE_DEFAULT))

    def train_dataset(self):
        self.clips = VideoClips(self.data_opts.videos, self.data_opts.clip, frame_ids=self.frozen_backbone())
        return self.clips

    def before_training(self, modules):
        if self.frozen_backbone():
            self.frame_embeddings = embed_frames(modules["backbone"].backbone, self.clips.frames, self.ctx.device,
                                                 flip=self.data_opts.flip)
            self.clips.release_frames()

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
        frames, labels = batch  # frames: (B, clip) frame indices when the embeddings are precomputed
        flip = None
        if self.data_opts.flip:
            flip = (torch.rand(frames.shape[0]) < 0.5).to(frames.device)
        if self.frame_embeddings is not None:
            side = flip.long()[:, None].expand_as(frames) if flip is not None else torch.zeros_like(frames)
            fused, _ = modules["backbone"](self.frame_embeddings[frames, side], fuse="embeddings")
        else:
            if flip is not None:
                frames = torch.where(flip[:, None, None, None, None], frames.flip(4), frames)
            fused, _ = modules["backbone"](frames, fuse="frames")
        return modules["head"](fused, labels)

    def prepare_validation(self) -> None:
        """Read the ``data.val`` video list before the first step (the frames are read when validating)."""
        if self.data_opts.val is not None:
            read_video_list(self.data_opts.val)  # a missing, malformed or empty list: a DataError naming it

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        if self.data_opts.val is None:
            return {}

        t = self.data_opts.val_target
        fusions = ("mean", "learned")
        feats, labels, ids = video_features(backbone, self.data_opts.val, fusions, self.ctx.device)
        res = score_videos(feats, labels, ids, fusions, (t,))
        return {f"val/{f}_tpr@{t:g}": float(r[t].tpr or 0.0) for f, r in res.results.items()}
