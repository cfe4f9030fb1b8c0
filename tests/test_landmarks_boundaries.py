"""Input boundaries of the landmark evaluation, submission and ``visrec landmarks``: a model whose points are in
another order, non-finite or absurd predictions, a stale or foreign submission folder, a box off the image, point
counts without a scheme, degenerate ground truth and bad NMEs are visrec errors naming what is at fault."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import save_tiny_landmark_model
from visrec.data.landmark_crops import JDCrops
from visrec.data.landmarks import read_landmark_txt, write_landmark_txt, write_submission_txt
from visrec.data.schemes import get_scheme
from visrec.data.synth import write_synthetic_jd
from visrec.errors import ConfigError, DataError, VisrecError
from visrec.evaluate.landmark_report import landmark_metrics, write_submission
from visrec.evaluate.landmarks import auc, ced_curve, failure_rate, nme
from visrec.faces.evaluation import evaluate_landmarks
from visrec.models.contract import contract_from_config

CFG = {"name": "pfld", "num_points": 106, "width_mult": 0.25}


def _model(folder: Path, *, scheme: str | None = None) -> Path:
    """The tiny PFLD as ``folder/model.pt`` with its contract; ``scheme``: the contract names that point order."""
    folder.mkdir(parents=True, exist_ok=True)
    net = save_tiny_landmark_model(folder)
    ckpt = {"model_config": CFG, "backbone": net.state_dict()}
    ckpt["contract"] = contract_from_config(CFG).to_dict()
    if scheme:
        ckpt["contract"]["point_scheme"] = scheme
    torch.save(ckpt, folder / "model.pt")
    return folder / "model.pt"


@pytest.fixture(scope="module")
def jd(tmp_path_factory):
    return write_synthetic_jd(tmp_path_factory.mktemp("jd") / "val", 3, seed=2)


def test_a_model_in_another_point_order_is_refused_before_it_runs(tmp_path, jd):
    model = _model(tmp_path / "m", scheme="insightface_2d106")
    with pytest.raises(DataError, match="insightface_2d106.*jd106") as err:
        evaluate_landmarks(model, jd, tmp_path / "out")
    assert err.value.path == str(model) and not (tmp_path / "out").exists()


def test_a_point_count_other_than_the_models_is_refused_naming_model_and_data(tmp_path, jd):
    model = _model(tmp_path / "m")
    with pytest.raises(DataError, match=f"106 points; 68 .*{jd}") as err:
        evaluate_landmarks(model, jd, tmp_path / "out", points=68)
    assert err.value.path == str(model)


def _nan_onnx(path: Path) -> Path:
    """A 106-point landmark ONNX file (finite weights, visrec contract) whose graph answers 0 / 0 = NaN."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from visrec.models.contract import ONNX_KEY

    inits = [numpy_helper.from_array(np.full((3, 212), 0.1, np.float32), "W"),
             numpy_helper.from_array(np.array([0, -1, 2], np.int64), "shape")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["m"]), helper.make_node("Sub", ["m", "m"], ["z"]),
             helper.make_node("Div", ["z", "z"], ["n"]), helper.make_node("Reshape", ["n", "shape"], ["points"])]
    graph = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["b", 3, 112, 112])],
                              [helper.make_tensor_value_info("points", TensorProto.FLOAT, ["b", 106, 2])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    helper.set_model_props(m, {ONNX_KEY: contract_from_config(CFG).to_json()})
    onnx.save(m, path)
    return path


def test_nan_predictions_of_a_torch_model_are_a_data_error_naming_it(tmp_path):
    from visrec.models.loading import load_model

    loaded = load_model(_model(tmp_path / "m"))
    loaded.module = lambda x: torch.full((len(x), 106, 2), float("nan"))
    for call in (lambda: loaded.predict_crops(np.zeros((2, 3, 112, 112), np.float32)),
                 lambda: loaded.predict(np.zeros((64, 64, 3), np.uint8), (4, 4, 60, 60))):
        with pytest.raises(DataError, match="NaN") as err:
            call()
        assert "model.pt" in str(err.value.path)


def test_a_landmark_graph_answering_no_point_pairs_is_named(tmp_path):
    """The ONNX answer was reshaped to (crops, -1, 2): an odd number of values was a bare ValueError."""
    from visrec.models.loading import load_model

    model = _nan_onnx(tmp_path / "m.onnx")
    loaded = load_model(model)
    loaded.onnx = lambda x: np.zeros((len(x), 7), np.float32)
    with pytest.raises(DataError, match=r"answered \[2, 7\] for 2 crops") as err:
        loaded.predict_crops(np.zeros((2, 3, 112, 112), np.float32))
    assert err.value.path == str(model)


def test_nan_predictions_are_a_data_error_naming_the_model(tmp_path, jd):
    from visrec.cli import app

    model = _nan_onnx(tmp_path / "nan.onnx")
    with pytest.raises(DataError, match="NaN") as err:
        evaluate_landmarks(model, jd, tmp_path / "out")
    assert err.value.path == str(model)
    image = sorted((jd / "picture").iterdir())[0]
    res = CliRunner().invoke(app, ["landmarks", str(image), "--model", str(model), "--out", str(tmp_path / "o.png")])
    assert isinstance(res.exception, DataError) and "NaN" in str(res.exception), res.output
    assert not (tmp_path / "o.png").exists()


def test_integer_submission_lines_never_wrap(tmp_path):
    with pytest.raises(DataError, match="point 1") as err:
        write_submission_txt(tmp_path / "a.jpg.txt", np.array([[1.0, 2.0], [1e19, 0.0]]))
    assert err.value.record == "point 1" and not (tmp_path / "a.jpg.txt").exists()


def test_submission_refuses_points_far_outside_the_picture_and_writes_nothing(tmp_path, jd):
    ds = JDCrops(jd, 106, 112, 0.15, augment=False)
    pred = np.full((len(ds), 106, 2), 56.0)
    pred[1, 7] = 1e30
    with pytest.raises(DataError, match="point 7") as err:
        write_submission(tmp_path / "sub", ds, pred)
    assert err.value.path == str(ds.paths[1]) and err.value.record == "point 7"
    assert list(tmp_path.iterdir()) == []  # no submission, no temporary folder


def test_submission_folder_is_replaced_whole_and_foreign_files_are_kept(tmp_path, jd):
    ds = JDCrops(jd, 106, 112, 0.15, augment=False)
    pred = np.stack([ds[i][1].numpy() for i in range(len(ds))]) * 112
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "old.jpg.txt").write_text("106\n")  # a stale prediction of an earlier, larger run
    write_submission(sub, ds, pred)
    assert sorted(p.name for p in sub.iterdir()) == sorted(f"{Path(p).name}.txt" for p in ds.paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    (sub / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="not a submission") as err:
        write_submission(sub, ds, pred)
    assert err.value.path == str(sub / "notes.md") and (sub / "notes.md").read_text() == "mine"


def test_a_file_named_submission_is_refused_before_the_model_loads(tmp_path, jd):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "submission").write_text("mine")
    with pytest.raises(DataError, match="must be a folder") as err:  # the model does not even exist
        evaluate_landmarks(tmp_path / "missing.pt", jd, tmp_path / "out")
    assert err.value.path == str(tmp_path / "out" / "submission")


def test_box_off_the_image_is_refused_and_far_points_are_not_drawn(tmp_path, jd, monkeypatch):
    from visrec.cli import app
    from visrec.models import loading

    model = _model(tmp_path / "m")
    image = sorted((jd / "picture").iterdir())[0]
    run = CliRunner().invoke
    for box in ("5000,5000,5100,5100", "0,0,1e12,1e12"):
        res = run(app, ["landmarks", str(image), "--model", str(model), f"--box={box}", "--out",
                        str(tmp_path / "o.png")])
        assert isinstance(res.exception, DataError) and "--box" in str(res.exception), res.output
    monkeypatch.setattr(loading.TorchModel, "predict", lambda self, img, box: np.full((106, 2), 1e30, np.float32))
    res = run(app, ["landmarks", str(image), "--model", str(model), "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    assert "106 of 106 points lie outside" in res.output and (tmp_path / "o.png").exists()


def test_crops_of_any_point_count_need_a_scheme_only_to_flip(tmp_path, jd):
    import shutil

    root = tmp_path / "d7"
    shutil.copytree(jd, root)
    for f in (root / "landmark").iterdir():
        write_landmark_txt(f, read_landmark_txt(f)[:7])
    assert len(JDCrops(root, 7, 112, 0.15, augment=False)) == 3
    with pytest.raises(ConfigError, match="no landmark scheme 7"):
        JDCrops(root, 7, 112, 0.15, augment=True)
    with pytest.raises(KeyError):  # still a KeyError for callers that look schemes up
        get_scheme(7)


def test_zero_normaliser_names_the_faces_ground_truth_file(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.uniform(10, 100, (3, 106, 2))
    gt[1, 61] = gt[1, 52]  # coincident outer eye corners: no inter-ocular distance
    with pytest.raises(DataError, match="inter_ocular") as err:
        landmark_metrics(gt + 1, gt, sources=["a.txt", "b.txt", "c.txt"])
    assert err.value.path == "b.txt" and err.value.record == "face 1"
    gt[2, :, 1] = 5.0  # points on a line: no area
    with pytest.raises(DataError, match="sqrt_area") as err:
        nme(gt + 1, gt, "sqrt_area", sources=["a.txt", "b.txt", "c.txt"])
    assert err.value.path == "c.txt"


@pytest.mark.parametrize("call", [lambda: failure_rate([np.nan, 0.01]), lambda: auc([np.nan, 0.01]),
                                  lambda: auc([-0.5]), lambda: auc([0.01], alpha=0), lambda: auc([0.01], alpha=-1),
                                  lambda: ced_curve([np.inf]), lambda: failure_rate([0.01], alpha=np.nan)])
def test_metrics_refuse_nmes_that_are_no_nme(call):
    with pytest.raises(VisrecError, match="NME|alpha"):
        call()
