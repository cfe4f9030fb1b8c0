"""Landmark schemes as data: index tables, left/right flip permutations and the 5 alignment points.

Convention: "left" and "right" mean IMAGE left/right (the viewer's), i.e. ``left_eye`` is the subject's
right eye. This is how all three annotation sets number their points (each starts on the image-left
side), so the tables below read in the same direction as the published figures.

JD-landmark 106 (ICME 2019 Grand Challenge; Liu et al., "Grand Challenge of 106-Point Facial Landmark
Localization", arXiv:1905.03469, Fig. 1 — the same 106-point order as the Face++ 106 markup). The named
indices were cross-checked against a public index table of that markup (repository
github.com/CainKernel/CainCamera, ``landmarklibrary/src/main/java/com/cgfay/landmarklibrary/
FaceLandmark.java`` at commit 0bf1edb2, "106 key points" — its right-brow corner *names* are swapped
relative to its own top-corner names 39/41, whose order we follow): brow corners 33/37 and 38/42,
brow lower middles 65/70, eye corners 52/55 and 58/61, eye top/bottom/centre 72/73/74 and 75/76/77,
nose tip 46, nostril centre 49, nose wings 82/83, mouth corners 84/90, lip mid-points 87/93 (outer) and
98/102 (inner), chin 16, cheek edges 4/28). Points that table does not name (the lid order 53-54 /
56-57 / 59-60 / 62-63, wings 78-81, pupils 104/105) follow the paper's figure. 0-based:

  ===========  ===================================================================================
  0-32         contour, image left -> right through the chin (16 = chin, 4 / 28 = cheek edges)
  33-37        left brow upper arc, outer -> inner;  38-42 right brow upper arc, inner -> outer
  43-46        nose bridge, between the eyes (43) -> nose tip (46)
  47-51        nose base, left -> right (49 = below the tip, between the nostrils)
  52-57        left eye: 52 outer corner, 53-54 upper lid, 55 inner corner, 56-57 lower lid
  58-63        right eye: 58 inner corner, 59-60 upper lid, 61 outer corner, 62-63 lower lid
  64-67        left brow lower arc, outer -> inner;  68-71 right brow lower arc, inner -> outer
  72, 73, 74   left eye upper-lid middle, lower-lid middle, eye centre
  75, 76, 77   right eye upper-lid middle, lower-lid middle, eye centre
  78-83        nose wings, left/right pairs top -> bottom (82 / 83 = outermost alar points)
  84-95        outer lip: 84 left corner, 85-89 upper (87 top middle), 90 right corner, 91-95 lower
               right -> left (93 bottom middle)
  96-103       inner lip: 96 left corner, 97-99 upper (98 middle), 100 right corner, 101-103 lower
               right -> left (102 middle)
  104, 105     left pupil, right pupil
  ===========  ===================================================================================

5 alignment points (left eye, right eye, nose tip, left mouth corner, right mouth corner — the order of
the ArcFace 112x112 template): JD 74 / 77 (eye centres), 46, 84, 90.

iBUG 300-W 68 (Sagonas et al., "300 Faces in-the-Wild Challenge", 2013; 1-based in the paper's figure,
0-based here): jaw 0-16, brows 17-21 / 22-26, nose bridge 27-30, nose base 31-35, eyes 36-41 / 42-47
(outer corner first, clockwise), outer lip 48-59, inner lip 60-67. 5 points: mean of each eye's six
points, 30, 48, 54.

WFLW 98 (Wu et al., "Look at Boundary", CVPR 2018, Fig. of the 98-point markup): contour 0-32, left
brow 33-41 (upper 33-37 outer -> inner, lower 38-41 inner -> outer), right brow 42-50 (upper 42-46
inner -> outer, lower 47-50 outer -> inner), nose bridge 51-54, nose base 55-59, left eye 60-67
(60 outer corner, 64 inner corner), right eye 68-75 (68 inner, 72 outer), outer lip 76-87, inner lip
88-95, pupils 96 / 97. 5 points: 96, 97, 54, 76, 82.

Every scheme's ``groups`` partition ``0..num_points-1`` (no overlaps; tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visrec.errors import ConfigError

FIVE_POINT_NAMES = ("left_eye", "right_eye", "nose_tip", "left_mouth_corner", "right_mouth_corner")


@dataclass(frozen=True)
class LandmarkScheme:
    """One annotation scheme.

    ``flip_perm``: after mirroring an image horizontally (x -> W - 1 - x), ``points[flip_perm]`` is the
    annotation of the mirrored image in the same scheme (point i of the result is the old point
    ``flip_perm[i]``). It is an involution. ``five_point[k]`` lists the indices whose mean is the k-th
    alignment point, in the order of ``FIVE_POINT_NAMES``.
    """

    name: str
    num_points: int
    groups: dict[str, list[int]]
    flip_perm: list[int]
    five_point: list[list[int]]


def _r(a: int, b: int) -> list[int]:
    """Inclusive index range a..b."""
    return list(range(a, b + 1))


def _perm_from_pairs(n: int, pairs: list[tuple[list[int], list[int]]]) -> list[int]:
    perm = list(range(n))
    for left, right in pairs:
        assert len(left) == len(right)
        for i, j in zip(left, right):
            perm[i], perm[j] = j, i
    return perm


def _jd106() -> LandmarkScheme:
    groups = {
        "contour": _r(0, 32), "left_brow_upper": _r(33, 37), "right_brow_upper": _r(38, 42),
        "nose_bridge": _r(43, 46), "nose_base": _r(47, 51), "left_eye": _r(52, 57) + [72, 73],
        "right_eye": _r(58, 63) + [75, 76], "left_brow_lower": _r(64, 67), "right_brow_lower": _r(68, 71),
        "left_eye_center": [74], "right_eye_center": [77], "nose_wings": _r(78, 83),
        "outer_lip": _r(84, 95), "inner_lip": _r(96, 103), "left_pupil": [104], "right_pupil": [105],
    }
    perm = _perm_from_pairs(106, [
        (_r(0, 15), _r(17, 32)[::-1]),                    # contour; 16 (chin) maps to itself
        (_r(33, 37), _r(38, 42)[::-1]),                   # upper brow arcs: outer<->outer ... inner<->inner
        (_r(64, 67), _r(68, 71)[::-1]),                   # lower brow arcs
        # eyes: outer corner, upper lid (outer, inner), inner corner, lower lid (inner, outer), mid lids, centre
        ([52, 53, 54, 55, 56, 57, 72, 73, 74], [61, 60, 59, 58, 63, 62, 75, 76, 77]),
        ([47, 48], [51, 50]),                             # nose base; 49 on the midline
        ([78, 80, 82], [79, 81, 83]),                     # nose wings
        (_r(84, 89), _r(85, 90)[::-1]),                   # outer upper lip: 84<->90 ... 87 midline
        ([91, 92], [95, 94]),                             # outer lower lip; 93 midline
        ([96, 97], [100, 99]),                            # inner upper lip; 98 midline
        ([101], [103]),                                   # inner lower lip; 102 midline
        ([104], [105]),                                   # pupils
    ])
    return LandmarkScheme("jd106", 106, groups, perm, [[74], [77], [46], [84], [90]])


def _300w68() -> LandmarkScheme:
    groups = {"contour": _r(0, 16), "left_brow": _r(17, 21), "right_brow": _r(22, 26),
              "nose_bridge": _r(27, 30), "nose_base": _r(31, 35), "left_eye": _r(36, 41),
              "right_eye": _r(42, 47), "outer_lip": _r(48, 59), "inner_lip": _r(60, 67)}
    perm = _perm_from_pairs(68, [
        (_r(0, 7), _r(9, 16)[::-1]), (_r(17, 21), _r(22, 26)[::-1]), ([31, 32], [35, 34]),
        ([36, 37, 38, 39, 40, 41], [45, 44, 43, 42, 47, 46]),
        ([48, 49, 50, 55, 56], [54, 53, 52, 59, 58]), ([60, 61, 65], [64, 63, 67]),
    ])
    return LandmarkScheme("300w68", 68, groups, perm, [_r(36, 41), _r(42, 47), [30], [48], [54]])


def _wflw98() -> LandmarkScheme:
    groups = {"contour": _r(0, 32), "left_brow": _r(33, 41), "right_brow": _r(42, 50),
              "nose_bridge": _r(51, 54), "nose_base": _r(55, 59), "left_eye": _r(60, 67),
              "right_eye": _r(68, 75), "outer_lip": _r(76, 87), "inner_lip": _r(88, 95),
              "left_pupil": [96], "right_pupil": [97]}
    perm = _perm_from_pairs(98, [
        (_r(0, 15), _r(17, 32)[::-1]), (_r(33, 37), _r(42, 46)[::-1]), (_r(38, 41), _r(47, 50)[::-1]),
        ([55, 56], [59, 58]), (_r(60, 64), _r(68, 72)[::-1]), ([65, 66, 67], [75, 74, 73]),
        ([76, 77, 78, 83, 84], [82, 81, 80, 87, 86]), ([88, 89, 93], [92, 91, 95]), ([96], [97]),
    ])
    return LandmarkScheme("wflw98", 98, groups, perm, [[96], [97], [54], [76], [82]])


SCHEMES: dict[str, LandmarkScheme] = {"jd106": _jd106(), "300w68": _300w68(), "wflw98": _wflw98()}


class UnknownSchemeError(ConfigError, KeyError):
    """No scheme by that name or point count: a visrec error (a ``KeyError`` too, for callers that look up)."""

    __str__ = ConfigError.__str__  # KeyError's would quote the message


def get_scheme(key: int | str | LandmarkScheme) -> LandmarkScheme:
    """A scheme by name (``jd106``, ``300w68``, ``wflw98``) or by point count (106, 68, 98; also as text);
    anything else raises :class:`UnknownSchemeError`."""
    if isinstance(key, LandmarkScheme):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key)
    if isinstance(key, (int, np.integer)):
        for scheme in SCHEMES.values():
            if scheme.num_points == int(key):
                return scheme
    elif key in SCHEMES:
        return SCHEMES[key]
    raise UnknownSchemeError(f"no landmark scheme {key!r}; known: {sorted(SCHEMES)} (or 106 / 68 / 98 points)")


def to_five_points(points: np.ndarray, scheme: LandmarkScheme | str | int) -> np.ndarray:
    """(..., num_points, 2) landmarks -> (..., 5, 2) float32 alignment points in ``FIVE_POINT_NAMES`` order."""
    s = get_scheme(scheme)
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim < 2 or pts.shape[-2:] != (s.num_points, 2):
        raise ValueError(f"scheme {s.name} expects points shaped (..., {s.num_points}, 2), got {pts.shape}")
    return np.stack([pts[..., idx, :].mean(axis=-2) for idx in s.five_point], axis=-2)


MIN_POINT_SPREAD = 1e-6  # pixels: visrec.faces.align's bound on two coincident eyes, applied to all five too


def degenerate_points(five: np.ndarray) -> np.ndarray:
    """Per set of five points (..., 5, 2), True where no alignment can use them: a coordinate not finite, all
    five within ``MIN_POINT_SPREAD`` of their mean (the least-squares scale divides by their spread) or the two
    eyes (rows 0 and 1) that close (``eyes`` maps them apart). ``visrec.faces.align`` refuses such points, and
    readers (IJB five-point files) check their files with it up front."""
    pts = np.asarray(five, np.float64)
    finite = np.isfinite(pts).all(axis=(-2, -1))
    safe = np.where(np.isfinite(pts), pts, 0.0)
    spread = np.sqrt(((safe - safe.mean(axis=-2, keepdims=True)) ** 2).sum(axis=-1).mean(axis=-1))
    eyes = np.linalg.norm(safe[..., 0, :] - safe[..., 1, :], axis=-1)
    return ~finite | (spread < MIN_POINT_SPREAD) | (eyes < MIN_POINT_SPREAD)
