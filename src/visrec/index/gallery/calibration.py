"""Setting a gallery's match threshold (:mod:`visrec.index.gallery.base`) at a target FPR from a labelled set:
:func:`calibrate` (``visrec gallery calibrate``)."""

from __future__ import annotations

from visrec.index.gallery.base import Gallery, GalleryMismatchError, _vectors


def calibrate(gallery: Gallery, embeddings, labels, target_fpr: float = 1e-4) -> dict:
    """Pick the threshold at ``target_fpr`` on a labelled set (all pairs, exact engine) and store it.

    Returns ``{"threshold", "target_fpr", "tpr", "fpr", "genuine_pairs", "impostor_pairs"}``. The set must
    hold at least 1/target_fpr impostor pairs, else the FPR cannot be resolved and this raises. Scores are the
    gallery's (``metric``), thresholded by :func:`visrec.evaluate.calibration.calibrate_threshold`.
    """
    from visrec.evaluate.calibration import calibrate_threshold
    from visrec.evaluate.verification import check_target_fpr

    target_fpr = check_target_fpr(target_fpr)  # before the gallery or the embeddings are touched
    x = _vectors(embeddings, "calibration embeddings", gallery.metric)
    if gallery.info["dim"] is not None and x.shape[1] != gallery.info["dim"]:
        raise GalleryMismatchError(f"the gallery holds {gallery.info['dim']}-d embeddings; the calibration set is "
                                   f"{x.shape[1]}-d")
    res = calibrate_threshold(x, labels, target_fpr, gallery.metric)
    gallery.set_threshold(res.threshold, target_fpr)
    return {"threshold": res.threshold, "target_fpr": float(target_fpr), "tpr": res.tpr, "fpr": res.fpr,
            "genuine_pairs": res.genuine_count, "impostor_pairs": res.impostor_count}
