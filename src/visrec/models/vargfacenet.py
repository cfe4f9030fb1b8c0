"""VarGFaceNet (Yan et al., "VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for
Lightweight Face Recognition", ICCV-W 2019, arXiv:1910.04985) — the LFR'19 DeepGlint-Light winner.

Variable group convolution (from VarGNet): every kxk conv uses a fixed number of channels per group
(S = 8, so groups = C / 8) instead of depthwise, which keeps the compute per memory access balanced
across the net. It is paired with a 1x1 pointwise conv ("VarG conv" below); the kxk conv widens the
channels by ``factor`` (2 in the stages, 1 in the head), the 1x1 conv maps them to the output width.

- Head setting (keeps information at the start): 3x3 stride-1 conv at 112x112, then a stride-2
  VarG block with a VarG-conv shortcut -> 56x56.
- Three stages (units 3, 7, 4; 64/128/256 x ``width_mult`` channels; 28, 14, 7): the first unit of
  each is a down-sampling block with two parallel stride-2 VarG convs summed, then one VarG conv,
  plus a stride-2 VarG-conv shortcut; the rest are normal blocks (two VarG convs + identity).
- Embedding setting: 1x1 conv to 1024, a 7x7 variable-group conv (128 groups) over the whole map,
  1x1 conv to 512, FC, BN1d (the GDC head with a projection).

PReLU activations throughout; no SE (an option of the reference code, left out). Measured at
1x3x112x112 (conv + FC): ``width_mult=1.25`` (40-80-160-320 channels) is 0.512 GMACs, 1.022 GFLOPs by
the LFR rule — just over the 1 GFLOPs light budget; the default ``width_mult=1.2`` (40-80-152-304)
is 0.486 GMACs, 0.969 GFLOPs by the LFR rule, inside it.
"""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES
from visrec.models.heads import GDC

S = 8  # channels per group of every variable group conv


def varg_conv(cin: int, cout: int, stride: int = 1, factor: int = 2, act_out: bool = True) -> nn.Sequential:
    """3x3 group conv (cin/S groups, cin -> cin*factor, stride) -> BN -> PReLU -> 1x1 conv -> BN [-> PReLU]."""
    mid = cin * factor
    mods = [nn.Conv2d(cin, mid, 3, stride, 1, groups=cin // S, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    if act_out:
        mods.append(nn.PReLU(cout))
    return nn.Sequential(*mods)


class NormalBlock(nn.Module):
    """Two VarG convs (the second linear) + shortcut -> PReLU. The shortcut is the identity, or a
    linear VarG conv when ``stride`` or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, factor: int = 2):
        super().__init__()
        self.body = nn.Sequential(varg_conv(cin, cout, stride, factor), varg_conv(cout, cout, 1, factor, act_out=False))
        self.shortcut = (None if stride == 1 and cin == cout else
                         varg_conv(cin, cout, stride, factor, act_out=False))
        self.act = nn.PReLU(cout)

    def forward(self, x):
        return self.act(self.body(x) + (x if self.shortcut is None else self.shortcut(x)))


class DownBlock(nn.Module):
    """Two parallel stride-2 linear VarG convs, summed -> PReLU -> linear VarG conv, plus a stride-2
    linear VarG-conv shortcut -> PReLU."""

    def __init__(self, cin: int, cout: int, factor: int = 2):
        super().__init__()
        self.branch1 = varg_conv(cin, cout, 2, factor, act_out=False)
        self.branch2 = varg_conv(cin, cout, 2, factor, act_out=False)
        self.merge_act = nn.PReLU(cout)
        self.merge = varg_conv(cout, cout, 1, factor, act_out=False)
        self.shortcut = varg_conv(cin, cout, 2, factor, act_out=False)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        y = self.merge(self.merge_act(self.branch1(x) + self.branch2(x)))
        return self.act(y + self.shortcut(x))


def _channels(c: float) -> int:
    """Round to a multiple of S (every group must hold exactly S channels)."""
    return max(S, int(round(c / S)) * S)


class VarGFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512, width_mult: float = 1.2, units=(3, 7, 4),
                 last_channels: int = 1024):
        super().__init__()
        c0, *widths = [_channels(c * width_mult) for c in (32, 64, 128, 256)]
        self.head = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.PReLU(c0),
                                  NormalBlock(c0, c0, stride=2, factor=1))  # 112 -> 56
        blocks, cin = [], c0
        for n, cout in zip(units, widths):  # 28, 14, 7
            blocks.append(DownBlock(cin, cout))
            blocks += [NormalBlock(cout, cout) for _ in range(n - 1)]
            cin = cout
        self.stages = nn.Sequential(*blocks)
        self.expand = nn.Sequential(nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                                    nn.PReLU(last_channels))
        self.embedding = GDC(last_channels, embedding_size, kernel=7, groups=last_channels // S,
                             project=last_channels // 2)

    def forward(self, x):
        """(B, 3, 112, 112) in [-1, 1] -> (B, embedding_size), not normalised."""
        return self.embedding(self.expand(self.stages(self.head(x))))


@BACKBONES.register("vargfacenet")
def vargfacenet(embedding_size: int = 512, width_mult: float = 1.2, units=(3, 7, 4)) -> VarGFaceNet:
    return VarGFaceNet(embedding_size, width_mult, tuple(units))
