"""Turn images into embeddings with any face backbone (batched, no grad)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


#: The most images a network runs on at once on a CPU, whatever batch the caller reads at a time. Depthwise and
#: narrow networks are bound by memory traffic there: the activations of 8 faces at 112x112 stay in the caches,
#: those of 256 do not. On one core MobileFaceNet embeds 68 images/s in calls of 8 against 19 in calls of 256,
#: PFLD 110 against 25, while the compute-bound iresnet50 gains 1.4x (`benchmarks/forward_batch.py`,
#: BENCHMARKS.md). On an accelerator the caller's batch is used as given.
CPU_FORWARD_BATCH = 8


def forward_batch(batch: int, device: str | torch.device) -> int:
    """How many images one forward call takes on ``device`` when the caller holds ``batch`` of them."""
    batch = max(1, int(batch))
    return min(batch, CPU_FORWARD_BATCH) if torch.device(device).type == "cpu" else batch


def for_inference(module: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``module`` itself, in eval mode on ``device``, its 4-D weights in NHWC (``channels_last``): the layout
    visrec runs a network in once it loads it to run (run dirs, checkpoints, a catalogue index's descriptor,
    a distillation teacher). The convolutions then run NHWC whatever layout the input has (the first one
    converts it). In eval mode without grad on a 2-core CPU, calls of 8 images, two runs: 1.08x to 1.57x the
    images/s of NCHW weights for the face and landmark networks, ResNet-50 at 224 px 1.21-1.31x; only the
    products ResNet-18 at 64 px was slower (0.82x) (`benchmarks/memory_format.py --inference`, BENCHMARKS.md).
    NHWC is also the layout of the tensor cores' convolutions on CUDA. Outputs equal NCHW's up to the float
    rounding of another convolution algorithm; the ONNX export of such a module is the same file as the NCHW
    module's (tested)."""
    return module.eval().to(device).to(memory_format=torch.channels_last)


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """HWC RGB uint8 images -> float32 NCHW in [-1, 1] ((x/255 - 0.5) / 0.5, as arcface_torch)."""
    arr = np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray) else images)
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return t.div_(127.5).sub_(1.0)


@torch.no_grad()
def embed_images(model: nn.Module, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 256,
                 device: str | torch.device = "cpu", flip: bool = False,
                 to_tensor: Callable[[np.ndarray], torch.Tensor] = images_to_tensor) -> np.ndarray:
    """Embeddings (N, D) float32, not normalised, of HWC RGB uint8 ``images``. ``flip`` adds the embedding of
    the mirrored image (the flip-test of the verification protocols). ``to_tensor`` turns a slice of the images
    into the network's float NCHW input (visrec's [-1, 1] by default). The network runs on ``forward_batch``
    images at a time (at most ``CPU_FORWARD_BATCH`` on a CPU)."""
    device = torch.device(device)
    step = forward_batch(batch_size, device)
    was_training = model.training
    model.eval().to(device)
    out = []
    for start in range(0, len(images), step):
        x = to_tensor(images[start:start + step]).to(device)
        emb = model(x).float()
        if flip:
            emb = emb + model(torch.flip(x, dims=[3])).float()
        out.append(emb.cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()
