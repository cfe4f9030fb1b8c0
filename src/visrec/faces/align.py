"""Face alignment for recognition: landmarks -> 5 points -> similarity transform -> 112x112 crop (other sizes:
:func:`arcface_template`; a model's contract says which size it takes).

The 5-point reference is the ArcFace template for 112x112 crops (InsightFace's ``arcface_dst``, the
positions its recognition models are trained on): left eye (38.2946, 51.6963), right eye (73.5318,
51.5014), nose tip (56.0252, 71.7366), left mouth corner (41.5493, 92.3655), right mouth corner
(70.7299, 92.2041); "left" is image left. Two ways to fit the similarity (rotation, uniform scale,
translation) from a face's 5 points to the template (``method``):

- ``lstsq`` (default): the least-squares fit over all 5 points (Umeyama 1991), what InsightFace's
  ``norm_crop`` and arcface_torch's data use, so what pretrained ArcFace models expect. A least-squares fit
  does not put any point exactly on the template: on real faces the eyes land ~2-3 px off at 112x112
  (measured in ``tests/test_real_faces.py``: 300-W's eyes, nose and mouth corners sit in other proportions
  than the template's, and pose moves them further).
- ``eyes``: the similarity fixed by the two eye centres alone (two points determine all four parameters),
  so both eyes land exactly on the template's eye positions and the nose/mouth wherever the face puts them.
  Use it when the eye positions matter more than the whole-face fit, and align training and serving data
  the same way: a model sees whichever alignment it was trained on as normal.
"""

from __future__ import annotations

import numpy as np

from visrec.data.schemes import MIN_POINT_SPREAD, degenerate_points, to_five_points  # noqa: F401 (re-exported)
from visrec.errors import ConfigError, DataError, VisrecError
from visrec.registry import Registry

ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M minimising sum |M [src; 1] - dst|^2 over rotation, uniform scale and translation."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def eyes_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity M with M [src_i; 1] = dst_i for the two eye points (rows 0 and 1 of src and dst)."""
    src, dst = np.asarray(src, np.float64)[:2], np.asarray(dst, np.float64)[:2]
    # as complex numbers a similarity is z -> a z + b: a from the eye vectors, b from the first eye
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    if abs(zs[1] - zs[0]) < MIN_POINT_SPREAD:
        raise DataError(f"the two eye points coincide ({src[0].tolist()}): no similarity maps them apart",
                        field="points")
    a = (zd[1] - zd[0]) / (zs[1] - zs[0])
    b = zd[0] - a * zs[0]
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


# 5 points -> 2x3 similarity, by name: a transform ``f(src (5, 2), dst (5, 2)) -> (2, 3)`` registered here
ALIGN_METHODS: Registry = Registry("alignment method")
ALIGN_METHODS.register("lstsq")(similarity_transform)
ALIGN_METHODS.register("eyes")(eyes_transform)


def check_method(method: str) -> str:
    """``method`` if it names an alignment method, else VisrecError listing them (callers check up front,
    before any image is read)."""
    if method not in ALIGN_METHODS:
        raise ConfigError(f"unknown alignment method {method!r}: align must be one of {ALIGN_METHODS.names()}")
    return method


def arcface_template(size: int = 112) -> np.ndarray:
    """The 5-point template for a ``size`` x ``size`` crop, by InsightFace's rule for other sizes: a multiple
    of 112 scales the 112 template (224: the same face at twice the pixels); a multiple of 128 scales it by
    ``size / 128`` and moves it 8 * that to the right (128: the 112 face centred in a wider frame, the crop
    of InsightFace's 128-pixel models); any other size scales it by ``size / 112``."""
    if size < 1:
        raise VisrecError(f"an aligned crop needs a positive size, got {size}")
    if size % 112 == 0 or size % 128 != 0:
        return (ARCFACE_112 * (size / 112.0)).astype(np.float32)
    ratio = size / 128.0
    return (ARCFACE_112 * ratio + np.array([8.0 * ratio, 0.0])).astype(np.float32)


def alignment_transform(five: np.ndarray, size: int = 112, method: str = "lstsq") -> np.ndarray:
    """The 2x3 matrix taking 5 points (image pixels) to the ArcFace template for ``size`` (:func:`arcface_template`).
    Points no alignment can use (:func:`degenerate_points`), or a transform that comes out singular or not
    finite, are a ``DataError`` (field ``points``): a NaN matrix would warp to a black crop that still gets
    embedded."""
    fit = ALIGN_METHODS.get(check_method(method))
    if degenerate_points(five):
        pts = np.asarray(five, np.float64)
        why = ("a coordinate is not finite" if not np.isfinite(pts).all() else
               "the two eye points coincide" if np.linalg.norm(pts[0] - pts[1]) < MIN_POINT_SPREAD else
               f"all five lie within {MIN_POINT_SPREAD:g} px of their mean")
        raise DataError(f"five points {pts.round(3).tolist()}: {why}; no alignment maps them to the template",
                        field="points")
    m = np.asarray(fit(five, arcface_template(size)), np.float64)
    if not (np.isfinite(m).all() and abs(np.linalg.det(m[:, :2])) > 0):
        raise DataError(f"the {method} alignment of these five points is singular or not finite", field="points")
    return m


def five_points(points: np.ndarray, scheme: str | int | None = None) -> np.ndarray:
    """The 5 alignment points of 5/68/98/106-point landmarks (scheme from the point count by default)."""
    pts = np.asarray(points, np.float32)
    if pts.shape[-2] == 5:
        return pts

    return to_five_points(pts, scheme if scheme is not None else pts.shape[-2])


def align_face(image: np.ndarray, points: np.ndarray, size: int = 112,
               method: str = "lstsq") -> tuple[np.ndarray, np.ndarray]:
    """(aligned size x size crop, the 2x3 transform). ``points`` are 5 points or a full scheme; ``method``
    is ``lstsq`` or ``eyes`` (module docstring). Pixel centres are at integer coordinates in both images
    (OpenCV's and dlib's convention), so a point at (x, y) in the image is at ``M [x, y, 1]`` in the crop."""
    import cv2

    m = alignment_transform(five_points(points), size, method)
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return crop, m
