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


def _eye_line_roll(pts):
    v = pts[77] - pts[74]  # JD eye centres, image-left -> image-right
    return float(np.degrees(np.arctan2(-v[1], v[0])))


def test_random_augment_keeps_pose_consistent_with_points(tmp_path):
    """Synthetic faces' eyes lie level in the canonical frame, so the eye line gives the roll exactly; a
    flip must negate yaw and roll, a rotation add to roll, and the draws must not depend on the pose."""
    from visrec.data.augment import flip_pose, rotate_pose
    from visrec.data.landmarks import read_jd_dir, read_jd_poses
    from visrec.data.synth import write_synthetic_jd

    assert np.allclose(flip_pose([10, 5, -20]), [-10, 5, 20])
    assert np.allclose(rotate_pose([10, 5, 170], 20), [10, 5, -170])  # wrapped to [-180, 180)
    root = write_synthetic_jd(tmp_path / "jd", 12, seed=2, difficulty=0.5)
    pics, pts, _ = read_jd_dir(root)
    poses = read_jd_poses(root, pics)
    jd = get_scheme(106)
    flips = 0
    from visrec.data.images import read_image

    for k in range(12):
        img = read_image(pics[k])
        a = random_augment(img, pts[k], jd.flip_perm, np.random.default_rng(k), p_occlude=0.0, pose=poses[k])
        b = random_augment(img, pts[k], jd.flip_perm, np.random.default_rng(k), p_occlude=0.0)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        aimg, apts, apose = a
        assert abs(_eye_line_roll(apts) - apose[2]) < 0.05
        # the nose bridge (43-46) is deeper than the eyes: yaw > 0 shifts it right along the eye line
        u = (apts[77] - apts[74]) / np.linalg.norm(apts[77] - apts[74])
        shift = float((apts[43:47].mean(0) - (apts[74] + apts[77]) / 2) @ u)
        if abs(poses[k, 0]) > 2:
            assert np.sign(shift) == np.sign(apose[0])
        flips += int(np.sign(apose[0]) != np.sign(poses[k, 0]))
    assert 0 < flips < 12  # both branches ran
