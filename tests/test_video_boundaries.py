"""Untrusted videos at their boundaries: frame and pixel caps, truncated and empty videos in the tracker's
reader, detector-score bounds, the score file of a video read up to max_frames, and synthetic sets that would
overwrite a user's video set. Videos are a few tiny MJPG frames (cv2.VideoWriter)."""

import cv2
import numpy as np
import pytest
import torch

import visrec.data.video as V
from visrec.data.video import read_frame_scores, read_frames, write_video_dataset
from visrec.errors import DataError, VisrecError
from visrec.faces.tracking import iter_frames


def _avi(path, n, size=(112, 112)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, size)
    assert w.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(n):
        w.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    w.release()
    return path


def _folder(path, n, scores=None):
    path.mkdir()
    for i in range(n):
        cv2.imwrite(str(path / f"{i:04d}.png"), np.full((112, 112, 3), 10 * i, np.uint8))
    if scores is not None:
        (path / "scores.txt").write_text("".join(f"{s}\n" for s in scores))
    return path


def test_read_frames_caps_the_frames_of_a_video(tmp_path, monkeypatch):
    monkeypatch.setattr(V, "MAX_FRAMES", 4)
    avi, folder = _avi(tmp_path / "v.avi", 6), _folder(tmp_path / "f", 6)
    for path in (avi, folder):
        with pytest.raises(DataError, match="more than 4 frames, the most visrec holds") as err:
            read_frames(path, "v")
        assert err.value.path == str(path)
        assert len(read_frames(path, "v", max_frames=3)) == 3  # the first ones may still be read


def test_iter_frames_refuses_truncated_empty_and_huge_videos(tmp_path, monkeypatch):
    full = _avi(tmp_path / "full.avi", 10)
    assert sum(1 for _ in iter_frames(full)) == 10
    data = full.read_bytes()
    (tmp_path / "trunc.avi").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"only \d of the 10 frames") as err:
        list(iter_frames(tmp_path / "trunc.avi"))
    assert err.value.path == str(tmp_path / "trunc.avi")
    with pytest.raises(DataError, match="no frames could be read"):
        list(iter_frames(_avi(tmp_path / "zero.avi", 0)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no frame images"):
        list(iter_frames(tmp_path / "empty"))
    monkeypatch.setattr(V, "MAX_FRAME_PIXELS", 64 * 48 - 1)
    frames = iter_frames(_avi(tmp_path / "big.avi", 2, (64, 48)))
    with pytest.raises(DataError, match="declares frames of 64x48 pixels, more than the 3071"):
        next(frames)  # before any frame is decoded


@pytest.mark.parametrize("value", ["1e39", "-0.5", "3e38"])
def test_frame_scores_are_bounded(tmp_path, value):
    folder = _folder(tmp_path / "f", 3, ["0.9", value, "0.8"])
    with pytest.raises(DataError, match=r"outside \[0, 1e\+06\]") as err:
        read_frame_scores(folder, 3)
    assert err.value.path == str(folder / "scores.txt") and err.value.record == "line 2"


def test_score_fusion_of_a_video_cut_at_max_frames(tmp_path):
    from visrec.data.video import VideoItem
    from visrec.models.inference import video_features

    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    items = [VideoItem("a", _folder(tmp_path / "a", 8, scores), "0")]
    feats, _, _ = video_features(model, items, ("score",), max_frames=4)
    assert feats["score"].shape == (1, 3) and np.isfinite(feats["score"]).all()
    # the whole video's scores are checked: a file one short of the 8 frames is still an error
    (tmp_path / "a" / "scores.txt").write_text("".join(f"{s}\n" for s in scores[:7]))
    with pytest.raises(DataError, match="7 scores for a video of 8 frames"):
        video_features(model, items, ("score",), max_frames=4)
    (tmp_path / "a" / "scores.txt").write_text("".join(f"{s}\n" for s in scores))
    assert read_frame_scores(tmp_path / "a", 4, first=True).tolist() == pytest.approx(scores[:4])


def test_synthetic_videos_never_overwrite_a_video_set(tmp_path):
    lst = write_video_dataset(tmp_path, 2, 1, 3, seed=1)
    before = lst.read_text(), (tmp_path / "video_filelist.txt").read_text()
    with pytest.raises(DataError, match="already holds a video set") as err:
        write_video_dataset(tmp_path, 3, 1, 2, seed=2)
    assert err.value.path == str(tmp_path)
    assert (lst.read_text(), (tmp_path / "video_filelist.txt").read_text()) == before
    assert len(list((tmp_path / "videos" / "000000_00").glob("*.png"))) == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "videos").mkdir()
    (tmp_path / "other" / "videos" / "mine.avi").write_bytes(b"x")
    with pytest.raises(DataError, match="already holds a video set"):
        write_video_dataset(tmp_path / "other", 2, 1, 2)


def test_negative_seeds_are_refused_before_writing(tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app

    for kw in ({"seed": -1}, {"first_identity": -5}):
        with pytest.raises(VisrecError, match=">= 0"):
            write_video_dataset(tmp_path / "v", 2, 1, 2, **kw)
        assert not (tmp_path / "v" / "videos").exists()
    for args in (["videos", "--seed", "-1"], ["videos", "--first-identity", "-5"], ["faces", "--seed", "-1"]):
        r = CliRunner().invoke(app, ["data", "synth", *args, "--out", str(tmp_path / "c")])
        assert r.exit_code == 2 and not isinstance(r.exception, ValueError), r.output
        assert not (tmp_path / "c" / "videos").exists() and not (tmp_path / "c" / "train").exists()


@pytest.mark.parametrize("spelling", ["./videos/a", "videos/x/../a", "ABSOLUTE"])
def test_a_video_listed_twice_under_two_ids_is_refused_whatever_the_spelling(tmp_path, monkeypatch, spelling):
    """Two ids for one video would score it against itself as a genuine pair: refused naming both lines, however
    the second line spells the path, with the list named by a relative path from another folder too."""
    (tmp_path / "videos").mkdir()
    _folder(tmp_path / "videos" / "a", 2)
    _folder(tmp_path / "videos" / "b", 2)
    second = str(tmp_path / "videos" / "a") if spelling == "ABSOLUTE" else spelling
    (tmp_path / "videos.csv").write_text(f"v1,videos/a,alice\nv2,videos/b,bob\nv3,{second},alice\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"videos\.csv, record line 3: video .* is listed on line 1 already"):
        V.read_video_list("videos.csv")
