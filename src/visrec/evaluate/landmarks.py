"""Landmark metrics of the ICME 2019 106-point challenge (and the usual variants).

NME (normalised mean error) of one face = mean over points of the Euclidean error / a normaliser:
  "sqrt_area"      sqrt(w * h) of the tight box around the ground-truth landmarks (the challenge's)
  "inter_ocular"   distance between the outer eye corners (scheme's ``outer_eye_corners``)
  "inter_pupil"    distance between the pupils / eye centres (scheme's ``pupils``)
  "bbox_diagonal"  diagonal of the tight ground-truth box
AUC@alpha = area under the cumulative error distribution (CED) on [0, alpha] divided by alpha (0..1; the
challenge reports it x100). Failure rate @alpha = share of faces with NME > alpha.
Arrays are (faces, points, 2) in pixels. This module imports no model. A face whose normaliser is zero
(degenerate ground truth: points on a line, coincident eye points) is an error naming the face (and its
landmark file when the caller passes ``sources``), never a silent inf; NMEs handed to ``auc`` /
``failure_rate`` / ``ced_curve`` must be finite and >= 0, and ``alpha`` > 0.
"""

from __future__ import annotations

import numpy as np

from visrec.errors import DataError, VisrecError

# indices per point count: (outer eye corners, pupils or eye centres) in each scheme's order
_EYES = {
    106: ((52, 61), (104, 105)),   # JD-landmark: 52/61 outer corners, 104/105 pupils
    68: ((36, 45), ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47))),  # 300W: eye contours' means
    98: ((60, 72), (96, 97)),      # WFLW: 60/72 outer corners, 96/97 pupils
}


def _check(pred, gt):
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 2:
        raise VisrecError(f"pred and gt must both be (faces, points, 2); got {pred.shape} and {gt.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(gt).all()):
        raise VisrecError("landmarks contain NaN or inf")
    return pred, gt


def _centre(points, idx):
    if isinstance(idx, tuple):
        return points[:, list(idx)].mean(axis=1)
    return points[:, idx]


def normaliser(gt: np.ndarray, norm: str = "sqrt_area", sources=None) -> np.ndarray:
    """Per-face normaliser (faces,) in pixels; ``sources[i]`` (optional) names face i's ground-truth file in
    the error a zero normaliser raises."""
    gt = np.asarray(gt, np.float64)
    if norm in ("sqrt_area", "bbox_diagonal"):
        w = gt[..., 0].max(axis=1) - gt[..., 0].min(axis=1)
        h = gt[..., 1].max(axis=1) - gt[..., 1].min(axis=1)
        d = np.sqrt(w * h) if norm == "sqrt_area" else np.sqrt(w ** 2 + h ** 2)
    elif norm in ("inter_ocular", "inter_pupil"):
        n = gt.shape[1]
        if n not in _EYES:
            raise VisrecError(f"no eye indices known for {n}-point landmarks; use sqrt_area or bbox_diagonal")
        a, b = _EYES[n][0 if norm == "inter_ocular" else 1]
        d = np.linalg.norm(_centre(gt, a) - _centre(gt, b), axis=1)
    else:
        raise VisrecError(f"unknown normalisation {norm!r}: sqrt_area, inter_ocular, inter_pupil, bbox_diagonal")
    if not (d > 0).all():  # also catches NaN
        bad = int(np.argmax(~(d > 0)))
        raise DataError(f"the ground truth of face {bad} gives a zero {norm} normaliser (its points lie on a line "
                        f"or the points it uses coincide): no NME is defined for it",
                        path=None if sources is None else sources[bad], record=f"face {bad}")
    return d


def norms_for(num_points: int) -> tuple[str, ...]:
    """The normalisations defined for ``num_points``-point landmarks (the eye-based ones need a known scheme)."""
    return ("sqrt_area", "inter_ocular", "inter_pupil", "bbox_diagonal") if num_points in _EYES else (
        "sqrt_area", "bbox_diagonal")


def per_point_error(pred, gt) -> np.ndarray:
    """(faces, points) Euclidean error in pixels."""
    pred, gt = _check(pred, gt)
    return np.linalg.norm(pred - gt, axis=2)


def nme(pred, gt, norm: str = "sqrt_area", sources=None) -> np.ndarray:
    """Per-face NME (faces,), see the module docstring for the normalisations; ``sources`` as ``normaliser``."""
    pred, gt = _check(pred, gt)
    return per_point_error(pred, gt).mean(axis=1) / normaliser(gt, norm, sources)


def _nmes(nmes, alpha: float) -> np.ndarray:
    """``nmes`` as float64, refused unless finite and >= 0 (an NME is a mean distance over a positive length),
    with ``alpha`` finite and > 0."""
    nmes = np.asarray(nmes, np.float64)
    if not (np.isfinite(alpha) and alpha > 0):
        raise VisrecError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not (np.isfinite(nmes).all() and (nmes >= 0).all()):
        raise VisrecError("NMEs must be finite and >= 0 (NaN, inf or a negative value is no NME)")
    return nmes


def ced_curve(nmes, alpha: float = 0.08, steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds on [0, alpha], share of faces with NME <= threshold)."""
    nmes = np.sort(_nmes(nmes, alpha))
    x = np.linspace(0, alpha, steps + 1)
    return x, np.searchsorted(nmes, x, side="right") / max(1, len(nmes))


def auc(nmes, alpha: float = 0.08) -> float:
    """Area under the CED on [0, alpha] divided by alpha, in [0, 1]; computed exactly (the CED is a step
    function): mean over faces of max(0, alpha - nme) / alpha."""
    nmes = _nmes(nmes, alpha)
    if nmes.size == 0:
        raise VisrecError("no faces")
    return float(np.mean(np.clip(alpha - nmes, 0, None)) / alpha)


def failure_rate(nmes, alpha: float = 0.08) -> float:
    """Share of faces with NME > alpha."""
    nmes = _nmes(nmes, alpha)
    if nmes.size == 0:
        raise VisrecError("no faces")
    return float(np.mean(nmes > alpha))
