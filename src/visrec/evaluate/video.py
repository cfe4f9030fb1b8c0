"""Video verification (the LFR iQIYI protocols): frames -> one feature per video -> exact TPR@FPR between
videos (every pair of videos; genuine = same label), FPR target 1e-4 by default.

Frame fusion (input: a video's raw frame embeddings (T, D)):
- ``mean``:    mean of the L2-normalised frame embeddings (the organisers' baseline), L2-normalised.
- ``norm``:    weights proportional to each frame's embedding norm (a sharp, frontal face tends to give
               a longer embedding), weighted mean of the normalised embeddings.
- ``score``:   weights proportional to the detector score of each frame (the video's scores file).
- ``learned``: the quality head of a ``quality_fusion`` model (``visrec.models.quality``): softmax of
               its per-frame logits within the video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visrec.errors import ConfigError, DataError

FUSIONS = ("mean", "norm", "score", "learned")


def fuse(embeddings: np.ndarray, method: str = "mean", scores: np.ndarray | None = None,
         logits: np.ndarray | None = None) -> np.ndarray:
    """(T, D) raw frame embeddings -> (D,) unit video feature (module docstring)."""
    e = np.asarray(embeddings, np.float32)
    norms = np.maximum(np.linalg.norm(e, axis=1), 1e-12)
    unit = e / norms[:, None]
    if method == "mean":
        w = np.ones(len(e), np.float32)
    elif method == "norm":
        w = norms
    elif method == "score":
        if scores is None:
            raise DataError("fusion 'score' needs per-frame detector scores (scores.txt) for every video")
        w = np.maximum(np.asarray(scores, np.float32), 0)
    elif method == "learned":
        if logits is None:
            raise ConfigError("fusion 'learned' needs a quality_fusion model (visrec train configs/faces/video-quality.yaml)")
        z = np.asarray(logits, np.float64)
        w = np.exp(z - z.max())
    else:
        raise ConfigError(f"unknown fusion {method!r}; expected one of {FUSIONS}")
    w = w / max(float(w.sum()), 1e-12)
    v = (w[:, None] * unit).sum(0)
    return v / max(float(np.linalg.norm(v)), 1e-12)


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


@dataclass
class VideoEval:
    results: dict  # fusion -> {target: TprResult}
    features: dict[str, np.ndarray]  # fusion -> (videos, D)
    labels: np.ndarray
    video_ids: list[str]
    submission: Path | None = None
    summary: dict = field(default_factory=dict)


def video_features(model: torch.nn.Module, video_list: str | Path, fusions=("mean",), device="cpu",
                   max_frames: int | None = None, progress=None) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Fused features of every video of a list file, for each fusion; (features by fusion, labels, ids)."""
    from visrec.data.video import read_frame_scores, read_frames, read_video_list

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


def evaluate_videos(model: torch.nn.Module, video_list: str | Path, fusions=("mean",), targets=(1e-4,),
                    device="cpu", submission: str | Path | None = None, filelist: str | Path | None = None,
                    progress=None) -> VideoEval:
    """Exact TPR@FPR between videos for each fusion. ``submission`` writes the LFR video feature binary of
    the first fusion, rows in ``filelist`` order (``video_filelist.txt``; default: list order)."""
    from visrec.evaluate.lfr import read_filelist, write_lfr_features
    from visrec.evaluate.verification import tpr_at_fpr

    feats, labels, ids = video_features(model, video_list, fusions, device, progress=progress)
    results = {f: tpr_at_fpr(feats[f], labels, targets) for f in fusions}
    out = None
    if submission is not None:
        order = read_filelist(filelist) if filelist else ids
        row = {v: i for i, v in enumerate(ids)}
        missing = [v for v in order if v not in row]
        if missing:
            raise DataError(f"{len(missing)} videos of the file list are not in the video list, e.g. {missing[:3]}",
                            path=filelist)
        out = write_lfr_features(submission, feats[fusions[0]][[row[v] for v in order]])
    genuine = sum(int(c) * (int(c) - 1) // 2 for c in np.unique(labels, return_counts=True)[1])
    n = len(labels)
    summary = {"videos": f"{n:,}", "genuine pairs": f"{genuine:,}", "impostor pairs": f"{n * (n - 1) // 2 - genuine:,}"}
    return VideoEval(results, feats, labels, ids, out, summary)


def evaluate_video_model(model: str | Path, video_list: str | Path, fusions=("mean",), targets=(1e-4,),
                         submission: str | Path | None = None, filelist: str | Path | None = None,
                         progress=None) -> VideoEval:
    """``visrec eval faces --video``: a visrec checkpoint (a face backbone, or a quality_fusion model for
    ``learned``) on a video list."""
    from visrec.models.loading import load_model

    loaded = load_model(model)
    if loaded.module is None:
        raise ConfigError(f"video evaluation needs a visrec checkpoint (a torch model); {model} is not one")
    net, cfg = loaded.module, dict(loaded.contract.arch or {"name": loaded.name})
    if "learned" in fusions and not hasattr(net, "frame_outputs"):
        raise ConfigError(f"--fusion learned needs a quality_fusion checkpoint; {model} is a {cfg['name']!r} "
                          f"backbone (train one with configs/faces/video-quality.yaml)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = evaluate_videos(net, video_list, tuple(fusions), tuple(targets), device, submission, filelist, progress)
    res.summary.update({"model": str(model), "videos list": str(video_list)})
    return res
