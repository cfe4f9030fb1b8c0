"""Landmark formats (JD-landmark, 300W .pts, WFLW), bad annotations, and 5-point alignment."""

import numpy as np
import pytest

from visrec.faces.align import ARCFACE_112, align_face, five_points, similarity_transform
from visrec.data.landmarks import (WflwRecord, read_jd_dir, read_landmark_txt, read_pts, read_wflw,
                                   write_landmark_txt, write_pts, write_wflw)
from visrec.data.synth import write_synthetic_jd
from visrec.errors import DataError, VisrecError


def test_jd_round_trip_with_synthetic_faces(tmp_path):
    root = write_synthetic_jd(tmp_path / "jd", 4, seed=1)
    pics, pts, boxes = read_jd_dir(root)
    assert len(pics) == 4 and pts.shape == (4, 106, 2) and boxes.shape == (4, 4)
    assert (boxes[:, 0] <= pts[:, :, 0].min(1) + 1).all()


@pytest.mark.parametrize("n", [68, 98, 106])
def test_point_count_is_data(tmp_path, n):
    pts = np.random.default_rng(n).uniform(0, 100, (n, 2)).astype(np.float32)
    assert np.allclose(read_landmark_txt(write_landmark_txt(tmp_path / "a.txt", pts)), pts, atol=1e-3)
    assert np.allclose(read_pts(write_pts(tmp_path / "a.pts", pts)), pts, atol=1e-3)


def test_wflw_round_trip(tmp_path):
    rec = WflwRecord(np.random.default_rng(0).uniform(0, 200, (98, 2)).astype(np.float32),
                     np.array([1, 2, 150, 160], np.float32), np.array([0, 1, 0, 0, 1, 0]), "a/b.jpg")
    back = read_wflw(write_wflw(tmp_path / "w.txt", [rec]))[0]
    assert np.allclose(back.points, rec.points, atol=1e-3) and back.image == "a/b.jpg"
    assert back.attributes.tolist() == [0, 1, 0, 0, 1, 0]


def test_bad_annotations_name_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("106\n" + "1 2\n" * 105)
    with pytest.raises(DataError, match="header says 106 points but 105"):
        read_landmark_txt(p)
    p.write_text("3\n1 2\n3 nan\n5 6\n")
    with pytest.raises(DataError, match=r"bad\.txt.*line 3.*NaN"):
        read_landmark_txt(p)
    p.write_text("3\n1 2\n3 4\n5000 6\n")
    with pytest.raises(DataError, match=r"line 4.*far outside"):
        read_landmark_txt(p, image_size=(112, 112))
    p.write_text("3\n1 2\n3 4\n5 6\n")
    with pytest.raises(DataError, match="expected 106"):
        read_landmark_txt(p, expected=106)
    (tmp_path / "w.txt").write_text("1 2 3\n")
    with pytest.raises(DataError, match="line 1"):
        read_wflw(tmp_path / "w.txt")


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = similarity_transform(src, src @ rot.T + shift)
    assert np.allclose(m[:, :2], rot) and np.allclose(m[:, 2], shift)


def test_alignment_is_exact_for_a_posed_template():
    rng = np.random.default_rng(1)
    for _ in range(5):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.5, 3)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = ARCFACE_112 @ rot.T + rng.uniform(0, 200, 2)
        img = np.zeros((400, 400, 3), np.uint8)
        crop, m = align_face(img, pts)
        assert crop.shape == (112, 112, 3)
        assert np.abs(pts @ m[:, :2].T + m[:, 2] - ARCFACE_112).max() < 1e-3


def test_eyes_alignment_puts_the_eyes_on_the_template_in_the_warped_image():
    """method='eyes': the two eye points land on the template's eyes exactly, checked on the warped pixels
    (a picture whose channels hold each pixel's own x and y, sampled in the crop at the template eyes),
    while the least-squares fit of a face with other proportions leaves them off."""
    import cv2

    rng = np.random.default_rng(2)
    h, w = 300, 400
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    coords = np.dstack([xs, ys, np.zeros_like(xs)])
    for _ in range(5):
        angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(1.5, 3)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        face = ARCFACE_112 + [[0, 0], [0, 0], [0, 4], [-3, 5], [3, 5]]  # longer nose, wider lower mouth
        pts = (face - 56) @ rot.T + [200, 150]
        crop, m = align_face(coords, pts, method="eyes")
        src = np.array([cv2.getRectSubPix(crop, (1, 1), tuple(map(float, t)))[0, 0, :2] for t in ARCFACE_112[:2]])
        assert np.abs(src - pts[:2]).max() * scale < 0.05  # crop pixels
        assert np.abs(pts[:2] @ m[:, :2].T + m[:, 2] - ARCFACE_112[:2]).max() < 1e-4
        _, m_ls = align_face(coords, pts)
        assert np.abs(pts[:2] @ m_ls[:, :2].T + m_ls[:, 2] - ARCFACE_112[:2]).max() > 1
    with pytest.raises(DataError, match="eye points coincide"):
        align_face(coords, np.zeros((5, 2)), method="eyes")
    with pytest.raises(VisrecError, match="unknown alignment method 'eye'.*lstsq"):
        align_face(coords, pts, method="eye")


def test_alignment_undoes_pose_on_synthetic_faces():
    """Two poses of one synthetic identity map their 5 points to nearly the same place, eyes level."""
    from visrec.data.synth import iter_faces

    faces = list(iter_faces(1, 6, seed=3, difficulty=0.5))
    mapped = []
    for img, _, pts in faces:
        _, m = align_face(img, pts)
        mapped.append(five_points(pts) @ m[:, :2].T + m[:, 2])
    mapped = np.stack(mapped)
    assert np.abs(mapped[:, 0, 1] - mapped[:, 1, 1]).max() < 3   # eyes level after alignment
    assert (mapped[:, 0, 0] < mapped[:, 1, 0]).all()
    assert mapped[:, :2].std(axis=0).max() < 3                     # pose removed: eyes stay put


def test_jd_dir_checks_points_against_the_image_and_rect_fields(tmp_path):
    root = write_synthetic_jd(tmp_path / "jd", 2, seed=4)
    ann = sorted((root / "landmark").glob("*.txt"))[0]
    lines = ann.read_text().splitlines()
    lines[5] = "900.0 10.0"  # file line 6 = point 4, far outside the 112x112 picture
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 6: point 4.*far outside"):
        read_jd_dir(root)
    root2 = write_synthetic_jd(tmp_path / "jd2", 1, seed=5)
    rect = sorted((root2 / "rect").glob("*.rect"))[0]
    rect.write_text("1 2 3\n")
    with pytest.raises(DataError, match=r"\.rect.*x1 y1 x2 y2"):
        read_jd_dir(root2)


def test_two_pictures_falling_back_to_one_landmark_file_are_refused(tmp_path):
    """landmark/<stem>.txt serves a picture with no landmark/<name>.txt: a.jpg and a.png would both take a.txt
    (one face's points for two pictures, each scored against them) and are refused naming both."""
    import shutil

    root = write_synthetic_jd(tmp_path / "jd", 2, seed=6)
    pic = sorted((root / "picture").iterdir())[0]
    named = root / "landmark" / f"{pic.name}.txt"
    if named.exists():
        named.rename(root / "landmark" / f"{pic.stem}.txt")
    assert len(read_jd_dir(root)[0]) == 2  # the fallback itself is fine
    shutil.copy(pic, pic.with_suffix(".png"))
    with pytest.raises(DataError, match=f"pictures {pic.name} and {pic.stem}.png both take landmark/{pic.stem}.txt"):
        read_jd_dir(root)
    # and so for pose/ files
    from visrec.data.landmarks import read_jd_poses

    (root / "pose").mkdir(exist_ok=True)
    for old in (root / "pose").iterdir():
        old.unlink()
    (root / "pose" / f"{pic.stem}.txt").write_text("0 0 0\n")
    pictures = [pic, pic.with_suffix(".png")]
    with pytest.raises(DataError, match=f"pictures {pic.name} and {pic.stem}.png both take pose/{pic.stem}.txt"):
        read_jd_poses(root, pictures)
    assert read_jd_poses(root, pictures[:1]).shape == (1, 3)


def _eye_line_roll(pts):
    """Roll (degrees, counter-clockwise as displayed) of the line between the JD eye centres 74 -> 77."""
    v = pts[..., 77, :] - pts[..., 74, :]
    return np.degrees(np.arctan2(-v[..., 1], v[..., 0]))


def test_synthetic_jd_writes_the_renderers_pose(tmp_path):
    from visrec.data.landmarks import read_jd_poses
    from visrec.data.synth import iter_faces

    root = write_synthetic_jd(tmp_path / "jd", 24, seed=3, difficulty=0.6)
    pics, pts, _ = read_jd_dir(root)
    poses = read_jd_poses(root, pics)
    assert poses.shape == (24, 3) and (poses[:, 1] == 0).all()  # the renderer has no pitch
    # the same faces as iter_faces renders (the recorder only watches the draws)
    for p, (_, _, ref) in zip(pts, iter_faces(24, 1, seed=3, difficulty=0.6)):
        assert np.abs(p - ref).max() < 1e-3
    # roll: the eyes lie level in the canonical frame, so the eye line's angle is the roll
    assert np.abs(_eye_line_roll(pts) - poses[:, 2]).max() < 0.05
    assert poses[:, 2].std() > 3
    # yaw > 0 shifts the nose (deeper than the eyes) towards image right, in the face's own frame
    v = pts[:, 77] - pts[:, 74]
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    nose_shift = ((pts[:, 43:47].mean(1) - (pts[:, 74] + pts[:, 77]) / 2) * u).sum(1)
    turned = np.abs(poses[:, 0]) > 1
    assert turned.sum() >= 12 and (np.sign(nose_shift[turned]) == np.sign(poses[turned, 0])).all()
    assert np.corrcoef(nose_shift, poses[:, 0])[0, 1] > 0.9


def test_pose_files_round_trip_and_bad_ones_name_file_and_line(tmp_path):
    from visrec.data.landmarks import read_jd_poses, read_pose_txt, write_pose_txt

    assert np.allclose(read_pose_txt(write_pose_txt(tmp_path / "p.txt", (12.5, -3, 170))), [12.5, -3, 170])
    (tmp_path / "q.txt").write_text("\n1.0 2.0\n")
    with pytest.raises(DataError, match=r"q\.txt.*line 2.*yaw pitch roll"):
        read_pose_txt(tmp_path / "q.txt")
    (tmp_path / "r.txt").write_text("1 2 nan\n")
    with pytest.raises(DataError, match=r"r\.txt.*line 1"):
        read_pose_txt(tmp_path / "r.txt")
    (tmp_path / "s.txt").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(DataError, match=r"s\.txt.*line 2.*one"):
        read_pose_txt(tmp_path / "s.txt")
    (tmp_path / "t.txt").write_text("400 0 0\n")
    with pytest.raises(DataError, match=r"t\.txt.*line 1.*-180, 180"):
        read_pose_txt(tmp_path / "t.txt")
    root = write_synthetic_jd(tmp_path / "jd", 2, seed=1)
    pics, _, _ = read_jd_dir(root)
    sorted((root / "pose").glob("*.txt"))[1].unlink()
    with pytest.raises(DataError, match=r"000001\.jpg.*no pose file"):
        read_jd_poses(root, pics)
    import shutil

    shutil.rmtree(root / "pose")
    assert read_jd_poses(root, pics) is None


def test_submission_coordinates_integer_by_default_and_decimal_on_request(tmp_path):
    from types import SimpleNamespace

    from visrec.data.landmarks import write_submission_txt
    from visrec.evaluate.landmark_report import write_submission

    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 200, (106, 2))
    pts[0] = (10.5, 11.5)                                       # halves round to even: 10, 12
    f = write_submission_txt(tmp_path / "a.jpg.txt", pts)
    lines = f.read_text().splitlines()
    assert lines[0] == "106" and lines[1] == "10 12" and all("." not in ln for ln in lines)
    back = read_landmark_txt(f, 106)
    assert np.array_equal(back, np.rint(pts).astype(np.float32)) and np.abs(back - pts).max() <= 0.5
    f = write_submission_txt(tmp_path / "b.jpg.txt", pts, coordinates="decimal")
    assert f.read_text().splitlines()[1] == "10.500 11.500"
    assert np.allclose(read_landmark_txt(f, 106), pts, atol=5e-4)
    with pytest.raises(DataError, match="coordinates must be one of"):
        write_submission_txt(tmp_path / "c.txt", pts, coordinates="float")
    bad = pts.copy()
    bad[7, 1] = np.nan
    with pytest.raises(DataError, match="point 7 is NaN") as e:
        write_submission_txt(tmp_path / "d.txt", bad)
    assert e.value.record == "point 7" and not (tmp_path / "d.txt").exists()
    # the evaluation's writer maps crop pixels back to the picture, in either form
    import cv2

    cv2.imwrite(str(tmp_path / "x.jpg"), np.zeros((200, 200, 3), np.uint8))  # the bound on points reads its size
    ds = SimpleNamespace(paths=[tmp_path / "x.jpg"], boxes=[(20.0, 30.0, 120.0, 130.0)], margin=0.0, size=100)
    crop = pts[None] * 0.5                                       # crop of side 100 px = box of side 100 px
    picture = crop[0] + [20.0, 30.0]
    sub = write_submission(tmp_path / "int", ds, crop)
    assert np.array_equal(read_landmark_txt(sub / "x.jpg.txt", 106), np.rint(picture).astype(np.float32))
    sub = write_submission(tmp_path / "dec", ds, crop, coordinates="decimal")
    assert np.allclose(read_landmark_txt(sub / "x.jpg.txt", 106), picture, atol=5e-4)


@pytest.mark.parametrize("text, match", [
    ("1000000 1000000 2000000 2000000", r"does not overlap the 112x112 image"),  # was a black crop
    ("-900 -900 -500 -500", r"does not overlap the 112x112 image"),
    ("-10 -10 500 900", r"more than 4 image sides outside it"),
    ("10 10 50 50 99", r"x1 y1 x2 y2"),  # an extra field was ignored
])
def test_jd_rect_must_frame_the_picture_and_hold_four_numbers(tmp_path, text, match):
    root = write_synthetic_jd(tmp_path / "jd", 1, seed=5)
    rect = sorted((root / "rect").glob("*.rect"))[0]
    rect.write_text(text + "\n")
    with pytest.raises(DataError, match=rf"{rect.name}, record line 1: .*{match}"):
        read_jd_dir(root)
    rect.write_text("-20 -20 130 130\n")  # a box overhanging its picture is a face box still
    assert read_jd_dir(root)[2].tolist() == [[-20, -20, 130, 130]]


def test_pts_without_its_closing_brace_is_refused(tmp_path):
    path = tmp_path / "face.pts"
    path.write_text("version: 1\nn_points: 3\n{\n1 2\n5 9\n9 3\n")
    with pytest.raises(DataError, match=r"face\.pts.*expected 3 point lines between braces"):
        read_pts(path)
    path.write_text("version: 1\nn_points: 3\n{\n1 2\n5 9\n9 3\n}\n")
    assert read_pts(path).shape == (3, 2)
