"""The verification ``.bin`` protocol (LFW, CFP-FP, AgeDB-30) as InsightFace reports it.

Embeddings are L2-normalised; a pair's distance is the squared Euclidean distance (= 2 - 2*cosine);
"same" is predicted when distance < threshold. The pairs are split into 10 contiguous folds (no shuffle);
for each fold the threshold is the one on the grid 0, 0.01, ..., 3.99 with the best accuracy on the other
9 folds (the first such on ties), and the fold's accuracy is measured with it. Result: mean +- std of the
10 fold accuracies. With ``flip`` the caller passes embeddings that already sum the original and mirrored
images (``visrec.models.embed.embed_images(flip=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visrec.errors import VisrecError

GRID = np.arange(0, 4, 0.01)


@dataclass
class BinResult:
    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray  # squared-L2 distance thresholds chosen on the other folds


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise VisrecError(f"embeddings contain NaN/inf (row {int(np.argwhere(~np.isfinite(x))[0][0])})")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise VisrecError(f"embedding row {int(np.argwhere(norms[:, 0] == 0)[0][0])} is a zero vector")
    return x / norms


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    e = _normalise(embeddings)
    return np.sum((e[0::2] - e[1::2]) ** 2, axis=1)


def evaluate_bin_pairs(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> BinResult:
    """``embeddings`` (2P, D) with pair k = rows 2k, 2k+1; ``issame`` (P,) bool."""
    issame = np.asarray(issame, dtype=bool)
    if len(embeddings) != 2 * len(issame):
        raise VisrecError(f"{len(embeddings)} embeddings for {len(issame)} pairs (need 2 per pair)")
    if len(issame) < nfolds:
        raise VisrecError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    dist = pair_distances(embeddings)
    # correct[t, k]: is pair k classified correctly at grid threshold t
    correct = (dist[None, :] < GRID[:, None]) == issame[None, :]
    folds = np.array_split(np.arange(len(issame)), nfolds)
    accs, thresholds = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(issame)), test)
        best = int(np.argmax(correct[:, train].mean(axis=1)))
        thresholds.append(GRID[best])
        accs.append(correct[best, test].mean())
    accs = np.asarray(accs)
    return BinResult(float(accs.mean()), float(accs.std()), accs, np.asarray(thresholds))
