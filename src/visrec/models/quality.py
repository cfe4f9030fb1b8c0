"""Learned frame fusion: a face backbone plus a small quality head predicting one weight per frame.

The head reads each frame's embedding (its direction and the log of its norm — a degraded frame
moves both) through a 2-layer MLP to a quality logit; within a video the weights are the softmax of the
logits, and the video feature is the weighted sum of the L2-normalised frame embeddings, L2-normalised.
Trained with a set-level loss on that fused feature (``visrec.train.video_task``), with the backbone
frozen (``freeze_backbone``: no gradient and its BatchNorm statistics kept) or fine-tuned.

``forward`` returns frame embeddings, so the model is still a plain backbone for stills, export and the
budget check; ``fuse`` is the video path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visrec.models import BACKBONES
from visrec.models.model_file import load_face_backbone, require_face_network

# A quality head is trained on a frozen backbone unless a config says otherwise (the video task reads this too:
# it embeds the training frames once when the backbone is frozen).
FREEZE_BACKBONE_DEFAULT = True


class QualityHead(nn.Module):
    def __init__(self, embedding_size: int = 512, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embedding_size + 1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) raw frame embeddings -> (N,) quality logits."""
        norm = embeddings.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return self.mlp(torch.cat([embeddings / norm, norm.log()], dim=1)).squeeze(1)


class QualityFusion(nn.Module):
    def __init__(self, backbone: nn.Module, embedding_size: int = 512, hidden: int = 64,
                 freeze_backbone: bool = FREEZE_BACKBONE_DEFAULT):
        super().__init__()
        self.backbone = backbone
        self.quality = QualityHead(embedding_size, hidden)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor, *, fuse: str | None = None, mask: torch.Tensor | None = None):
        """Frame embeddings of (N, 3, H, W) images (a plain backbone: stills, export, the budget check); with
        ``fuse="frames"`` :meth:`fuse` of (B, T, 3, H, W) frames, with ``fuse="embeddings"``
        :meth:`fuse_embeddings` of (B, T, D) embeddings. Training calls the fused paths through here, so that a
        DistributedDataParallel wrapper (which only sees ``forward``) averages the quality head's gradients."""
        if fuse is None:
            return self.backbone(x)
        if fuse == "frames":
            return self.fuse(x, mask)
        if fuse == "embeddings":
            return self.fuse_embeddings(x, mask)
        raise ValueError(f"fuse={fuse!r}: expected None, 'frames' or 'embeddings'")

    def frame_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 112, 112) -> (raw embeddings (N, D), quality logits (N,))."""
        if self.freeze_backbone:
            with torch.no_grad():
                emb = self.backbone(x).float()
        else:
            emb = self.backbone(x).float()
        return emb, self.quality(emb)

    def fuse(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, 112, 112) frames [+ (B, T) bool mask of real frames] -> (fused (B, D) unit vectors,
        weights (B, T) summing to 1 per video)."""
        b, t = frames.shape[:2]
        emb, logits = self.frame_outputs(frames.flatten(0, 1))
        return fuse_with_logits(emb.view(b, t, -1), logits.view(b, t), mask)

    def fuse_embeddings(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fuse` from (B, T, D) raw frame embeddings the backbone already gave (a frozen backbone's,
        computed once for a whole training set)."""
        b, t = emb.shape[:2]
        return fuse_with_logits(emb, self.quality(emb.flatten(0, 1)).view(b, t), mask)


def fuse_with_logits(emb: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-within-video weights over (B, T) logits, weighted sum of normalised (B, T, D) embeddings."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    fused = (weights.unsqueeze(2) * F.normalize(emb, dim=2)).sum(1)
    return F.normalize(fused, dim=1), weights


@BACKBONES.register("quality_fusion")
def quality_fusion(backbone: dict | str, hidden: int = 64,
                   freeze_backbone: bool = FREEZE_BACKBONE_DEFAULT) -> QualityFusion:
    """``backbone``: a visrec checkpoint / run directory (architecture and weights), or a registry spec
    ``{name: mobilefacenet, embedding_size: 512}`` (architecture only, as a saved model records it)."""
    role = "model.backbone of a quality_fusion model"
    if isinstance(backbone, dict):
        require_face_network(backbone, role)
        spec = dict(backbone)
        net = BACKBONES.build(spec.pop("name"), **spec)
    else:
        net, _ = load_face_backbone(backbone, role)
    with torch.no_grad():
        dim = int(net.eval()(torch.zeros(2, 3, 112, 112)).shape[1])
    return QualityFusion(net, dim, hidden, freeze_backbone)
