"""One writer per output folder: a second run (another process, or another call in this one) into a folder a run
is writing is refused with an error naming the folder, before it writes anything, instead of two runs mixing
their files (a training log with every step twice and two configs; product crops of two sizes; a video set
that lost one run's rows; a catalogue build deleting the other's staging folder). The claim is a ``flock`` on the
folder itself, held by a subprocess here as a second `visrec` process would hold it."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import small_face_rec
from visrec.data.text import FolderClaim
from visrec.errors import VisrecError

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import make_cfg  # noqa: E402  (the trainer tests' tiny face config)


@pytest.fixture
def held(tmp_path):
    """``hold(folder)``: a subprocess that claims ``folder`` (as a running visrec command would) until the test
    ends."""
    procs = []

    def hold(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom visrec.data.text import FolderClaim\n"
                              f"c = FolderClaim({str(folder)!r}, 'test')\nprint('held', flush=True)\n"
                              "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_claim_is_exclusive_and_released_by_close_or_death(tmp_path, held):
    with FolderClaim(tmp_path, "run"):
        with pytest.raises(VisrecError, match=rf"{tmp_path} is in use by another second run"):
            FolderClaim(tmp_path, "second run")
    FolderClaim(tmp_path, "run").close()  # released
    held(tmp_path / "x")
    with pytest.raises(VisrecError, match="in use by another"):
        FolderClaim(tmp_path / "x", "run")


def test_training_into_a_folder_another_run_is_writing_is_refused(tmp_path_factory, tmp_path, held):
    from visrec.train.trainer import train

    rec = small_face_rec(tmp_path_factory, 4, 4, seed=3)
    out = tmp_path / "run"
    held(out)
    with pytest.raises(VisrecError, match=rf"{out} is in use by another training run"):
        train(make_cfg(rec, out, schedule={"max_steps": 1}), progress=False)
    assert list(out.iterdir()) == []  # nothing written
    other = tmp_path / "free"
    assert train(make_cfg(rec, other, schedule={"max_steps": 1}), progress=False).global_step == 1
    assert train(make_cfg(rec, other, schedule={"max_steps": 2}), resume=True, progress=False).global_step == 2


def test_preparing_into_a_folder_another_run_is_writing_is_refused(tmp_path, held):
    from visrec.data.prepare import prepare_products

    src = tmp_path / "shop"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.full((40, 60, 3), 200, np.uint8))
    out = tmp_path / "cat"
    held(out)
    with pytest.raises(VisrecError, match=rf"{out} is in use by another prepare run"):
        prepare_products(src, out, size=32)
    assert list(out.iterdir()) == []
    assert prepare_products(src, tmp_path / "free", size=32).written == 1
    assert prepare_products(src, tmp_path / "free", size=32).resumed == 1  # its claim was released


def test_adding_videos_to_a_set_another_run_is_writing_is_refused(tmp_path, held):
    from visrec.faces.tracking import video_to_tracks

    out = tmp_path / "set"
    held(out)
    with pytest.raises(VisrecError, match=rf"{out} is in use by another run adding videos"):
        video_to_tracks(iter([]), out, lambda image: [], None, video_id="clip")
    assert list(out.iterdir()) == []


def test_building_a_catalogue_index_into_a_folder_another_build_is_writing_is_refused(tmp_path, held):
    import torch

    from visrec.index.catalogue import IndexOptions, build_catalogue_index

    cat = tmp_path / "catalogue"
    cat.mkdir()
    cv2.imwrite(str(cat / "p1.jpg"), np.full((32, 32, 3), 120, np.uint8))
    out = tmp_path / "index"
    held(out)
    with pytest.raises(VisrecError, match=rf"{out} is in use by another catalogue index build"):
        build_catalogue_index(cat, out, torch.nn.Identity(), {}, IndexOptions())
    assert list(out.iterdir()) == []


def test_a_milvus_lite_gallery_open_in_another_process_is_an_error_saying_so(tmp_path):
    """Milvus Lite refused a second opener with two logged tracebacks and "Open local milvus failed"; the error now
    says the gallery is open elsewhere and what to do, as the FAISS gallery's does."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs visrec[serve]")
    from visrec.index.gallery import open_gallery
    from visrec.index.gallery.base import GalleryUnavailableError

    uri = tmp_path / "g.db"  # made by the other process (Milvus Lite keeps a gallery open until its process ends)
    p = subprocess.Popen([sys.executable, "-c", "import time\nfrom visrec.index.gallery import open_gallery\n"
                          f"g = open_gallery('milvus', uri={str(uri)!r}, collection='faces')\nprint('open', flush=True)\n"
                          "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "open"
        with pytest.raises(GalleryUnavailableError, match=rf"Milvus Lite gallery {uri} is open elsewhere"):
            open_gallery("milvus", uri=str(uri), collection="faces")
    finally:
        p.kill()
        p.wait()
    open_gallery("milvus", uri=str(uri), collection="faces").close()  # free again once that process has gone


def test_what_a_killed_run_left_is_removed_by_the_next_and_a_running_ones_is_not(tmp_path):
    """A killed export left its model-sized temporary file beside --out for good (the names carry the process id:
    a running process's are left alone)."""
    import os

    from conftest import save_tiny_face_model
    from visrec.data.text import leftovers
    from visrec.export import export_checkpoint

    dead, live = ".m.onnx.999999999.ab.tmp", f".m.onnx.{os.getpid()}.cd.tmp"
    for name in (dead, live, "..m.onnx.999999999.ab.tmp.999999999.ef.tmp", ".m.onnx.notapid.tmp"):
        (tmp_path / name).write_bytes(b"x" * 100)
    assert sorted(p.name for p in leftovers(tmp_path, ".m.onnx.")) == [dead]
    save_tiny_face_model(tmp_path / "run")
    export_checkpoint(tmp_path / "run", tmp_path / "m.onnx", parity=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [live, ".m.onnx.notapid.tmp"]


def test_a_forked_worker_does_not_keep_the_claim(tmp_path):
    """A forked child (a DataLoader or preparation worker) shares the claim's descriptor; it drops its copy at the
    fork, so a claim ends with its run even while a worker lingers."""
    import os

    claim = FolderClaim(tmp_path, "run")
    r, w = os.pipe()
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the lingering worker (the fork hooks have run once it can write)
        os.close(w)
        os.write(started_w, b"s")
        os.read(r, 1)
        os._exit(0)
    try:
        assert os.read(started_r, 1) == b"s"
        claim.close()
        FolderClaim(tmp_path, "run").close()  # free while the child lives
    finally:
        os.close(r)
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
        os.close(started_r)
        os.close(started_w)
