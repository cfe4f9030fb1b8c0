"""A face model's threshold calibrated on labelled faces is written into the model's own contract (checkpoint and
ONNX), and every user of the model then applies it and says where it came from: the Python API, the service."""

from __future__ import annotations

import numpy as np
import pytest

from visrec.errors import VisrecError

from conftest import save_tiny_face_model


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from visrec.data.synth import write_face_dataset

    return write_face_dataset(tmp_path_factory.mktemp("calib") / "faces", 8, 5, format="folder", seed=3)


def expected_threshold(model, data, target):
    from visrec.data.datasets import open_face_dataset
    from visrec.evaluate.calibration import calibrate_threshold
    from visrec.models.loading import load_model

    ds = open_face_dataset(data)
    emb = load_model(model).embed(np.stack([ds.source.image(i) for i in range(len(ds))]))
    return calibrate_threshold(emb, ds.labels, target, "cosine")


def test_models_calibrate_writes_the_threshold_into_the_checkpoint_and_the_api_uses_it(faces, tmp_path):
    from typer.testing import CliRunner

    import visrec
    from visrec.cli import app
    from visrec.models.loading import load_model

    model = save_tiny_face_model(tmp_path / "model")
    assert load_model(model).contract.threshold is None
    res = CliRunner().invoke(app, ["models", "calibrate", str(model), "--data", str(faces), "--target-fpr", "0.01"])
    assert res.exit_code == 0, res.output
    t = load_model(model).contract.threshold
    want = expected_threshold(model, faces, 0.01)
    assert t.origin == "calibrated" and t.fpr == 0.01 and "faces (40 images, 8 identities" in t.data
    assert t.value == pytest.approx(want.threshold, abs=1e-6)
    assert "calibrated at FPR 0.01 on faces" in res.output
    info = CliRunner().invoke(app, ["models", "info", str(model)])
    assert "calibrated at FPR 0.01" in info.output, info.output
    fa = visrec.FaceAnalysis(model, detector="haar")
    value, origin = fa.threshold
    assert value == pytest.approx(t.value) and origin.startswith("calibrated at FPR 0.01 on faces")
    assert origin == t.origin_text() and origin.endswith("impostor pairs)")  # its own ')' was cut with the outer
    # the weights are untouched: the same embeddings as before the rewrite
    img = np.stack([np.full((112, 112, 3), 90, np.uint8)])
    np.testing.assert_allclose(load_model(model).embed(img), load_model(tmp_path / "model" / "model.pt").embed(img))


def test_an_onnx_file_gets_the_threshold_in_its_metadata_and_the_service_reports_its_origin(faces, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from visrec.data.images import encode_jpeg
    from visrec.export import export_checkpoint
    from visrec.faces.calibrate import calibrate_model
    from visrec.models.loading import load_model, read_onnx_contract
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    model = save_tiny_face_model(tmp_path / "model")
    onnx = tmp_path / "model.onnx"
    export_checkpoint(model, onnx, parity=False)
    out = calibrate_model(onnx, faces, 0.02)
    assert out["written"] == str(onnx)
    t = read_onnx_contract(onnx).threshold
    assert t.origin == "calibrated" and t.fpr == 0.02
    assert t.value == pytest.approx(expected_threshold(onnx, faces, 0.02).threshold, abs=1e-5)
    assert load_model(onnx).contract.embedding_dim == 64  # the rest of the contract is kept

    client = TestClient(create_app(ServeConfig(faces={"model": str(onnx), "aligned": True,
                                                     "gallery": {"backend": "faiss"}})))
    a = encode_jpeg(np.full((112, 112, 3), 80, np.uint8))
    r = client.post("/v1/faces/verify", files={"image_a": a, "image_b": a})
    body = r.json()
    assert r.status_code == 200 and body["threshold"] == pytest.approx(t.value, abs=1e-6), body
    assert body["threshold_origin"].startswith("the model's contract: calibrated at FPR 0.02"), body


def test_adapters_and_unestimable_targets_are_refused_and_nothing_is_written(faces, tmp_path):
    from visrec.faces.calibrate import calibrate_model

    with pytest.raises(VisrecError, match="not visrec's to change"):
        calibrate_model("dlib-resnet", faces, 0.01, photos=True)
    with pytest.raises(VisrecError, match="cannot calibrate at FPR 1e-06"):
        calibrate_model(save_tiny_face_model(tmp_path / "m"), faces, 1e-6)  # 720 impostor pairs: not estimable


def test_calibrating_on_photos_counts_what_was_embedded_and_names_a_set_without_faces(tmp_path, monkeypatch):
    """With --photos, the threshold's data note counts the photos that had a face and their people, not every
    file; a set where no photo has a face is said so, not a shape error."""
    import types

    from visrec.data.images import encode_jpeg
    from visrec.faces import calibrate as cal

    people = tmp_path / "people"
    for who, n in (("ann", 3), ("bob", 2), ("cy", 1)):
        (people / who).mkdir(parents=True)
        for i in range(n):
            (people / who / f"{i}.jpg").write_bytes(encode_jpeg(np.full((32, 32, 3), 40 * i + 10, np.uint8)))

    class Pipe:  # a stand-in pipeline: the one photo of "cy" has no face
        def __init__(self, model, **kw):
            self.embedder = types.SimpleNamespace(metric="cosine")

    def embed_photos(pipe, listing, batch, progress):
        keep = [i for i, p in enumerate(listing.paths) if "cy" not in str(p)]
        rng = np.random.default_rng(0)
        return (rng.normal(size=(len(keep), 8)).astype(np.float32), listing.labels[keep],
                [p for p in listing.paths if "cy" in str(p)])

    monkeypatch.setattr(cal, "FacePipeline", Pipe)
    monkeypatch.setattr(cal, "embed_photos", embed_photos)
    _, emb, labels, seen = cal.embed_labelled("m", people, photos=True)
    assert (seen["images"], seen["identities"], len(seen["no_face"])) == (5, 2, 1) and len(emb) == 5

    monkeypatch.setattr(cal, "embed_photos", lambda pipe, listing, batch, progress: (
        np.zeros((0, 8), np.float32), np.zeros(0, np.int64), list(listing.paths)))
    with pytest.raises(VisrecError, match="no face found in any of the 6 photos"):
        cal.embed_labelled("m", people, photos=True)


def test_a_model_that_gives_impostors_a_cosine_of_1_is_refused_a_threshold_above_1(tmp_path):
    """A near-collapsed model scores many impostor pairs 1.0: the only threshold accepting few enough lies just
    above 1, which the contract refused in a bare ValueError traceback; it is a DataError saying why."""
    from visrec.errors import DataError
    from visrec.evaluate.calibration import calibrate_threshold

    same = np.tile(np.array([[0.6, 0.8]], np.float32), (40, 1))  # ten people, one embedding
    with pytest.raises(DataError, match="impostor pairs score a cosine of 1"):
        calibrate_threshold(same, np.repeat(np.arange(10), 4), 0.1)
    same[:20] = [1.0, 0.0]  # two embeddings: at 60% of the impostors a threshold below 1 exists
    assert calibrate_threshold(same, np.repeat(np.arange(10), 4), 0.6).threshold <= 1.0


def test_models_calibrate_on_one_image_per_identity_is_refused_and_leaves_the_model_as_it_was(tmp_path, monkeypatch,
                                                                                             capsys):
    """No genuine pair: a threshold from impostors alone was written (-1.0 on 4 singletons at FPR 1), then the
    command crashed formatting its TPR (None). Refused before anything is written, exit 2."""
    from conftest import cli_status

    from visrec.data.folders import write_image_folder

    model = tmp_path / "m"
    model.mkdir()
    save_tiny_face_model(model)
    before = (model / "model.pt").read_bytes()
    rng = np.random.default_rng(0)
    write_image_folder(tmp_path / "singletons", [(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), name)
                                                 for name in ("a", "b", "c", "d")])
    code, err = cli_status(["models", "calibrate", str(model), "--data", str(tmp_path / "singletons"),
                            "--target-fpr", "1"], monkeypatch, capsys)
    assert code == 2 and "no genuine pair" in err and "Traceback" not in err, err
    assert (model / "model.pt").read_bytes() == before
