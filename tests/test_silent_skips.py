"""Nothing a reader meets is dropped without a word: an image folder's nested folders, loose images, broken links,
devices and pipes; JD-landmark pictures of every image suffix; a video whose frames end early; unbounded inputs
(a device or a pipe) are refused unread; degenerate face boxes are refused, naming the file, line or option."""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np
import pytest

from visrec.data.images import encode_jpeg
from visrec.errors import DataError


def jpeg(seed: int = 0) -> bytes:
    return encode_jpeg(np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8))


def folder(root, identities=2, per=2):
    for i in range(identities):
        (root / f"{i:03d}").mkdir(parents=True, exist_ok=True)
        for j in range(per):
            (root / f"{i:03d}" / f"{j}.jpg").write_bytes(jpeg(i * 10 + j))
    return root


class Writer:
    """Opens a FIFO for writing in a thread and writes ``data`` when a reader opens it (a reader that should
    never open it leaves the thread waiting: ``release`` opens the read end to let it go)."""

    def __init__(self, path, data: bytes = b"\0" * 64):
        self.path = path
        self.thread = threading.Thread(target=self._write, args=(data,), daemon=True)
        self.thread.start()

    def _write(self, data):
        try:
            with open(self.path, "wb") as fh:
                fh.write(data)
        except OSError:
            pass

    def release(self):
        if self.thread.is_alive():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(5)
            os.close(fd)


# --- 3. bounded reads: a device or a pipe is never read ---------------------------------------------------------

def test_lfr_features_must_be_a_regular_file(tmp_path):
    from visrec.evaluate.lfr import read_lfr_features

    link = tmp_path / "feat.bin"
    link.symlink_to("/dev/null")
    with pytest.raises(DataError, match="feat.bin.*regular file"):
        read_lfr_features(link)
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    writer = Writer(fifo)
    try:
        with pytest.raises(DataError, match="fifo.bin.*regular file"):
            read_lfr_features(fifo)
    finally:
        writer.release()


# --- 4. image folders ----------------------------------------------------------------------------------------------

def test_image_folder_refuses_what_it_used_to_drop(tmp_path):
    from visrec.data.folders import read_image_folder

    cases = {
        "nested": lambda r: ((r / "000" / "more").mkdir(), (r / "000" / "more" / "x.jpg").write_bytes(jpeg(9))),
        "loose": lambda r: (r / "stray.jpg").write_bytes(jpeg(9)),
        "broken": lambda r: (r / "000" / "b.jpg").symlink_to("/nonexistent.jpg"),
        "device": lambda r: (r / "001" / "zero.jpg").symlink_to("/dev/zero"),
        "fifo": lambda r: os.mkfifo(r / "001" / "p.jpg"),
        "loop": lambda r: (r / "000" / "up").symlink_to(".."),
        "self-link": lambda r: (r / "000" / "loop.jpg").symlink_to("loop.jpg"),
    }
    names = {"nested": "more", "loose": "stray.jpg", "broken": "b.jpg", "device": "zero.jpg", "fifo": "p.jpg",
             "loop": "up", "self-link": "loop.jpg"}
    for case, make in cases.items():
        root = folder(tmp_path / case)
        make(root)
        with pytest.raises(DataError, match=names[case]) as info:
            read_image_folder(root)
        assert "--skip-bad" not in str(info.value), str(info.value)
        skipping = read_image_folder(root, skip_bad=True)  # the train config's data.skip_bad: counted, with why
        assert [p.name for p, _ in skipping.skipped] == [names[case]], (case, skipping.skipped)
        assert len(skipping.paths) == 4


def test_image_folder_ignores_only_what_its_docstring_says(tmp_path):
    from visrec.data import folders
    from visrec.data.folders import read_image_folder

    root = folder(tmp_path / "f")
    (root / "000" / ".x.jpg").write_bytes(jpeg(5))  # hidden: ignored, as documented
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("about this set")  # a regular non-image file beside the identities
    lst = read_image_folder(root)
    assert lst.class_names == ["000", "001"] and len(lst.paths) == 4
    doc = folders.read_image_folder.__doc__.lower()
    assert "hidden" in doc and "readme" in doc


def test_not_an_image_message_names_what_exists(tmp_path):
    from visrec.data.folders import read_image_folder

    root = folder(tmp_path / "f")
    (root / "000" / "notes.docx").write_text("x")
    with pytest.raises(DataError) as info:
        read_image_folder(root)
    assert "--skip-bad" not in str(info.value) and "data.skip_bad" in str(info.value)


# --- 4. JD-landmark pictures of any image suffix -----------------------------------------------------------------

def _jd(root, names, points=None):
    from visrec.data.landmarks import write_landmark_txt

    (root / "picture").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        (root / "picture" / name).write_bytes(jpeg(len(name)))
        pts = rng.uniform(20, 90, (106, 2)) if points is None else points
        write_landmark_txt(root / "landmark" / f"{name}.txt", pts)
    return root


def test_jd_dir_reads_every_image_suffix_whatever_its_case(tmp_path):
    from visrec.data.landmarks import read_jd_dir

    root = _jd(tmp_path / "jd", ["a.jpg", "b.JPG", "c.png", "d.jpeg"])
    pics, pts, boxes = read_jd_dir(root)
    assert [p.name for p in pics] == ["a.jpg", "b.JPG", "c.png", "d.jpeg"] and pts.shape == (4, 106, 2)


def test_jd_dir_refuses_what_is_not_a_picture(tmp_path):
    from visrec.data.landmarks import read_jd_dir

    root = _jd(tmp_path / "jd", ["a.jpg"])
    (root / "picture" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt"):
        read_jd_dir(root)
    (root / "picture" / "notes.txt").unlink()
    (root / "picture" / "b.jpg").symlink_to("/nonexistent.jpg")
    with pytest.raises(DataError, match="b.jpg"):
        read_jd_dir(root)


# --- 4. videos whose frames end before their declared count ------------------------------------------------------

def test_a_truncated_video_is_an_error_naming_it(tmp_path):
    from visrec.data.video import read_frames, read_video_list, write_video_dataset

    write_video_dataset(tmp_path / "v", 2, 1, 30, video_format="avi")
    item = read_video_list(tmp_path / "v" / "videos.csv")[0]
    assert len(read_frames(item.path, item.video_id)) == 30
    data = item.path.read_bytes()
    item.path.write_bytes(data[:len(data) * 2 // 3])  # a third of the frames gone (more than the 2 frames' slack)
    with pytest.raises(DataError, match=rf"{item.path.name}.*of the 30 frames") as info:
        read_frames(item.path, item.video_id)
    assert "video " + item.video_id in str(info.value)
    assert len(read_frames(item.path, item.video_id, max_frames=1)) == 1  # fewer asked for: nothing missing


# --- 6. face boxes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["10 10 10 10", "100 100 10 10", "10 10 60 10", "0 0 0.5 0.5"])
def test_rect_files_refuse_degenerate_boxes(text, tmp_path):
    from visrec.data.landmarks import read_rect

    rect = tmp_path / "a.jpg.rect"
    rect.write_text(text + "\n")
    with pytest.raises(DataError, match=r"a\.jpg\.rect.*line 1"):
        read_rect(rect)


def test_crop_face_refuses_degenerate_boxes():
    from visrec.data.augment import crop_face

    img = np.zeros((64, 64, 3), np.uint8)
    for box in ((10, 10, 10, 10), (10, 10, 5, 5), (math.nan, 0, 50, 50), (0, 0, math.inf, 50)):
        with pytest.raises(DataError, match="box"):
            crop_face(img, np.zeros((1, 2)), box)
    crop, _ = crop_face(img, np.zeros((1, 2)), (10, 10, 40, 50), size=32)
    assert crop.shape == (32, 32, 3)


def test_identical_points_give_no_box(tmp_path):
    from visrec.data.landmarks import read_jd_dir, read_pts, write_pts

    root = _jd(tmp_path / "jd", ["a.jpg"], points=np.full((106, 2), 30.0))
    with pytest.raises(DataError, match=r"a\.jpg\.txt"):
        read_jd_dir(root)
    pts = write_pts(tmp_path / "a.pts", np.full((68, 2), 30.0))
    with pytest.raises(DataError, match=r"a\.pts"):
        read_pts(pts)


def test_eval_landmarks_names_a_zero_area_rect(tmp_path, monkeypatch, capsys):
    from conftest import save_tiny_landmark_model
    from visrec.cli import main
    from visrec.data.synth import write_synthetic_jd

    root = write_synthetic_jd(tmp_path / "jd", 2)
    rect = sorted((root / "rect").iterdir())[0]
    rect.write_text("10 10 10 10\n")
    (tmp_path / "lm").mkdir()
    save_tiny_landmark_model(tmp_path / "lm")
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(sys, "argv", ["visrec", "eval", "landmarks", str(tmp_path / "lm"), "--data", str(root),
                                      "--out", str(tmp_path / "ev")])
    with pytest.raises(SystemExit) as done:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 2 and "Traceback" not in err and rect.name in err, err


@pytest.mark.parametrize("box", ["10,10,10,10", "nan,0,50,50", "10,10,5,5", "0,0,inf,5", "1,2,3"])
def test_landmarks_box_option_refuses_degenerate_boxes(box, tmp_path, monkeypatch, capsys):
    from conftest import save_tiny_landmark_model
    from visrec.cli import main

    img = tmp_path / "face.jpg"
    img.write_bytes(jpeg())
    (tmp_path / "lm").mkdir()
    save_tiny_landmark_model(tmp_path / "lm")
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(sys, "argv", ["visrec", "landmarks", str(img), "--model", str(tmp_path / "lm"), "--box", box,
                                      "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as done:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 2 and "Traceback" not in err and "--box" in err, err
    assert not (tmp_path / "x.png").exists()
