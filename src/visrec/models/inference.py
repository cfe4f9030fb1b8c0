"""A model over a data set: the arrays that :mod:`visrec.evaluate` turns into metrics (frame embeddings and
quality logits of every video of a list, fused per video; product descriptors of images), and the metrics of a
product descriptor network on a validation root (the product trainer's validation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from visrec.data.products import (CATALOGUE_DIR, GROUND_TRUTH, list_images, normalise_product_pixels,
                                  product_pixels, read_image_checked)
from visrec.errors import DataError
from visrec.evaluate.products import query_items, read_checked_ground_truth, retrieval_metrics
from visrec.evaluate.video import fuse
from visrec.models.embed import forward_batch, images_to_tensor


@torch.no_grad()
def frame_outputs(model: torch.nn.Module, frames: list[np.ndarray], device="cpu", batch: int = 256
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings (T, D) of a video's frames and, for a quality_fusion model, quality logits (T,)."""
    embs, logits = [], []
    batch = forward_batch(batch, device)
    for s in range(0, len(frames), batch):
        x = images_to_tensor(frames[s:s + batch]).to(device)
        if hasattr(model, "frame_outputs"):
            e, z = model.frame_outputs(x)
            logits.append(z.float().cpu())
        else:
            e = model(x)
        embs.append(e.float().cpu())
    return torch.cat(embs).numpy(), (torch.cat(logits).numpy() if logits else None)


def video_features(model, video_list, fusions=("mean",), device="cpu",
                   max_frames: int | None = None, progress=None) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Fused features of every video of a list file (or of the items ``read_video_list`` read from one), for
    each fusion; (features by fusion, labels, ids).
    ``model``: a torch module (a quality_fusion model gives the ``learned`` fusion its logits), or a loaded
    model with ``embed`` (``visrec.models.load_model``: an ONNX export, an adapter), which has no quality head;
    ``device`` applies to a torch module."""
    from visrec.data.video import read_frame_scores, read_frames, read_video_list

    items = video_list if isinstance(video_list, list) else read_video_list(video_list)
    is_module = isinstance(model, torch.nn.Module)
    if is_module:
        was_training = model.training
        model.eval().to(device)
    feats = {f: [] for f in fusions}
    for it in items:
        frames = read_frames(it.path, it.video_id, max_frames)
        if is_module:
            emb, logits = frame_outputs(model, frames, device)
        else:
            emb = np.concatenate([model.embed(frames[s:s + 256]) for s in range(0, len(frames), 256)])
            logits = None
        # a read cut at max_frames has the video's first frames: their scores are the file's first lines
        cut = max_frames is not None and len(frames) >= max_frames
        scores = read_frame_scores(it.path, len(frames), first=cut) if "score" in fusions else None
        if "score" in fusions and scores is None:
            raise DataError("fusion 'score' needs a scores file for every video", path=it.path,
                            record=f"video {it.video_id}")
        for f in fusions:
            feats[f].append(fuse(emb, f, scores, logits))
        if progress:
            progress(1)
    if is_module:
        model.train(was_training)
    return ({f: np.stack(v) for f, v in feats.items()}, np.array([it.label for it in items]),
            [it.video_id for it in items])


@dataclass(frozen=True)
class PreparedBatch:
    """A batch of product images ready for the network but for the normalisation: for each scale, (N, S, S, 3)
    uint8, the images padded to white squares and resized (:func:`~visrec.data.products.product_pixels`),
    stacked. What :func:`describe` runs: it copies each scale to the network's device and normalises it there
    (``normalise_product_pixels``: the same bits as ``preprocess_product``). The catalogue extraction has them
    made by its loader threads, ahead of the network."""

    scales: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.scales[0]) if self.scales else 0


def prepare_batch(images: Sequence[np.ndarray], size: int = 224, multiscale: Sequence[float] | None = None
                  ) -> PreparedBatch:
    """The :class:`PreparedBatch` of RGB uint8 images: each padded and resized to ``round(size * scale)`` at
    every scale of ``multiscale`` (default: ``size`` alone)."""
    scales = list(multiscale) if multiscale else [1.0]
    return PreparedBatch(tuple(np.stack([product_pixels(im, int(round(size * s))) for im in images])
                               for s in scales))


@torch.no_grad()
def describe(model: torch.nn.Module, images: Sequence[np.ndarray] | PreparedBatch, size: int = 224,
             multiscale: Sequence[float] | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """(N, D) float32 L2-normalised descriptors of RGB uint8 images (or of their :class:`PreparedBatch`, made
    with the same ``size`` and ``multiscale``). The network runs on ``forward_batch`` images at a time: on an
    accelerator that is the whole batch, one copy there per scale and one copy back."""
    if not len(images):
        return np.zeros((0, getattr(model, "dim", 0)), np.float32)
    batch = images if isinstance(images, PreparedBatch) else prepare_batch(images, size, multiscale)
    total = None
    for x in batch.scales:
        step = forward_batch(len(x), device)
        out = torch.cat([model(normalise_product_pixels(torch.from_numpy(x[s:s + step]).to(device))).float()
                         for s in range(0, len(x), step)])
        total = out if total is None else total + out
    return torch.nn.functional.normalize(total, dim=1).cpu().numpy()


@torch.no_grad()
def evaluate_descriptor(model: torch.nn.Module, root: str | Path, size: int = 224, k: int = 7,
                        device="cpu", batch_size: int = 32) -> dict[str, float]:
    """mAP@k / recall of a descriptor network on ``root`` with exact search (everything in memory: for
    validation sets; use an index directory for a full catalogue). An empty catalogue, or a ground-truth id
    naming no catalogue image, is a DataError."""
    root = Path(root)
    cat_items = list_images(root / CATALOGUE_DIR)
    if not cat_items:
        raise DataError("no catalogue images (.jpg/.jpeg/.png)", path=root / CATALOGUE_DIR)
    # every ground-truth id names a catalogue image (an unreadable one raises as it is described)
    gt, _ = read_checked_ground_truth(root / GROUND_TRUTH, [i for i, _ in cat_items])
    was_training = model.training
    model.eval()

    def vectors(items):
        out = [describe(model, [read_image_checked(i, p) for i, p in items[s:s + batch_size]], size, device=device)
               for s in range(0, len(items), batch_size)]
        return np.concatenate(out)

    cat = torch.from_numpy(vectors(cat_items))
    q_items = query_items(root, gt)
    q = torch.from_numpy(vectors(q_items))
    model.train(was_training)
    top = torch.topk(q @ cat.T, min(k, len(cat_items)), dim=1).indices.numpy()
    ranked = {qid: [cat_items[j][0] for j in row] for (qid, _), row in zip(q_items, top)}
    return retrieval_metrics(ranked, gt, k)
