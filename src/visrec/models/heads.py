"""The two face embedding heads, as modules.

Both keep arcface_torch's key names so that MobileFaceNet and IResNet reuse them and still load that
project's ``backbone.pth`` with ``strict=True``:

- ``GDC`` (MobileFaceNet): global depthwise conv. A kxk conv over the whole final kxk map (no
  pooling, so every position keeps its own weight) -> BN -> flatten -> FC (no bias) -> BN1d.
  Keys: ``layers.0.layers.{0,1}`` (conv, BN), ``layers.2`` (FC), ``layers.3`` (BN1d).
- ``BNDropoutFC`` (IResNet): BN2d -> flatten -> dropout -> FC (with bias) over the whole CxHxW map
  -> BN1d whose scale is fixed at 1. Keys: ``bn2``, ``fc``, ``features`` (and ``dropout``, which
  holds no tensor). IResNet keeps these modules at its top level, so it installs them on itself
  with ``BNDropoutFC.install`` and runs them with ``BNDropoutFC.embed`` instead of owning a child.
"""

from __future__ import annotations

from torch import nn


class ConvBN(nn.Module):
    """Conv (no bias) -> BN [-> PReLU], children in ``.layers`` (arcface_torch's ConvBlock/LinearBlock
    layout: keys ``layers.0`` conv, ``layers.1`` BN, ``layers.2`` PReLU)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, act: bool = True):
        super().__init__()
        mods = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            mods.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: (B, C, k, k) -> (B, embedding_size).

    ``groups`` defaults to C (depthwise); VarGFaceNet's variable groups use C // 8. ``project`` adds a
    1x1 conv -> BN -> PReLU to that many channels after the global conv (VarGFaceNet's embedding
    setting, which shrinks the FC); without it the keys are exactly arcface_torch's."""

    def __init__(self, channels: int = 512, embedding_size: int = 512, kernel: int = 7, groups: int | None = None,
                 project: int | None = None):
        super().__init__()
        mods = [ConvBN(channels, channels, kernel, groups=groups or channels, act=False)]  # linear: no activation
        if project:
            mods.append(ConvBN(channels, project))
        fc_in = project or channels
        mods += [nn.Flatten(), nn.Linear(fc_in, embedding_size, bias=False), nn.BatchNorm1d(embedding_size)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class BNDropoutFC(nn.Module):
    """IResNet's head: (B, C, s, s) -> BN2d -> flatten -> dropout -> FC -> BN1d -> (B, embedding_size).

    The final BN1d's scale is fixed at 1 and not trained (as arcface_torch does), so the embedding's
    spread is set by the FC alone."""

    def __init__(self, channels: int, spatial: int, embedding_size: int = 512, dropout: float = 0.0):
        super().__init__()
        self.install(self, channels, spatial, embedding_size, dropout)

    @staticmethod
    def install(owner: nn.Module, channels: int, spatial: int, embedding_size: int, dropout: float) -> None:
        """Create the head's modules as attributes of ``owner`` (``bn2``, ``dropout``, ``fc``, ``features``)."""
        owner.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        owner.dropout = nn.Dropout(p=dropout)
        owner.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        owner.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(owner.features.weight, 1.0)
        owner.features.weight.requires_grad = False

    @staticmethod
    def embed(owner: nn.Module, x):
        """Run the head modules installed on ``owner``."""
        return owner.features(owner.fc(owner.dropout(owner.bn2(x).flatten(1))))

    def forward(self, x):
        return self.embed(self, x)
