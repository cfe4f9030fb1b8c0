"""An EfficientNet-style face network (MBConv + squeeze-excitation) scalable to a compute budget.

The stage table is EfficientNet-B0's, with the stride plan re-cut for 112x112 faces: four stride-2
steps (stem and three stages) end on a 7x7 map, which the GDC head embeds. ``width_mult`` scales every
stage's channels (rounded to multiples of 8), ``depth_mult`` every stage's repeats (rounded up), as in
EfficientNet's compound scaling; ``budget fit`` searches these two knobs. Default (1.0, 1.0): about
0.18 GMACs at 1x3x112x112, far inside the 1 GFLOPs light track, so the search has room to grow it.
"""

from __future__ import annotations

import math

from torch import nn

from visrec.models import BACKBONES
from visrec.models.heads import GDC

# (expand ratio, kernel, stride, out channels, repeats)
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 1, 192, 4), (6, 3, 1, 320, 1)]


def round_channels(c: float, divisor: int = 8) -> int:
    out = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * c else out


def conv_bn_act(cin, cout, k=1, s=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return x * self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise (stride) -> SE -> 1x1 project; residual if shapes match."""

    def __init__(self, cin, cout, expand, k, stride, se_ratio=0.25):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn_act(cin, mid) if expand != 1 else nn.Identity()
        self.dw = conv_bn_act(mid, mid, k, stride, groups=mid)
        self.se = SqueezeExcite(mid, max(1, int(cin * se_ratio)))
        self.project = conv_bn_act(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class EffNetFace(nn.Module):
    def __init__(self, embedding_size: int = 512, width_mult: float = 1.0, depth_mult: float = 1.0,
                 expand_ratio: int | None = None, head_channels: int = 512):
        super().__init__()
        stem = round_channels(32 * width_mult)
        layers = [conv_bn_act(3, stem, 3, 2)]
        cin = stem
        for expand, k, stride, c, n in STAGES:
            cout = round_channels(c * width_mult)
            for i in range(int(math.ceil(n * depth_mult))):
                e = expand if expand_ratio is None or expand == 1 else expand_ratio
                layers.append(MBConv(cin, cout, e, k, stride if i == 0 else 1))
                cin = cout
        head = round_channels(head_channels * max(1.0, width_mult))
        layers.append(conv_bn_act(cin, head))
        self.body = nn.Sequential(*layers)
        self.head = GDC(head, embedding_size)

    def forward(self, x):
        return self.head(self.body(x))


@BACKBONES.register("effnet_face", "efficientnet_face")
def effnet_face(embedding_size: int = 512, width_mult: float = 1.0, depth_mult: float = 1.0,
                expand_ratio: int | None = None) -> EffNetFace:
    return EffNetFace(embedding_size, width_mult, depth_mult, expand_ratio)
