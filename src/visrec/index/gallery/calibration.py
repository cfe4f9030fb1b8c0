"""Setting a gallery's match threshold (:mod:`visrec.index.gallery.base`) at a target FPR from a labelled set:
:func:`calibrate` (``visrec gallery calibrate``)."""

from __future__ import annotations

import numpy as np

from visrec.errors import DataError
from visrec.index.gallery.base import Gallery, GalleryMismatchError, _vectors


def calibrate(gallery: Gallery, embeddings, labels, target_fpr: float = 1e-4) -> dict:
    """Pick the threshold at ``target_fpr`` on a labelled set (all pairs, exact engine) and store it.

    Returns ``{"threshold", "target_fpr", "tpr", "fpr", "genuine_pairs", "impostor_pairs"}``. The set must
    hold at least 1/target_fpr impostor pairs, else the FPR cannot be resolved and this raises; and at least one
    genuine pair (an identity with two or more embeddings), else there is no TPR to report and nothing says the
    threshold accepts anyone: a :class:`DataError`, raised before the gallery is touched (its threshold stays as
    it was). Scores are the gallery's (``metric``), thresholded by
    :func:`visrec.evaluate.calibration.calibrate_threshold`.
    """
    from visrec.evaluate.calibration import calibrate_threshold
    from visrec.evaluate.verification import check_target_fpr

    target_fpr = check_target_fpr(target_fpr)  # before the gallery or the embeddings are touched
    x = _vectors(embeddings, "calibration embeddings", gallery.metric)
    if gallery.info["dim"] is not None and x.shape[1] != gallery.info["dim"]:
        raise GalleryMismatchError(f"the gallery holds {gallery.info['dim']}-d embeddings; the calibration set is "
                                   f"{x.shape[1]}-d")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(x):
        raise DataError(f"{len(x)} calibration embeddings for {len(labels)} labels: give one label per embedding")
    _check_genuine_pairs(labels)
    res = calibrate_threshold(x, labels, target_fpr, gallery.metric)
    if not res.genuine_count or res.tpr is None:  # the engine's own count: never store a threshold without one
        raise DataError(f"the calibration set holds no genuine pair the engine could score ({res.reason or 'no TPR'})"
                        f": each identity needs two or more images; the gallery's threshold is unchanged")
    gallery.set_threshold(res.threshold, target_fpr)
    return {"threshold": res.threshold, "target_fpr": float(target_fpr), "tpr": res.tpr, "fpr": res.fpr,
            "genuine_pairs": res.genuine_count, "impostor_pairs": res.impostor_count}


def _check_genuine_pairs(labels: np.ndarray) -> None:
    """A :class:`DataError` unless some label occurs twice (a genuine pair: two embeddings of one identity)."""
    try:
        _, counts = np.unique(labels, return_counts=True)
    except TypeError:
        raise DataError(f"calibration labels must be one kind of value (identity numbers or names), got "
                        f"{labels.dtype}") from None
    if not len(counts) or counts.max() < 2:
        raise DataError(f"the calibration set holds no genuine pair ({len(labels):,} embeddings of "
                        f"{len(counts):,} identities, one each): each identity needs two or more images, so that "
                        f"the threshold's true-accept rate can be measured; the gallery's threshold is unchanged")
