"""A verification threshold from a labelled set: the score at which a target false-accept rate is reached.

Scores are those of the model's metric: cosine similarity of unit embeddings, or for distance models
(``euclidean``) the negated Euclidean distance of the raw embeddings, so that "accept when score >=
threshold" holds for both. All pairs i < j of the set are scored; the threshold follows the exact engine's
strict rule (:mod:`visrec.evaluate.verification`: the smallest threshold whose false accepts stay within
``target_fpr`` of the impostor pairs). The set must hold at least 1 / target_fpr impostor pairs.
"""

from __future__ import annotations

import numpy as np

from visrec.errors import DataError, VisrecError
from visrec.evaluate.verification import tpr_at_fpr, tpr_at_fpr_pairs

METRICS = ("cosine", "euclidean")
MAX_DISTANCE_SET = 20_000  # euclidean sets are scored as a dense pair list: 20k embeddings = 200M pairs


def calibrate_threshold(embeddings, labels, target_fpr: float = 1e-4, metric: str = "cosine"):
    """The :class:`~visrec.evaluate.verification.TprResult` at ``target_fpr`` over all pairs (module
    docstring): ``threshold``, achieved ``fpr``, ``tpr``, pair counts. Raises when it is not estimable."""
    if metric not in METRICS:
        raise VisrecError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    x = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or len(x) != len(labels):
        raise DataError(f"{x.shape} calibration embeddings for {len(labels)} labels")
    if not np.isfinite(x).all():
        raise DataError(f"calibration embeddings: row {int(np.flatnonzero(~np.isfinite(x).all(1))[0])} holds NaN "
                        f"or inf")
    if metric == "cosine":
        res = tpr_at_fpr(x, labels, targets=(target_fpr,), device="cpu")[float(target_fpr)]
    else:
        if len(x) > MAX_DISTANCE_SET:
            raise VisrecError(f"{len(x):,} embeddings: a distance model is calibrated on at most "
                              f"{MAX_DISTANCE_SET:,} (every pair's distance is held in memory)")
        i, j = np.triu_indices(len(x), k=1)
        d = x.astype(np.float64)
        sq = (d * d).sum(1)
        dist = np.sqrt(np.maximum(sq[i] + sq[j] - 2 * np.einsum("ij,ij->i", d[i], d[j]), 0))
        res = tpr_at_fpr_pairs((-dist).astype(np.float32), labels[i] == labels[j],
                               targets=(target_fpr,))[float(target_fpr)]
    if not res.estimable:
        raise VisrecError(f"cannot calibrate at FPR {target_fpr:g}: {res.reason}")
    if not res.genuine_count:  # a threshold from impostors alone: what it would accept of the same person is unknown
        raise DataError(f"cannot calibrate at FPR {target_fpr:g}: no genuine pair (every identity has one image); "
                        "give each identity two or more images, so the threshold's TPR is measured")
    if metric == "cosine" and res.threshold > 1:  # only above the largest cosine do few enough impostors score
        raise DataError(f"cannot calibrate at FPR {target_fpr:g}: more than {target_fpr:g} of the impostor pairs "
                        f"score a cosine of 1 (the model gives different people one embedding), so no threshold "
                        f"a cosine can reach accepts few enough of them")
    return res
