"""Input boundaries of the face evaluations: what an organiser's file can hold that would otherwise be scored
silently, crash with a bare traceback or surface only after hours of embedding. Each is a ``DataError`` naming
the file and the line/record, raised when the file is read (before a model loads)."""

import shutil

import numpy as np
import pytest

from visrec.errors import DataError
from visrec.evaluate import ijb
from visrec.evaluate.ijb import read_1n_csv, read_five_points, read_template_pairs, read_tid_mid

HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
POINTS = "30 40 70 40 50 60 35 80 65 80"


def raises(call, *matches):
    with pytest.raises(DataError) as info:
        call()
    for m in matches:
        assert m in str(info.value), str(info.value)
    return info.value


def test_pairs_self_repeated_one_label(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("1 2 1\n3 3 1\n1 3 0\n")
    raises(lambda: read_template_pairs(p), "pairs.txt", "line 2", "paired with itself")
    p.write_text("1 2 1\n1 3 0\n\n2 1 1\n")  # the same pair in the other order, after a blank line
    raises(lambda: read_template_pairs(p), "pairs.txt", "line 4", "repeats line 1")
    p.write_text("1 2 1\n1 3 1\n")
    raises(lambda: read_template_pairs(p), "pairs.txt", "labelled 1")
    p.write_text("1 2 0\n1 3 0\n")
    raises(lambda: read_template_pairs(p), "pairs.txt", "labelled 0")
    p.write_text("1 2 1\n1 3 0\n2 3 0\n")
    a, b, same = read_template_pairs(p)
    assert a.tolist() == [1, 1, 2] and b.tolist() == [2, 3, 3] and same.tolist() == [True, False, False]


def test_repeated_image_rows(tmp_path):
    (tmp_path / "tid.txt").write_text("a.jpg 1 10\nb.jpg 1 10\na.jpg 1 10\n")
    raises(lambda: read_tid_mid(tmp_path / "tid.txt"), "tid.txt", "line 3", "repeats line 1")
    (tmp_path / "five.txt").write_text(f"a.jpg {POINTS} 0.9\na.jpg {POINTS} 0.9\n")
    raises(lambda: read_five_points(tmp_path / "five.txt"), "five.txt", "line 2", "repeats line 1")
    # another spelling of one image is the same image
    (tmp_path / "tid.txt").write_text("a.jpg 1 10\nb.jpg 1 10\n./a.jpg 1 10\n")
    raises(lambda: read_tid_mid(tmp_path / "tid.txt"), "tid.txt", "line 3", "repeats line 1")
    (tmp_path / "five.txt").write_text(f"a.jpg {POINTS} 0.9\n.//a.jpg {POINTS} 0.9\n")
    raises(lambda: read_five_points(tmp_path / "five.txt"), "five.txt", "line 2", "repeats line 1")


def test_five_points_degenerate_or_negative_score(tmp_path):
    p = tmp_path / "five.txt"
    p.write_text(f"a.jpg {POINTS} 0.9\nb.jpg {' '.join(['50'] * 10)} 0.9\n")
    raises(lambda: read_five_points(p), "five.txt", "line 2", "coincide")
    p.write_text(f"a.jpg {POINTS} 0.9\nb.jpg 30 40 30 40 50 60 35 80 65 80 0.9\n")  # the two eyes coincide
    raises(lambda: read_five_points(p), "five.txt", "line 2", "coincide")
    p.write_text(f"a.jpg {POINTS} 0.9\nb.jpg {POINTS} -0.5\n")
    raises(lambda: read_five_points(p), "five.txt", "line 2", "negative")
    p.write_text(f"a.jpg {POINTS} 0.9\nb.jpg {POINTS} 0\n")
    assert read_five_points(p).scores.tolist() == [pytest.approx(0.9), 0.0]


def test_align_face_refuses_degenerate_points():
    from visrec.faces.align import align_face

    image = np.zeros((120, 120, 3), np.uint8)
    for method in ("lstsq", "eyes"):
        for pts in (np.full((5, 2), 50.0), np.array([[30, 40], [70, 40], [50, np.nan], [35, 80], [65, 80]])):
            with pytest.raises(DataError, match="points"):
                align_face(image, pts, method=method)
    crop, m = align_face(image, np.array(POINTS.split(), float).reshape(5, 2))
    assert crop.shape == (112, 112, 3) and np.isfinite(m).all()


def test_1n_csv_quotes_fields_header(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text(HEADER + '1,1000,"1.jpg\n2,1001,2.jpg\n3,1002,3.jpg\n')
    raises(lambda: read_1n_csv(p), "g.csv", "line 2")
    p.write_text(HEADER + "1,1000,1.jpg\n2,1001," + "x" * 200_000 + "\n")
    raises(lambda: read_1n_csv(p), "g.csv", "line 3")
    p.write_text("TEMPLATE_ID,SUBJECT_ID,SUBJECT_ID\n1,1000,2000\n")
    raises(lambda: read_1n_csv(p), "g.csv", "line 1", "SUBJECT_ID", "twice")
    p.write_text(HEADER + '1,1000,"a,b.jpg"\n2,1001,2.jpg\n')  # a quoted comma on one line is fine
    assert read_1n_csv(p)[0].tolist() == [1, 2]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from visrec.data.synth_ijb import write_synthetic_ijb

    return write_synthetic_ijb(tmp_path_factory.mktemp("ijb") / "IJB_C", 4, 3, seed=2)


def mutated(release, tmp_path, name, change):
    root = tmp_path / "IJB_C"
    shutil.copytree(release / "meta", root / "meta")
    path = root / "meta" / name
    path.write_text(change(path.read_text()))
    layout = ijb.IJBLayout.find(root)
    return layout, ijb.read_layout(layout)[0]


@pytest.mark.parametrize("name, change, match", [
    ("ijbc_1N_probe_mixed.csv", lambda t: t + "1,1000,1.jpg\n", "also a gallery template"),
    ("ijbc_1N_gallery_G1.csv", lambda t: t + "999,1999,x.jpg\n", "template 999 has no image"),
    ("ijbc_1N_gallery_G2.csv", lambda t: t + "1,1000,1.jpg\n", "also in ijbc_1N_gallery_G1.csv"),
    ("ijbc_1N_gallery_G2.csv", lambda t: t + "3,1000,9.jpg\n", "subject 1000 has a gallery template"),
    ("ijbc_1N_probe_mixed.csv", lambda t: t.replace("\n2,1000,", "\n2,5555,"), "subject 5555"),
])
def test_1n_files_checked_against_each_other(release, tmp_path, name, change, match):
    layout, meta = mutated(release, tmp_path, name, change)
    err = raises(lambda: ijb.read_1n(layout, meta), name, match)
    assert "line" in str(err.record)


def test_1n_files_of_the_synthetic_release_pass(release, tmp_path):
    layout, meta = mutated(release, tmp_path, "ijbc_1N_probe_mixed.csv", lambda t: t)
    gallery, split, probe = ijb.read_1n(layout, meta)
    assert set(split) == {"G1", "G2"} and len(gallery[0]) == len(np.unique(gallery[1]))
    assert not np.isin(probe[0], gallery[0]).any()


def test_all_zero_detector_scores_of_a_template(release, tmp_path):
    def zero(text):
        return "".join(" ".join(line.split()[:11] + ["0"]) + "\n" if line.split()[0] in ("1.jpg", "2.jpg", "3.jpg")
                       else line + "\n" for line in text.splitlines())

    layout, meta = mutated(release, tmp_path, "ijbc_name_5pts_score.txt", zero)
    five = read_five_points(layout.five_points)
    t1 = set(np.array(meta.image_names)[meta.templates == meta.templates[0]])
    assert t1 <= {"1.jpg", "2.jpg", "3.jpg"}  # template 1's images all score 0 now
    raises(lambda: ijb.check_detector_scores(meta, five, layout.five_points), "ijbc_name_5pts_score.txt",
           f"template {int(meta.templates[0])}")


def test_evaluate_ijb_checks_before_the_model_loads(release, tmp_path):
    from visrec.faces.evaluation import evaluate_ijb

    layout, _ = mutated(release, tmp_path, "ijbc_template_pair_label.txt", lambda t: t + t.splitlines(True)[0])
    # the model path does not exist: a check that ran after loading it would fail on that instead
    raises(lambda: evaluate_ijb(layout.root, tmp_path / "no-model.pt"), "ijbc_template_pair_label.txt",
           "repeats line 1")


def test_verification_bin_empty_or_mixed_sizes(tmp_path):
    from visrec.data.verification import read_verification_bin, write_verification_bin

    raises(lambda: read_verification_bin(write_verification_bin(tmp_path / "e.bin", [], [])), "e.bin", "no pairs")
    imgs = [np.full((112, 112, 3), 90, np.uint8)] * 3 + [np.full((100, 112, 3), 90, np.uint8)]
    err = raises(lambda: read_verification_bin(write_verification_bin(tmp_path / "m.bin", imgs, [True, False])),
                 "m.bin", "112x100")
    assert err.record == 3


def test_verification_bin_not_of_the_model_input_size(tmp_path):
    import torch

    from visrec.data.verification import write_verification_bin
    from visrec.faces.evaluation import evaluate_faces
    from visrec.models import build_backbone

    torch.manual_seed(0)
    torch.save({"model_config": {"name": "mbf", "embedding_size": 16},
                "backbone": build_backbone("mbf", embedding_size=16).state_dict()}, tmp_path / "m.pt")
    imgs = [np.full((96, 96, 3), 90 + i, np.uint8) for i in range(20)]
    write_verification_bin(tmp_path / "s.bin", imgs, [True, False] * 5)  # 10 pairs: one per fold
    with pytest.warns(UserWarning, match="no model contract"):
        raises(lambda: evaluate_faces(data=tmp_path / "s.bin", model=tmp_path / "m.pt", out=tmp_path / "o"),
               "s.bin", "96x96", "112x112")


def test_lfr_features_bad_rows_named_at_read_time(tmp_path):
    from visrec.evaluate.lfr import labelled_rows, read_lfr_features, write_lfr_features

    raises(lambda: read_lfr_features(write_lfr_features(tmp_path / "e.bin", np.zeros((0, 8)))), "e.bin", "no feature")
    (tmp_path / "list.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    labels = {"a.jpg": "1", "b.jpg": "1", "c.jpg": "2"}
    feats = np.ones((3, 8), np.float32)
    for value, what in ((np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (0.0, "all zeros")):
        bad = feats.copy()
        bad[1] = value
        err = raises(lambda: labelled_rows(write_lfr_features(tmp_path / "f.bin", bad), tmp_path / "list.txt", labels),
                     "f.bin", "row 2", "'b.jpg'", what)
        assert err.record == "row 2"
    assert labelled_rows(write_lfr_features(tmp_path / "f.bin", feats), tmp_path / "list.txt", labels)[0].shape == (3, 8)


def test_video_list_one_path_under_two_ids(tmp_path):
    from visrec.data.video import read_video_list

    p = tmp_path / "videos.csv"
    p.write_text("a,videos/x,0\nb,videos/y,1\ndupvid,./videos/x,0\n")
    raises(lambda: read_video_list(p), "videos.csv", "line 3", "line 1")
    p.write_text("a,videos/x,0\nb,videos/y,1\n")
    assert [it.video_id for it in read_video_list(p)] == ["a", "b"]


def test_all_zero_frame_scores(tmp_path):
    from visrec.data.video import read_frame_scores

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "scores.txt").write_text("0\n0\n0\n")
    raises(lambda: read_frame_scores(tmp_path / "v", 3), "scores.txt", "'v'")
    (tmp_path / "v" / "scores.txt").write_text("0\n0.5\n0\n")
    assert read_frame_scores(tmp_path / "v", 3).tolist() == [0, 0.5, 0]


def test_video_submission_file_list_naming_a_video_twice(tmp_path):
    from visrec.evaluate.video import score_videos

    feats = {"mean": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    (tmp_path / "order.txt").write_text("a\nb\na\n")
    raises(lambda: score_videos(feats, [0, 0, 1], ["a", "b", "c"], submission=tmp_path / "s.bin",
                                filelist=tmp_path / "order.txt"), "order.txt", "entries 1 and 3")
    assert not (tmp_path / "s.bin").exists()


def test_video_table_without_genuine_pairs(monkeypatch):
    from typer.testing import CliRunner

    import visrec.faces.evaluation as fe
    from visrec.cli import app
    from visrec.evaluate.video import score_videos

    feats = {"mean": np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)}
    res = score_videos(feats, np.arange(12), [str(i) for i in range(12)], targets=(0.1,))  # one video per identity
    assert res.results["mean"][0.1].tpr is None
    monkeypatch.setattr(fe, "evaluate_video_model", lambda *a, **k: res)
    r = CliRunner().invoke(app, ["eval", "faces", "m.pt", "--video", "--data", "v.csv", "--target-fpr", "0.1"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "n/a (no genuine pairs" in r.output


def test_target_one_accepts_every_pair_whatever_the_score_range():
    from visrec.evaluate.identification import tpir_at_fpir
    from visrec.evaluate.verification import tpr_at_fpr_pairs

    r = tpr_at_fpr_pairs([-1.5, -1.2, -0.3, -1.4], [True, False, True, False], [1.0])[1.0]
    assert (r.tpr, r.fpr, r.threshold) == (1.0, 1.0, -1.5)
    # 1:N at FPIR 1: every probe may pass; the threshold accepts every score
    g = np.eye(2, dtype=np.float32)
    probe = -2 * np.eye(2, dtype=np.float32)[[0, 1, 0]]  # mated scores -2 (one_to_n takes the scores as they come)
    res = ijb.one_to_n(probe, np.array([0, 1, 0]), g, np.array([0, 1]), targets=(1.0,))
    assert res.strict[1.0]["tpir"] == 1.0 and res.strict[1.0]["threshold"] == -2.0
    g = np.eye(3, dtype=np.float32)
    p = np.array([[1, 0.1, 0], [0.2, 1, 0], [-1, 0, 0.01], [0, -1, 0.01]], np.float32)
    out = tpir_at_fpir(p, [0, 1, 7, 8], g[:2], [0, 1], targets=(1.0,))[1.0]
    assert out["tpir"] == 1.0 and out["fpir"] == 1.0


def test_ijb_reader_and_align_agree_on_degenerate_points():
    from visrec.faces.align import MIN_POINT_SPREAD, degenerate_points

    base = np.array(POINTS.split(), float).reshape(5, 2)
    cases = np.stack([base, np.full((5, 2), 50.0), np.vstack([base[:1], base[:1], base[2:]]),
                      base * 0 + base[0] + np.arange(10).reshape(5, 2) * 1e-8])
    assert ijb.MIN_POINT_SPREAD == MIN_POINT_SPREAD
    assert ijb.degenerate_points(cases).tolist() == degenerate_points(cases).tolist() == [False, True, True, True]
