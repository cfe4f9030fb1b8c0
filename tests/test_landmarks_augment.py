"""Augmentation keeps image and points consistent, and the scheme's order after a flip."""

import numpy as np

from visrec.data.augment import affine, crop_face, hflip, random_augment
from visrec.data.schemes import get_scheme
from visrec.data.synth import render_face


def pupil_is_dark(img, pts):
    for idx in (104, 105):
        x, y = np.round(pts[idx]).astype(int)
        patch = img[max(0, y - 1):y + 2, max(0, x - 1):x + 2].astype(int).sum(axis=2)
        ring = img[max(0, y - 8):y + 9, max(0, x - 8):x + 9].astype(int).sum(axis=2)
        if not patch.min() < np.median(ring):
            return False
    return True


def test_flip_keeps_the_scheme_order():
    jd = get_scheme(106)
    img, pts = render_face(1, np.random.default_rng(0), difficulty=0.0)
    fimg, fpts = hflip(img, pts, jd.flip_perm)
    assert fpts[jd.groups["left_eye"], 0].max() < fpts[jd.groups["right_eye"], 0].min()
    assert pupil_is_dark(fimg, fpts)
    back_img, back = hflip(fimg, fpts, jd.flip_perm)
    assert np.allclose(back, pts) and np.array_equal(back_img, img)


def test_affine_and_crop_move_points_with_pixels():
    img, pts = render_face(2, np.random.default_rng(1), difficulty=0.0)
    rimg, rpts = affine(img, pts, angle_deg=25, scale=0.9, shift=(4, -3))
    assert pupil_is_dark(rimg, rpts)
    cimg, cpts = crop_face(img, pts, [*pts.min(0), *pts.max(0)], size=96, margin=0.1)
    assert cimg.shape == (96, 96, 3) and pupil_is_dark(cimg, cpts)


def test_random_augment_is_consistent():
    jd = get_scheme(106)
    rng = np.random.default_rng(3)
    for k in range(10):
        img, pts = render_face(k, np.random.default_rng(k), difficulty=0.0)
        aimg, apts = random_augment(img, pts, jd.flip_perm, rng, p_occlude=0.0)
        assert pupil_is_dark(aimg, apts)
        assert apts[jd.groups["left_eye"], 0].mean() < apts[jd.groups["right_eye"], 0].mean()


def test_every_scheme_flip_swaps_sides():
    from visrec.data.schemes import SCHEMES

    for scheme in SCHEMES.values():
        perm = np.asarray(scheme.flip_perm)
        assert np.array_equal(perm[perm], np.arange(scheme.num_points)), scheme.name
        assert set(perm[scheme.groups["left_eye"]]) == set(scheme.groups["right_eye"]), scheme.name
        assert set(perm[scheme.groups["contour"]]) == set(scheme.groups["contour"]), scheme.name
