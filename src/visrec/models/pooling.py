"""Global pooling of a conv feature map (N, C, H, W) -> (N, C) descriptors.

MAC = max over positions; SPoC = mean; GeM = (mean x^p)^(1/p) with learnable p (p=1 SPoC,
p->inf MAC); R-MAC = sum of L2-normalised MACs over square regions at several scales;
attention-thresholded MAC = MAC over positions whose channel-summed activation >= its mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visrec.registry import Registry

POOLINGS: Registry = Registry("pooling")  # cirtorch's poolings by name; a new one is a module registered here


@POOLINGS.register("mac")
class MAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


@POOLINGS.register("spoc")
class SPoC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@POOLINGS.register("gem")
class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


def _region_starts(last: int, n: int) -> list[int]:
    """``n`` evenly spaced starts from 0 to ``last``, rounded half to even, distinct and sorted: what
    ``torch.linspace(0, last, n).round().long().unique().tolist()`` gives, in plain Python, so that
    ``torch.export`` (the ONNX exporter) traces constants rather than a data-dependent ``unique``."""
    if n == 1:
        return [0]
    return sorted({round(last * i / (n - 1)) for i in range(n)})


@POOLINGS.register("rmac")
class RMAC(nn.Module):
    """Regions: at scale l (1..levels) squares of side 2*min(H,W)/(l+1), on a regular grid."""

    def __init__(self, levels: int = 3, eps: float = 1e-6):
        super().__init__()
        self.levels, self.eps = levels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])  # ints, not traced shapes: ONNX export rounds them
        out = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        for level in range(1, self.levels + 1):
            side = max(1, int(round(2 * min(h, w) / (level + 1))))
            ys = _region_starts(h - side, level + (h > w))
            xs = _region_starts(w - side, level + (w > h))
            for y in ys:
                for x0 in xs:
                    region = x[:, :, y:y + side, x0:x0 + side].amax(dim=(2, 3))
                    out = out + F.normalize(region, dim=1, eps=self.eps)
        return out


@POOLINGS.register("amac")
class AttentionMAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = x.sum(dim=1, keepdim=True)
        mask = attention >= attention.mean(dim=(2, 3), keepdim=True)
        return torch.where(mask, x, torch.full_like(x, float("-inf"))).amax(dim=(2, 3))


def build_pooling(name: str, **kwargs) -> nn.Module:
    """The pooling registered as ``name`` (``ConfigError`` listing the known ones otherwise)."""
    return POOLINGS.build(name, **kwargs)
