"""Landmark annotations are read only as they are: files bounded by their format's size, no stray field dropped,
rect/pose files found as landmark files are, none left over without its picture, points in the upright
picture's frame (EXIF orientation), config values the model contract takes, and no prepared crop whose points
the readers would refuse."""

import itertools
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from visrec.data import landmarks
from visrec.data.images import image_size, read_image
from visrec.data.landmarks import (WflwRecord, read_jd_dir, read_jd_poses, read_landmark_txt, read_pose_txt,
                                   read_pts, read_rect, read_wflw, write_landmark_txt, write_pts, write_wflw)
from visrec.data.synth import write_synthetic_jd
from visrec.errors import ConfigError, DataError


def _wflw_line(tmp_path):
    rng = np.random.default_rng(0)
    rec = WflwRecord(rng.uniform(20, 80, (98, 2)).astype(np.float32), np.array([10, 10, 90, 90], np.float32),
                     np.zeros(6, int), "a.png")
    return write_wflw(tmp_path / "list.txt", [rec] * 3)


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# reader, the bound it reads under, a valid file of its kind
READERS = {
    "landmark": (read_landmark_txt, "MAX_POINT_FILE_BYTES",
                 lambda d: write_landmark_txt(d / "a.jpg.txt", np.full((106, 2), 50.0))),
    "pts": (read_pts, "MAX_POINT_FILE_BYTES", lambda d: write_pts(d / "a.pts", np.full((68, 2), 50.0) + np.eye(68, 2))),
    "rect": (read_rect, "MAX_LINE_FILE_BYTES", lambda d: _text(d / "a.rect", "10 10 90 90\n")),
    "pose": (read_pose_txt, "MAX_LINE_FILE_BYTES", lambda d: _text(d / "p.txt", "1 2 3\n")),
    "wflw": (read_wflw, "MAX_WFLW_FILE_BYTES", _wflw_line),
}


@pytest.mark.parametrize("kind", sorted(READERS))
def test_every_annotation_reader_refuses_a_file_beyond_its_formats_bound_before_reading_it(tmp_path, kind,
                                                                                          monkeypatch):
    """A sparse 1 GB .rect was read whole (2.6 GB peak; 3 GB ended in a MemoryError traceback). Each reader's
    bound is checked from the file's size: a valid file one byte over it is refused naming file and bound."""
    reader, bound, write = READERS[kind]
    path = write(tmp_path)
    reader(path)  # valid as written
    limit = path.stat().st_size - 1
    monkeypatch.setattr(landmarks, bound, limit)
    with pytest.raises(DataError, match=rf"more than the {limit:,}") as e:
        reader(path)
    assert e.value.path == str(path)


def test_a_sparse_rect_in_a_set_is_refused_from_its_size_and_the_bounds_fit_their_formats(tmp_path):
    """A sparse 1 MiB .rect in a JD set (the prober's was 1 GB) is refused naming it, not read; the bounds hold
    the largest honest file of each kind (a 10,000-point file; WFLW's whole release of 10,000 faces, ~20 MB)
    and are finite."""
    root = write_synthetic_jd(tmp_path / "jd", 2, seed=3)
    rect = sorted((root / "rect").iterdir())[0]
    with open(rect, "r+b") as fh:
        fh.truncate(1 << 20)
    with pytest.raises(DataError, match=rf"{rect.name}: 1,048,576 bytes, more than the [0-9,]+ a file of this kind"):
        read_jd_dir(root)
    assert landmarks.MAX_LINE_FILE_BYTES < 1 << 16
    assert landmarks.MAX_POINT_FILE_BYTES >= 10_000 * 40
    assert 20 << 20 < landmarks.MAX_WFLW_FILE_BYTES <= 1 << 30


def _landmark_file(tmp_path, body: str) -> Path:
    path = tmp_path / "face.txt"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, line", [
    ("3\n24.5 63.0 99.0\n30 40\n50 60\n", 2),  # a third number was dropped
    ("3\n24 5 63 0\n30 40\n50 60\n", 2),  # decimal commas split by a locale: read as x=24, y=5
    ("3 points\n24 63\n30 40\n50 60\n", 1),  # a header with a word after the count
])
def test_a_jd_point_line_is_two_numbers_and_the_header_the_count_alone(tmp_path, body, line):
    path = _landmark_file(tmp_path, body)
    with pytest.raises(DataError, match=rf"face\.txt, record line {line}: "):
        read_landmark_txt(path)


@pytest.mark.parametrize("body, line", [
    ("version: 1\nn_points: 3\n{\n1 2 7\n5 9\n9 3\n}\n", 4),  # a third column
    ("version: 1\nn_points: 3\n{\n1 2\n5 9\n9 3\n}\n4 4\n", 8),  # a line after the closing brace
    ("version: 1\nn_points: 3\nn_points: 4\n{\n1 2\n5 9\n9 3\n}\n", 3),  # a second count
    ("version: 1\nn_points: 3\nscale: 2\n{\n1 2\n5 9\n9 3\n}\n", 3),  # a header line of no .pts
])
def test_a_pts_file_holds_its_header_and_points_and_nothing_else(tmp_path, body, line):
    path = tmp_path / "face.pts"
    path.write_text(body)
    with pytest.raises(DataError, match=rf"face\.pts, record line {line}: "):
        read_pts(path)
    path.write_text("version: 1\nn_points: 3\n{\n1 2\n5 9\n9 3\n}\n\n")  # blank lines are no field
    assert read_pts(path).tolist() == [[1, 2], [5, 9], [9, 3]]


def test_a_rect_is_one_line(tmp_path):
    path = tmp_path / "a.rect"
    path.write_text("10 10 90 90\n20 20 80 80\n")
    with pytest.raises(DataError, match=r"a\.rect, record line 2: .*one"):
        read_rect(path)
    path.write_text("\n10 10 90 90\n\n")
    assert read_rect(path) == [10, 10, 90, 90]


def test_a_rect_named_by_the_pictures_stem_is_read_and_checked(tmp_path):
    """rect/<stem>.rect (the layout the module documents) was never read: the box came from the points' extent
    without a word, and a garbage rect/000000.rect passed. It is found as landmark files are, with the same
    refusal when two pictures would take it."""
    root = write_synthetic_jd(tmp_path / "jd", 2, seed=1)
    named = root / "rect" / "000000.jpg.rect"
    stem = root / "rect" / "000000.rect"
    named.rename(stem)
    stem.write_text("5 6 100 101\n")
    assert read_jd_dir(root)[2][0].tolist() == [5, 6, 100, 101]
    stem.write_text("garbage\n")
    with pytest.raises(DataError, match=r"000000\.rect, record line 1: .*x1 y1 x2 y2"):
        read_jd_dir(root)
    stem.write_text("5 6 100 101\n")
    pic = root / "picture" / "000000.jpg"
    cv2.imwrite(str(pic.with_suffix(".png")), read_image(pic)[:, :, ::-1])
    shutil.copy(root / "landmark" / "000000.jpg.txt", root / "landmark" / "000000.png.txt")
    shutil.copy(root / "pose" / "000000.jpg.txt", root / "pose" / "000000.png.txt")
    with pytest.raises(DataError, match=r"pictures 000000\.jpg and 000000\.png both take rect/000000\.rect"):
        read_jd_dir(root)


@pytest.mark.parametrize("folder", ["picture", "landmark", "rect", "pose"])
def test_annotation_files_of_no_picture_are_refused_naming_them_and_the_count(tmp_path, folder):
    """A deleted picture left its landmark/rect/pose files unread and the set was scored one face short,
    exit 0. Every file there belongs to a picture, or the set is refused naming the first ones and the count."""
    root = write_synthetic_jd(tmp_path / "jd", 4, seed=2)
    if folder == "picture":
        (root / "picture" / "000003.jpg").unlink()
        stray = root / "landmark" / "000003.jpg.txt"
    else:  # a file no picture takes (its picture was renamed, or the name mistyped)
        stray = root / folder / ("000009.jpg.rect" if folder == "rect" else "000009.jpg.txt")
        shutil.copy(sorted((root / folder).iterdir())[0], stray)
    with pytest.raises(DataError, match=rf"{stray.name}: 1 file\(s\) in {stray.parent.name}/ belong to no picture"):
        read_jd_dir(root)
    stray.unlink()
    if folder == "picture":
        for f in ("rect/000003.jpg.rect", "pose/000003.jpg.txt"):
            (root / f).unlink()
    assert len(read_jd_dir(root)[0]) == (3 if folder == "picture" else 4)


def test_several_stray_files_are_counted(tmp_path):
    root = write_synthetic_jd(tmp_path / "jd", 8, seed=2)
    for name in sorted((root / "picture").iterdir())[1:]:
        name.unlink()
    with pytest.raises(DataError, match=r"000001\.jpg\.txt: 7 file\(s\) in landmark/ .*000001\.jpg\.txt, "
                                        r"000002\.jpg\.txt, .*, \.\.\."):
        read_jd_dir(root)


def _oriented(path: Path, orientation: int, fmt: str = "JPEG", size=(224, 112)) -> Path:
    """A picture stored ``size`` (width, height) with EXIF ``orientation``: its left half black, right white."""
    from PIL import Image

    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, w // 2:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, fmt, exif=exif.tobytes())
    return path


def test_image_size_is_the_size_read_image_returns_for_every_orientation(tmp_path):
    """The header's size ignored the EXIF orientation the decoder applies: a JPEG stored 224x112 and tagged
    "rotate 90" (6) was 224x112 to the annotation checks and 112x224 to the crops (so were PNG and WebP; Pillow
    already turned a TIFF's)."""
    for (fmt, suffix), orientation in itertools.product(
            [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("TIFF", ".tif")], range(1, 9)):
        path = _oriented(tmp_path / f"o{orientation}{suffix}", orientation, fmt)
        h, w = read_image(path).shape[:2]
        assert image_size(path) == (w, h), (fmt, orientation)
        assert (w, h) == ((112, 224) if orientation >= 5 else (224, 112))


def test_jd_points_are_checked_in_the_upright_pictures_frame(tmp_path):
    """Points placed on the upright picture (112 wide, 224 high) were refused as far outside "the 224x112 image";
    points in the stored frame passed and were cropped on turned pixels. One frame: the upright picture's."""
    root = tmp_path / "jd"
    for d in ("picture", "landmark"):
        (root / d).mkdir(parents=True)
    _oriented(root / "picture" / "a.jpg", 6)
    rng = np.random.default_rng(0)
    upright = np.column_stack([rng.uniform(10, 100, 106), rng.uniform(120, 215, 106)])
    write_landmark_txt(root / "landmark" / "a.jpg.txt", upright)
    pics, pts, boxes = read_jd_dir(root)
    assert np.allclose(pts[0], upright, atol=1e-3)
    stored_frame = upright[:, ::-1] + [90, 0]  # x up to 305: inside 1.5 x 224, far outside 1.5 x 112
    write_landmark_txt(root / "landmark" / "a.jpg.txt", stored_frame)
    with pytest.raises(DataError, match=r"far outside the 112x224 image"):
        read_jd_dir(root)


def test_submission_bounds_points_by_the_upright_picture(tmp_path):
    """write_submission bounded predictions by the stored frame: a point low on a portrait photo stored
    landscape was refused as far outside it."""
    from types import SimpleNamespace

    from visrec.evaluate.landmark_report import write_submission

    pic = _oriented(tmp_path / "a.jpg", 6)
    crop = np.array([[[50.0, 90.0], [60.0, 95.0]]])  # crop of side 100 = the box (0, 120)-(100, 220)
    ds = SimpleNamespace(paths=[pic], boxes=[(0.0, 120.0, 100.0, 220.0)], margin=0.0, size=100)
    out = write_submission(tmp_path / "sub", ds, crop, coordinates="decimal")
    assert np.allclose(read_landmark_txt(out / "a.jpg.txt"), [[50, 210], [60, 215]], atol=1e-3)


def _photo(folder: Path, name: str, side: int = 200) -> Path:
    path = folder / name
    cv2.imwrite(str(path), np.full((side, side, 3), 120, np.uint8))
    return path


def test_prepare_lists_a_wflw_face_with_a_point_far_off_its_photo_naming_list_and_line(tmp_path):
    """A WFLW line whose point 0 is x=1000000 (its box on the photo) was written, exit 0, as a landmark file
    holding 563381.875 that the readers then refused. It is a bad annotation naming the list and its line."""
    from visrec.faces.prepare import prepare_landmarks

    src = tmp_path / "photos"
    src.mkdir()
    for name in ("good.png", "far.png"):
        _photo(src, name)
    rng = np.random.default_rng(1)
    good = rng.uniform(60, 140, (98, 2)).astype(np.float32)
    far = good.copy()
    far[0, 0] = 1_000_000
    box = np.array([50, 50, 150, 150], np.float32)
    write_wflw(src / "list.txt", [WflwRecord(good, box, np.zeros(6, int), "good.png"),
                                  WflwRecord(far, box, np.zeros(6, int), "far.png")])
    report = prepare_landmarks(src, tmp_path / "out", annotations=src / "list.txt", size=64)
    assert report.written == 1
    bad = {b["path"]: b["error"] for b in report.bad_annotation}
    assert set(bad) == {"far.png"}, bad
    assert "list.txt, record line 2: point 0" in bad["far.png"] and "far outside the 200x200 image" in bad["far.png"]
    assert len(read_jd_dir(tmp_path / "out", 98)[0]) == 1


def test_prepare_writes_no_crop_whose_points_its_readers_refuse(tmp_path):
    """A point inside the photo's bound but far from its face box lies far outside the crop written for it:
    the set prepare wrote could not be read back. Such a face is a bad annotation; the others read back."""
    from visrec.faces.prepare import prepare_landmarks

    src = tmp_path / "photos"
    src.mkdir()
    for name in ("good.png", "stray.png"):
        _photo(src, name, 400)
    rng = np.random.default_rng(2)
    good = rng.uniform(160, 240, (98, 2)).astype(np.float32)
    stray = good.copy()
    stray[5] = (5, 5)  # on the photo, ~100 px outside the 160 px crop around the box
    box = np.array([150, 150, 250, 250], np.float32)
    write_wflw(src / "list.txt", [WflwRecord(good, box, np.zeros(6, int), "good.png"),
                                  WflwRecord(stray, box, np.zeros(6, int), "stray.png")])
    report = prepare_landmarks(src, tmp_path / "out", annotations=src / "list.txt", size=64)
    bad = {b["path"]: b["error"] for b in report.bad_annotation}
    assert report.written == 1 and set(bad) == {"stray.png"} and "point 5" in bad["stray.png"], bad
    assert len(read_jd_dir(tmp_path / "out", 98)[0]) == 1
    # a sidecar's point 3 photo widths away (its extent still a box on the photo) names the sidecar
    src2 = tmp_path / "photos2"
    src2.mkdir()
    _photo(src2, "a.png", 100)
    pts = rng.uniform(30, 70, (106, 2))
    pts[7] = (300, 50)
    write_landmark_txt(src2 / "a.txt", pts)
    report = prepare_landmarks(src2, tmp_path / "out2", size=64)
    assert report.written == 0
    assert "a.txt" in report.bad_annotation[0]["error"] and "point 7" in report.bad_annotation[0]["error"]


@pytest.mark.parametrize("setting, field", [
    ("data.margin=-1.0", "data.margin"), ("data.margin=11", "data.margin"), ("data.margin=nan", "data.margin"),
    ("data.size=0", "data.size"), ("data.size=-8", "data.size"), ("data.size=100000", "data.size"),
    ("data.points=0", "data.points"), ("data.points=20000", "data.points"), ("loss.eps=0", "loss.eps"),
])
def test_landmark_config_values_the_contract_refuses_are_config_errors_naming_the_field(tmp_path, setting, field):
    """data.margin=-1 or data.size=0 ended in a ValueError traceback from the model contract, exit 1."""
    from visrec.cli import app

    write_synthetic_jd(tmp_path / "train", 4, seed=0)
    config = Path(__file__).resolve().parents[1] / "configs" / "landmarks" / "synthetic-heatmap.yaml"
    r = CliRunner().invoke(app, ["train", "--config", str(config), "--set", "schedule.max_steps=1",
                                 "--set", f"data.train={tmp_path / 'train'}", "--set", "data.val=null",
                                 "--set", f"output={tmp_path / 'run'}", "--set", "batch_size=2",
                                 "--set", "device=cpu", "--set", setting])
    # a ConfigError is printed without a traceback, exit 2 (visrec.cli.run_app); a ValueError was a traceback
    assert isinstance(r.exception, ConfigError), (r.exception, r.output)
    assert f"{field}:" in str(r.exception)
