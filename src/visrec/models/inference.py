"""A model over a data set: the arrays that :mod:`visrec.evaluate` turns into metrics (frame embeddings and
quality logits of every video of a list, fused per video)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visrec.errors import DataError


@torch.no_grad()
def frame_outputs(model: torch.nn.Module, frames: list[np.ndarray], device="cpu", batch: int = 256
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings (T, D) of a video's frames and, for a quality_fusion model, quality logits (T,)."""
    from visrec.models.embed import images_to_tensor

    embs, logits = [], []
    for s in range(0, len(frames), batch):
        x = images_to_tensor(frames[s:s + batch]).to(device)
        if hasattr(model, "frame_outputs"):
            e, z = model.frame_outputs(x)
            logits.append(z.float().cpu())
        else:
            e = model(x)
        embs.append(e.float().cpu())
    return torch.cat(embs).numpy(), (torch.cat(logits).numpy() if logits else None)


def video_features(model: torch.nn.Module, video_list: str | Path, fusions=("mean",), device="cpu",
                   max_frames: int | None = None, progress=None) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Fused features of every video of a list file, for each fusion; (features by fusion, labels, ids)."""
    from visrec.data.video import read_frame_scores, read_frames, read_video_list
    from visrec.evaluate.video import fuse

    items = read_video_list(video_list)
    was_training = model.training
    model.eval().to(device)
    feats = {f: [] for f in fusions}
    for it in items:
        frames = read_frames(it.path, it.video_id, max_frames)
        emb, logits = frame_outputs(model, frames, device)
        scores = read_frame_scores(it.path, len(frames)) if "score" in fusions else None
        if "score" in fusions and scores is None:
            raise DataError("fusion 'score' needs a scores file for every video", path=it.path,
                            record=f"video {it.video_id}")
        for f in fusions:
            feats[f].append(fuse(emb, f, scores, logits))
        if progress:
            progress(1)
    model.train(was_training)
    return ({f: np.stack(v) for f, v in feats.items()}, np.array([it.label for it in items]),
            [it.video_id for it in items])


