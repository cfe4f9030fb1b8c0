"""Turn images into embeddings with any face backbone (batched, no grad)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """HWC RGB uint8 images -> float32 NCHW in [-1, 1] ((x/255 - 0.5) / 0.5, as arcface_torch)."""
    arr = np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return t.div_(127.5).sub_(1.0)


@torch.no_grad()
def embed_images(model: nn.Module, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 256,
                 device: str | torch.device = "cpu", flip: bool = False) -> np.ndarray:
    """Embeddings (N, D) float32, not normalised. ``flip`` adds the embedding of the mirrored image
    (the flip-test of the verification protocols)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size]).to(device)
        emb = model(x).float()
        if flip:
            emb = emb + model(torch.flip(x, dims=[3])).float()
        out.append(emb.cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()
