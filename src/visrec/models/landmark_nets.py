"""Light landmark models. Both take (B, 3, 112, 112) face crops in [-1, 1] and return (B, P, 2) point
coordinates normalised to [0, 1] of the crop (x right, y down), so they export to ONNX as one tensor.

- ``pfld``: PFLD-style regressor (Guo et al. 2019): a MobileNetV2-like trunk of inverted residuals, a
  multi-scale head (pooled 14x14, 7x7 and 1x1 features concatenated, then FC), and an auxiliary branch on
  the 28x28 features predicting head pose (yaw, pitch, roll, radians) used only by the PFLD loss during
  training (``forward_with_pose``).
- ``heatmap_lite``: inverted-residual trunk to 7x7, two transposed convs up to 28x28, one heatmap per
  point; coordinates by soft-argmax (differentiable, so it trains with heatmap losses or on coordinates).
``width_mult`` scales every channel count for the landmark budgets (ICPR'20 <= 1 GFLOPs, ICME'21 <= 100
MFLOPs).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from visrec.data.augment import crop_face
from visrec.models import BACKBONES
from visrec.models.embed import forward_batch


def _c(ch: float) -> int:
    return max(8, int(round(ch / 8)) * 8)


def conv_bn(cin, cout, k=3, s=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid),
                                  conv_bn(mid, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def _stage(cin, cout, n, stride, expand):
    return nn.Sequential(*[InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, expand)
                           for i in range(n)])


class PFLD(nn.Module):
    def __init__(self, num_points: int = 106, width_mult: float = 1.0):
        super().__init__()
        w = lambda c: _c(c * width_mult)  # noqa: E731
        self.num_points = num_points
        self.stem = nn.Sequential(conv_bn(3, w(64), 3, 2), conv_bn(w(64), w(64), 3, 1, groups=w(64)))  # 56
        self.stage1 = _stage(w(64), w(64), 5, 2, 2)                                                     # 28
        self.stage2 = nn.Sequential(_stage(w(64), w(128), 1, 2, 2), _stage(w(128), w(128), 6, 1, 4),
                                    _stage(w(128), w(16), 1, 1, 2))                                     # 14
        self.s2 = conv_bn(w(16), w(32), 3, 2)                                                           # 7
        self.s3 = nn.Sequential(nn.Conv2d(w(32), w(128), 7), nn.BatchNorm2d(w(128)), nn.ReLU(inplace=True))
        self.fc = nn.Linear(w(16) + w(32) + w(128), num_points * 2)
        self.aux = nn.Sequential(conv_bn(w(64), w(128), 3, 2), conv_bn(w(128), w(128), 3, 1),
                                 conv_bn(w(128), w(32), 3, 2), conv_bn(w(32), w(128), 7, 1),
                                 nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w(128), 32),
                                 nn.Linear(32, 3))

    def _features(self, x):
        f28 = self.stage1(self.stem(x))
        f14 = self.stage2(f28)
        f7 = self.s2(f14)
        f1 = self.s3(f7)
        pooled = torch.cat([f14.mean((2, 3)), f7.mean((2, 3)), f1.flatten(1)], dim=1)
        return f28, pooled

    def forward(self, x, with_pose: bool = False):
        """Points (B, P, 2) in [0, 1] of the crop; with ``with_pose`` also the (B, 3) pose branch output.
        Training calls go through ``forward`` (not a side method) so DDP synchronises their gradients."""
        f28, pooled = self._features(x)
        points = torch.sigmoid(self.fc(pooled)).view(-1, self.num_points, 2)
        return (points, self.aux(f28)) if with_pose else points

    def forward_with_pose(self, x):
        return self.forward(x, with_pose=True)


class HeatmapLite(nn.Module):
    def __init__(self, num_points: int = 106, width_mult: float = 1.0, heatmap_size: int = 28):
        super().__init__()
        w = lambda c: _c(c * width_mult)  # noqa: E731
        self.num_points, self.heatmap_size = num_points, heatmap_size
        self.trunk = nn.Sequential(conv_bn(3, w(32), 3, 2), _stage(w(32), w(48), 2, 2, 2),  # 56 -> 28
                                   _stage(w(48), w(64), 3, 2, 4), _stage(w(64), w(96), 3, 2, 4))  # 14 -> 7
        up = []
        cin = w(96)
        for _ in range(2):  # 7 -> 14 -> 28
            up += [nn.ConvTranspose2d(cin, w(64), 4, 2, 1, bias=False), nn.BatchNorm2d(w(64)), nn.ReLU(inplace=True)]
            cin = w(64)
        self.up = nn.Sequential(*up)
        self.head = nn.Conv2d(w(64), num_points, 1)
        # computed on the CPU, then put beside the weights: on the meta device (a model file's network built for
        # its shapes) arithmetic imports TorchDynamo, seconds of a command's start (visrec.models.meta)
        grid = (torch.arange(heatmap_size, dtype=torch.float32, device="cpu") + 0.5) / heatmap_size
        self.register_buffer("grid", grid.to(self.head.weight.device), persistent=False)

    def forward_heatmaps(self, x):
        return self.head(self.up(self.trunk(x)))  # (B, P, H, W) logits

    def decode(self, heatmaps):
        b, p, h, w = heatmaps.shape
        prob = torch.softmax(heatmaps.flatten(2).float(), dim=-1).view(b, p, h, w)
        xs = (prob.sum(2) * self.grid).sum(-1)
        ys = (prob.sum(3) * self.grid).sum(-1)
        return torch.stack([xs, ys], dim=-1)

    def forward(self, x, heatmaps: bool = False):
        """Points (B, P, 2) in [0, 1]; with ``heatmaps`` the (B, P, H, W) logits instead (for training)."""
        logits = self.forward_heatmaps(x)
        return logits if heatmaps else self.decode(logits)


@BACKBONES.register("pfld")
def pfld(num_points: int = 106, width_mult: float = 1.0) -> PFLD:
    return PFLD(num_points, width_mult)


@BACKBONES.register("heatmap_lite")
def heatmap_lite(num_points: int = 106, width_mult: float = 1.0, heatmap_size: int = 28) -> HeatmapLite:
    return HeatmapLite(num_points, width_mult, heatmap_size)


def predict_points(net: nn.Module, image: np.ndarray, box, margin: float = 0.15, size: int = 112) -> np.ndarray:
    """One face's landmarks in image pixels (origin top-left), from an RGB uint8 image and its face box
    ``(x1, y1, x2, y2)``: the square crop the landmark task trains on (``crop_face`` with ``margin`` per side,
    ``size`` pixels, inputs in [-1, 1]) -> the model's normalised crop coordinates -> back to the image."""
    x1, y1, x2, y2 = map(float, box)
    crop, _ = crop_face(image, np.zeros((1, 2)), (x1, y1, x2, y2), size, margin)
    with torch.no_grad():
        x = torch.from_numpy(crop).permute(2, 0, 1).float().div(127.5).sub(1)[None]
        pts = net(x)[0].float().numpy() * size
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    return ((pts - size / 2) * (side / size) + ((x1 + x2) / 2, (y1 + y2) / 2)).astype(np.float32)


@torch.no_grad()
def predict_crop_set(model: nn.Module, crops, device="cpu", batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, ground-truth) points in crop pixels, (N, P, 2) each, for every face of a crop set
    (:class:`visrec.data.landmark_crops.JDCrops`: items are (image tensor in [-1, 1], points in [0, 1]))."""
    model.eval().to(device)
    preds, gts = [], []
    batch = forward_batch(batch, device)
    for start in range(0, len(crops), batch):
        items = [crops[i] for i in range(start, min(len(crops), start + batch))]
        x = torch.stack([it[0] for it in items]).to(device)
        preds.append(model(x).float().cpu().numpy() * crops.size)
        gts.append(np.stack([it[1].numpy() for it in items]) * crops.size)
    return np.concatenate(preds), np.concatenate(gts)
