"""VarGFaceNet (Yan et al., "VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for
Lightweight Face Recognition", ICCV-W 2019, arXiv:1910.04985) — the LFR'19 DeepGlint-Light winner.

Variable group convolution: every kxk conv uses groups = channels / S with a fixed channel count per
group (S = 8), which balances compute against memory traffic better than depthwise conv; each is paired
with a 1x1 pointwise conv. Normal blocks hold two such pairs with a residual; down-sampling blocks have
two parallel stride-2 branches summed (wider early representation) plus a strided shortcut. The
embedding head expands to 1024 channels, reduces the 7x7 map with a variable-group conv, projects to
512 and ends in FC + BN. Default width 32: about 0.36 GMACs (~0.73 GFLOPs) at 1x3x112x112, inside the
light budget.
"""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES

S = 8  # channels per group


def varg_conv(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    """kxk group conv (cin/S groups, widening x2) -> BN -> PReLU -> 1x1 pointwise -> BN [-> PReLU]."""
    mid = cin * 2
    layers = [nn.Conv2d(cin, mid, k, stride, k // 2, groups=cin // S, bias=False), nn.BatchNorm2d(mid),
              nn.PReLU(mid), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class NormalBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(varg_conv(c, c), varg_conv(c, c, act=False))
        self.act = nn.PReLU(c)

    def forward(self, x):
        return self.act(x + self.body(x))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.branch1 = varg_conv(cin, cout, stride=2)
        self.branch2 = varg_conv(cin, cout, stride=2)
        self.merge = varg_conv(cout, cout, act=False)
        self.shortcut = varg_conv(cin, cout, stride=2, act=False)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        y = self.branch1(x) + self.branch2(x)
        return self.act(self.merge(y) + self.shortcut(x))


class VarGFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512, width: int = 32, repeats=(2, 6, 3)):
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c),
                                  NormalBlock(c))  # 56x56
        stages = []
        for i, n in enumerate(repeats):  # 28, 14, 7
            cout = c * 2
            stages.append(DownBlock(c, cout))
            stages += [NormalBlock(cout) for _ in range(n)]
            c = cout
        self.stages = nn.Sequential(*stages)
        self.expand = nn.Sequential(nn.Conv2d(c, 1024, 1, bias=False), nn.BatchNorm2d(1024), nn.PReLU(1024))
        # head: variable-group 7x7 conv over the whole map, then pointwise to 512, FC, BN
        self.reduce = nn.Sequential(nn.Conv2d(1024, 1024, 7, groups=1024 // S, bias=False), nn.BatchNorm2d(1024),
                                    nn.Conv2d(1024, 512, 1, bias=False), nn.BatchNorm2d(512), nn.PReLU(512))
        self.fc = nn.Linear(512, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        x = self.expand(self.stages(self.stem(x)))
        return self.features(self.fc(self.reduce(x).flatten(1)))


@BACKBONES.register("vargfacenet")
def vargfacenet(embedding_size: int = 512, width: int = 32, repeats=(2, 6, 3)) -> VarGFaceNet:
    return VarGFaceNet(embedding_size, width, tuple(repeats))
