"""IResNet (Deng et al., ArcFace; "improved" pre-activation residual units) with arcface_torch's parameter
names (``conv1``, ``layer1.0.bn1`` ... ``bn2``, ``fc``, ``features``), so its ``backbone.pth`` files load
with ``strict=True``. r100: ~12.1 GMACs at 1x3x112x112. ``se=True`` adds squeeze-excitation to every
unit (IR-SE, the attention/SE residual net of the LFR large-track entries; its keys are then visrec's
own). ``width`` multiplies every stage's channels (a budget-search knob; 1.0 keeps the released shapes).
"""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3], 152: [3, 8, 36, 3],
          200: [6, 26, 60, 6]}


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        return x * self.fc2(self.relu(self.fc1(self.pool(x)))).sigmoid()


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN [-> SE], plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.se = SqueezeExcite(cout) if se else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se is not None:
            out = self.se(out)
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    def __init__(self, layers: list[int], embedding_size: int = 512, dropout: float = 0.0, se: bool = False,
                 width: float = 1.0):
        super().__init__()
        widths = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(layers, widths), start=1):
            blocks = [IBasicBlock(cin, cout, 2, se)] + [IBasicBlock(cout, cout, 1, se) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        # BN -> dropout -> FC -> BN1d embedding head (arcface_torch freezes the last BN's scale at 1)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def _register(depth: int):
    @BACKBONES.register(f"iresnet{depth}", f"r{depth}")
    def build(embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
        return IResNet(DEPTHS[depth], embedding_size, dropout, width=width)

    @BACKBONES.register(f"irse{depth}")
    def build_se(embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
        return IResNet(DEPTHS[depth], embedding_size, dropout, se=True, width=width)


for _d in DEPTHS:
    _register(_d)


@BACKBONES.register("iresnet")
def iresnet(layers: list[int], embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    """Any depth list, e.g. ``layers: [3, 4, 6, 3]``."""
    return IResNet(list(layers), embedding_size, dropout, width=width)


@BACKBONES.register("irse")
def irse(layers: list[int], embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    return IResNet(list(layers), embedding_size, dropout, se=True, width=width)
