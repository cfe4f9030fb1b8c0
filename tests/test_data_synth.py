"""Synthetic identities: determinism, identity stability, exact landmarks, difficulty, real-format writers."""

import numpy as np
import pytest

from visrec.data.schemes import SCHEMES, get_scheme, to_five_points
from visrec.data.synth import iter_faces, render_face, write_face_dataset, write_verification_pairs


def test_deterministic():
    a = render_face(3, np.random.default_rng(1), 0.5)
    b = render_face(3, np.random.default_rng(1), 0.5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_flip_permutation_is_an_involution_and_pairs_groups():
    for scheme in SCHEMES.values():
        perm = np.array(scheme.flip_perm)
        assert sorted(perm) == list(range(scheme.num_points))
        assert np.array_equal(perm[perm], np.arange(scheme.num_points))
    jd = get_scheme(106)
    all_idx = sorted(i for g in jd.groups.values() for i in g)
    assert all_idx == list(range(106))  # the groups partition the 106 points
    perm = np.array(jd.flip_perm)
    assert set(perm[jd.groups["left_eye"]]) == set(jd.groups["right_eye"])
    assert set(perm[jd.groups["outer_lip"]]) == set(jd.groups["outer_lip"])


def test_frontal_geometry_follows_the_scheme():
    jd = get_scheme("jd106")
    _, pts = render_face(0, np.random.default_rng(0), difficulty=0.0)
    g = {k: pts[v] for k, v in jd.groups.items()}
    assert g["left_eye"][:, 0].max() < g["right_eye"][:, 0].min()  # image-left eye first
    assert g["left_brow_upper"][:, 1].mean() < g["left_eye"][:, 1].mean()  # brows above eyes
    assert g["nose_bridge"][0, 1] < g["nose_bridge"][-1, 1]  # bridge runs down to the tip
    assert g["outer_lip"][:, 1].mean() > g["nose_base"][:, 1].mean()  # mouth below the nose
    assert g["contour"][16, 1] == pytest.approx(g["contour"][:, 1].max(), abs=1.0)  # 16 = chin
    # mirroring the points and applying the flip permutation gives a plausible frontal face again
    mirrored = pts.copy()
    mirrored[:, 0] = 111 - mirrored[:, 0]
    flipped = mirrored[jd.flip_perm]
    assert flipped[jd.groups["left_eye"], 0].max() < flipped[jd.groups["right_eye"], 0].min()
    five = to_five_points(pts, jd)
    assert five.shape == (5, 2) and five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]


def test_landmarks_follow_the_pose():
    """The pupil landmark sits on a dark pupil pixel under any pose (points transform with the image)."""
    for seed in range(6):
        img, pts = render_face(seed, np.random.default_rng(seed), difficulty=0.5)
        for idx in (104, 105):
            x, y = np.round(pts[idx]).astype(int)
            patch = img[max(0, y - 1):y + 2, max(0, x - 1):x + 2].astype(int).sum(axis=2)
            surround = img[max(0, y - 8):y + 9, max(0, x - 8):x + 9].astype(int).sum(axis=2)
            assert patch.min() < np.median(surround), (seed, idx)


def test_identity_is_stable_and_distinct():
    """Pose-normalised landmark configurations vary less within an identity than between identities."""
    def normalised(pts):
        five = to_five_points(pts, "jd106")
        centre = five[:2].mean(0)
        d = five[1] - five[0]
        angle = np.arctan2(d[1], d[0])
        rot = np.array([[np.cos(-angle), -np.sin(-angle)], [np.sin(-angle), np.cos(-angle)]])
        return (pts - centre) @ rot.T / np.linalg.norm(d)

    faces = list(iter_faces(6, 5, seed=0, difficulty=0.2))
    shapes = np.stack([normalised(p) for _, _, p in faces]).reshape(6, 5, -1)
    within = np.mean([np.linalg.norm(s - s.mean(0), axis=1).mean() for s in shapes])
    means = shapes.mean(1)
    between = np.mean([np.linalg.norm(means[i] - means[j]) for i in range(6) for j in range(i + 1, 6)])
    assert between > 2 * within


def test_difficulty_adds_nuisance():
    def pose_spread(d):  # how far the same identity's landmarks move between images
        pts = np.stack([f[2] for f in iter_faces(1, 12, seed=4, difficulty=d)])
        return np.std(pts, axis=0).mean()

    def noise(d):  # high-frequency energy: noise and occluder edges grow with difficulty
        img = np.stack([f[0].astype(float) for f in iter_faces(1, 12, seed=4, difficulty=d)])
        return np.abs(np.diff(img, axis=2)).mean()

    assert pose_spread(0.9) > 3 * pose_spread(0.05)
    assert noise(0.9) > 1.5 * noise(0.05)


def test_writers_round_trip_through_the_real_readers(tmp_path):
    from visrec.data.folders import read_image_folder
    from visrec.data.recordio import RecordIOReader
    from visrec.data.verification import read_verification_bin

    rec = write_face_dataset(tmp_path / "rec", 3, 4, format="recordio", seed=2)
    reader = RecordIOReader(rec)
    assert len(reader) == 12 and reader.num_classes == 3
    lm = np.load(rec / "landmarks106.npy")
    assert lm.shape == (12, 106, 2)
    # image order in the .rec is identity-grouped, the order iter_faces renders
    first_img, _, first_pts = next(iter_faces(3, 4, seed=2))
    assert np.allclose(lm[0], first_pts)
    assert np.abs(reader.image(0).astype(int) - first_img.astype(int)).mean() < 4

    folder = write_face_dataset(tmp_path / "img", 2, 3, format="folder", seed=2)
    lst = read_image_folder(folder)
    assert lst.num_classes == 2 and len(lst.paths) == 6
    side = (tmp_path / "img-landmarks" / "000001" / "00002.txt").read_text().split("\n")
    assert side[0] == "106" and len(side[1].split()) == 2

    pairs = write_verification_pairs(tmp_path / "v.bin", 5, 8, seed=1)
    images, issame = read_verification_bin(pairs)
    assert len(images) == 16 and issame.tolist() == [True, False] * 4
