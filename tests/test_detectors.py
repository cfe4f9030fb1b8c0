"""Face detectors (visrec.faces.detectors): SCRFD and YuNet decoding checked on tiny ONNX files that have the
real models' input/output names and shapes but ignore the pixels and emit constant tensors encoding known
faces; the Haar cascade on synthetic images; load_detector's format sniffing and errors; nms by hand."""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from visrec.faces.detectors import (Detection, HaarDetector, ScrfdDetector, YunetDetector, load_detector,
                                   nms)
from visrec.errors import DataError, VisrecError

# A non-square image (width 480, height 300): the letterbox scale is canvas_width / 480 and the canvas rows
# below 300 * scale are padding. Faces are written in canvas pixels and expected at canvas / scale.
IMG_W, IMG_H = 480, 300
IMAGE = np.full((IMG_H, IMG_W, 3), 128, np.uint8)


def _export(path, outputs: dict, input_name: str, canvas: int, dynamic: bool):
    """An ONNX file with input (1, 3, canvas, canvas) (or dynamic H, W) whose outputs are `outputs`."""
    torch = pytest.importorskip("torch")

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, value in enumerate(outputs.values()):
                self.register_buffer(f"out{i}", torch.from_numpy(np.ascontiguousarray(value, np.float32)))

        def forward(self, x):
            zero = x.mean() * 0  # keeps the input in the graph; the output does not depend on it
            return tuple(getattr(self, f"out{i}") + zero for i in range(len(outputs)))

    axes = {input_name: {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Constant(), torch.zeros(1, 3, canvas, canvas), str(path), dynamo=False,
                          input_names=[input_name], output_names=list(outputs), dynamic_axes=axes)
    return path


class _Spy:
    """Wraps an onnxruntime session and records what it was fed (the models ignore their input)."""

    def __init__(self, session):
        self.session, self.feeds = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, names, feed):
        self.feeds.append(feed)
        return self.session.run(names, feed)


# red 200, green 100, blue 50: shows which channel order reaches the network
COLOUR = np.empty((IMG_H, IMG_W, 3), np.uint8)
COLOUR[:] = (200, 100, 50)


# ----------------------------------------------------------------------------------------------- SCRFD
# (stride, row, column, anchor, score, distances l t r b, 5 keypoint offsets), distances in strides
SCRFD_FACES = [
    (16, 10, 12, 1, 0.9, (2.0, 2.5, 2.25, 3.0), ((-1, -1), (1, -1), (0, 0.5), (-0.75, 1.5), (0.75, 1.5))),
    # the same location's other anchor, nearly the same box, lower score: NMS merges it into the first
    (16, 10, 12, 0, 0.7, (2.1, 2.5, 2.25, 3.0), ((-1, -1), (1, -1), (0, 0.5), (-0.75, 1.5), (0.75, 1.5))),
    (32, 2, 7, 0, 0.6, (1.0, 1.0, 1.0, 1.5), ((-0.5, -0.5), (0.5, -0.5), (0, 0), (-0.4, 0.6), (0.4, 0.6))),
    (8, 30, 5, 1, 0.3, (1.0, 1.0, 1.0, 1.0), ((0, 0),) * 5),  # below the default threshold 0.5
]


def _scrfd_outputs(canvas: int, batched: bool) -> dict:
    scores, boxes, kps = {}, {}, {}
    for s in (8, 16, 32):
        n = (canvas // s) ** 2 * 2
        scores[s], boxes[s], kps[s] = np.zeros((n, 1)), np.zeros((n, 4)), np.zeros((n, 10))
    for s, r, c, a, score, dist, offsets in SCRFD_FACES:
        i = (r * (canvas // s) + c) * 2 + a  # row-major grid, the 2 anchors of a location adjacent
        scores[s][i], boxes[s][i], kps[s][i] = score, dist, np.ravel(offsets)
    out = {f"score_{s}": scores[s] for s in (8, 16, 32)}
    out |= {f"bbox_{s}": boxes[s] for s in (8, 16, 32)}
    out |= {f"kps_{s}": kps[s] for s in (8, 16, 32)}
    return {k: (v[None] if batched else v) for k, v in out.items()}


def _scrfd_expected(face, scale):
    s, r, c, _, score, (l, t, rr, b), offsets = face
    cx, cy = c * s, r * s  # SCRFD anchor centres sit on the grid points, not the cell centres
    box = np.array([cx - l * s, cy - t * s, cx + rr * s, cy + b * s]) / scale
    points = (np.array([cx, cy]) + np.array(offsets) * s) / scale
    return box, score, points


@pytest.fixture(scope="module")
def scrfd_files(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    d = tmp_path_factory.mktemp("scrfd")
    # like a batched re-export with a fixed 640x640 input, and like det_10g (dynamic input, (N, C) outputs)
    return {"fixed": _export(d / "scrfd_fixed.onnx", _scrfd_outputs(640, True), "input.1", 640, False),
            "dynamic": _export(d / "det_dynamic.onnx", _scrfd_outputs(320, False), "input.1", 320, True)}


@pytest.mark.parametrize("kind, kwargs, scale", [("fixed", {}, 640 / IMG_W),
                                                 ("dynamic", {"input_size": (320, 320)}, 320 / IMG_W)])
def test_scrfd_decodes_known_faces_into_original_pixels(scrfd_files, kind, kwargs, scale):
    det = ScrfdDetector(scrfd_files[kind], **kwargs)
    found = det(IMAGE)
    assert [type(f) for f in found] == [Detection, Detection]  # the 2nd anchor merged, the 0.3 one dropped
    for f, face in zip(found, [SCRFD_FACES[0], SCRFD_FACES[2]]):
        box, score, points = _scrfd_expected(face, scale)
        assert f.box.dtype == np.float32 and f.box.shape == (4,)
        assert f.points.dtype == np.float32 and f.points.shape == (5, 2)
        np.testing.assert_allclose(f.box, box, atol=1e-3)
        np.testing.assert_allclose(f.points, points, atol=1e-3)
        assert f.score == pytest.approx(score)
    # the first face worked out by hand: centre (192, 160) in the 640 canvas, scale 4/3
    if kind == "fixed":
        np.testing.assert_allclose(found[0].box, [120, 90, 171, 156], atol=1e-3)
        np.testing.assert_allclose(found[0].points[0], [132, 108], atol=1e-3)


def test_scrfd_thresholds_and_order(scrfd_files):
    low = ScrfdDetector(scrfd_files["fixed"], score_threshold=0.2)
    assert [round(f.score, 3) for f in low(IMAGE)] == [0.9, 0.6, 0.3]
    no_nms = ScrfdDetector(scrfd_files["fixed"], nms_threshold=1.0)  # nothing is suppressed
    assert [round(f.score, 3) for f in no_nms(IMAGE)] == [0.9, 0.7, 0.6]
    assert ScrfdDetector(scrfd_files["fixed"], score_threshold=0.95)(IMAGE) == []


def test_scrfd_preprocessing(scrfd_files):
    det = ScrfdDetector(scrfd_files["fixed"])
    det.session = spy = _Spy(det.session)
    det(COLOUR)
    (blob,) = spy.feeds[0].values()
    assert list(spy.feeds[0]) == ["input.1"] and blob.shape == (1, 3, 640, 640) and blob.dtype == np.float32
    # RGB, (x - 127.5) / 128, the resized image (640x400) top-left, black (0 -> -127.5 / 128) below it
    for channel, value in enumerate((200, 100, 50)):
        np.testing.assert_allclose(blob[0, channel, :400], (value - 127.5) / 128, atol=1e-6)
    np.testing.assert_allclose(blob[0, :, 400:], -127.5 / 128, atol=1e-6)


def test_scrfd_rejects_a_mismatched_input_size(scrfd_files):
    # the dynamic file's constant outputs are sized for a 320x320 input
    with pytest.raises(VisrecError, match=r"stride 8 output has float32 \[3200, 1\], expected 12800 rows"):
        ScrfdDetector(scrfd_files["dynamic"], input_size=(640, 640))(IMAGE)


# ----------------------------------------------------------------------------------------------- YuNet
# (stride, row, column, cls, obj, bbox (dx, dy, log w, log h) in cells/strides, kps offsets in cells)
YUNET_FACES = [
    (16, 6, 9, 0.81, 1.0, (0.25, 0.5, math.log(4), math.log(5)),
     ((-0.6, -0.7), (0.6, -0.7), (0.25, 0.5), (-0.5, 1.5), (1.0, 1.5))),
    (16, 6, 10, 0.64, 1.0, (0.25, 0.5, math.log(4), math.log(5)), ((0, 0),) * 5),  # overlaps: NMS drops it
    (32, 1, 2, 1.5, 0.49, (0.5, 0.5, 0.0, 0.0), ((0.5, 0.5),) * 5),  # cls clamped to 1: score sqrt(0.49)
    (8, 30, 30, 0.25, 1.0, (0.5, 0.5, 0.0, 0.0), ((0, 0),) * 5),  # score 0.5 < 0.6
]
YUNET_KEPT = [(YUNET_FACES[0], 0.9), (YUNET_FACES[2], 0.7)]


def _yunet_outputs(canvas: int) -> dict:
    out = {}
    for part, width in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            out[f"{part}_{s}"] = np.zeros((1, (canvas // s) ** 2, width))  # (1, N, C) as in the 2023mar file
    for s, r, c, cls, obj, bbox, offsets in YUNET_FACES:
        i = r * (canvas // s) + c
        out[f"cls_{s}"][0, i], out[f"obj_{s}"][0, i] = cls, obj
        out[f"bbox_{s}"][0, i], out[f"kps_{s}"][0, i] = bbox, np.ravel(offsets)
    return out


def _yunet_expected(face, scale):
    s, r, c, _, _, (dx, dy, lw, lh), offsets = face
    cx, cy, w, h = (c + dx) * s, (r + dy) * s, math.exp(lw) * s, math.exp(lh) * s
    box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) / scale
    points = (np.array([c, r]) + np.array(offsets)) * s / scale
    return box, points


@pytest.fixture(scope="module")
def yunet_files(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    d = tmp_path_factory.mktemp("yunet")
    return {"fixed": _export(d / "yunet_fixed.onnx", _yunet_outputs(640), "input", 640, False),
            "dynamic": _export(d / "yunet_dynamic.onnx", _yunet_outputs(320), "input", 320, True)}


@pytest.mark.parametrize("kind, scale", [("fixed", 640 / IMG_W), ("dynamic", 320 / IMG_W)])
def test_yunet_decodes_known_faces_into_original_pixels(yunet_files, kind, scale):
    det = YunetDetector(yunet_files[kind])  # default input_size (320, 320); the fixed file forces 640
    assert det.input_size == ((640, 640) if kind == "fixed" else (320, 320))
    found = det(IMAGE)
    assert len(found) == 2
    for f, (face, score) in zip(found, YUNET_KEPT):
        box, points = _yunet_expected(face, scale)
        assert f.box.dtype == np.float32 and f.points.shape == (5, 2)
        np.testing.assert_allclose(f.box, box, atol=1e-3)
        np.testing.assert_allclose(f.points, points, atol=1e-3)
        assert f.score == pytest.approx(score, abs=1e-6)
    if kind == "dynamic":  # by hand: centre (148, 104), 64x80 in the 320 canvas, scale 2/3
        np.testing.assert_allclose(found[0].box, [174, 96, 270, 216], atol=1e-3)


def test_yunet_thresholds(yunet_files):
    scores = [round(f.score, 3) for f in YunetDetector(yunet_files["dynamic"], score_threshold=0.4)(IMAGE)]
    assert scores == [0.9, 0.7, 0.5]
    scores = [round(f.score, 3) for f in YunetDetector(yunet_files["dynamic"], nms_threshold=0.99)(IMAGE)]
    assert scores == [0.9, 0.8, 0.7]


def test_yunet_preprocessing_pads_to_32_and_scales_each_axis(yunet_files):
    det = YunetDetector(yunet_files["dynamic"], input_size=(300, 300))
    det.session = spy = _Spy(det.session)
    found = det(COLOUR)
    (blob,) = spy.feeds[0].values()
    assert list(spy.feeds[0]) == ["input"] and blob.shape == (1, 3, 320, 320)  # 300 padded up to 320
    # 480x300 -> 300x188 (187.5 rounded): BGR, raw 0-255, zero padding right and below
    for channel, value in enumerate((50, 100, 200)):
        np.testing.assert_array_equal(blob[0, channel, :188, :300], value)
    assert not blob[0, :, 188:].any() and not blob[0, :, :, 300:].any()
    box, points = _yunet_expected(YUNET_FACES[0], 1.0)
    scale = np.array([300 / 480, 188 / 300])  # x and y factors differ by the rounding
    np.testing.assert_allclose(found[0].box, box / np.tile(scale, 2), atol=1e-3)
    np.testing.assert_allclose(found[0].points, points / scale, atol=1e-3)


# --------------------------------------------------------------------------------------- load_detector
def test_load_detector_picks_the_format(scrfd_files, yunet_files, tmp_path):
    assert isinstance(load_detector(str(scrfd_files["fixed"])), ScrfdDetector)
    assert isinstance(load_detector(yunet_files["fixed"]), YunetDetector)
    det = load_detector(scrfd_files["dynamic"], input_size=(320, 320), score_threshold=0.2)
    assert isinstance(det, ScrfdDetector) and len(det(IMAGE)) == 3
    assert isinstance(load_detector(f"yunet:{yunet_files['dynamic']}"), YunetDetector)
    assert isinstance(load_detector(f"scrfd:{scrfd_files['fixed']}"), ScrfdDetector)
    with pytest.raises(VisrecError, match="not a YuNet model"):
        load_detector(f"yunet:{scrfd_files['fixed']}")
    with pytest.raises(VisrecError, match="not an SCRFD model"):
        load_detector(f"scrfd:{yunet_files['fixed']}")


def test_load_detector_errors(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    other = _export(tmp_path / "embedder.onnx", {"embedding": np.zeros((1, 512))}, "input", 112, False)
    with pytest.raises(VisrecError, match=r"embedder\.onnx.*neither.*embedding\[1, 512\]"):
        load_detector(other)
    missing = tmp_path / "nope.onnx"
    for spec in (missing, f"scrfd:{missing}", f"yunet:{missing}"):
        with pytest.raises(DataError) as err:
            load_detector(spec)
        assert err.value.path == str(missing)
    with pytest.raises(VisrecError, match="unknown face detector"):
        load_detector("retinaface")
    assert isinstance(load_detector("haar"), HaarDetector)


# ------------------------------------------------------------------------------------------------ Haar
def test_haar_finds_no_face_on_flat_grey():
    assert HaarDetector()(np.full((240, 320, 3), 128, np.uint8)) == []


def test_haar_on_a_synthetic_face():
    import cv2

    from visrec.data.synth import render_face

    # identity 24 is one the cascade finds with OpenCV 4.x here; other versions may find none
    face, _ = render_face(24, np.random.default_rng(0), difficulty=0.1)
    image = np.full((400, 480, 3), 128, np.uint8)
    image[32:368, 72:408] = cv2.resize(face, (336, 336), interpolation=cv2.INTER_LINEAR)
    found = HaarDetector(min_size=60)(image)
    # a cartoon face need not fool the cascade: check the documented form of whatever it returns
    for f in found:
        assert isinstance(f, Detection) and f.points is None
        assert f.box.dtype == np.float32 and f.box.shape == (4,)
        assert f.box[2] - f.box[0] >= 60 and f.box[3] - f.box[1] >= 60
        assert 0 < f.score <= 1
    assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
    if found:
        assert found[0].score == 1.0
        x1, y1, x2, y2 = found[0].box
        assert 0 <= x1 < x2 <= 480 and 0 <= y1 < y2 <= 400


def test_haar_boxes_scores_and_order():
    class FakeCascade:  # what detectMultiScale returns: int (x, y, w, h) rows
        def detectMultiScale(self, gray, scale_factor, min_neighbors, minSize):
            assert gray.ndim == 2 and (scale_factor, min_neighbors, minSize) == (1.1, 5, (40, 40))
            return np.array([[10, 20, 40, 40], [100, 50, 80, 60]], np.int32)

    det = HaarDetector()
    det.cascade = FakeCascade()
    found = det(np.zeros((200, 300, 3), np.uint8))
    assert [f.box.tolist() for f in found] == [[100, 50, 180, 110], [10, 20, 50, 60]]  # largest first
    assert [f.score for f in found] == [1.0, pytest.approx(1600 / 4800)]
    assert all(f.box.dtype == np.float32 and f.points is None for f in found)


def test_detectors_reject_non_rgb_input():
    with pytest.raises(VisrecError, match="RGB uint8"):
        HaarDetector()(np.zeros((50, 50), np.uint8))


# ------------------------------------------------------------------------------------------------- nms
def test_nms_by_hand():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.8, 0.9, 0.7])
    # IoU(0, 1) = 50 / 150 = 1/3; box 2 overlaps nothing
    assert nms(boxes, scores, 0.34).tolist() == [1, 0, 2]
    assert nms(boxes, scores, 0.33).tolist() == [1, 2]
    assert nms(boxes, scores, 0.0).tolist() == [1, 2]
    same = np.array([[0, 0, 4, 4], [0, 0, 4, 4]])
    assert nms(same, [0.5, 0.5], 0.5).tolist() == [0]  # equal scores: the first wins
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).dtype == np.int64


def test_module_imports_without_onnxruntime_or_cv2():
    code = ("import sys; sys.modules['onnxruntime'] = None; import visrec.faces.detectors; "
            "assert 'cv2' not in sys.modules, 'cv2 imported at module load'")
    subprocess.run([sys.executable, "-c", code], check=True)
