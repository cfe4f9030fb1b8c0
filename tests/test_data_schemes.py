"""Landmark schemes: flip permutations, group partitions, 5-point mappings (JD-106, 300W-68, WFLW-98)."""

import numpy as np
import pytest

from visrec.data.schemes import FIVE_POINT_NAMES, SCHEMES, get_scheme, to_five_points

# points on the face's vertical midline, which a mirror leaves in place (from the published markups)
MIDLINE = {
    "jd106": {16, 43, 44, 45, 46, 49, 87, 93, 98, 102},
    "300w68": {8, 27, 28, 29, 30, 33, 51, 57, 62, 66},
    "wflw98": {16, 51, 52, 53, 54, 57, 79, 85, 90, 94},
}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_flip_permutation_is_an_involution_fixing_only_the_midline(name):
    s = SCHEMES[name]
    perm = np.array(s.flip_perm)
    assert s.num_points == len(perm) and sorted(perm) == list(range(s.num_points))
    assert np.array_equal(perm[perm], np.arange(s.num_points))
    assert {int(i) for i in np.flatnonzero(perm == np.arange(s.num_points))} == MIDLINE[name]
    assert perm[0] == s.groups["contour"][-1]  # the contour runs ear to ear


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_groups_partition_the_points_and_mirror_left_to_right(name):
    s = SCHEMES[name]
    flat = sorted(i for g in s.groups.values() for i in g)
    assert flat == list(range(s.num_points))  # every point in exactly one group
    perm = np.array(s.flip_perm)
    for group, idx in s.groups.items():
        mirrored = {int(i) for i in perm[idx]}
        if group.startswith("left_"):
            assert mirrored == set(s.groups["right_" + group[5:]]), group
        elif not group.startswith("right_"):
            assert mirrored == set(idx), group  # midline groups (contour, nose, lips) map onto themselves


def test_jd106_permutation_matches_a_symmetric_rendered_face():
    """The renderer's neutral frontal face is mirror-symmetric about x = 56: mirroring its points and
    applying the flip permutation must give back exactly the same annotation."""
    from visrec.data import synth

    p, shape = synth._identity_params(0, 5), synth._identity_shape(0, 5)
    pts = synth._face_points(p, shape, smile=0.0, mouth_open=0.5, eye_open=0.8, yaw=0.0)
    mirrored = pts.copy()
    mirrored[:, 0] = 2 * synth._CX - mirrored[:, 0]
    assert np.allclose(mirrored[get_scheme("jd106").flip_perm], pts, atol=1e-9)
    # and a wrong permutation (identity) would not: the check has teeth
    assert not np.allclose(mirrored, pts, atol=1e-3)


def test_five_points_shapes_order_and_errors():
    for s in SCHEMES.values():
        pts = np.random.default_rng(0).uniform(0, 112, (4, 3, s.num_points, 2))
        five = to_five_points(pts, s)
        assert five.shape == (4, 3, 5, 2) and five.dtype == np.float32
        assert np.allclose(five[1, 2], to_five_points(pts[1, 2], s.name))
        assert np.allclose(five[0, 0, 2], pts[0, 0, s.five_point[2]].mean(0))
        assert len(s.five_point) == len(FIVE_POINT_NAMES) == 5
    with pytest.raises(ValueError, match="106"):
        to_five_points(np.zeros((68, 2)), "jd106")
    assert get_scheme(106) is get_scheme("106") is get_scheme("jd106") is SCHEMES["jd106"]
    assert get_scheme(68).name == "300w68" and get_scheme(np.int64(98)).name == "wflw98"
    with pytest.raises(KeyError):
        get_scheme(5)


def test_five_points_of_a_rendered_face_are_where_a_face_has_them():
    from visrec.data.synth import render_face

    _, pts = render_face(7, np.random.default_rng(0), difficulty=0.0)
    le, re, nose, lm, rm = to_five_points(pts, 106)
    assert le[0] < nose[0] < re[0] and lm[0] < nose[0] < rm[0]  # image-left first
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])      # eyes, then nose, then mouth, downwards
