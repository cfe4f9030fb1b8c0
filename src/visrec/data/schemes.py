"""Landmark schemes: index tables, left/right flip permutations and the 5 alignment points.

JD-landmark 106 (ICME 2019 Grand Challenge; Liu et al., "Grand Challenge of 106-Point Facial Landmark
Localization", arXiv:1905.03469, Fig. 1): 0-32 contour (image left to right through the chin), 33-37 and
38-42 upper eyebrow arcs, 43-46 nose bridge, 47-51 nose base, 52-57 / 58-63 eye contours, 64-67 / 68-71
lower eyebrow arcs, 72-73 extra upper/lower eyelid points and 74 the eye centre (left), 75-76 and 77
(right), 78-83 nose wings, 84-95 outer lip, 96-103 inner lip, 104 / 105 pupils.
"Left" means image left (the subject's right) throughout, as in the figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LandmarkScheme:
    name: str
    num_points: int
    groups: dict[str, list[int]]
    flip_perm: list[int]
    # each of the 5 alignment points (left eye, right eye, nose tip, left mouth corner, right mouth corner)
    # is the mean of these indices
    five_point: list[list[int]]


def _r(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


def _jd106() -> LandmarkScheme:
    groups = {
        "contour": _r(0, 32), "left_brow_upper": _r(33, 37), "right_brow_upper": _r(38, 42),
        "nose_bridge": _r(43, 46), "nose_base": _r(47, 51), "left_eye": _r(52, 57) + [72, 73],
        "right_eye": _r(58, 63) + [75, 76], "left_brow_lower": _r(64, 67), "right_brow_lower": _r(68, 71),
        "left_eye_center": [74], "right_eye_center": [77], "nose_wings": _r(78, 83),
        "outer_lip": _r(84, 95), "inner_lip": _r(96, 103), "left_pupil": [104], "right_pupil": [105],
    }
    perm = list(range(106))

    def mirror(a: list[int], b: list[int]) -> None:
        for i, j in zip(a, b):
            perm[i], perm[j] = j, i

    mirror(_r(0, 15), list(range(32, 16, -1)))
    mirror(_r(33, 37), list(range(42, 37, -1)))          # brow arcs run outer->inner / inner->outer
    mirror(_r(64, 67), list(range(71, 67, -1)))
    # eye contours: 52 outer corner, 53-54 upper, 55 inner corner, 56-57 lower (left); mirrored on the right
    mirror([52, 53, 54, 55, 56, 57, 72, 73, 74], [61, 60, 59, 58, 63, 62, 75, 76, 77])
    mirror([47, 48], [51, 50])
    mirror([78, 80, 82], [79, 81, 83])
    mirror([84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95],
           [90, 89, 88, 87, 86, 85, 84, 95, 94, 93, 92, 91])
    mirror([96, 97, 98, 99, 100, 101, 102, 103], [100, 99, 98, 97, 96, 103, 102, 101])
    mirror([104], [105])
    return LandmarkScheme("jd106", 106, groups, perm, [[104], [105], [46], [84], [90]])


def _from_pairs(name: str, n: int, groups: dict[str, list[int]], pairs: list[tuple[int, int]],
                five: list[list[int]]) -> LandmarkScheme:
    perm = list(range(n))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return LandmarkScheme(name, n, groups, perm, five)


def _300w68() -> LandmarkScheme:
    """iBUG 300-W 68-point markup (Sagonas et al. 2013), 0-based: jaw 0-16, brows 17-21 / 22-26, nose
    27-35, eyes 36-41 / 42-47 (outer corner first, clockwise), mouth 48-59 outer, 60-67 inner."""
    pairs = [(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
    groups = {"contour": _r(0, 16), "left_brow": _r(17, 21), "right_brow": _r(22, 26), "nose": _r(27, 35),
              "left_eye": _r(36, 41), "right_eye": _r(42, 47), "outer_lip": _r(48, 59), "inner_lip": _r(60, 67)}
    return _from_pairs("300w68", 68, groups, pairs, [_r(36, 41), _r(42, 47), [30], [48], [54]])


def _wflw98() -> LandmarkScheme:
    """WFLW 98-point markup (Wu et al., LAB, CVPR 2018), 0-based: contour 0-32, brows 33-41 / 42-50,
    nose 51-59, eyes 60-67 / 68-75, mouth 76-87 outer, 88-95 inner, pupils 96 / 97."""
    pairs = [(i, 32 - i) for i in range(16)] + [(33 + i, 46 - i) for i in range(5)] + \
            [(38 + i, 50 - i) for i in range(4)] + [(55, 59), (56, 58)]
    pairs += [(60 + i, 72 - i) for i in range(5)] + [(65, 75), (66, 74), (67, 73)]
    pairs += [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86), (88, 92), (89, 91), (93, 95), (96, 97)]
    groups = {"contour": _r(0, 32), "left_brow": _r(33, 41), "right_brow": _r(42, 50), "nose": _r(51, 59),
              "left_eye": _r(60, 67), "right_eye": _r(68, 75), "outer_lip": _r(76, 87), "inner_lip": _r(88, 95),
              "left_pupil": [96], "right_pupil": [97]}
    return _from_pairs("wflw98", 98, groups, pairs, [[96], [97], [54], [76], [82]])


SCHEMES: dict[str, LandmarkScheme] = {"jd106": _jd106(), "300w68": _300w68(), "wflw98": _wflw98()}


def get_scheme(key: int | str) -> LandmarkScheme:
    if isinstance(key, int):
        for s in SCHEMES.values():
            if s.num_points == key:
                return s
    elif key in SCHEMES:
        return SCHEMES[key]
    raise KeyError(f"no landmark scheme {key!r}; known: {sorted(SCHEMES)}")


def to_five_points(points: np.ndarray, scheme: LandmarkScheme | str | int) -> np.ndarray:
    s = scheme if isinstance(scheme, LandmarkScheme) else get_scheme(scheme)
    pts = np.asarray(points, dtype=np.float32)
    return np.stack([pts[..., idx, :].mean(axis=-2) for idx in s.five_point], axis=-2)
