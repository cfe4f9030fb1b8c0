"""LFR submission binary, CMC and open-set TPIR on crafted cases."""

import os
import struct

import numpy as np
import pytest

from visrec.errors import DataError
from visrec.evaluate.identification import cmc, tpir_at_fpir
from visrec.evaluate.lfr import evaluate_submission, read_entry_labels, read_lfr_features, write_lfr_features


def test_lfr_binary_round_trip_and_header(tmp_path):
    feats = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    path = write_lfr_features(tmp_path / "f.bin", feats)
    raw = path.read_bytes()
    assert raw[:16] == struct.pack("4i", 5, 512, 2048, 5)
    assert np.array_equal(read_lfr_features(path), feats)
    path.write_bytes(raw[:-4])
    with pytest.raises(DataError, match="header announces"):
        read_lfr_features(path)
    path.write_bytes(struct.pack("4i", 5, 512, 2048, 4) + raw[16:])
    with pytest.raises(DataError, match="type code 4"):
        read_lfr_features(path)


def test_evaluate_a_submission(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(20), 5)
    feats = rng.standard_normal((20, 64))[labels] + 0.3 * rng.standard_normal((100, 64))
    names = [f"img/{i:04d}.jpg" for i in range(100)]
    (tmp_path / "filelist.txt").write_text("\n".join(names) + "\n")
    write_lfr_features(tmp_path / "sub.bin", feats)
    res = evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", dict(zip(names, labels)), [1e-3],
                              device="cpu")
    assert res[1e-3].tpr > 0.9
    with pytest.raises(DataError, match="no ground-truth label"):
        evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", {}, [1e-3])


def test_a_labels_file_is_read_strictly(tmp_path):
    """name,label lines (the label after the last comma; a header line; blank lines): a line without both
    fields, or a name listed twice (with the same label or another), is refused naming the line, never skipped
    or overwritten (the reader used to drop lines without a comma and keep the last of two labels)."""
    path = tmp_path / "labels.csv"
    path.write_text("name,label\nimg/a,b.jpg, 7 \n\nimg/c.jpg,8\r\n")
    assert read_entry_labels(path) == {"img/a,b.jpg": "7", "img/c.jpg": "8"}
    for text, message in [("a.jpg,1\nb.jpg\n", "line 2.*expected 'name,label'"),
                          ("a.jpg,1\nb.jpg,\n", "line 2.*expected 'name,label'"),
                          ("a.jpg,1\nb.jpg,2\na.jpg,3\n", "line 3.*'a.jpg' is listed twice \\(first on line 1\\)"),
                          ("a.jpg,1\na.jpg,1\n", "line 2.*listed twice"),
                          ("name,label\n", "no 'name,label' lines"),
                          (f"{'x' * 5000},1\n", "line 1.*at most 4096")]:
        path.write_text(text)
        with pytest.raises(DataError, match=message) as err:
            read_entry_labels(path)
        assert "labels.csv" in str(err.value)


def test_scoring_refuses_an_entry_listed_twice_and_names_entries_without_a_label(tmp_path):
    feats = np.eye(4, dtype=np.float32)
    write_lfr_features(tmp_path / "sub.bin", feats)
    (tmp_path / "filelist.txt").write_text("a.jpg\nb.jpg\nc.jpg\na.jpg\n")
    labels = {"a.jpg": 1, "b.jpg": 1, "c.jpg": 2}
    with pytest.raises(DataError, match="entries 1 and 4 are both 'a.jpg'.*genuine pair") as err:
        evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", labels, [1e-1], device="cpu")
    assert "filelist.txt" in str(err.value)
    (tmp_path / "filelist.txt").write_text("a.jpg\nb.jpg\nc.jpg\nd.jpg\n")
    with pytest.raises(DataError, match="1 entries have no ground-truth label, e.g. 'd.jpg'"):
        evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", labels, [1e-1], device="cpu")
    (tmp_path / "filelist.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    with pytest.raises(DataError, match="4 feature rows but 3 file-list entries"):
        evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", labels, [1e-1], device="cpu")


def test_eval_faces_features_cli_names_a_bad_labels_line_and_exits_2(tmp_path, monkeypatch, capsys):
    from test_cli_outputs import run_cli

    write_lfr_features(tmp_path / "sub.bin", np.eye(4, dtype=np.float32))
    (tmp_path / "filelist.txt").write_text("a.jpg\nb.jpg\nc.jpg\nd.jpg\n")
    (tmp_path / "labels.csv").write_text("a.jpg,1\nb.jpg,1\nc.jpg,2\nd.jpg 2\n")
    args = ["eval", "faces", "--features", tmp_path / "sub.bin", "--filelist", tmp_path / "filelist.txt",
            "--labels", tmp_path / "labels.csv", "--target-fpr", "0.2", "--out", tmp_path / "eval-out"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "labels.csv" in err and "line 4" in err and "Traceback" not in err, (out, err)
    (tmp_path / "labels.csv").write_text("a.jpg,1\nb.jpg,1\nc.jpg,2\nd.jpg,2\n")
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "0.2" in out, (out, err)


def test_cmc_on_a_crafted_case():
    gallery = np.eye(4, dtype=np.float32)
    gallery_labels = np.array([10, 11, 12, 13])
    probe = np.array([[1, 0, 0, 0], [0.9, 1, 0, 0], [0.5, 0.4, 0.45, 0]], np.float32)
    probe_labels = np.array([10, 10, 12])  # probe 1 ranks 2nd, probe 2 ranks 2nd
    res = cmc(probe, probe_labels, gallery, gallery_labels, ranks=(1, 2, 5))
    assert res == {1: pytest.approx(1 / 3), 2: 1.0, 5: 1.0}


def test_tpir_at_fpir_open_set():
    gallery = np.eye(3, dtype=np.float32)
    g_labels = np.array([0, 1, 2])
    rng = np.random.default_rng(2)
    mated = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]] + 0.05 * rng.standard_normal((4, 3)).astype(np.float32)
    strangers = rng.standard_normal((10, 3)).astype(np.float32)
    probe = np.concatenate([mated, strangers])
    labels = np.array([0, 1, 2, 0] + [99] * 10)
    res = tpir_at_fpir(probe, labels, gallery, g_labels, targets=[0.1, 0.5])
    assert res[0.1]["fpir"] <= 0.1 and res[0.5]["fpir"] <= 0.5
    assert res[0.5]["tpir"] >= res[0.1]["tpir"]


def test_writing_features_over_an_earlier_file_replaces_it_whole(tmp_path, monkeypatch):
    """The video track's --submission wrote straight over an earlier submission, so a kill mid-write left it
    truncated; the file is written beside and renamed in, and a failure leaves the earlier file as it was."""
    earlier = np.ones((3, 4), np.float32)
    path = write_lfr_features(tmp_path / "sub.bin", earlier)
    before = path.read_bytes()

    class Killed(Exception):
        pass

    def killed(*a, **k):
        raise Killed

    monkeypatch.setattr(os, "replace", killed)  # dies before the new file is in place
    with pytest.raises(Killed):
        write_lfr_features(path, np.full((5, 4), 2, np.float32))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["sub.bin"]
    monkeypatch.undo()
    np.testing.assert_array_equal(read_lfr_features(write_lfr_features(path, np.full((5, 4), 2, np.float32))),
                                  np.full((5, 4), 2, np.float32))


def test_a_killed_writers_temporary_feature_file_is_removed_by_the_next_write(tmp_path):
    """Both LFR writers used their own temporary names, which nothing removed after a kill -9 (a test-set
    submission is 3.8 GB); they write through visrec._files.replacing, whose next write clears them."""
    from visrec.data.synth import write_face_dataset
    from visrec.evaluate.lfr import write_image_submission

    dead = 2 ** 22 + 7  # above the kernel's largest pid: no running process has it
    left = [tmp_path / f".sub.bin.{dead}.0badcafe.tmp", tmp_path / f".img.bin.{dead}.0badcafe.tmp"]
    for f in left:
        f.write_bytes(b"half a submission")
    write_lfr_features(tmp_path / "sub.bin", np.ones((3, 4), np.float32))
    d = write_face_dataset(tmp_path / "set", 2, 2, format="folder", seed=0)
    entries = sorted(str(p.relative_to(d)) for p in d.rglob("*.jpg"))
    (tmp_path / "list.txt").write_text("\n".join(entries) + "\n")
    write_image_submission(lambda x: np.ones((len(x), 4), np.float32), d, tmp_path / "list.txt", tmp_path / "img.bin")
    assert not any(f.exists() for f in left)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nor a temporary file of these writes
