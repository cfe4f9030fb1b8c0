"""``searched``: a backbone built from an architecture spec — plain data (a dict, or the YAML a search writes)
— so that a network found by architecture search trains, counts, exports and loads like any named backbone.

A spec (checked by :class:`ArchSpec`; every error names the stage and the field)::

    task: faces                   # faces: an embedding (GDC head, ``embedding_size``); landmarks: points
    input_size: 112               # the square input side, pixels
    stem: {channels: 32, kernel: 3, stride: 2, act: prelu}
    stages:                       # in order; a stage's first block takes its stride, the rest stride 1
      - {block: mbconv, kernel: 3, expand: 1, repeats: 1, channels: 16, stride: 1, se: true, act: silu}
      - {block: fused_mbconv, kernel: 3, expand: 4, repeats: 2, channels: 24, stride: 2, se: false, act: relu}
      - {block: bottleneck, kernel: 3, expand: 4, repeats: 2, channels: 64, stride: 2, se: false, act: prelu}
    head: {channels: 512, act: prelu}

Blocks (each keeps a residual connection when its input and output shapes match):

- ``mbconv``: MobileNetV2/EfficientNet's inverted residual — 1x1 expand (``expand`` x input channels), kxk
  depthwise (stride), squeeze-excitation when ``se``, linear 1x1 projection.
- ``fused_mbconv``: EfficientNetV2's — a full kxk conv does the expansion (stride), then SE and the linear
  1x1 projection (with ``expand: 1``, the kxk conv alone).
- ``bottleneck``: ResNet's — 1x1 reduce to ``channels / expand``, kxk conv (stride), 1x1 back to ``channels``;
  a strided or widening one adds a 1x1 projection on the shortcut. For the large tracks' residual stages.

Heads: faces end on a 1x1 conv to ``head.channels`` then the GDC embedding head (global depthwise conv over
the last map -> FC -> BN, MobileFaceNet's); landmarks on global average pooling -> FC -> sigmoid, points
(B, P, 2) in [0, 1] of the crop (the regression head of ``pfld``, without its pose branch).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from visrec.errors import ConfigError
from visrec.models import BACKBONES
from visrec.models.heads import GDC

ACTIVATIONS = {"relu": nn.ReLU, "prelu": nn.PReLU, "silu": nn.SiLU, "hswish": nn.Hardswish}
BLOCKS = ("mbconv", "fused_mbconv", "bottleneck")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StemSpec(_Strict):
    channels: int = Field(32, ge=8, le=512)
    kernel: Literal[3, 5, 7] = 3
    stride: Literal[1, 2] = 2
    act: Literal["relu", "prelu", "silu", "hswish"] = "prelu"


class StageSpec(_Strict):
    block: Literal["mbconv", "fused_mbconv", "bottleneck"]
    kernel: Literal[3, 5, 7] = 3
    expand: int = Field(1, ge=1, le=8)
    repeats: int = Field(1, ge=1, le=16)
    channels: int = Field(ge=8, le=4096)
    stride: Literal[1, 2] = 1
    se: bool = False
    act: Literal["relu", "prelu", "silu", "hswish"] = "prelu"


class HeadSpec(_Strict):
    channels: int = Field(512, ge=8, le=4096)
    act: Literal["relu", "prelu", "silu", "hswish"] = "prelu"


class ArchSpec(_Strict):
    """A checked architecture spec (module docstring)."""

    task: Literal["faces", "landmarks"] = "faces"
    input_size: int = Field(112, ge=32, le=1024)
    stem: StemSpec = Field(default_factory=StemSpec)
    stages: list[StageSpec] = Field(min_length=1, max_length=16)
    head: HeadSpec = Field(default_factory=HeadSpec)

    @property
    def final_side(self) -> int:
        """The side of the last feature map, pixels (what the GDC head's kernel spans)."""
        side = -(-self.input_size // self.stem.stride)
        for s in self.stages:
            side = -(-side // s.stride)
        return side


def check_spec(spec, where: str = "architecture spec") -> ArchSpec:
    """``spec`` (a dict, or an :class:`ArchSpec`) checked, or a :class:`ConfigError` naming the stage and field."""
    if isinstance(spec, ArchSpec):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a mapping (task, input_size, stem, stages, head), got {type(spec).__name__}")
    try:
        return ArchSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(spec)"
        if first["loc"][:1] == ("stages",) and len(first["loc"]) > 1:
            field = f"stages[{first['loc'][1]}]" + "".join(f".{p}" for p in first["loc"][2:])
        if first["type"] == "literal_error" and first["loc"][-1] == "block":
            return _raise(where, field, f"unknown block {first.get('input')!r}: expected one of {', '.join(BLOCKS)}")
        return _raise(where, field, first["msg"])


def _raise(where: str, field: str, message: str):
    raise ConfigError(f"{where}: {field}: {message}")


def _act(name: str, channels: int) -> nn.Module:
    return nn.PReLU(channels) if name == "prelu" else ACTIVATIONS[name](inplace=True)


def _conv(cin, cout, k=1, s=1, groups=1, act: str | None = "prelu") -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(_act(act, cout))
    return nn.Sequential(*layers)


class _SE(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return x * self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class Block(nn.Module):
    """One block of a stage (module docstring): ``mbconv``, ``fused_mbconv`` or ``bottleneck``."""

    def __init__(self, kind: str, cin: int, cout: int, kernel: int, expand: int, stride: int, se: bool, act: str):
        super().__init__()
        if kind == "mbconv":
            mid = cin * expand
            body = ([_conv(cin, mid, act=act)] if expand != 1 else []) + [_conv(mid, mid, kernel, stride, mid, act)]
        elif kind == "fused_mbconv":
            mid = cin * expand if expand != 1 else cout
            body = [_conv(cin, mid, kernel, stride, act=act)]
        else:
            mid = max(8, cout // expand)
            body = [_conv(cin, mid, act=act), _conv(mid, mid, kernel, stride, act=act)]
        if se:
            body.append(_SE(mid, max(8, cin // 4)))
        if kind != "fused_mbconv" or expand != 1:
            body.append(_conv(mid, cout, act=None))  # linear projection
        self.body = nn.Sequential(*body)
        self.residual = stride == 1 and cin == cout
        self.shortcut = None
        if kind == "bottleneck" and not self.residual:  # ResNet's projection shortcut
            self.shortcut = _conv(cin, cout, 1, stride, act=None)
        self.out_act = _act(act, cout) if kind == "bottleneck" else nn.Identity()  # ResNet: after the sum

    def forward(self, x):
        y = self.body(x)
        if self.residual:
            y = y + x
        elif self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.out_act(y)


class SearchedNet(nn.Module):
    """The network a spec describes (module docstring); ``spec`` is the checked :class:`ArchSpec`."""

    def __init__(self, spec, embedding_size: int = 512, num_points: int = 106):
        super().__init__()
        self.spec = spec = check_spec(spec)
        layers = [_conv(3, spec.stem.channels, spec.stem.kernel, spec.stem.stride, act=spec.stem.act)]
        cin = spec.stem.channels
        for s in spec.stages:
            for i in range(s.repeats):
                layers.append(Block(s.block, cin, s.channels, s.kernel, s.expand, s.stride if i == 0 else 1,
                                    s.se, s.act))
                cin = s.channels
        layers.append(_conv(cin, spec.head.channels, act=spec.head.act))
        self.body = nn.Sequential(*layers)
        self.task = spec.task
        if spec.task == "faces":
            self.head = GDC(spec.head.channels, embedding_size, kernel=spec.final_side)
        else:
            self.num_points = num_points
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.head.channels, 2 * num_points))

    def forward(self, x):
        y = self.head(self.body(x))
        return y if self.task == "faces" else torch.sigmoid(y).view(-1, self.num_points, 2)


@BACKBONES.register("searched")
def searched(spec: dict, embedding_size: int = 512, num_points: int = 106) -> SearchedNet:
    return SearchedNet(spec, embedding_size, num_points)
