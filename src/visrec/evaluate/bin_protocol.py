"""The verification ``.bin`` protocol (LFW, CFP-FP, AgeDB-30) as InsightFace reports it, flip and no flip.

Definitions:

- A pair's distance is the squared Euclidean distance of the L2-normalised embeddings (= 2 - 2*cosine);
  "same" is predicted when distance < threshold.
- 10-fold accuracy: the pairs are split into 10 contiguous folds in file order (no shuffle; the first
  ``P mod 10`` folds hold one pair more, as scikit-learn's ``KFold(10, shuffle=False)`` splits); for each
  fold the threshold is the one on the grid 0, 0.01, ..., 3.99 with the best accuracy on the other 9 folds
  (the first such on ties), and the fold's accuracy is measured with it. Result: mean +- std of the 10 fold
  accuracies.
- **flip** (the field's convention, what arcface_torch prints and what visrec reports as the headline): an
  image's embedding is the embedding of the image plus the embedding of its horizontal mirror, summed
  before normalisation.
- **no flip**: the embedding of the image alone.

:func:`evaluate_bin_both` returns both figures, labelled by :data:`FLIP` and :data:`NO_FLIP`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visrec.errors import VisrecError

GRID = np.arange(0, 4, 0.01)
NFOLDS = 10  # InsightFace's protocol: every fold must hold at least one pair, so a .bin needs >= NFOLDS pairs
FLIP = "flip"
NO_FLIP = "no flip"


@dataclass
class BinResult:
    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray  # squared-L2 distance thresholds chosen on the other folds


@dataclass
class BinBoth:
    """The 10-fold accuracy with and without the flip test. ``headline`` is the flip figure (the field's
    convention); ``label`` names it."""

    flip: BinResult
    no_flip: BinResult

    @property
    def headline(self) -> BinResult:
        return self.flip

    label = FLIP

    def as_dict(self) -> dict[str, BinResult]:
        return {FLIP: self.flip, NO_FLIP: self.no_flip}


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


def flip_embeddings(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The flip-test embedding: ``plain`` (embeddings of the images) + ``mirrored`` (of their horizontal
    mirrors), row by row, float32, not normalised (the distance normalises)."""
    plain, mirrored = np.asarray(plain, np.float32), np.asarray(mirrored, np.float32)
    if plain.shape != mirrored.shape:
        raise VisrecError(f"flip test: {plain.shape} embeddings of the images but {mirrored.shape} of the mirrors")
    return plain + mirrored


def fold_problem(num_pairs: int, nfolds: int = NFOLDS) -> str | None:
    """Why ``num_pairs`` pairs cannot be evaluated with ``nfolds``-fold accuracy, or None when they can. A
    caller that reads a pairs file long before evaluating it (the Trainer's validation sets, ``data synth
    faces --pairs``) checks it up front with this."""
    if nfolds < 2:
        return f"{nfolds} folds: the protocol needs at least 2 (each fold's threshold comes from the others)"
    if num_pairs < nfolds:
        return (f"{num_pairs} pairs cannot be split into {nfolds} folds: {nfolds}-fold accuracy needs at least "
                f"{nfolds} pairs (one per fold)")
    return None


def evaluate_bin_pairs(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = NFOLDS) -> BinResult:
    """``embeddings`` (2P, D) with pair k = rows 2k, 2k+1; ``issame`` (P,) bool. One figure: whichever
    embeddings are given (flip-summed or not); :func:`evaluate_bin_both` gives both, labelled."""
    issame = np.asarray(issame, dtype=bool)
    if len(embeddings) != 2 * len(issame):
        raise VisrecError(f"{len(embeddings)} embeddings for {len(issame)} pairs (need 2 per pair)")
    problem = fold_problem(len(issame), nfolds)
    if problem:
        raise VisrecError(problem)
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


def evaluate_bin_both(plain: np.ndarray, mirrored: np.ndarray, issame: np.ndarray, nfolds: int = NFOLDS) -> BinBoth:
    """10-fold accuracy without (``plain``) and with the flip test (``plain + mirrored``): module docstring."""
    return BinBoth(flip=evaluate_bin_pairs(flip_embeddings(plain, mirrored), issame, nfolds),
                   no_flip=evaluate_bin_pairs(plain, issame, nfolds))


def mirror(images) -> np.ndarray:
    """Horizontal mirrors of (N, H, W, C) images (a list of (H, W, C) arrays is stacked)."""
    arr = np.asarray(images) if isinstance(images, np.ndarray) else np.stack(list(images))
    return np.ascontiguousarray(arr[:, :, ::-1])


def format_both(both: BinBoth) -> dict[str, str]:
    """Summary lines, labelled: the flip figure first (the headline), then the no-flip one."""
    f, n = both.flip, both.no_flip
    return {f"10-fold accuracy ({FLIP}, headline: the field's convention)": f"{f.accuracy_mean:.4f} +- {f.accuracy_std:.4f}",
            f"10-fold accuracy ({NO_FLIP})": f"{n.accuracy_mean:.4f} +- {n.accuracy_std:.4f}"}
