"""Backbones and heads, built by name: ``build_backbone("mobilefacenet", embedding_size=512)``."""

from __future__ import annotations

from visrec.registry import Registry

BACKBONES: Registry = Registry("backbone")


def build_backbone(name: str, **kwargs):
    """Build a registered backbone. Face backbones take (B, 3, 112, 112) in [-1, 1], return (B, D)."""
    return BACKBONES.build(name, **kwargs)


# One import line per backbone file: importing runs its @BACKBONES.register decorator.

from visrec.models import (attention_net, effnet_face, iresnet, irse, landmark_nets, mobilefacenet, products, quality,  # noqa: E402,F401
                           searched, vargfacenet)

from visrec.models.contract import ModelContract, Threshold  # noqa: E402,F401
from visrec.models.loading import LoadedModel, load_model  # noqa: E402,F401
