"""Galleries trust only what names them for sure: a link to a gallery file is that file (one writer, one gallery
per file in a config), a model is its weights (two checkpoints of one architecture are two models; a checkpoint
and its ONNX export are one), a threshold is stored only when it could be measured, and no finite embedding is
stored as zeros."""

import logging
import os

import numpy as np
import pytest

pytest.importorskip("faiss", reason="galleries need visrec[index]")

from conftest import cli_status as _cli_status, save_tiny_face_model  # noqa: E402
from visrec.errors import ConfigError, DataError  # noqa: E402
from visrec.index.gallery import GalleryMismatchError, calibrate, open_gallery  # noqa: E402


def cli_status(args, monkeypatch, capsys):
    """(exit status, stderr with its lines joined: the console wraps long messages)."""
    code, err = _cli_status(args, monkeypatch, capsys)
    return code, " ".join(err.split())


def unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two trained checkpoints of one architecture (64-d MobileFaceNet, different weights)."""
    root = tmp_path_factory.mktemp("two-models")
    (root / "a").mkdir()
    (root / "b").mkdir()
    return save_tiny_face_model(root / "a", seed=0), save_tiny_face_model(root / "b", seed=1)


def _serve_yaml(path, model, gallery_file, extra=""):
    path.write_text(f"faces:\n  model: {model}\n  aligned: true\n"
                    f"  gallery: {{backend: faiss, path: {gallery_file}}}\n{extra}")
    return path


# --- 1. a link to a gallery file is the file ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["file link", "relative link to a link"])
def test_a_link_to_an_open_gallery_file_is_refused_as_open_elsewhere(tmp_path, how):
    real = tmp_path / "data" / "g1.sqlite"
    real.parent.mkdir()
    g = open_gallery("faiss", path=real, model_name="m")
    g.enroll("x", unit(np.ones((1, 8))))
    if how == "file link":
        alias = tmp_path / "alias.sqlite"
        alias.symlink_to(real)
    else:
        (tmp_path / "first.sqlite").symlink_to(real)
        alias = tmp_path / "data" / "second.sqlite"
        alias.symlink_to("../first.sqlite")
    with pytest.raises(DataError, match="open elsewhere") as err:
        open_gallery("faiss", path=alias)
    assert str(alias) in str(err.value)
    g.enroll("y", unit(np.arange(1, 9)[None]))  # the first open is unharmed
    g.close()
    again = open_gallery("faiss", path=alias)  # closed: the link opens the same gallery
    assert [r["identity"] for r in again.list()] == ["x", "y"]
    again.close()


def test_the_gallery_cli_through_a_link_to_a_served_gallery_file_is_refused_and_writes_nothing(
        tmp_path, tiny_face_model, monkeypatch, capsys):
    from visrec.models.loading import load_model

    real = tmp_path / "g1.sqlite"
    (tmp_path / "alias.sqlite").symlink_to(real)
    alias_yaml = _serve_yaml(tmp_path / "alias.yaml", tiny_face_model, tmp_path / "alias.sqlite")
    model = load_model(tiny_face_model)
    served = open_gallery("faiss", path=real, model_name=model.name, dim=64)  # as a running service holds it
    served.enroll("X", unit(np.ones((1, 64))), model_name=model.name)
    code, err = cli_status(["gallery", "delete", "X", "--config", str(alias_yaml)], monkeypatch, capsys)
    assert code == 2 and "open elsewhere" in err, err
    served.enroll("X", unit(np.arange(64)[None] + 1.0), model_name=model.name)
    assert served.count() == 2
    served.close()
    reopened = open_gallery("faiss", path=real)  # not unopenable: the rows agree
    assert reopened.identity("X")["templates"] == 2
    reopened.close()


@pytest.mark.parametrize("link", ["symlink", "hardlink", "dangling symlink"])
def test_a_config_naming_one_gallery_file_twice_through_a_link_is_refused(tmp_path, link):
    from visrec.serve.config import load_serve_config

    real = tmp_path / "g3.sqlite"
    if link != "dangling symlink":
        g = open_gallery("faiss", path=real, model_name="m")
        g.close()
    alias = tmp_path / "alias3.sqlite"
    if link == "hardlink":
        os.link(real, alias)
    else:
        alias.symlink_to(real)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: run\n  aligned: true\n  galleries:\n"
                   f"    a: {{backend: faiss, path: {real}}}\n    b: {{backend: faiss, path: {alias}}}\n")
    with pytest.raises(ConfigError, match="'a' and 'b' use the same file"):
        load_serve_config(cfg)


def test_a_config_naming_one_milvus_lite_folder_twice_through_a_link_is_refused(tmp_path):
    from visrec.serve.config import load_serve_config

    (tmp_path / "g.db").mkdir()
    (tmp_path / "alias.db").symlink_to(tmp_path / "g.db", target_is_directory=True)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"faces:\n  model: run\n  aligned: true\n  galleries:\n"
                   f"    a: {{backend: milvus, uri: {tmp_path / 'g.db'}}}\n"
                   f"    b: {{backend: milvus, uri: {tmp_path / 'alias.db'}}}\n")
    with pytest.raises(ConfigError, match="point at the same Milvus collections"):
        load_serve_config(cfg)


# --- 2. a model is its weights --------------------------------------------------------------------------------
def test_two_checkpoints_of_one_architecture_are_two_models(two_models, tmp_path):
    from visrec.models.loading import load_model

    a, b = (load_model(m) for m in two_models)
    assert a.name != b.name and "@sha256:" in a.name and a.name.startswith("mobilefacenet:")
    g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name=a.name, dim=64)
    g.enroll("ann", unit(np.ones((1, 64))), model_name=a.name)
    with pytest.raises(GalleryMismatchError, match="refusing embeddings of model"):
        g.enroll("bob", unit(np.ones((1, 64))), model_name=b.name)
    g.close()
    with pytest.raises(GalleryMismatchError, match="refusing embeddings of model"):
        open_gallery("faiss", path=tmp_path / "g.sqlite", model_name=b.name, dim=64)


def test_a_calibrated_checkpoint_and_its_exports_stay_the_model_a_gallery_knows(tmp_path):
    """`visrec models calibrate` rewrites the checkpoint (same weights, a threshold): the file records the
    fingerprint it had, so a gallery enrolled before still takes it, and an export made before or after is
    the same model."""
    from visrec.export import export_checkpoint
    from visrec.faces.calibrate import write_threshold
    from visrec.models.contract import Threshold
    from visrec.models.loading import load_model

    run = tmp_path / "run"
    run.mkdir()
    save_tiny_face_model(run, seed=2)
    before = load_model(run).name
    export_checkpoint(run, tmp_path / "before.onnx")
    g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name=before, dim=64)
    g.enroll("ann", unit(np.ones((1, 64))), model_name=before)
    g.close()
    write_threshold(run, Threshold(0.4, "calibrated", fpr=1e-3, data="held-out"))
    export_checkpoint(run, tmp_path / "after.onnx")
    names = {load_model(m).name for m in (run, tmp_path / "before.onnx", tmp_path / "after.onnx")}
    assert names == {before} and load_model(run).contract.threshold.value == 0.4
    g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name=load_model(run).name, dim=64)
    assert g.count() == 1
    g.close()


def test_gallery_import_refuses_an_export_of_another_checkpoint_of_the_same_architecture(
        two_models, tmp_path, monkeypatch, capsys):
    from visrec.models.loading import load_model

    other = load_model(two_models[1])
    src = open_gallery("faiss", model_name=other.name, dim=64)
    rng = np.random.default_rng(0)
    for i in range(3):
        src.enroll(f"p{i}", unit(rng.normal(size=(2, 64))), model_name=other.name)
    export = src.export(tmp_path / "other.npz")
    cfg = _serve_yaml(tmp_path / "serve.yaml", two_models[0], tmp_path / "g.sqlite")
    code, err = cli_status(["gallery", "import", "--config", str(cfg), str(export)], monkeypatch, capsys)
    assert code == 2 and "refusing embeddings of model" in err, err
    g = open_gallery("faiss", path=tmp_path / "g.sqlite")
    assert g.count() == 0
    g.close()


def test_a_gallery_recorded_without_a_fingerprint_opens_with_its_model_and_records_it(two_models, tmp_path, caplog):
    from visrec.models.loading import load_model

    a, b = (load_model(m) for m in two_models)
    old_name = a.name.split("@sha256:")[0]  # what earlier versions recorded: the architecture only
    assert old_name == "mobilefacenet:embedding_size=64,scale=1"
    path = tmp_path / "g.sqlite"
    g = open_gallery("faiss", path=path, model_name=old_name, dim=64)
    g.enroll("ann", unit(np.ones((1, 64))))
    g.close()
    with caplog.at_level(logging.WARNING):
        g = open_gallery("faiss", path=path, model_name=a.name, dim=64)
    assert g.info["model_name"] == a.name and "without a fingerprint" in caplog.text
    g.close()
    with pytest.raises(GalleryMismatchError):  # recorded now: the other checkpoint is another model
        open_gallery("faiss", path=path, model_name=b.name, dim=64)
    # an export written by an earlier version (no fingerprint) still imports into the fingerprinted gallery
    old = open_gallery("faiss", model_name=old_name, dim=64)
    old.enroll("bob", unit(np.arange(64)[None] + 1.0))
    g = open_gallery("faiss", path=path, model_name=a.name, dim=64)
    assert g.import_(old.export(tmp_path / "old.npz")) == 1
    g.close()


def test_onnx_files_are_named_by_their_weights_and_an_export_by_its_checkpoint(two_models, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from visrec.export import export_checkpoint, export_model
    from visrec.models.loading import load_model

    a, b = (load_model(m) for m in two_models)
    onnx_a, _ = export_checkpoint(two_models[0], two_models[0] / "model.onnx")  # records the checkpoint
    exported = load_model(onnx_a)
    assert exported.name == a.name  # one model: the export has the checkpoint's identity
    assert load_model(two_models[0], runtime="onnx").name == a.name
    # ONNX files recording no checkpoint, both called model.onnx: each is named by its own bytes
    for m, d in ((a, "x"), (b, "y")):
        (tmp_path / d).mkdir()
        export_model(m.module, tmp_path / d / "model.onnx", m.contract)
    x, y = load_model(tmp_path / "x" / "model.onnx"), load_model(tmp_path / "y" / "model.onnx")
    assert x.name != y.name and x.name.startswith("onnx:model.onnx@sha256:")
    # a gallery an earlier version filled through the export (named onnx:model.onnx) opens with it
    g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name="onnx:model.onnx", dim=64)
    g.close()
    g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name=exported.name, dim=64)
    assert g.info["model_name"] == a.name
    g.close()


# --- 3. no threshold without a genuine pair ---------------------------------------------------------------
def test_calibrating_on_one_embedding_per_identity_is_refused_and_stores_nothing(tmp_path):
    x = unit(np.random.default_rng(0).normal(size=(150, 16)))
    g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name="m", dim=16)
    g.set_threshold(0.5, 1e-3)
    with pytest.raises(DataError, match="no genuine pair.*two or more images"):
        calibrate(g, x, np.arange(150), 1e-4)
    assert g.threshold == 0.5 and g.info["target_fpr"] == 1e-3
    g.close()


def test_gallery_calibrate_cli_on_one_image_per_identity_exits_2_and_keeps_the_threshold(
        tiny_face_model, tmp_path, monkeypatch, capsys):
    import cv2

    data = tmp_path / "tiny2"
    rng = np.random.default_rng(1)
    for i in range(4):
        (data / f"id{i}").mkdir(parents=True)
        cv2.imwrite(str(data / f"id{i}" / "0.png"), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    cfg = _serve_yaml(tmp_path / "serve.yaml", tiny_face_model, tmp_path / "g.sqlite")
    code, err = cli_status(["gallery", "calibrate", "--config", str(cfg), "--data", str(data), "--target-fpr", "1"],
                           monkeypatch, capsys)
    assert code == 2 and "no genuine pair" in err, err
    g = open_gallery("faiss", path=tmp_path / "g.sqlite")
    assert g.threshold is None
    g.close()


# --- 4. no finite embedding is stored as zeros -----------------------------------------------------------
@pytest.mark.parametrize("value", [1e38, 3e38, 1e-30, 1e-44])
def test_huge_and_tiny_finite_embeddings_are_stored_as_unit_rows(value):
    g = open_gallery("faiss", model_name="m", dim=512)
    g.enroll("v", np.full((1, 512), value, np.float32))
    found = g.search(np.ones((1, 512), np.float32), 1)[0][0]
    assert found.identity == "v" and found.score == pytest.approx(1.0, abs=1e-5)


def test_an_import_of_huge_vectors_stores_unit_templates(tmp_path):
    src = open_gallery("faiss", model_name="m", dim=16)
    src.enroll("p", unit(np.ones((2, 16)) + np.eye(16)[:2]))
    path = src.export(tmp_path / "g.npz")
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["vectors"] = np.full_like(data["vectors"], 1e38)
    data["vectors"][1, 0] = 3e38
    np.savez(tmp_path / "huge.npz", **data)
    g = open_gallery("faiss", path=tmp_path / "into.sqlite")
    assert g.import_(tmp_path / "huge.npz") == 2
    rows = [v for batch in g._template_batches(10) for *_, v in batch]
    assert len(rows) == 2 and np.allclose(np.linalg.norm(np.stack(rows), axis=1), 1, atol=1e-5)
    g.close()


def test_a_raw_distance_embedding_too_long_for_float32_distances_is_refused_naming_the_row():
    g = open_gallery("faiss", model_name="d", dim=4, metric="euclidean")
    x = np.ones((2, 4), np.float32)
    x[1] = 1e38
    with pytest.raises(DataError, match="row 1 has length .* beyond what distances in float32 can hold"):
        g.enroll("big", x)
    assert g.count() == 0
    g.enroll("tiny", np.full((1, 4), 1e-30, np.float32))  # small but not zero: kept as it is
    assert g.count() == 1
