"""Synthetic identities: determinism, identity stability, exact landmarks, difficulty, real-format writers."""

from pathlib import Path

import numpy as np
import pytest

from visrec.data import synth
from visrec.data.schemes import get_scheme, to_five_points
from visrec.data.synth import iter_faces, render_face, write_face_dataset, write_verification_pairs
from visrec.errors import DataError

JD = get_scheme("jd106")


def test_deterministic_and_seeded():
    a = render_face(3, np.random.default_rng(1), 0.5)
    b = render_face(3, np.random.default_rng(1), 0.5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (112, 112, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (106, 2) and a[1].dtype == np.float32
    other_seed = render_face(3, np.random.default_rng(1), 0.5, seed=1)  # seed changes the identity itself
    assert not np.array_equal(a[1], other_seed[1])
    first = [f[0] for f in iter_faces(2, 2, seed=5)]
    again = [f[0] for f in iter_faces(2, 2, seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_first_identity_offsets_identities_not_labels():
    shifted = list(iter_faces(2, 1, seed=0, first_identity=3))
    plain = list(iter_faces(5, 1, seed=0))
    assert [lab for _, lab, _ in shifted] == [0, 1]
    assert np.array_equal(shifted[0][0], plain[3][0]) and np.array_equal(shifted[1][2], plain[4][2])


def test_frontal_geometry_follows_the_jd_scheme():
    _, pts = render_face(0, np.random.default_rng(0), difficulty=0.0)
    g = {k: pts[v] for k, v in JD.groups.items()}
    assert g["left_eye"][:, 0].max() < g["right_eye"][:, 0].min()  # image-left eye first
    assert g["left_brow_upper"][:, 0].max() < g["right_brow_upper"][:, 0].min()
    assert g["left_brow_upper"][:, 1].mean() < g["left_eye"][:, 1].mean()  # brows above eyes
    assert g["nose_bridge"][0, 1] < g["nose_bridge"][-1, 1]  # 43 -> 46 runs down to the tip
    assert g["outer_lip"][:, 1].mean() > g["nose_base"][:, 1].mean()  # mouth below the nose
    assert g["contour"][16, 1] == pytest.approx(g["contour"][:, 1].max(), abs=1.0)  # 16 = chin
    assert np.all(np.diff(g["contour"][:, 0]) > 0)  # contour runs image left -> right
    assert pts[52, 0] < pts[55, 0] < pts[58, 0] < pts[61, 0]  # outer, inner | inner, outer eye corners
    assert pts[84, 0] < pts[87, 0] < pts[90, 0] and pts[87, 1] < pts[93, 1]  # mouth corners, lip middles


def test_landmarks_are_the_unposed_geometry_under_one_affine_map():
    """At difficulty 0 there is no expression or yaw, only a small rotation/shift: the rendered points must
    be an exact similarity transform of the identity's neutral canonical points."""
    for ident in range(4):
        _, pts = render_face(ident, np.random.default_rng(ident), difficulty=0.0)
        p, shape = synth._identity_params(0, ident), synth._identity_shape(0, ident)
        canon = synth._face_points(p, shape, smile=0.0, mouth_open=0.0, eye_open=1.0, yaw=0.0)
        A = np.hstack([canon, np.ones((106, 1))])
        M, *_ = np.linalg.lstsq(A, pts.astype(np.float64), rcond=None)
        assert np.abs(A @ M - pts).max() < 1e-3  # float32 rounding only
        lin = M[:2].T
        assert np.allclose(lin @ lin.T, np.eye(2) * np.linalg.det(lin), atol=1e-6)  # rotation x scale
        assert not np.allclose(lin, np.eye(2), atol=1e-3)  # and the pose did move the points


def test_landmarks_follow_the_pose_on_the_pixels():
    """The pupil landmark sits on a dark pupil pixel and the mouth centre on lip colour, under any pose."""
    for ident in range(8):
        img, pts = render_face(ident, np.random.default_rng(ident), difficulty=0.4)
        for idx in (104, 105):
            x, y = np.round(pts[idx]).astype(int)
            patch = img[max(0, y - 1):y + 2, max(0, x - 1):x + 2].astype(int).sum(axis=2)
            surround = img[max(0, y - 8):y + 9, max(0, x - 8):x + 9].astype(int).sum(axis=2)
            assert patch.min() < np.median(surround), (ident, idx)
    # clean images: halfway between the lower lip's outer (93) and inner (102) middles is lip colour
    for ident in range(9, 13):
        img, pts = render_face(ident, np.random.default_rng(3), difficulty=0.0)
        lips = np.array(synth._identity_params(0, ident)["lips"])
        x, y = np.round((pts[93] + pts[102]) / 2).astype(int)
        patch = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).astype(float)  # 3x3: the lip can be 2 px thin
        assert np.abs(patch - lips).max(axis=1).min() < 25, ident


def test_identity_is_stable_and_distinct():
    """Pose-normalised landmark configurations vary less within an identity than between identities."""
    def normalised(pts):
        five = to_five_points(pts, "jd106")
        centre = five[:2].mean(0)
        d = five[1] - five[0]
        angle = np.arctan2(d[1], d[0])
        rot = np.array([[np.cos(-angle), -np.sin(-angle)], [np.sin(-angle), np.cos(-angle)]])
        return (pts - centre) @ rot.T / np.linalg.norm(d)

    faces = list(iter_faces(6, 5, seed=0, difficulty=0.3))
    shapes = np.stack([normalised(p) for _, _, p in faces]).reshape(6, 5, -1)
    within = np.mean([np.linalg.norm(s - s.mean(0), axis=1).mean() for s in shapes])
    means = shapes.mean(1)
    between = np.mean([np.linalg.norm(means[i] - means[j]) for i in range(6) for j in range(i + 1, 6)])
    assert between > 2 * within


def test_difficulty_adds_nuisance_and_hides_identity_from_raw_pixels():
    def pose_spread(d):  # how far the same identity's landmarks move between images
        pts = np.stack([f[2] for f in iter_faces(1, 12, seed=4, difficulty=d)])
        return np.std(pts, axis=0).mean()

    def roughness(d):  # high-frequency energy: noise and occluder edges grow with difficulty
        img = np.stack([f[0].astype(float) for f in iter_faces(1, 12, seed=4, difficulty=d)])
        return np.abs(np.diff(img, axis=2)).mean()

    def raw_pixel_1nn(d):  # identification by nearest neighbour on raw pixels
        faces = list(iter_faces(25, 4, seed=3, difficulty=d))
        x = np.stack([f[0].astype(np.float32).ravel() for f in faces])
        y = np.array([f[1] for f in faces])
        x -= x.mean(1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return (y[s.argmax(1)] == y).mean()

    assert pose_spread(0.9) > 3 * pose_spread(0.05)
    assert roughness(0.9) > 1.5 * roughness(0.05)
    easy, hard = raw_pixel_1nn(0.0), raw_pixel_1nn(0.9)
    assert hard < easy - 0.1 and easy > 0.2  # chance is 0.04


def test_recordio_round_trip_with_landmark_sidecar(tmp_path):
    from visrec.data.recordio import RecordIOReader

    calls = []
    rec = write_face_dataset(tmp_path / "rec", 3, 4, format="recordio", seed=2, progress=lambda: calls.append(1))
    assert len(calls) == 12
    reader = RecordIOReader(rec)
    assert len(reader) == 12 and reader.num_classes == 3
    lm = np.load(rec / "landmarks106.npy")
    assert lm.shape == (12, 106, 2) and lm.dtype == np.float32
    faces = list(iter_faces(3, 4, seed=2))
    for i in (0, 5, 11):  # image order in the .rec = the order iter_faces renders
        img, label, pts = faces[i]
        assert int(reader.labels[i]) == label
        assert np.array_equal(lm[i], pts)
        decoded = reader.image(i).astype(int)
        own = np.abs(decoded - img.astype(int)).mean()  # JPEG (quality 95) loses a little, mostly the noise
        other = np.abs(decoded - faces[(i + 1) % 12][0].astype(int)).mean()
        assert own < 6 and own < 0.3 * other


def test_folder_round_trip_with_jd_text_sidecar(tmp_path):
    from visrec.data.folders import read_image_folder
    from visrec.data.landmarks import read_landmark_txt

    folder = write_face_dataset(tmp_path / "img", 2, 3, format="folder", seed=2, first_identity=7)
    lst = read_image_folder(folder)  # the sidecar lives outside the root: the reader sees only images
    assert lst.num_classes == 2 and len(lst.paths) == 6
    faces = list(iter_faces(2, 3, seed=2, first_identity=7))
    for path, label in zip(lst.paths, lst.labels):
        path = Path(path)
        side = tmp_path / "img-landmarks" / path.parent.name / f"{path.stem}.txt"
        assert side.read_text().splitlines()[0] == "106"
        k = int(path.parent.name) * 3 + int(path.stem)
        assert faces[k][1] == label
        assert np.allclose(read_landmark_txt(side, 106), faces[k][2], atol=1e-3)
    with pytest.raises(ValueError, match="format"):
        write_face_dataset(tmp_path / "x", 2, 1, format="zip")


def test_verification_pairs_are_half_genuine_and_held_out(tmp_path):
    from visrec.data.verification import read_verification_bin

    pairs = write_verification_pairs(tmp_path / "v.bin", 5, 8, seed=1)
    images, issame = read_verification_bin(pairs)
    assert len(images) == 16 and issame.tolist() == [True, False] * 4
    assert images[0].shape == (112, 112, 3)
    with pytest.raises(ValueError):
        write_verification_pairs(tmp_path / "w.bin", 1, 2)


def test_cli_synth_faces_folder_and_pairs(tmp_path):
    from typer.testing import CliRunner

    from visrec.commands.data import app

    runner = CliRunner()
    res = runner.invoke(app, ["synth", "faces", "--out", str(tmp_path / "s"), "--identities", "2", "--per-identity", "2",
                              "--format", "folder", "--pairs", "10", "--difficulty", "0.5"])
    assert res.exit_code == 0, res.output
    assert "synthetic faces written" in res.output and "106-point landmarks" in res.output
    assert len(list((tmp_path / "s" / "train").glob("*/*.jpg"))) == 4
    assert len(list((tmp_path / "s" / "train-landmarks").glob("*/*.txt"))) == 4
    assert (tmp_path / "s" / "val.bin").exists()
    bad = runner.invoke(app, ["synth", "faces", "--out", str(tmp_path / "t"), "--format", "zip"])
    assert bad.exit_code == 2 and "zip" in bad.output


@pytest.mark.parametrize("fmt", ["folder", "recordio"])
def test_a_second_set_into_the_same_folder_is_refused_and_the_first_is_untouched(tmp_path, fmt):
    """A folder set of 4 identities rewritten with 2 kept the 2 stale identity folders (and their landmarks):
    a mixed set the trainer read as 4 classes, while the command reported 2. A RecordIO set was replaced."""
    from visrec.data.synth import write_face_dataset, write_synthetic_jd

    write_face_dataset(tmp_path / "train", 4, 2, format=fmt)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for other in ("folder", "recordio"):
        with pytest.raises(DataError, match="already holds a data set .* write into a new or empty folder"):
            write_face_dataset(tmp_path / "train", 2, 3, format=other, seed=1)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    write_synthetic_jd(tmp_path / "jd", 3)
    with pytest.raises(DataError, match="already holds a data set"):
        write_synthetic_jd(tmp_path / "jd", 2, seed=1)
    assert len(list((tmp_path / "jd" / "picture").iterdir())) == 3
