"""MobileFaceNet (Chen et al., "MobileFaceNets", 2018) with arcface_torch's parameter layout, so its
released ``backbone.pth`` files load with ``strict=True``.

Layout (key prefix: what it is), at 112x112 input, default ``blocks=(1, 4, 6, 2)``, ``scale=2``:

- ``layers.0``: 3x3/2 conv 3 -> 64*scale (56x56)
- ``layers.1``: 3x3 grouped conv (64 groups) if ``blocks[0] == 1``, else ``blocks[0]`` residual
  bottlenecks
- ``layers.2``/``3``: bottleneck /2 (28x28) then ``blocks[1]`` residual bottlenecks, 64*scale channels
- ``layers.4``/``5``: bottleneck /2 (14x14) then ``blocks[2]`` residual bottlenecks, 128*scale
- ``layers.6``/``7``: bottleneck /2 (7x7) then ``blocks[3]`` residual bottlenecks, 128*scale
- ``conv_sep``: 1x1 conv to 512; ``features``: GDC head (7x7 depthwise -> FC -> BN1d)

Each bottleneck is 1x1 expand -> 3x3 depthwise -> 1x1 linear projection; its inner width is fixed per
stage (128, 128, 256, 256; 512 in the last down-sampling one) independently of ``scale``, as in
arcface_torch. Default: about 0.45 GMACs (conv + FC) at 1x3x112x112, ~2.06 M parameters.
``scale`` widens the stage outputs, ``blocks`` deepens the stages (budget-search knobs).
"""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES
from visrec.models.heads import GDC, ConvBN


class Bottleneck(nn.Module):
    """1x1 expand to ``mid`` -> 3x3 depthwise (stride) -> 1x1 linear to ``cout``; identity added if
    ``residual``. Keys: ``layers.{0,1,2}`` (arcface_torch's DepthWise)."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBN(cin, mid), ConvBN(mid, mid, 3, stride, 1, groups=mid),
                                    ConvBN(mid, cout, act=False))

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class ResidualStage(nn.Module):
    """``n`` stride-1 residual bottlenecks of width ``c``; keys ``layers.{i}`` (arcface_torch's Residual)."""

    def __init__(self, c: int, n: int, mid: int):
        super().__init__()
        self.layers = nn.Sequential(*[Bottleneck(c, c, mid, 1, residual=True) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512, blocks=(1, 4, 6, 2), scale: int = 2):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"blocks must list 4 stage depths, got {blocks!r}")
        c1, c2 = 64 * scale, 128 * scale
        stem2 = ConvBN(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else ResidualStage(c1, blocks[0], 128)
        self.layers = nn.ModuleList([
            ConvBN(3, c1, 3, 2, 1), stem2,
            Bottleneck(c1, c1, 128, 2), ResidualStage(c1, blocks[1], 128),
            Bottleneck(c1, c2, 256, 2), ResidualStage(c2, blocks[2], 256),
            Bottleneck(c2, c2, 512, 2), ResidualStage(c2, blocks[3], 256),
        ])
        self.conv_sep = ConvBN(c2, 512)
        self.features = GDC(512, embedding_size, kernel=7)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """(B, 3, 112, 112) in [-1, 1] -> (B, embedding_size), not normalised."""
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@BACKBONES.register("mobilefacenet", "mbf")
def mobilefacenet(embedding_size: int = 512, blocks=(1, 4, 6, 2), scale: int = 2) -> MobileFaceNet:
    return MobileFaceNet(embedding_size, tuple(blocks), scale)


@BACKBONES.register("mobilefacenet_large", "mbf_large")
def mobilefacenet_large(embedding_size: int = 512) -> MobileFaceNet:
    """arcface_torch's ``mbf_large``: blocks (2, 8, 12, 4), scale 4."""
    return MobileFaceNet(embedding_size, (2, 8, 12, 4), 4)
