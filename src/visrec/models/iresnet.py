"""IResNet (Deng et al., ArcFace; the "improved" pre-activation residual unit) with arcface_torch's
parameter names (``conv1``, ``bn1``, ``prelu``, ``layer1.0.bn1`` ... ``bn2``, ``fc``, ``features``), so its
released ``backbone.pth`` files load with ``strict=True``.

Stem 3x3 conv (stride 1, 64 ch, 112x112) -> four stages of units at 64/128/256/512 channels, each stage
starting with a stride-2 unit (56, 28, 14, 7) -> BN-dropout-FC-BN head over the 512x7x7 map.
Unit: BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride) -> BN, plus the input (1x1 conv + BN
projection when the shape changes). r100 (3, 13, 30, 3): about 12.1 GMACs at 1x3x112x112.

``width`` multiplies every stage's channels (a budget-search knob; 1.0 keeps the released shapes).
``block`` lets IR-SE (``visrec.models.irse``) reuse this body with squeeze-excitation units.
"""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES
from visrec.models.heads import BNDropoutFC

# Units per stage. 18-100 and 200 as in arcface_torch; 152 as in the original InsightFace (MXNet).
DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3], 152: [3, 8, 36, 3],
          200: [6, 26, 60, 6]}


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def residual(self, x):
        return self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))

    def forward(self, x):
        return self.residual(x) + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, layers: list[int], embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0,
                 block: type[IBasicBlock] = IBasicBlock):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must list 4 stage depths >= 1, got {layers!r}")
        widths = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(layers, widths), start=1):
            units = [block(cin, cout, 2)] + [block(cout, cout, 1) for _ in range(int(n) - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            cin = cout
        # four stride-2 stages: 112 -> 7
        BNDropoutFC.install(self, cin, 7, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x):
        """(B, 3, 112, 112) in [-1, 1] -> (B, embedding_size), not normalised."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return BNDropoutFC.embed(self, x)


def _register(depth: int):
    @BACKBONES.register(f"iresnet{depth}", f"r{depth}")
    def build(embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
        return IResNet(DEPTHS[depth], embedding_size, dropout, width)

    build.__name__ = f"iresnet{depth}"
    build.__doc__ = f"IResNet-{depth}: units per stage {DEPTHS[depth]}."


for _d in DEPTHS:
    _register(_d)


@BACKBONES.register("iresnet")
def iresnet(layers: list[int], embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    """Any depth list, e.g. ``layers: [3, 4, 6, 3]`` (= iresnet34)."""
    return IResNet(list(layers), embedding_size, dropout, width)
