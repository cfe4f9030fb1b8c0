"""IR-SE: IResNet units with squeeze-excitation (the "attention"/SE residual nets of the LFR'19 large-track
entries; SE from Hu et al., "Squeeze-and-Excitation Networks").

Each unit's residual branch (BN -> conv -> BN -> PReLU -> conv -> BN) is re-weighted per channel by
sigmoid(W2 relu(W1 avgpool(r))) with a bottleneck of C/16 before the identity is added. Body, stride
plan and BN-dropout-FC-BN head are IResNet's; the ``se.*`` keys are visrec's own (there is no
arcface_torch checkpoint for this family). irse50: ~6.3 GMACs, irse100: ~12.1 GMACs at 1x3x112x112
(SE adds few MACs).
"""

from __future__ import annotations

from torch import nn

from visrec.models import BACKBONES
from visrec.models.iresnet import DEPTHS, IBasicBlock, IResNet


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))), fc as 1x1 convs without bias, hidden = C // reduction."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        return x * self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class IBasicBlockSE(IBasicBlock):
    """IResNet unit whose residual branch passes through squeeze-excitation before the addition."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, stride)
        self.se = SqueezeExcite(cout)

    def residual(self, x):
        return self.se(super().residual(x))


def irse_net(layers: list[int], embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    return IResNet(list(layers), embedding_size, dropout, width, block=IBasicBlockSE)


@BACKBONES.register("irse50", "ir_se50")
def irse50(embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    return irse_net(DEPTHS[50], embedding_size, dropout, width)


@BACKBONES.register("irse100", "ir_se100")
def irse100(embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    return irse_net(DEPTHS[100], embedding_size, dropout, width)


@BACKBONES.register("irse", "ir_se")
def irse(layers: list[int], embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0) -> IResNet:
    """Any depth list, e.g. ``layers: [3, 4, 14, 3]`` (= irse50)."""
    return irse_net(layers, embedding_size, dropout, width)
