"""Landmark-aware augmentation: every geometric change is applied to the image and the points together.

A horizontal flip mirrors x and re-orders the points with the scheme's flip permutation (the left eye's
points become the right eye's), so the order stays the scheme's. Rotation, scale and translation are one
affine matrix applied to both. ``crop_face`` cuts a square around the face box (with margin) and resizes
it, mapping the points with it. Occlusion paints a random rectangle and leaves the points unchanged (they
are still where they were, only hidden).

Head pose, where given, is ``(yaw, pitch, roll)`` in degrees (``visrec.data.landmarks`` states the signs:
yaw > 0 turns the nose towards image right, roll > 0 is counter-clockwise as displayed). A horizontal
flip negates yaw and roll (pitch is unchanged); a rotation by ``angle_deg`` (OpenCV's sign: counter-
clockwise as displayed) adds ``angle_deg`` to roll; scale, translation and occlusion leave pose alone.
"""

from __future__ import annotations

import math

import numpy as np

from visrec.errors import DataError

MIN_BOX_SIDE = 1.0  # pixels: a face box narrower or lower than this frames no face (and a zero side divides by 0)


def check_box(box, *, path=None, record=None, what: str = "face box") -> tuple[float, float, float, float]:
    """``box`` as four floats ``(x1, y1, x2, y2)`` when it can frame a face: finite, not inverted (x1 <= x2,
    y1 <= y2: an inverted box would give a point-reflected crop) and at least ``MIN_BOX_SIDE`` pixel wide and
    high (a zero-area box has no crop). Else ``DataError`` naming ``what`` (``--box``, "face box") and, when
    given, the file and record (line) it came from."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be four numbers x1,y1,x2,y2, got {box!r}", path=path, record=record) from None
    shown = ",".join(f"{v:g}" for v in (x1, y1, x2, y2))
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DataError(f"{what} {shown} holds NaN or inf", path=path, record=record)
    if x2 < x1 or y2 < y1:
        raise DataError(f"{what} {shown} is inverted (x2 < x1 or y2 < y1): give the top-left corner first",
                        path=path, record=record)
    if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        raise DataError(f"{what} {shown} is {x2 - x1:g} x {y2 - y1:g} pixels: a face box is at least "
                        f"{MIN_BOX_SIDE:g} pixel wide and high", path=path, record=record)
    return x1, y1, x2, y2


def flip_pose(pose) -> np.ndarray:
    """(yaw, pitch, roll) degrees of the horizontally mirrored face: yaw and roll change sign."""
    yaw, pitch, roll = np.asarray(pose, np.float32)
    return np.array([-yaw, pitch, -roll], np.float32)


def rotate_pose(pose, angle_deg: float) -> np.ndarray:
    """(yaw, pitch, roll) degrees after the image is rotated by ``angle_deg`` (counter-clockwise as
    displayed, ``cv2.getRotationMatrix2D``'s sign): roll grows by ``angle_deg``, wrapped to [-180, 180)."""
    yaw, pitch, roll = np.asarray(pose, np.float32)
    return np.array([yaw, pitch, (roll + angle_deg + 180.0) % 360.0 - 180.0], np.float32)


def hflip(image: np.ndarray, points: np.ndarray, flip_perm) -> tuple[np.ndarray, np.ndarray]:
    w = image.shape[1]
    pts = np.asarray(points, np.float32).copy()
    pts[:, 0] = (w - 1) - pts[:, 0]  # pixel centres: x -> w-1-x
    return np.ascontiguousarray(image[:, ::-1]), pts[np.asarray(flip_perm)]


def affine(image: np.ndarray, points: np.ndarray, angle_deg: float = 0.0, scale: float = 1.0,
           shift=(0.0, 0.0), centre=None) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    h, w = image.shape[:2]
    cx, cy = centre if centre is not None else ((w - 1) / 2, (h - 1) / 2)
    m = cv2.getRotationMatrix2D((cx, cy), angle_deg, scale)
    m[:, 2] += shift
    # constant border: reflecting would mirror face parts into the crop, where no landmark is
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return out, (np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]).astype(np.float32)


def crop_face(image: np.ndarray, points: np.ndarray, box, size: int = 112, margin: float = 0.2):
    """Square crop around ``box`` (x1, y1, x2, y2) enlarged by ``margin`` on each side, resized to size. A box
    ``check_box`` refuses (not finite, inverted, under a pixel) is a ``DataError``."""
    import cv2

    x1, y1, x2, y2 = check_box(box)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    s = size / side
    m = np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]])
    out = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return out, (np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]).astype(np.float32)


def occlude(image: np.ndarray, rng: np.random.Generator, max_frac: float = 0.35) -> np.ndarray:
    h, w = image.shape[:2]
    rh, rw = (rng.uniform(0.1, max_frac, 2) * (h, w)).astype(int)
    y, x = rng.integers(0, h - rh), rng.integers(0, w - rw)
    out = image.copy()
    out[y:y + rh, x:x + rw] = rng.integers(0, 256, 3)
    return out


def random_augment(image, points, flip_perm, rng: np.random.Generator, *, max_angle=20.0, max_scale=0.1,
                   max_shift=0.05, p_flip=0.5, p_occlude=0.3, pose=None):
    """Random flip, rotation (degrees) + scale + shift, occlusion -> (image, points), or (image, points,
    pose) when ``pose`` (yaw, pitch, roll degrees) is given, updated to match. The random draws do not
    depend on ``pose``."""
    flipped = rng.uniform() < p_flip
    if flipped:
        image, points = hflip(image, points, flip_perm)
    h, w = image.shape[:2]
    angle = rng.uniform(-max_angle, max_angle)
    image, points = affine(image, points, angle, 1 + rng.uniform(-max_scale, max_scale),
                           rng.uniform(-max_shift, max_shift, 2) * (w, h))
    if rng.uniform() < p_occlude:
        image = occlude(image, rng)
    if pose is None:
        return image, points
    pose = flip_pose(pose) if flipped else np.asarray(pose, np.float32)
    return image, points, rotate_pose(pose, angle)
