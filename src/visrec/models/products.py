"""Product-retrieval descriptors: an ImageNet backbone (or a visrec face backbone) -> pooling -> [FC] -> L2.

Input of every descriptor: (N, 3, S, S) float32, RGB normalised with the ImageNet mean/std
(``visrec.data.products.preprocess_product``: white square padding, resize to S). Output: (N, D)
L2-normalised float32, so the inner product of two descriptors is their cosine similarity.

Backbones by name (``source``):
- ``timm`` (default): any ``timm.create_model`` name — CNNs give a (N, C, H, W) map that the pooling
  module reduces; ViTs give tokens, reduced by the model's own head pooling (``pooling`` is ignored).
- ``torchvision``: any ``torchvision.models.get_model`` name; its convolutional trunk (``.features``, or
  everything before ``avgpool``) feeds the pooling.
- ``visrec``: a face backbone from ``visrec.models.BACKBONES``; its embedding is the descriptor (the
  input is mapped back to [-1, 1] and resized to 112x112, the face models' input).
Weights are random unless ``weights`` names a local state-dict file (``.pth``/``.pt``/``.safetensors``;
classifier keys may be absent or extra) or ``hub=True`` (the library's own downloader; needs internet).

``product_ensemble`` combines several descriptors: ``combine="concat"`` concatenates the L2-normalised
parts scaled by 1/sqrt(n), so the inner product is the MEAN of the parts' cosines (the "sum of
similarities" ensemble, up to the factor n) and the result stays unit-norm; ``combine="sum"`` adds the
parts (equal dimensions) and re-normalises.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visrec._optional import require
from visrec._torchfile import read_torch_file
from visrec.data.products import IMAGENET_MEAN, IMAGENET_STD
from visrec.errors import ConfigError, DataError
from visrec.models import BACKBONES
from visrec.models.meta import on_meta_device
from visrec.models.pooling import build_pooling


def _load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local state dict; keys only of a classifier (fc/classifier/head) may be missing or extra."""
    path = Path(path)
    if not path.exists():
        raise DataError("weights file not found", path=path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = read_torch_file(path)  # weights_only; a refusal names the file and the globals
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read weights: {exc}", path=path) from None
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    missing, unexpected = module.load_state_dict(state, strict=False)
    head = ("fc.", "classifier.", "head.", "last_linear.")
    bad = [k for k in list(missing) + list(unexpected) if not k.startswith(head)]
    if bad:
        raise DataError(f"weights do not match the backbone: {len(bad)} keys differ, e.g. {bad[:3]}", path=path)


class _Trunk(nn.Module):
    """Feature-map trunk of a timm / torchvision classifier."""

    def __init__(self, name: str, source: str, weights: str | None, hub: bool):
        super().__init__()
        if source == "timm":
            timm = require("timm", "products")
            try:
                self.net = timm.create_model(name, pretrained=hub, num_classes=0)
            except RuntimeError as exc:
                raise ConfigError(f"timm has no model {name!r}: {exc}") from None
            self.out_channels = int(self.net.num_features)
        else:
            import torchvision

            try:
                net = torchvision.models.get_model(name, weights="DEFAULT" if hub else None)
            except ValueError as exc:
                raise ConfigError(f"torchvision has no model {name!r}: {exc}") from None
            if hasattr(net, "features"):
                self.net = net.features
            else:
                children = dict(net.named_children())
                if "avgpool" not in children:
                    raise ConfigError(f"torchvision model {name!r}: no .features and no avgpool to cut at")
                keep = list(children)[:list(children).index("avgpool")]
                self.net = nn.Sequential(*[children[k] for k in keep])
            with torch.no_grad():
                self.out_channels = int(self.net.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
        if weights:
            _load_weights(self.net, weights)

    def forward(self, x):
        if hasattr(self.net, "forward_features"):
            feats = self.net.forward_features(x)
            if feats.dim() == 3:  # ViT-style tokens: the model's own head pooling (cls token or mean)
                return self.net.forward_head(feats, pre_logits=True)
            return feats
        return self.net(x)


class _FaceTrunk(nn.Module):
    """A visrec face backbone fed ImageNet-normalised input (undone to [-1, 1], resized to 112)."""

    def __init__(self, name: str, weights: str | None, **kwargs):
        super().__init__()
        self.net = BACKBONES.build(name, **kwargs)
        if weights:
            _load_weights(self.net, weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with on_meta_device():  # shapes only
            self.out_channels = int(BACKBONES.build(name, **kwargs).eval()(torch.zeros(1, 3, 112, 112)).shape[1])

    def forward(self, x):
        x = (x * self.std + self.mean) * 2.0 - 1.0
        if x.shape[-1] != 112:
            x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
        return self.net(x)


class ProductDescriptor(nn.Module):
    """Backbone -> pooling (for feature maps) -> optional FC to ``dim`` -> L2 normalisation."""

    def __init__(self, backbone: str = "resnet50", pooling: str = "gem", pooling_kwargs: dict | None = None,
                 dim: int | None = None, source: str = "timm", weights: str | None = None, hub: bool = False,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        if source not in ("timm", "torchvision", "visrec"):
            raise ConfigError(f"unknown backbone source {source!r}: timm | torchvision | visrec")
        if source == "visrec":
            self.trunk = _FaceTrunk(backbone, weights, **(backbone_kwargs or {}))
            self.pool = None
        else:
            self.trunk = _Trunk(backbone, source, weights, hub)
            self.pool = build_pooling(pooling, **(pooling_kwargs or {}))
        channels = self.trunk.out_channels
        self.fc = nn.Linear(channels, dim) if dim else None
        self.dim = dim or channels

    def forward(self, x):
        feats = self.trunk(x)
        if feats.dim() == 4:
            feats = self.pool(feats)
        if self.fc is not None:
            feats = self.fc(feats)
        return F.normalize(feats.float(), dim=1)


class DescriptorEnsemble(nn.Module):
    """Several descriptors on the same input; see the module docstring for ``combine``."""

    def __init__(self, heads: list[ProductDescriptor], combine: str = "concat"):
        super().__init__()
        if not heads:
            raise ConfigError("product_ensemble needs at least one head")
        if combine not in ("concat", "sum"):
            raise ConfigError(f"unknown combine {combine!r}: concat | sum")
        if combine == "sum" and len({h.dim for h in heads}) > 1:
            raise ConfigError(f"combine=sum needs equal dimensions, got {[h.dim for h in heads]}")
        self.heads = nn.ModuleList(heads)
        self.combine = combine
        self.dim = sum(h.dim for h in heads) if combine == "concat" else heads[0].dim

    def forward(self, x):
        parts = [h(x) for h in self.heads]
        if self.combine == "concat":
            return torch.cat(parts, dim=1) / math.sqrt(len(parts))
        return F.normalize(torch.stack(parts).sum(0), dim=1)


@BACKBONES.register("product")
def product(backbone: str = "resnet50", pooling: str = "gem", pooling_kwargs: dict | None = None,
            dim: int | None = None, source: str = "timm", weights: str | None = None, hub: bool = False,
            backbone_kwargs: dict | None = None) -> ProductDescriptor:
    """One retrieval descriptor (module docstring)."""
    return ProductDescriptor(backbone, pooling, pooling_kwargs, dim, source, weights, hub, backbone_kwargs)


@BACKBONES.register("product_ensemble")
def product_ensemble(heads: list[dict], combine: str = "concat") -> DescriptorEnsemble:
    """Several descriptors, e.g. ``heads: [{backbone: resnet50, pooling: rmac}, {backbone: densenet201}]``."""
    return DescriptorEnsemble([ProductDescriptor(**h) for h in heads], combine)
