"""Residual Attention Network (Wang et al., "Residual Attention Network for Image Classification", CVPR
2017) adapted to 112x112 faces the way InsightFace adapted it (Lin Xiong's ``fresattnet`` symbol for the
MXNet ``recognition`` trainer, 2018): 3x3 stride-1 stem, no max-pool, PReLU, the "E" output head.

Body, at width_mult 1 (channels 64 / 256 / 512 / 1024 / 2048 as in the paper):

  stem    3x3 conv s1 (64) -> BN -> PReLU                                   112x112
  stage1  bottleneck s2 (256)  + m1 attention modules, 3 mask levels        56x56
  stage2  bottleneck s2 (512)  + m2 attention modules, 2 mask levels        28x28
  stage3  bottleneck s2 (1024) + m3 attention modules, 1 mask level         14x14
  stage4  bottleneck s2 (2048) + 2 bottlenecks, no attention (nothing left to pool at 7x7)
  head    BN2d -> flatten -> dropout -> FC -> BN1d (``heads.BNDropoutFC``) -> embedding_size

Residual unit: pre-activation bottleneck in InsightFace's "improved" form,
BN -> 1x1 -> BN -> PReLU -> 3x3 (stride) -> BN -> PReLU -> 1x1 -> BN, plus the input (1x1 conv + BN
projection when the shape changes); the middle width is a quarter of the output width.

Attention module (paper hyper-parameters p=1, t=2, r=1): ``first`` (p units) -> trunk T (t units) and
soft-mask M in parallel -> ``(1 + M(x)) * T(x)`` (attention residual learning) -> ``last`` (p units).
The mask branch is bottom-up top-down: ``levels`` times [3x3/2 max-pool -> r units] (2r units at the
innermost level), then back up: bilinear up-sampling to the next larger level plus a skip connection (one
unit on the bottom-up map of that level), r units; a final bilinear up-sampling to the trunk size, then
BN -> PReLU -> 1x1 -> BN -> PReLU -> 1x1 (with bias) -> sigmoid. Levels follow the feature size as in the
paper: 3 at 56x56 (56 -> 28 -> 14 -> 7, 2 skip connections), 2 at 28x28 (1 skip), 1 at 14x14 (none).
As in the paper, an up-sampled map is summed with the skip connection only; the tengshaofeng PyTorch
port, which InsightFace's and FaceX-Zoo's versions follow, also adds the level's bottom-up map and, before
the sigmoid head, the trunk output.

Depth and layout, ``LAYOUTS`` (attention modules per stage 1-3). Depth by the paper's count = 12 * (m1 +
m2 + m3) + 20 (each module adds p + t + p = 4 trunk units of 3 layers; 6 plain units, stem and FC add 20):

- 56: (1, 1, 1) and 92: (1, 2, 3): the paper, and InsightFace ``fresattnet`` (which defines only these two
  and raises for any other depth). FaceX-Zoo's ``AttentionNets.py`` takes free per-stage counts (its
  config's default is 1-1-1); GluonCV's ``residual_attentionnet.py`` adds 128 (2, 3, 4), 164 (3, 4, 5),
  200, 236, 452 -- and no 152.
- 152: (1, 2, 6). No public implementation found here defines an Attention-152 (InsightFace: 56/92 only;
  FaceX-Zoo: free counts; GluonCV: 56/92/128/164/200/236/452). (1, 2, 6) is the layout this project's task
  named ("1-2-6"); it continues the paper's 56 -> 92 step, which added modules only after stage 1, and it
  lands just under the 30 G Large budget (about the ~29.5 GFLOPs quoted for a LFR'19 AttentionNet-152,
  a figure not confirmed from a public source). Caveat: by the paper's count (1, 2, 6) has 128 layers
  (nine modules, like GluonCV's (2, 3, 4) "128", 29.7455 GFLOPs here). A layout that counts 152 layers
  needs eleven modules, e.g. (1, 2, 8) at 34.9556 GFLOPs, over the budget. Any layout:
  ``attention_net(modules=[m1, m2, m3])``.

LFR-rule FLOPs (``visrec budget check NAME -p deepglint-large``, i.e. ``visrec.budget.lfr_flops`` on
1x3x112x112, conv + FC only), width_mult 1, 512-d, and parameters:

  attention56   (1, 1, 1):  12.5071 GFLOPs ( 6.262 GMACs),  81.20 M params, fp32 ONNX 324.5 MB
  attention92   (1, 2, 3):  21.0265 GFLOPs (10.525 GMACs), 101.91 M params, fp32 ONNX 407.0 MB
  attention152  (1, 2, 6):  29.3840 GFLOPs (14.706 GMACs), 128.38 M params, fp32 ONNX 512.5 MB

The MACs of 56 and 92 match the paper's 6.2 / 10.4 G (its 224x224 ImageNet nets have the same 56-28-14-7
maps). 51.38 M of the parameters are the head's FC (2048 x 7 x 7 -> 512). Each attention module costs
about 2.8 GFLOPs wherever it sits: a stage halves the map and doubles the channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visrec.models import BACKBONES
from visrec.models.heads import BNDropoutFC

# attention modules per stage (stages 1-3; stage 4 at 7x7 has none). See the module docstring for sources.
LAYOUTS: dict[int, tuple[int, int, int]] = {56: (1, 1, 1), 92: (1, 2, 3), 152: (1, 2, 6)}
CHANNELS = (64, 256, 512, 1024, 2048)  # stem, stage 1-4 outputs (paper / InsightFace fresattnet)
MASK_LEVELS = (3, 2, 1)  # mask-branch down-sampling levels at 56x56, 28x28, 14x14


def _width(c: int, width_mult: float) -> int:
    """Channels scaled by ``width_mult``, a multiple of 8, at least 8."""
    return max(8, int(round(c * width_mult / 8)) * 8)


class Bottleneck(nn.Module):
    """Pre-activation bottleneck: BN -> 1x1 -> BN -> PReLU -> 3x3 (stride) -> BN -> PReLU -> 1x1 -> BN,
    plus the input (1x1 conv (stride) + BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = max(1, cout // 4)
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid, eps=1e-5)
        self.prelu1 = nn.PReLU(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid, eps=1e-5)
        self.prelu2 = nn.PReLU(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        y = self.prelu1(self.bn2(self.conv1(self.bn1(x))))
        y = self.bn4(self.conv3(self.prelu2(self.bn3(self.conv2(y)))))
        return y + (x if self.downsample is None else self.downsample(x))


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[Bottleneck(channels, channels) for _ in range(n)])


class MaskBranch(nn.Module):
    """Bottom-up top-down soft mask: (B, C, H, W) -> sigmoid weights in (0, 1), same shape.

    ``down[i]``: units after the i-th 3x3/2 max-pool (r units, 2r at the innermost level);
    ``skip[i]``: one unit on ``down[i]``'s output, added to the up-sampled map of level i (i < levels-1);
    ``up[i]``: r units after that sum; ``out``: BN -> PReLU -> 1x1 -> BN -> PReLU -> 1x1 (bias), its last
    conv (``out[5]``) giving the logits."""

    def __init__(self, channels: int, levels: int, r: int = 1):
        super().__init__()
        if levels < 1:
            raise ValueError(f"a mask branch needs at least one down-sampling level, got {levels}")
        self.levels = levels
        self.down = nn.ModuleList(_units(channels, 2 * r if i == levels - 1 else r) for i in range(levels))
        self.skip = nn.ModuleList(_units(channels, 1) for _ in range(levels - 1))
        self.up = nn.ModuleList(_units(channels, r) for _ in range(levels - 1))
        self.out = nn.Sequential(
            nn.BatchNorm2d(channels), nn.PReLU(channels), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.PReLU(channels), nn.Conv2d(channels, channels, 1, bias=True))

    @staticmethod
    def upsample(y):
        # a constant x2 factor (every map is even: 56, 28, 14 pool to 28, 14, 7), so the exported Resize's
        # scales are constants (Concat of two Constant nodes in a graph exported with BatchNorm kept) rather
        # than a function of the input's shape. Note: ONNX shape inference does not see through that Concat,
        # so ``visrec budget check model.onnx`` misses the mask head's two 1x1 convs after the last up-sampling
        # unless it folds constant Concats first; the PyTorch count (``visrec budget check attention56``) is whole.
        return F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, x):
        feats = []
        y = x
        for down in self.down:  # bottom-up
            y = down(F.max_pool2d(y, 3, 2, 1))
            feats.append(y)
        for i in reversed(range(self.levels - 1)):  # top-down with skip connections
            y = self.up[i](self.upsample(y) + self.skip[i](feats[i]))
        return torch.sigmoid(self.out(self.upsample(y)))


class AttentionModule(nn.Module):
    """``first`` (p units) -> trunk T (t units) and mask M -> ``last((1 + M) * T)`` (p units)."""

    def __init__(self, channels: int, levels: int, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        self.first = _units(channels, p)
        self.trunk = _units(channels, t)
        self.mask = MaskBranch(channels, levels, r)
        self.last = _units(channels, p)

    def forward(self, x):
        x = self.first(x)
        return self.last((1 + self.mask(x)) * self.trunk(x))


class AttentionNet(nn.Module):
    """Residual Attention Network for (B, 3, 112, 112) faces in [-1, 1] -> (B, embedding_size).

    ``depth`` picks a layout from ``LAYOUTS`` (56, 92, 152); ``modules`` (three per-stage counts, each
    >= 0) overrides it. ``width_mult`` scales every channel count (multiples of 8); ``dropout`` is the
    head's; ``fp16`` runs the body under CUDA float16 autocast and the head in float32 (arcface_torch's
    switch; a no-op on CPU). ``p, t, r``: the paper's module hyper-parameters (1, 2, 1)."""

    def __init__(self, depth: int = 56, embedding_size: int = 512, width_mult: float = 1.0, dropout: float = 0.0,
                 fp16: bool = False, modules: Sequence[int] | None = None, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        if modules is None:
            if depth not in LAYOUTS:
                raise ValueError(f"no AttentionNet layout for depth {depth}; known: {sorted(LAYOUTS)} "
                                 "(or pass modules=[m1, m2, m3])")
            modules = LAYOUTS[depth]
        modules = tuple(int(m) for m in modules)
        if len(modules) != 3 or any(m < 0 for m in modules):
            raise ValueError(f"modules must list 3 per-stage attention-module counts >= 0, got {modules!r}")
        if min(p, t, r) < 1:
            raise ValueError(f"p, t, r must be >= 1, got {(p, t, r)}")
        self.layout = modules
        self.fp16 = fp16
        c = [_width(ch, width_mult) for ch in CHANNELS]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0], eps=1e-5)
        self.prelu = nn.PReLU(c[0])
        for i in range(3):  # 56x56, 28x28, 14x14
            blocks = [Bottleneck(c[i], c[i + 1], 2)]
            blocks += [AttentionModule(c[i + 1], MASK_LEVELS[i], p, t, r) for _ in range(modules[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.layer4 = nn.Sequential(Bottleneck(c[3], c[4], 2), Bottleneck(c[4], c[4]), Bottleneck(c[4], c[4]))  # 7x7
        BNDropoutFC.install(self, c[4], 7, embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def attention_modules(self) -> list[AttentionModule]:
        return [m for m in self.modules() if isinstance(m, AttentionModule)]

    def forward(self, x):
        """(B, 3, 112, 112) in [-1, 1] -> (B, embedding_size), not normalised."""
        amp = (torch.autocast("cuda", dtype=torch.float16) if self.fp16 and x.is_cuda
               else contextlib.nullcontext())
        with amp:
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.fp16:
            x = x.float()
        return BNDropoutFC.embed(self, x)


def _register(depth: int):
    @BACKBONES.register(f"attention{depth}")
    def build(embedding_size: int = 512, width_mult: float = 1.0, dropout: float = 0.0, fp16: bool = False
              ) -> AttentionNet:
        return AttentionNet(depth, embedding_size, width_mult, dropout, fp16)

    build.__name__ = f"attention{depth}"
    build.__doc__ = f"Residual Attention Network {depth}: attention modules per stage {LAYOUTS[depth]}."


for _d in LAYOUTS:
    _register(_d)


@BACKBONES.register("attention_net")
def attention_net(modules: list[int], embedding_size: int = 512, width_mult: float = 1.0, dropout: float = 0.0,
                  fp16: bool = False) -> AttentionNet:
    """Any layout, e.g. ``modules: [2, 3, 4]`` (GluonCV's Attention-128)."""
    return AttentionNet(embedding_size=embedding_size, width_mult=width_mult, dropout=dropout, fp16=fp16,
                        modules=modules)
