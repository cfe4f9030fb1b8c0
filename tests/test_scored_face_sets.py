"""Scored face sets at their boundary: a set scored over its pairs (image folder, CSV list, RecordIO) is embedded
as it is, like a .bin and the LFR image track, so an image that is not the model's aligned crop size is a
DataError naming its file (and record) — it was a bare traceback from np.stack (mixed sizes) or from the network
(one odd size) — in `eval faces`, in a calibration and in a face search's held-out scorer. A .bin too small for
10-fold accuracy is refused naming the file before the model loads (it was refused, unnamed, after every image
was embedded)."""

import pickle

import cv2
import numpy as np
import pytest
from conftest import run_cli

from visrec.data.folders import write_image_folder
from visrec.data.recordio import RecordIOWriter
from visrec.data.synth import write_verification_pairs
from visrec.errors import DataError


def _crops(n: int, side: int = 112) -> list[np.ndarray]:
    rng = np.random.default_rng(side)
    return [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _folder_with_one_odd_image(root, side: int):
    write_image_folder(root, zip(_crops(6), ["a", "a", "a", "b", "b", "b"]))
    odd = sorted((root / "b").iterdir())[1]
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(odd)), (side, side)))
    return odd


@pytest.mark.parametrize("side", [150, 96])
def test_eval_faces_names_the_image_that_is_not_an_aligned_crop(tmp_path, tiny_face_model, monkeypatch, capsys,
                                                               side):
    odd = _folder_with_one_odd_image(tmp_path / "set", side)
    code, out, err = run_cli(["eval", "faces", tiny_face_model, "--data", tmp_path / "set", "--target-fpr", "0.1",
                              "--out", tmp_path / "ev"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, (out, err)
    assert f"error: {odd}: image is {side}x{side};" in err and "takes aligned 112x112 crops" in err, err
    assert not (tmp_path / "ev").exists()  # nothing written for a set that cannot be scored


def test_a_recordio_set_of_other_sized_crops_is_named_with_its_record(tmp_path, tiny_face_model, monkeypatch, capsys):
    with RecordIOWriter(tmp_path / "rec") as writer:
        for i, img in enumerate(_crops(6, side=150)):
            writer.add(img, i % 2)
    code, out, err = run_cli(["eval", "faces", tiny_face_model, "--data", tmp_path / "rec", "--target-fpr", "0.1",
                              "--out", tmp_path / "ev"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, (out, err)
    assert "train.rec, record 1: image is 150x150;" in err and "takes aligned 112x112 crops" in err, err


def test_calibration_and_a_search_scorer_refuse_the_same_image(tmp_path, tiny_face_model):
    from visrec.faces.calibrate import embed_labelled
    from visrec.search.proxy import FaceScorer

    odd = _folder_with_one_odd_image(tmp_path / "set", 150)
    with pytest.raises(DataError, match="image is 150x150; .* takes aligned 112x112 crops") as err:
        embed_labelled(tiny_face_model, tmp_path / "set")
    assert str(odd) in str(err.value)
    with pytest.raises(DataError, match="image is 150x150; a face search's candidate model takes aligned 112") as err:
        FaceScorer(tmp_path / "set", target_fpr=0.5)
    assert str(odd) in str(err.value)


def test_a_bin_too_small_for_ten_folds_is_refused_naming_it_before_the_model_loads(tmp_path, tiny_face_model,
                                                                                  monkeypatch, capsys):
    import visrec.faces.evaluation as evaluation

    full = write_verification_pairs(tmp_path / "full.bin", 10, 40, seed=1)
    with open(full, "rb") as fh:
        bins, issame = pickle.load(fh, encoding="bytes")
    with open(tmp_path / "nine.bin", "wb") as fh:
        pickle.dump((bins[:18], issame[:9]), fh, protocol=2)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a .bin that cannot be evaluated")

    monkeypatch.setattr(evaluation, "load_model", no_model)
    code, out, err = run_cli(["eval", "faces", tiny_face_model, "--data", tmp_path / "nine.bin", "--out",
                              tmp_path / "ev"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, (out, err)
    assert f"error: {tmp_path / 'nine.bin'}: 9 pairs cannot be split into 10 folds" in err, err
