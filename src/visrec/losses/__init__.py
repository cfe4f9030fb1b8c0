"""Margin losses, PartialFC, distillation and landmark losses, built by name."""

from __future__ import annotations

from visrec.registry import Registry

MARGIN_LOSSES: Registry = Registry("margin loss")


def build_margin_loss(name: str, **kwargs):
    return MARGIN_LOSSES.build(name, **kwargs)


# One import line per loss file: importing runs its @MARGIN_LOSSES.register decorator.

from visrec.losses import margins  # noqa: E402,F401
