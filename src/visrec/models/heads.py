"""Embedding heads shared by backbones that are not bound to a third-party key layout."""

from __future__ import annotations

from torch import nn


class GDC(nn.Module):
    """Global depthwise conv head (MobileFaceNet): kxk depthwise conv over the final feature map (no
    pooling, so position matters) -> BN -> flatten -> FC (no bias) -> BN1d."""

    def __init__(self, channels: int, embedding_size: int, kernel: int = 7):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, embedding_size, bias=False)
        self.out = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        return self.out(self.fc(self.bn(self.dw(x)).flatten(1)))


class BNDropoutFC(nn.Module):
    """IResNet's head: BN2d -> dropout -> FC over the flattened CxHxW map -> BN1d."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.out = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        return self.out(self.fc(self.dropout(self.bn(x).flatten(1))))
