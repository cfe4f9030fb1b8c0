"""An output never replaces what the same command reads. `eval faces --submission` named as its own model.pt, its
file list or its video list wrote the LFR binary over it (a checkpoint turned into 24 KB of features); the same
kind of mistake in `visrec landmarks IMAGE --out IMAGE` drew the points over the user's photo, and `products
search --out` inside the index replaced an index file. Each is refused before any work, naming the option and the
input, and the input is left as it was: by any spelling of its path, through a link or a hard link."""

import hashlib
import os

import pytest
from conftest import run_cli

from visrec.data.text import check_apart, check_output
from visrec.errors import DataError


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(code, err, *words):
    assert code == 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.fixture
def image_track(tmp_path, tiny_face_model):
    (tmp_path / "images").mkdir()
    (tmp_path / "filelist.txt").write_text("a.jpg\nb.jpg\n")
    return tiny_face_model, tmp_path / "images", tmp_path / "filelist.txt"


def test_an_image_submission_over_its_model_or_file_list_is_refused(image_track, tmp_path, monkeypatch, capsys):
    model, images, filelist = image_track
    before = {p: digest(p) for p in (model / "model.pt", filelist)}
    for target, name in [(model / "model.pt", "MODEL"), (filelist, "--filelist"),
                         (tmp_path / "." / "images" / ".." / "filelist.txt", "--filelist")]:
        code, out, err = run_cli(["eval", "faces", model, "--data", images, "--filelist", filelist,
                                  "--submission", target], monkeypatch, capsys)
        refused(code, err, f"--submission is {name}", "which this command reads", "name another file")
    os.link(filelist, tmp_path / "hard.txt")  # another name of the same file
    code, out, err = run_cli(["eval", "faces", model, "--data", images, "--filelist", filelist,
                              "--submission", tmp_path / "hard.txt"], monkeypatch, capsys)
    refused(code, err, "--submission is --filelist")
    code, out, err = run_cli(["eval", "faces", model, "--data", images, "--filelist", filelist,
                              "--submission", images / "sub.bin"], monkeypatch, capsys)
    refused(code, err, "--submission lies inside --data", "name a path outside it")
    assert {p: digest(p) for p in before} == before


def test_a_video_submission_over_its_video_list_is_refused(tmp_path, tiny_face_model, monkeypatch, capsys):
    from visrec.faces.evaluation import evaluate_video_model

    videos = tmp_path / "videos.csv"
    videos.write_text("v1,videos/a,alice\n")
    (tmp_path / "videos" / "a").mkdir(parents=True)
    before = digest(videos)
    code, out, err = run_cli(["eval", "faces", tiny_face_model, "--video", "--data", videos, "--submission", videos],
                             monkeypatch, capsys)
    refused(code, err, "--submission is --data")
    # the library function refuses it as well (a Python caller passes no CLI check)
    (tmp_path / "link.csv").symlink_to(videos)
    with pytest.raises(DataError, match="the submission is the video list"):
        evaluate_video_model(tiny_face_model, videos, submission=tmp_path / "link.csv")
    assert digest(videos) == before


def test_landmarks_never_draws_over_its_own_image(tmp_path, monkeypatch, capsys):
    from conftest import save_tiny_landmark_model

    import numpy as np
    from PIL import Image

    model = tmp_path / "lm"
    model.mkdir()
    save_tiny_landmark_model(model)
    photo = tmp_path / "face.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photo)
    before = digest(photo)
    code, out, err = run_cli(["landmarks", photo, "--model", model, "--out", photo], monkeypatch, capsys)
    refused(code, err, "--out is IMAGE", "writing would replace it")
    assert digest(photo) == before


def test_a_search_csv_inside_the_index_or_over_a_query_is_refused(tmp_path, monkeypatch, capsys):
    index = tmp_path / "idx"
    index.mkdir()
    (index / "ids.txt").write_text("p0\n")
    query = tmp_path / "q.jpg"
    query.write_bytes(b"not read: the check comes first")
    for target, words in [(index / "ids.txt", ["--out lies inside --index"]),
                          (index / "new.csv", ["--out lies inside --index"]),
                          (query, ["--out is QUERY"])]:
        code, out, err = run_cli(["products", "search", query, "--index", index, "--out", target], monkeypatch,
                                 capsys)
        refused(code, err, *words)
    assert (index / "ids.txt").read_text() == "p0\n" and not (index / "new.csv").exists()
    from visrec.index.catalogue import search_catalogue  # a Python caller passes no CLI check: refused as well

    with pytest.raises(DataError, match="the submission lies inside the index"):
        search_catalogue(index, query, 7, index / "ids.txt")
    assert (index / "ids.txt").read_text() == "p0\n"


def test_ijb_results_never_land_in_the_release_folder(tmp_path, tiny_face_model, monkeypatch, capsys):
    (tmp_path / "ijb" / "meta").mkdir(parents=True)
    code, out, err = run_cli(["eval", "ijb", tiny_face_model, "--data", tmp_path / "ijb", "--out",
                              tmp_path / "ijb" / "meta" / "results.json"], monkeypatch, capsys)
    refused(code, err, "--out lies inside --data")


def test_check_apart_takes_every_spelling_and_leaves_other_outputs_alone(tmp_path, monkeypatch):
    src = tmp_path / "data" / "list.txt"
    src.parent.mkdir()
    src.write_text("x\n")
    monkeypatch.chdir(tmp_path)
    for spelling in ["data/list.txt", "./data/../data/list.txt", str(src)]:
        with pytest.raises(DataError, match="is --list"):
            check_apart(spelling, {"--list": "data/list.txt"})
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    with pytest.raises(DataError, match="lies inside --folder"):
        check_apart("alias/new.csv", {"--folder": tmp_path / "data"})
    # a file beside the inputs, an input not given and one that does not exist are fine
    check_apart(tmp_path / "out.bin", {"--list": src, "--folder": None, "--model": tmp_path / "missing.pt"})
    assert check_output(tmp_path / "out.bin", kind="file", reads={"--list": src}) == tmp_path / "out.bin"


@pytest.mark.parametrize("kind", ["faces", "products", "landmarks"])
def test_a_prepared_set_is_never_written_inside_the_photos_it_comes_from(tmp_path, monkeypatch, capsys, kind):
    """A set prepared into a folder inside SRC would be listed as photos by the next run (which resumes):
    refused before any photo is read, and nothing is created there."""
    src = tmp_path / "photos"
    (src / "alice").mkdir(parents=True)
    (src / "alice" / "1.jpg").write_bytes(b"not read: the check comes first")
    for out in (src / "prepared", src):
        code, _, err = run_cli(["data", "prepare", kind, src, "--out", out], monkeypatch, capsys)
        refused(code, err, "--out lies inside SRC", "name a path outside it")
    assert sorted(p.name for p in src.iterdir()) == ["alice"]


def test_tracks_are_never_written_inside_a_frame_folder_they_come_from(tmp_path, monkeypatch, capsys):
    frames = tmp_path / "clip"
    frames.mkdir()
    code, _, err = run_cli(["data", "prepare", "videos", tmp_path / "other.avi", frames, "--out", frames / "set"],
                           monkeypatch, capsys)
    refused(code, err, "--out lies inside VIDEOS item 2")
