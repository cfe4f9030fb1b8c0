"""Video verification (the LFR iQIYI protocols): frames -> one feature per video -> exact TPR@FPR between
videos (every pair of videos; genuine = same label), FPR target 1e-4 by default.

Frame fusion (input: a video's raw frame embeddings (T, D)):
- ``mean``:    mean of the L2-normalised frame embeddings (the organisers' baseline), L2-normalised.
- ``norm``:    weights proportional to each frame's embedding norm (a sharp, frontal face tends to give
               a longer embedding), weighted mean of the normalised embeddings.
- ``score``:   weights proportional to the detector score of each frame (the video's scores file).
- ``learned``: the quality head of a ``quality_fusion`` model (``visrec.models.quality``): softmax of
               its per-frame logits within the video.

Pure maths over arrays: the frame embeddings come from :mod:`visrec.models.inference`, and
``visrec.faces.evaluation.evaluate_video_model`` runs a model file end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visrec.errors import ConfigError, DataError
from visrec.evaluate.lfr import read_filelist, write_lfr_features
from visrec.evaluate.verification import tpr_at_fpr

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
            raise ConfigError("fusion 'learned' needs a quality_fusion model (visrec train --config configs/faces/video-quality.yaml)")
        z = np.asarray(logits, np.float64)
        w = np.exp(z - z.max())
    else:
        raise ConfigError(f"unknown fusion {method!r}; expected one of {FUSIONS}")
    w = w / max(float(w.sum()), 1e-12)
    v = (w[:, None] * unit).sum(0)
    return v / max(float(np.linalg.norm(v)), 1e-12)


@dataclass
class VideoEval:
    results: dict  # fusion -> {target: TprResult}
    features: dict[str, np.ndarray]  # fusion -> (videos, D)
    labels: np.ndarray
    video_ids: list[str]
    submission: Path | None = None
    summary: dict = field(default_factory=dict)


def score_videos(feats: dict, labels, ids: list[str], fusions=("mean",), targets=(1e-4,),
                 submission: str | Path | None = None, filelist: str | Path | None = None) -> VideoEval:
    """Exact TPR@FPR between videos for each fusion of fused video features (``feats``: fusion -> (videos, D);
    :func:`visrec.models.inference.video_features` computes them with a model). ``submission`` writes the LFR
    video feature binary of the first fusion, rows in ``filelist`` order (``video_filelist.txt``; default: list
    order)."""
    labels = np.asarray(labels)
    results = {f: tpr_at_fpr(feats[f], labels, targets) for f in fusions}
    out = None
    if submission is not None:
        order = read_filelist(filelist) if filelist else ids
        first: dict[str, int] = {}
        for i, v in enumerate(order, start=1):  # as visrec.evaluate.lfr.labelled_rows: one row per video
            if first.setdefault(v, i) != i:
                raise DataError(f"entries {first[v]} and {i} are both {v[:200]!r}: the submission would hold its "
                                f"row twice", path=filelist, record=f"entry {i}")
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
