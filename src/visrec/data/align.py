"""Face alignment for recognition: landmarks -> 5 points -> similarity transform -> 112x112 crop.

The 5-point reference is the ArcFace template for 112x112 crops (InsightFace's ``arcface_dst``, the
positions its recognition models are trained on): left eye (38.2946, 51.6963), right eye (73.5318,
51.5014), nose tip (56.0252, 71.7366), left mouth corner (41.5493, 92.3655), right mouth corner
(70.7299, 92.2041); "left" is image left. The transform is the least-squares similarity (rotation,
uniform scale, translation; Umeyama 1991) from the 5 points to the template.
"""

from __future__ import annotations

import numpy as np

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


def five_points(points: np.ndarray, scheme: str | int | None = None) -> np.ndarray:
    """The 5 alignment points of 5/68/98/106-point landmarks (scheme from the point count by default)."""
    pts = np.asarray(points, np.float32)
    if pts.shape[-2] == 5:
        return pts
    from visrec.data.schemes import to_five_points

    return to_five_points(pts, scheme if scheme is not None else pts.shape[-2])


def align_face(image: np.ndarray, points: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """(aligned size x size crop, the 2x3 transform). ``points`` are 5 points or a full scheme."""
    import cv2

    dst = ARCFACE_112 * (size / 112.0)
    m = similarity_transform(five_points(points), dst)
    crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return crop, m
