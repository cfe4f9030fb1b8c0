"""MobileFaceNet (Chen et al. 2018) with arcface_torch's parameter layout, so its released
``backbone.pth`` files load with ``strict=True``. Default (blocks 1-4-6-2, scale 2): ~0.45 GMACs at
1x3x112x112. ``scale`` widens every stage (a budget-search knob); ``blocks`` deepens them."""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES


class _Seq(nn.Module):
    """A module whose children live in ``.layers`` (arcface_torch's key layout)."""

    def __init__(self, *mods: nn.Module, residual: bool = False):
        super().__init__()
        self.layers = nn.Sequential(*mods)
        self.residual = residual

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


def conv_bn(cin, cout, kernel=1, stride=1, padding=0, groups=1, act=True) -> _Seq:
    """Conv (no bias) -> BN [-> PReLU]."""
    mods = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        mods.append(nn.PReLU(cout))
    return _Seq(*mods)


def depthwise(cin, cout, mid, stride, residual=False) -> _Seq:
    """Inverted bottleneck: 1x1 expand to ``mid`` -> 3x3 depthwise -> 1x1 linear projection."""
    return _Seq(conv_bn(cin, mid), conv_bn(mid, mid, 3, stride, 1, groups=mid), conv_bn(mid, cout, act=False),
                residual=residual)


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512, blocks=(1, 4, 6, 2), scale: int = 2):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        stem2 = (conv_bn(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else
                 _Seq(*[depthwise(c1, c1, 128, 1, True) for _ in range(blocks[0])]))
        self.layers = nn.ModuleList([
            conv_bn(3, c1, 3, 2, 1), stem2,
            depthwise(c1, c1, 128, 2), _Seq(*[depthwise(c1, c1, 128, 1, True) for _ in range(blocks[1])]),
            depthwise(c1, c2, 256, 2), _Seq(*[depthwise(c2, c2, 256, 1, True) for _ in range(blocks[2])]),
            depthwise(c2, c2, 512, 2), _Seq(*[depthwise(c2, c2, 256, 1, True) for _ in range(blocks[3])]),
        ])
        self.conv_sep = conv_bn(c2, 512)
        # GDC head: 7x7 depthwise (linear) -> flatten -> FC (no bias) -> BN1d
        self.features = _Seq(conv_bn(512, 512, 7, groups=512, act=False), nn.Flatten(),
                             nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@BACKBONES.register("mobilefacenet", "mbf")
def mobilefacenet(embedding_size: int = 512, blocks=(1, 4, 6, 2), scale: int = 2) -> MobileFaceNet:
    return MobileFaceNet(embedding_size, tuple(blocks), scale)


@BACKBONES.register("mobilefacenet_large", "mbf_large")
def mobilefacenet_large(embedding_size: int = 512) -> MobileFaceNet:
    return MobileFaceNet(embedding_size, (2, 8, 12, 4), 4)
