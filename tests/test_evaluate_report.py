"""visrec eval faces end to end: checkpoint + labelled RecordIO / .bin -> table and a self-contained report."""

import re

import torch
from typer.testing import CliRunner

from visrec.cli import app
from visrec.data.synth import write_face_dataset, write_verification_pairs
from visrec.evaluate.lfr import write_lfr_features
from visrec.models import build_backbone


def test_eval_faces_cli_and_report(tmp_path):
    write_face_dataset(tmp_path / "train", 10, 4, format="recordio", seed=1)
    write_verification_pairs(tmp_path / "val.bin", 10, 20, seed=2)
    torch.save({"model_config": {"name": "mbf", "embedding_size": 128},
                "backbone": build_backbone("mbf", embedding_size=128).state_dict()}, tmp_path / "model.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "faces", str(tmp_path / "model.pt"), "--data", str(tmp_path / "train"),
                              "--target-fpr", "1e-2", "--out", str(tmp_path / "r1")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r1" / "report.html").read_text()
    for img in re.findall(r'src="([^"]+)"', page):
        assert not img.startswith(("http", "//", "/")) and (tmp_path / "r1" / img).exists()
    assert "<script" not in page and "0.01" in page
    res = runner.invoke(app, ["eval", "faces", str(tmp_path / "model.pt"), "--data",
                              str(tmp_path / "val.bin"), "--target-fpr", "0.1", "--flip", "--out", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r2" / "report.html").read_text()
    assert "10-fold accuracy" in page and "flip test" in page


def test_eval_faces_from_a_features_file(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 4)
    write_lfr_features(tmp_path / "f.bin", rng.standard_normal((8, 32))[labels] + 0.2 * rng.standard_normal((32, 32)))
    names = [f"{i}.jpg" for i in range(32)]
    (tmp_path / "list.txt").write_text("\n".join(names))
    (tmp_path / "labels.csv").write_text("\n".join(f"{n},{l}" for n, l in zip(names, labels)))
    res = CliRunner().invoke(app, ["eval", "faces", "--features", str(tmp_path / "f.bin"), "--filelist",
                                   str(tmp_path / "list.txt"), "--labels", str(tmp_path / "labels.csv"),
                                   "--target-fpr", "0.01", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "1.000000" in res.output  # well-separated identities: every genuine pair accepted at FPR 1e-2



def test_eval_faces_names_every_data_kind_it_takes_before_loading_the_model(tmp_path):
    import pytest

    from visrec.errors import DataError
    from visrec.faces.evaluation import evaluate_faces

    (tmp_path / "embeddings.pt").write_bytes(b"\x80\x02not a data set")
    # the model is not there either: the data are checked first, and the message lists the .bin kind too
    with pytest.raises(DataError, match=r"embeddings.pt: not a face data set: .* a \.csv list or a \.bin pairs file"):
        evaluate_faces(model=tmp_path / "no-model.pt", data=tmp_path / "embeddings.pt", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # a .bin too: one that is no pickle is named before the (missing) model
    (tmp_path / "lfw.bin").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"lfw.bin"):
        evaluate_faces(model=tmp_path / "no-model.pt", data=tmp_path / "lfw.bin", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # a video list and the LFR image track's file list and images folder likewise
    from visrec.faces.evaluation import evaluate_video_model, image_submission

    with pytest.raises(DataError, match=r"videos.csv: video list not found"):
        evaluate_video_model(tmp_path / "no-model.pt", tmp_path / "videos.csv")
    with pytest.raises(DataError, match=r"images folder not found"):
        image_submission(model=tmp_path / "no-model.pt", images=tmp_path / "aligned", filelist=tmp_path / "f.txt",
                         out=tmp_path / "sub.bin")
    (tmp_path / "aligned").mkdir()
    (tmp_path / "f.txt").write_text("")
    with pytest.raises(DataError, match=r"f.txt.*no entries|no entries.*f.txt"):
        image_submission(model=tmp_path / "no-model.pt", images=tmp_path / "aligned", filelist=tmp_path / "f.txt",
                         out=tmp_path / "sub.bin")
    assert not (tmp_path / "sub.bin").exists()
