"""A model carries its contract: saved by the trainer, written into ONNX metadata, declared by adapters,
read back by ``visrec.models.load_model``; callers take sizes, margins and dims from it."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from visrec.config import parse_config
from visrec.errors import DataError
from visrec.models import ModelContract, build_backbone, load_model
from visrec.models.contract import ONNX_KEY
from visrec.train.trainer import train

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SRC = Path(__file__).resolve().parents[1] / "src" / "visrec"


def _same_but_origin(a: ModelContract, b: ModelContract) -> bool:
    return a.replace(source=None, origin=None) == b.replace(source=None, origin=None)


def _onnx_contract_json(path) -> dict:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[ONNX_KEY])


@pytest.fixture(scope="module")
def face_run(tmp_path_factory):
    """A 1-step face training run (32-d MobileFaceNet) on data 'prepared' with eyes alignment."""
    from visrec.data.synth import write_face_dataset

    tmp = tmp_path_factory.mktemp("face-run")
    root = tmp / "train"
    write_face_dataset(root, 4, 4, format="recordio", seed=3, difficulty=0.2)
    (root / "prepare_journal.jsonl").write_text(json.dumps({"settings": {"kind": "faces", "align": "eyes",
                                                                          "box_margin": None}}) + "\n")
    cfg = parse_config({"task": "faces", "output": str(tmp / "run"), "device": "cpu", "batch_size": 8,
                        "model": {"name": "mobilefacenet", "embedding_size": 32},
                        "data": {"train": str(root)}, "loss": {"name": "arcface", "s": 16.0, "m": 0.3},
                        "optim": {"name": "sgd", "lr": 0.01}, "schedule": {"max_steps": 1},
                        "checkpoint_every": 100})
    train(cfg, progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def landmark_run(tmp_path_factory):
    """A 1-step heatmap_lite run trained on crops with margin 0.25 per side at 96 px (not 0.15 / 112); PFLD's
    7x7 head needs 112 px crops, so the margin/size test uses the heatmap model (24x24 heatmaps at 96 px)."""
    from visrec.data.synth import write_synthetic_jd

    tmp = tmp_path_factory.mktemp("landmark-run")
    write_synthetic_jd(tmp / "train", 8, seed=1)
    write_synthetic_jd(tmp / "val", 4, seed=2)
    cfg = parse_config({"task": "landmarks", "output": str(tmp / "run"), "device": "cpu", "batch_size": 4,
                        "model": {"name": "heatmap_lite", "width_mult": 0.25, "heatmap_size": 24},
                        "data": {"train": str(tmp / "train"), "margin": 0.25, "size": 96, "augment": False},
                        "loss": {"name": "wing"}, "optim": {"name": "adamw", "lr": 1e-3},
                        "schedule": {"max_steps": 1}, "checkpoint_every": 100})
    train(cfg, progress=False)
    # an untrained heatmap model puts every point at the crop centre, which every margin maps to the box
    # centre: scale its head (BatchNorm with fresh statistics leaves the features ~1e-6) so the points follow the image (and the crop's margin matters)
    from visrec._torchfile import atomic_save, read_torch_file

    blob = read_torch_file(tmp / "run" / "model.pt")
    blob["backbone"]["head.weight"] = blob["backbone"]["head.weight"] * 1e6
    atomic_save(blob, tmp / "run" / "model.pt")
    return tmp / "run", tmp / "val"


def test_face_contract_saved_by_the_trainer_and_round_trips_through_onnx(face_run, tmp_path):
    from visrec._torchfile import read_torch_file
    from visrec.export import export_checkpoint
    from visrec.models.loading import read_onnx_contract

    for name in ("model.pt", "last.rank0.pt"):
        saved = read_torch_file(face_run / name)["contract"]
        assert saved["embedding_dim"] == 32 and saved["task"] == "face-embedding"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint with a contract loads without a warning
        model = load_model(face_run)
    c = model.contract
    assert (c.embedding_dim, c.input_size, c.metric, c.colour_order) == (32, (112, 112), "cosine", "RGB")
    assert (c.pixel_mean, c.pixel_std) == ((127.5,) * 3, (127.5,) * 3)
    assert c.align_method == "eyes" and c.align_template == "arcface-112"  # from the prepare journal
    assert c.threshold is None and c.arch["name"] == "mobilefacenet"
    assert ModelContract.from_json(c.to_json()) == c
    assert _same_but_origin(load_model(face_run / "last.rank0.pt").contract, c)

    onnx_path, _ = export_checkpoint(face_run, tmp_path / "face.onnx")
    assert ModelContract.from_dict(_onnx_contract_json(onnx_path)).replace(source=None, origin=None) == \
        c.replace(source=None, origin=None)
    back = read_onnx_contract(onnx_path)
    assert _same_but_origin(back, c) and back.origin == "visrec-onnx"
    onnx_model = load_model(onnx_path)
    assert _same_but_origin(onnx_model.contract, c)
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    np.testing.assert_allclose(onnx_model.embed(crops), model.embed(crops), atol=1e-4)
    assert model.embed(list(crops)).shape == (3, 32)

    # arcface_torch's bare backbone.pth + an architecture: the adapter declares its contract
    bare = load_model(face_run / "backbone.pth", arch={"name": "mobilefacenet", "embedding_size": 32})
    assert bare.contract.origin == "arcface_torch" and bare.contract.embedding_dim == 32
    np.testing.assert_allclose(bare.embed(crops), model.embed(crops), atol=1e-5)


def test_landmark_contract_round_trips_and_every_caller_uses_its_margin_and_size(landmark_run, tmp_path):
    from fastapi.testclient import TestClient

    from visrec.data.images import encode_jpeg, read_image
    from visrec.data.landmark_crops import JDCrops
    from visrec.evaluate.landmark_report import landmark_metrics
    from visrec.faces.evaluation import evaluate_landmarks
    from visrec.models.landmark_nets import predict_points
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    run, val = landmark_run
    model = load_model(run)
    c = model.contract
    assert (c.task, c.crop_margin, c.crop_size, c.input_size, c.num_points, c.point_scheme) == \
        ("landmarks", 0.25, 96, (96, 96), 106, "jd106")
    net = model.module

    # eval: crops of the contract's margin/size (the same NME as predicting those crops by hand)
    ev = evaluate_landmarks(run, val, tmp_path / "ev")
    ds = JDCrops(val, 106, 96, 0.25, augment=False)
    with torch.no_grad():
        pred = net(torch.stack([ds[i][0] for i in range(len(ds))])).numpy() * 96
    gt = np.stack([ds[i][1].numpy() for i in range(len(ds))]) * 96
    want = landmark_metrics(pred, gt)
    assert ev.metrics["sqrt_area"]["nme"] == pytest.approx(want["sqrt_area"]["nme"], rel=1e-5)
    # the submission maps the predictions back to picture pixels through the contract's crop: the same
    # files as writing them by hand with margin 0.25 / 96 px, other files than with the old 0.15 margin
    from visrec.data.landmarks import read_landmark_txt
    from visrec.evaluate.landmark_report import write_submission

    mine = write_submission(tmp_path / "mine", ds, pred)
    old = write_submission(tmp_path / "old", JDCrops(val, 106, 96, 0.15, augment=False), pred)
    name = f"{Path(ds.paths[0]).name}.txt"
    got = read_landmark_txt(tmp_path / "ev" / "submission" / name, 106)
    np.testing.assert_allclose(got, read_landmark_txt(mine / name, 106), atol=1e-3)
    assert not np.allclose(got, read_landmark_txt(old / name, 106), atol=0.5)
    assert "margin 0.25" in (tmp_path / "ev" / "report.html").read_text()

    image = read_image(sorted((val / "picture").glob("*.jpg"))[0])
    box = (20.0, 24.0, 150.0, 160.0)
    ref = predict_points(net, image, box, margin=0.25, size=96)
    wrong = predict_points(net, image, box, margin=0.15, size=96)  # the old assumed margin
    assert not np.allclose(ref, wrong, atol=0.5)
    np.testing.assert_allclose(model.predict(image, box), ref, atol=1e-4)
    np.testing.assert_allclose(model.predict(image, np.array([box, box]))[1], ref, atol=1e-3)
    # serve: the HTTP landmarks endpoint and the face pipeline's landmark step
    client = TestClient(create_app(ServeConfig(landmarks={"model": str(run)})))
    r = client.post("/v1/landmarks", files={"image": encode_jpeg(image)}, data={"box": ",".join(map(str, box))})
    assert r.status_code == 200, r.text
    from visrec.faces.images import decode_upload

    np.testing.assert_allclose(np.array(r.json()["points"]),
                               predict_points(net, decode_upload(encode_jpeg(image)), box, 0.25, 96), atol=0.01)


def test_landmark_contract_in_pipeline_prepare_and_onnx(landmark_run, tmp_path):
    from visrec.data.images import read_image
    from visrec.faces.prepare import _landmarker_from
    from visrec.export import export_checkpoint
    from visrec.models.landmark_nets import predict_points
    from visrec.faces.pipeline import FacePipeline

    from conftest import save_tiny_face_model

    run, val = landmark_run
    net = load_model(run).module
    image = read_image(sorted((val / "picture").glob("*.jpg"))[0])
    box = (20.0, 24.0, 150.0, 160.0)
    ref = predict_points(net, image, box, margin=0.25, size=96)
    face_dir = tmp_path / "face"
    face_dir.mkdir()
    pipe = FacePipeline(save_tiny_face_model(face_dir), landmarks=run, detector="haar")
    np.testing.assert_allclose(pipe.landmarks(image, box), ref, atol=1e-4)
    np.testing.assert_allclose(_landmarker_from(run)(image, box), ref, atol=1e-4)

    onnx_path, _ = export_checkpoint(run, tmp_path / "lm.onnx")
    contract = load_model(run).contract
    assert _same_but_origin(ModelContract.from_dict(_onnx_contract_json(onnx_path)), contract)
    onnx_model = load_model(onnx_path)
    assert _same_but_origin(onnx_model.contract, contract) and onnx_model.module is None
    # pixels: float32 differences between the runtimes, scaled up to the crop's size, reach ~0.011 px here
    # with either ONNX exporter; a wrong crop, margin or scheme is off by pixels
    np.testing.assert_allclose(onnx_model.predict(image, box), ref, atol=0.05)


def test_pfld_contract_round_trips_through_model_pt_and_onnx(tmp_path):
    from visrec.export import export_checkpoint
    from visrec.models.contract import contract_from_config
    from visrec.train.checkpoint import atomic_save

    cfg = {"name": "pfld", "num_points": 106, "width_mult": 0.25}
    contract = contract_from_config(cfg, crop_margin=0.3, crop_size=112)
    net = build_backbone(**cfg).eval()
    atomic_save({"model_config": cfg, "backbone": net.state_dict(), "contract": contract.to_dict()},
                tmp_path / "run" / "model.pt")
    model = load_model(tmp_path / "run")
    assert _same_but_origin(model.contract, contract) and model.contract.crop_margin == 0.3
    onnx_path, report = export_checkpoint(tmp_path / "run", tmp_path / "pfld.onnx")
    assert report.passed
    assert _same_but_origin(load_model(onnx_path).contract, contract)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    np.testing.assert_allclose(load_model(onnx_path).predict_crops(x), model.predict_crops(x), atol=1e-4)


def test_old_checkpoints_without_a_contract_load_with_a_warning(tmp_path):
    from visrec.train.checkpoint import atomic_save

    face = build_backbone("mobilefacenet", embedding_size=48).eval()
    atomic_save({"model_config": {"name": "mobilefacenet", "embedding_size": 48}, "backbone": face.state_dict()},
                tmp_path / "face" / "model.pt")
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / "face" / "model.pt"))) as rec:
        m = load_model(tmp_path / "face")
    assert "embedding dim 48" in str(rec[0].message) and "lstsq" in str(rec[0].message)
    assert (m.contract.embedding_dim, m.contract.metric, m.contract.align_method) == (48, "cosine", "lstsq")

    lm = build_backbone("pfld", num_points=106, width_mult=0.25).eval()
    atomic_save({"model_config": {"name": "pfld", "num_points": 106, "width_mult": 0.25}, "backbone": lm.state_dict()},
                tmp_path / "lm.pt")
    with pytest.warns(UserWarning, match="crop margin 0.15, crop size 112") as rec:
        m = load_model(tmp_path / "lm.pt")
    assert str(tmp_path / "lm.pt") in str(rec[0].message)
    assert (m.contract.crop_margin, m.contract.crop_size, m.contract.num_points) == (0.15, 112, 106)


def _plain_onnx(path, size=32, out_dim=5, input_name="x", output_name="y"):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, out_dim)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, size, size), str(path), dynamo=False, input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "n"}, output_name: {0: "n"}})
    return path


def test_load_model_bad_inputs_are_data_errors_naming_them(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_model(missing)
    with pytest.raises(DataError, match="no-such-model"):
        load_model("no-such-model")
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(DataError, match=re.escape(str(text)) + ".*unknown kind of model file"):
        load_model(text)
    random_onnx = _plain_onnx(tmp_path / "random.onnx")
    with pytest.raises(DataError, match=re.escape(str(random_onnx)) + ".*without a visrec model contract"):
        load_model(random_onnx)
    bare = tmp_path / "backbone.pth"
    torch.save(build_backbone("mobilefacenet", embedding_size=16).state_dict(), bare)
    with pytest.raises(DataError, match=re.escape(str(bare)) + ".*arch"):
        load_model(bare)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without model.pt"):
        load_model(tmp_path / "empty")


def test_zoo_layout_onnx_and_adapters_declare_their_contracts(tmp_path):
    from visrec.models.loading import adapter_contract, model_contract

    zoo = load_model(_plain_onnx(tmp_path / "w600k_tiny.onnx", size=112, out_dim=8, input_name="data",
                                 output_name="fc1"))
    c = zoo.contract
    assert (c.origin, c.embedding_dim, c.input_size, c.metric, c.align_method, c.align_template) == \
        ("insightface-zoo", 8, (112, 112), "cosine", "lstsq", "arcface-112")
    assert c.pixel_mean == (127.5,) * 3 and c.pixel_std == (127.5,) * 3
    assert zoo.embed(np.zeros((2, 112, 112, 3), np.uint8)).shape == (2, 8)
    dlib = model_contract("dlib-resnet")
    assert (dlib.embedding_dim, dlib.metric, dlib.input_size) == (128, "euclidean", (150, 150))
    assert dlib.threshold.value == -0.6 and dlib.threshold.origin == "author" and "0.6" in dlib.threshold.citation
    assert adapter_contract("dlib-68").num_points == 68
    with pytest.raises(DataError, match="detector"):
        adapter_contract("dlib-hog")


def test_models_info_cli_prints_each_kind(face_run, landmark_run, tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.export import export_checkpoint

    runner = CliRunner()
    onnx_path, _ = export_checkpoint(face_run, tmp_path / "f.onnx", parity=False)
    bare = tmp_path / "backbone.pth"
    torch.save(build_backbone("mobilefacenet").state_dict(), bare)
    cases = [([str(face_run)], ["32", "cosine", "threshold origin", "none", "eyes"]),
             ([str(onnx_path)], ["32", "cosine", "visrec-onnx"]),
             ([str(landmark_run[0])], ["0.25", "96", "jd106"]),
             ([str(bare), "--arch", "mobilefacenet"], ["512", "arcface_torch"]),
             (["dlib-resnet"], ["128", "euclidean", "author", "-0.6"])]
    for args, wanted in cases:
        res = runner.invoke(app, ["models", "info", *args])
        assert res.exit_code == 0, res.output
        for w in wanted:
            assert w in res.output, (args, w, res.output)
    res = runner.invoke(app, ["models", "info", str(tmp_path / "missing.pt")])  # main() prints it, exit 2
    assert isinstance(res.exception, DataError) and "missing.pt" in str(res.exception)


def test_nothing_outside_train_imports_visrec_train_to_read_a_model():
    # they run training (visrec train / finetune, the demo trains its models, a search trains its trials)
    allowed = {"cli.py", "demo.py", "search/study.py"}
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "train" or str(rel) in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"^\s*(from visrec\.train\b|import visrec\.train\b)", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, offenders
    # demo.py imports visrec.train only for the trainer, never to read a model
    demo = (SRC / "demo.py").read_text()
    assert not re.search(r"from visrec\.train\.(checkpoint|landmarks_task) import", demo)


# --- a model file from elsewhere: its contract and config are checked before they are used ------------------

def _mean_pool_onnx(path, contract: dict | None, in_shape=("N", 3, 112, 112), in_type=None, out_dim=3):
    """A tiny ONNX embedder: global mean of each channel times a fixed (3, out_dim) matrix, so its output shows
    exactly which numbers it was fed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    in_type = TensorProto.FLOAT if in_type is None else in_type
    nodes = [] if in_type == TensorProto.FLOAT else [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)]
    src = "x" if in_type == TensorProto.FLOAT else "xf"
    nodes += [helper.make_node("GlobalAveragePool", [src], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("MatMul", ["f", "W"], ["y"])]
    w = numpy_helper.from_array(np.arange(1, 3 * out_dim + 1, dtype=np.float32).reshape(3, out_dim) / 10, "W")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if contract is not None:
        helper.set_model_props(model, {ONNX_KEY: json.dumps(contract)})
    onnx.save(model, str(path))
    return path


def test_onnx_models_are_fed_what_their_contract_declares(tmp_path):
    base = ModelContract(task="face-embedding", input_size=(112, 112), embedding_dim=3, metric="cosine").to_dict()
    crop = np.zeros((1, 112, 112, 3), np.uint8)
    crop[..., 0], crop[..., 1], crop[..., 2] = 200, 50, 10
    w = np.arange(1, 10, dtype=np.float32).reshape(3, 3) / 10
    for changes in ({}, {"colour_order": "BGR"}, {"pixel_mean": [0, 0, 0], "pixel_std": [1, 2, 4]}):
        c = {**base, **changes}
        x = crop[0].astype(np.float32)[..., ::-1 if c.get("colour_order") == "BGR" else 1]
        expected = ((x - np.float32(c["pixel_mean"])) / np.float32(c["pixel_std"])).mean((0, 1)) @ w
        got = load_model(_mean_pool_onnx(tmp_path / "m.onnx", c)).embed(crop)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=str(changes))


def test_an_onnx_contract_that_lies_about_its_graph_is_refused(tmp_path):
    from onnx import TensorProto

    base = ModelContract(task="face-embedding", input_size=(112, 112), embedding_dim=3, metric="cosine").to_dict()
    cases = {
        "dim": (dict(base, embedding_dim=512), {}, "its contract says embedding_dim 512, the graph outputs"),
        "size": (dict(base, input_size=[160, 160]), {}, "says input 160x160, the graph takes 112x112"),
        "zero size": (dict(base, input_size=[0, 0]), {}, "declares no input size"),
        "uint8 input": (base, {"in_type": TensorProto.UINT8}, r"input 'x' is tensor\(uint8\)"),
        "no contract, uint8": (None, {"in_type": TensorProto.UINT8}, r"input 'x' is tensor\(uint8\)"),
        "landmarks": (dict(base, task="landmarks", num_points=5, crop_size=112, crop_margin=0.1), {},
                      "landmark model of 5 points, the graph outputs"),
        "huge input": (dict(base, input_size=[60000, 60000]), {}, r"input_size must be integer\(s\) in \[0, 4096\]"),
        "NaN threshold": (dict(base, threshold={"value": float("nan"), "origin": "author"}), {}, "not JSON|finite"),
        "cosine threshold 7.5": (dict(base, threshold={"value": 7.5, "origin": "author"}), {}, r"\[-1, 1\]"),
        "fpr 2": (dict(base, threshold={"value": 0.3, "origin": "calibrated", "fpr": 2}), {}, r"fpr must be in \(0, 1\]"),
        "std 0": (dict(base, pixel_std=[0, 0, 0]), {}, "pixel_std must be positive"),
        "10 MB text": (dict(base, source="A" * 2_000_000), {}, "characters of JSON, above"),
    }
    for why, (contract, kw, message) in cases.items():
        path = _mean_pool_onnx(tmp_path / "bad.onnx", contract, **kw)
        with pytest.raises(DataError, match=message) as err:
            load_model(path)
        assert "bad.onnx" in str(err.value), why


def test_a_checkpoint_is_checked_against_its_weights_before_its_network_is_built(tmp_path):
    """The network a file's model_config describes is built on the meta device and compared with the saved
    weights first: a 2 KB file cannot make visrec allocate a 2-million-wide embedding layer (4.4 GB before)."""
    import subprocess
    import sys

    config = {"name": "mobilefacenet", "embedding_size": 16, "scale": 1}
    sd = build_backbone(**config).state_dict()
    good = ModelContract(task="face-embedding", input_size=(112, 112), embedding_dim=16, metric="cosine",
                         align_method="lstsq").to_dict()
    cases = {
        "huge": ({"model_config": dict(config, embedding_size=2_000_000), "backbone": {"x": torch.zeros(1)}},
                 "weights do not fit the model"),
        "no name": ({"model_config": {"embedding_size": 16}, "backbone": sd}, "'model_config' must be a mapping"),
        "config text": ({"model_config": "mobilefacenet", "backbone": sd}, "'model_config' must be a mapping"),
        "unknown option": ({"model_config": dict(config, bogus=1), "backbone": sd}, "has no option 'bogus'"),
        "backbone text": ({"model_config": config, "backbone": "x"}, "'backbone' is not a state dict"),
        "other network": ({"model_config": {"name": "iresnet18", "embedding_size": 16}, "backbone": sd},
                          r"weights do not fit the model \(missing"),
        "contract dim": ({"model_config": config, "backbone": sd, "contract": dict(good, embedding_dim=999)},
                         "its contract says embedding_dim 999, the network outputs 16"),
        "contract task": ({"model_config": config, "backbone": sd, "contract": dict(good, task="landmarks")},
                          "its contract says task 'landmarks'"),
    }
    for why, (blob, message) in cases.items():
        torch.save(blob, tmp_path / "model.pt")
        with pytest.raises(DataError, match=message) as err:
            load_model(tmp_path / "model.pt")
        assert "model.pt" in str(err.value), why
    torch.save({"model_config": config, "backbone": sd, "contract": good}, tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt").embed(np.zeros((2, 112, 112, 3), np.uint8)).shape == (2, 16)
    with pytest.raises(DataError, match="records its own architecture"):  # not silently ignored
        load_model(tmp_path / "model.pt", arch="iresnet50")
    torch.save(cases["huge"][0], tmp_path / "huge.pt")
    # the peak RSS the load adds, in a fresh process: its baseline is a good model's load (imports, one network)
    probe = ("import resource, sys, visrec\n"
             "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
             "visrec.load_model(sys.argv[2])\nbefore = peak()\n"
             "try:\n    visrec.load_model(sys.argv[1])\nexcept visrec.errors.DataError as e:\n    print(e)\n"
             "print(peak() - before)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "huge.pt"), str(tmp_path / "model.pt")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = out.stdout.strip().splitlines()
    assert "weights do not fit" in out.stdout and int(lines[-1]) < 300, out.stdout + out.stderr  # MiB added


def test_a_16_bit_grey_pil_image_gives_the_pixels_its_file_gives():
    import io

    from PIL import Image

    from visrec.faces.images import load_image

    grey = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    im = Image.open(io.BytesIO(buf.getvalue()))
    assert im.mode.startswith("I;16")
    from_file, from_pil = load_image(buf.getvalue()), load_image(im)
    np.testing.assert_array_equal(from_pil, from_file)
    assert from_pil.max() > 200 and from_pil.min() < 10  # not clipped to white
