"""Face detectors behind one interface: ``det(image) -> list[Detection]``, best score first.

Three back ends:

* ``HaarDetector``  OpenCV's bundled frontal-face Haar cascade; boxes only.
* ``ScrfdDetector`` InsightFace SCRFD ONNX models (``det_10g.onnx``, ``scrfd_*_kps.onnx``); box + 5 points.
* ``YunetDetector`` OpenCV Zoo YuNet ONNX (``face_detection_yunet_2023mar.onnx``); box + 5 points.

``load_detector("haar" | "dlib-hog" | "dlib-cnn" | "scrfd:PATH" | "yunet:PATH" | "PATH.onnx")`` picks one; a
bare ``.onnx`` path is recognised from its output names and count. ``ScaledDetector`` runs any of them on a
copy scaled to a longest side of ``detect_size`` pixels (640 by default in the face pipeline and in
``visrec data prepare faces``) and maps what it finds back.

Conventions (all detectors): the input is an RGB uint8 array of shape (H, W, 3). Coordinates are float32
pixels of that input image, origin top-left, x to the right, y down. Boxes are ``x1, y1, x2, y2`` and may
extend past the image border (nothing is clipped, as in the reference implementations). The five points
are, in order: left eye, right eye, nose tip, left mouth corner, right mouth corner, where "left" means
image left (the subject's right eye comes first) - the order of InsightFace and of ``visrec.faces.align``,
so ``Detection.points`` can be passed to ``align`` unchanged. YuNet documents the same order under the
subject's names ("right eye, left eye, nose tip, right mouth corner, left mouth corner").

onnxruntime is optional (``pip install 'visrec[export]'``) and cv2 is imported only when a detector runs,
so importing this module is cheap.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec._onnx import open_session
from visrec.errors import DataError, VisrecError
from visrec.registry import Registry

__all__ = ["DETECT_SIZE", "Detection", "HaarDetector", "ScaledDetector", "ScrfdDetector", "YunetDetector",
           "load_detector", "nms"]

YUNET_OUTPUTS = ("cls_8", "cls_16", "cls_32", "obj_8", "obj_16", "obj_32",
                 "bbox_8", "bbox_16", "bbox_32", "kps_8", "kps_16", "kps_32")
YUNET_STRIDES = (8, 16, 32)
# SCRFD output count -> (strides, anchors per grid location, has keypoints). The outputs come as all
# score tensors, then all box tensors, then (with keypoints) all keypoint tensors, each group by stride.
SCRFD_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


@dataclass
class Detection:
    """One face. ``box``: float32 (4,) ``x1, y1, x2, y2`` in input-image pixels. ``score``: higher is more
    confident (its scale depends on the detector). ``points``: float32 (5, 2) ``x, y`` of left eye, right
    eye, nose, left mouth corner, right mouth corner (left = image left), or None when the detector gives
    no points."""

    box: np.ndarray
    score: float
    points: np.ndarray | None = None


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression. ``boxes`` (N, 4) ``x1, y1, x2, y2``; returns the int64 indices of
    the kept boxes, highest score first. A box is dropped when its IoU with an already kept box exceeds
    ``threshold``. Areas are continuous (``(x2 - x1) * (y2 - y1)``, no ``+1``; InsightFace adds 1 pixel,
    which only matters for boxes a few pixels wide)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")  # stable: equal scores keep their input order
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= threshold]
    return np.asarray(keep, np.int64)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise VisrecError(f"face detectors take an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml`` from ``cv2.data``).

    Runs on the histogram-equalised grayscale image with ``detectMultiScale(gray, 1.1, 5, minSize)``;
    ``min_size`` is the smallest face side in pixels. Gives no points. The cascade has no confidence, so
    ``score`` is the box area relative to the largest box found in the same image (the largest face scores
    1.0): results are largest first, and scores cannot be compared across images. Thread-safe (a
    ``CascadeClassifier`` must not run in two threads at once, so calls are serialised).
    """

    def __init__(self, min_size: int = 40):
        import cv2

        # opencv-python wheels ship the cascades as cv2.data.haarcascades; OpenCV 5 builds may not
        folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = Path(folder or "cv2.data.haarcascades") / "haarcascade_frontalface_default.xml"
        if folder is None or not path.is_file():
            raise VisrecError(f"OpenCV ships no Haar cascade at {path}: install opencv-python-headless<5")
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise DataError("OpenCV cannot read this Haar cascade", path=path)
        self.min_size = int(min_size)
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> list[Detection]:
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(_check_image(image), cv2.COLOR_RGB2GRAY))
        with self._lock:
            found = self.cascade.detectMultiScale(gray, 1.1, 5, minSize=(self.min_size, self.min_size))
        if len(found) == 0:
            return []
        xywh = np.asarray(found, np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        areas = xywh[:, 2] * xywh[:, 3]
        order = np.argsort(-areas, kind="stable")
        return [Detection(boxes[i].copy(), float(areas[i] / areas[order[0]]), None) for i in order]


MAX_COORD = 1e6  # canvas pixels: a box or point beyond it is no face of any image (as visrec.evaluate.ijb)
MAX_STRIDE = 128  # the largest stride of any layout here (5-stride SCRFD): a canvas is padded to at most this


def sizing_hw(input_size: Sequence[int]) -> tuple[int, int] | None:
    """The (height, width) at which :func:`visrec._onnx.open_session` sizes a detector graph whose input
    height and width are free: ``input_size`` (width, height) rounded up to a multiple of :data:`MAX_STRIDE`,
    at least the canvas any layout pads it to. None for a size that is not two positive integers (the
    detector's own check names it)."""
    try:
        w, h = (int(v) for v in input_size)
    except (TypeError, ValueError):
        return None
    if w <= 0 or h <= 0:
        return None
    return -(-h // MAX_STRIDE) * MAX_STRIDE, -(-w // MAX_STRIDE) * MAX_STRIDE


class _OnnxDetector:
    """Shared part of the ONNX detectors: the onnxruntime session, the letterbox and the final NMS.

    The image is resized keeping its aspect ratio to fit ``input_size`` (width, height), placed at the
    top-left of a zero (black) canvas, and the canvas is padded right/bottom to a multiple of the largest
    stride. A model file that fixes its input height and width wins over ``input_size``: onnxruntime
    rejects any other shape. Outputs are mapped back by dividing x and y by the resize factors.
    Thread-safe: an onnxruntime session may run in several threads, and calls keep no other state.
    The subclasses take ``providers`` (onnxruntime execution providers: a choice of :mod:`visrec._onnx`, ``cpu``
    by default, ``cuda``, ``tensorrt``, ``auto``, or provider names) and ``session``
    (an already open session of ``path``: ``load_detector`` passes the one it inspected).
    """

    strides: tuple[int, ...] = ()

    def __init__(self, path: Path, session, input_size: Sequence[int], score_threshold: float,
                 nms_threshold: float):
        self.path = path
        self.session = session
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = list(inp.shape)
        # what is fixed in the file is checked here; a free axis the graph cannot take fails at the first run
        # (_run), with the same kind of error
        if len(shape) != 4 or (isinstance(shape[0], int) and shape[0] != 1) or \
                (isinstance(shape[1], int) and shape[1] != 3) or inp.type != "tensor(float)":
            raise DataError(f"a face detector takes one float32 NCHW image input (batch 1, 3 channels), input "
                            f"{inp.name!r} is {inp.type} {shape}", path=self.path)
        if isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0 and shape[3] > 0:
            # fixed-shape export: letterbox straight into it (no extra padding, onnxruntime would refuse)
            self.input_size = (shape[3], shape[2])
            self.canvas_size = self.input_size
        else:
            w, h = (int(v) for v in input_size)
            if w <= 0 or h <= 0:
                raise VisrecError(f"input_size must be (width, height) > 0, got {tuple(input_size)}")
            m = max(self.strides)
            self.input_size = (w, h)
            self.canvas_size = (-(-w // m) * m, -(-h // m) * m)

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """RGB uint8 canvas (canvas_h, canvas_w, 3) and the x, y resize factors (canvas px per image px)."""
        import cv2

        h, w = image.shape[:2]
        tw, th = self.input_size
        s = min(tw / w, th / h)
        nw, nh = min(tw, max(1, round(w * s))), min(th, max(1, round(h * s)))
        canvas = np.zeros((self.canvas_size[1], self.canvas_size[0], 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(image, (nw, nh)) if (nw, nh) != (w, h) else image
        # per-axis factors: the rounded size is what cv2.resize really did to each axis
        return canvas, nw / w, nh / h

    def _run(self, blob: np.ndarray) -> list[np.ndarray]:
        """The session's outputs for one NCHW blob; onnxruntime's refusal (a free input axis the graph cannot
        take) is a DataError naming the file."""
        try:
            return self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})  # by position
        except Exception as exc:  # onnxruntime's own exception types
            raise DataError(f"onnxruntime cannot run it on a {list(blob.shape)} image: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                            path=self.path) from None

    def _output(self, value, name: str, stride: int, rows: int, width: int, canvas) -> np.ndarray:
        """Output ``name`` of ``stride`` as float32 (rows, width): batched (1, rows, width) or (rows, width), or
        (rows,) when width is 1; anything else is a DataError naming the file and the output (the decoding
        would index past it or broadcast it). Scores (width 1) must be finite: a NaN is never above the
        threshold, and a face would silently be lost."""
        a = np.asarray(value)
        if a.dtype.kind != "f" or a.size != rows * width or (width > 1 and a.shape[-1] != width):
            raise DataError(f"stride {stride} output has {a.dtype} {list(a.shape)}, expected {rows} rows of "
                            f"{width} float for a {canvas[1]}x{canvas[0]} input", path=self.path, field=name)
        a = a.reshape(rows, width).astype(np.float32, copy=False)
        if width == 1 and not np.isfinite(a).all():
            raise DataError(f"stride {stride} output has a score that is not finite (NaN or inf)",
                            path=self.path, field=name)
        return a

    def _finish(self, boxes, scores, points, sx: float, sy: float) -> list[Detection]:
        """Map candidates (already above the score threshold, canvas pixels) back to the image; NMS."""
        if len(scores) == 0:
            return []
        # a NaN box or point would pass NMS and become a face no frame can track or align (NaN fails <=)
        if not ((np.abs(boxes) <= MAX_COORD).all() and (points is None or (np.abs(points) <= MAX_COORD).all())):
            raise DataError(f"a face above the score threshold has a box or points that are not finite (NaN or "
                            f"inf) or beyond {MAX_COORD:g} pixels", path=self.path)
        scale = np.array([sx, sy], np.float32)
        boxes = (np.asarray(boxes, np.float32).reshape(-1, 2, 2) / scale).reshape(-1, 4)
        if points is not None:
            points = np.asarray(points, np.float32).reshape(-1, 5, 2) / scale
        keep = nms(boxes, scores, self.nms_threshold)
        return [Detection(boxes[i].copy(), float(scores[i]), None if points is None else points[i].copy())
                for i in keep]


class ScrfdDetector(_OnnxDetector):
    """InsightFace SCRFD (``det_10g.onnx``, ``scrfd_*_kps.onnx``, ...) run with onnxruntime.

    Preprocessing as InsightFace: letterbox (see ``_OnnxDetector``), then RGB ``(pixel - 127.5) / 128``,
    NCHW float32. Outputs: score, box and (for ``*_kps`` models) keypoint tensors, grouped in that order,
    one per stride - 3 strides (8, 16, 32) with 2 anchors per grid location for 6/9-output models, 5
    strides (8 ... 128) with 1 anchor for 10/15-output models. Rows run over the grid row-major, the
    anchors of one location adjacent. Each anchor sits at ``(column * stride, row * stride)``; the box is
    ``centre -/+ distances * stride`` (left, top, right, bottom) and each point ``centre + offset * stride``.
    Scores are the model's sigmoid outputs, kept when ``>= score_threshold``; ``nms_threshold`` is IoU.
    Batched (1, N, C) and unbatched (N, C) output shapes are both accepted.
    """

    def __init__(self, path: str | Path, input_size: Sequence[int] = (640, 640), score_threshold: float = 0.5,
                 nms_threshold: float = 0.4, *, providers: Sequence[str] | None = None, session=None):
        self.path = Path(path)
        session = session if session is not None else open_session(self.path, providers, "face detector",
                                                                    input_hw=sizing_hw(input_size))
        layout = SCRFD_LAYOUTS.get(len(session.get_outputs()))
        if layout is None:
            raise VisrecError(f"{self.path}: not an SCRFD model (expected 6, 9, 10 or 15 outputs); "
                              f"outputs seen: {_describe_outputs(session)}")
        self.strides, self.num_anchors, self.use_kps = layout
        super().__init__(self.path, session, input_size, score_threshold, nms_threshold)
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}

    def _anchor_centres(self, rows: int, cols: int, stride: int) -> np.ndarray:
        key = (rows, cols, stride)
        if key not in self._centres:  # a benign race: two threads would store equal arrays
            ys, xs = np.mgrid[:rows, :cols]
            centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self._centres[key] = np.repeat(centres, self.num_anchors, axis=0)
        return self._centres[key]

    def __call__(self, image: np.ndarray) -> list[Detection]:
        canvas, sx, sy = self._letterbox(_check_image(image))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self._run(blob)  # by position
        n = len(self.strides)
        ch, cw = canvas.shape[:2]
        scores, boxes, points = [], [], []

        def output(i, stride, rows, width):  # (N, C) or (1, N, C): we always run a batch of one
            return self._output(outs[i], self.output_names[i], stride, rows, width, (ch, cw))

        for level, stride in enumerate(self.strides):
            centres = self._anchor_centres(ch // stride, cw // stride, stride)
            score = output(level, stride, len(centres), 1).reshape(-1)
            dist = output(level + n, stride, len(centres), 4)
            hit = np.nonzero(score >= self.score_threshold)[0]
            c = centres[hit]
            d = dist[hit] * stride
            scores.append(score[hit])
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            if self.use_kps:
                k = output(level + 2 * n, stride, len(centres), 10)[hit].reshape(-1, 5, 2) * stride
                points.append(c[:, None, :] + k)
        return self._finish(np.concatenate(boxes), np.concatenate(scores),
                            np.concatenate(points) if self.use_kps else None, sx, sy)


class YunetDetector(_OnnxDetector):
    """OpenCV Zoo YuNet (``face_detection_yunet_2023mar.onnx``) run with onnxruntime, decoded as OpenCV's
    ``FaceDetectorYN`` does.

    Preprocessing: letterbox (see ``_OnnxDetector``; the canvas is padded to a multiple of 32 as
    ``FaceDetectorYN`` pads), BGR, raw 0-255 values, NCHW float32. Outputs, by name, for strides 8, 16,
    32: ``cls_S`` and ``obj_S`` (N, 1), ``bbox_S`` (N, 4), ``kps_S`` (N, 10), N = rows * columns of the
    stride's grid, row-major, with or without a leading batch axis of 1. Score = ``sqrt(cls * obj)`` with
    both clamped to [0, 1], kept when ``>= score_threshold``. Box centre = ``(column + bbox[0], row +
    bbox[1]) * stride``, size = ``exp(bbox[2:4]) * stride``; point = ``(column + kps[2i], row + kps[2i+1])
    * stride``. The 2023mar file fixes its input at 640x640, which then overrides ``input_size``.
    """

    strides = YUNET_STRIDES

    def __init__(self, path: str | Path, input_size: Sequence[int] = (320, 320), score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, *, providers: Sequence[str] | None = None, session=None):
        self.path = Path(path)
        session = session if session is not None else open_session(self.path, providers, "face detector",
                                                                    input_hw=sizing_hw(input_size))
        if not _is_yunet(session):
            raise VisrecError(f"{self.path}: not a YuNet model (expected outputs {', '.join(YUNET_OUTPUTS)}); "
                              f"outputs seen: {_describe_outputs(session)}")
        super().__init__(self.path, session, input_size, score_threshold, nms_threshold)

    def __call__(self, image: np.ndarray) -> list[Detection]:
        canvas, sx, sy = self._letterbox(_check_image(image))
        blob = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)  # RGB -> BGR, NCHW, 0-255
        out = dict(zip(self.output_names, self._run(blob)))  # by name, as FaceDetectorYN asks for them
        ch, cw = canvas.shape[:2]
        scores, boxes, points = [], [], []
        for stride in self.strides:
            rows, cols = ch // stride, cw // stride

            def output(part, width):
                name = f"{part}_{stride}"
                return self._output(out[name], name, stride, rows * cols, width, (ch, cw))

            cls = np.clip(output("cls", 1).reshape(-1), 0, 1)
            obj = np.clip(output("obj", 1).reshape(-1), 0, 1)
            score = np.sqrt(cls * obj)
            hit = np.nonzero(score >= self.score_threshold)[0]
            cell = np.stack([hit % cols, hit // cols], axis=1).astype(np.float32)  # (column, row)
            b = output("bbox", 4)[hit]
            centre = (cell + b[:, :2]) * stride
            with np.errstate(over="ignore"):  # exp of a huge log-size is inf: refused by _finish
                half = np.exp(b[:, 2:]) * stride / 2
            scores.append(score[hit])
            boxes.append(np.concatenate([centre - half, centre + half], axis=1))
            k = output("kps", 10)[hit].reshape(-1, 5, 2)
            points.append((cell[:, None, :] + k) * stride)
        return self._finish(np.concatenate(boxes), np.concatenate(scores), np.concatenate(points), sx, sy)


def _describe_outputs(session) -> str:
    return ", ".join(f"{o.name}{list(o.shape)}" for o in session.get_outputs()) or "none"


def _is_yunet(session) -> bool:
    return set(YUNET_OUTPUTS) <= {o.name for o in session.get_outputs()}


def _is_scrfd(session) -> bool:
    outputs = session.get_outputs()
    layout = SCRFD_LAYOUTS.get(len(outputs))
    if layout is None:
        return False
    levels = len(layout[0])
    # last axis: 1 score, 4 box distances, 10 keypoint offsets per anchor (checked where it is static)
    expected = [1] * levels + [4] * levels + [10] * levels
    return all(not isinstance(o.shape[-1], int) or o.shape[-1] == e
               for o, e in zip(outputs, expected) if len(o.shape) > 0)



class ExternalDetector:
    """A pretrained detector adapter from ``visrec.models.dlib_models`` (``[(box, score)]``) as Detections
    (no points: pair it with a landmark model for alignment). ``min_side``: the adapter's smallest image side in
    pixels (dlib-cnn: 16; a smaller image finds no face), 1 when it has none."""

    def __init__(self, name: str, **kwargs):
        from visrec.models.dlib_models import build_external

        self.name = name
        self.model = build_external(name, **kwargs)
        self.min_side = int(getattr(self.model, "min_side", 1))

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return [Detection(np.asarray(box, np.float32), float(score), None) for box, score in self.model(image)]


DETECT_SIZE = 640  # longest side of the copy faces are found on (InsightFace's FaceAnalysis det_size too)


class ScaledDetector:
    """Any detector run on a copy of the image scaled down to ``detect_size`` pixels on its longest side
    (``cv2.INTER_AREA``); boxes and points are mapped back to the input's pixels. An image already that small is
    passed as it is (never scaled up). Why: detection cost grows with the pixel count (a Haar cascade or dlib's
    HOG scan every position at every scale), and a face large enough to recognise is still found at 640 px;
    alignment and embedding read the full-resolution image, so the crop loses nothing. Faces smaller than the
    detector's minimum *in the copy* are not found: ``detect_size=None`` (or 0) detects on the full image. A
    ``detect_size`` below the detector's ``min_side`` (dlib-cnn: 16 px) is refused: every copy would be too
    small to search."""

    def __init__(self, detector, detect_size: int | None = DETECT_SIZE):
        if detect_size is not None and detect_size < 0:
            raise VisrecError(f"detect_size must be a positive number of pixels (or 0 / None: full size), "
                              f"got {detect_size}")
        min_side = int(getattr(detector, "min_side", 1) or 1)
        if detect_size and detect_size < min_side:
            raise VisrecError(f"detect_size {detect_size} is below the {min_side} px this face detector needs: "
                              f"use at least {min_side} (or 0: full size)")
        self.detector, self.detect_size = detector, int(detect_size or 0)

    def __getattr__(self, name):  # the wrapped detector's own attributes (use_kps, min_size, ...)
        if name == "detector":
            raise AttributeError(name)
        return getattr(self.detector, name)

    def scale(self, image: np.ndarray) -> float:
        """The factor the copy is scaled by (1.0: detected at full size)."""
        longest = max(image.shape[:2])
        return 1.0 if not self.detect_size or longest <= self.detect_size else self.detect_size / longest

    def __call__(self, image: np.ndarray) -> list[Detection]:
        import cv2

        s = self.scale(_check_image(image))
        if s == 1.0:
            return list(self.detector(image))
        h, w = image.shape[:2]
        small = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        k = np.array([w / small.shape[1], h / small.shape[0]], np.float32)
        found = []
        for d in self.detector(small):
            box = (np.asarray(d.box, np.float32).reshape(2, 2) * k).reshape(4)  # box edges scale as they are
            # points are pixel centres: the copy's pixel x covers the input's [x, x + 1) * k, centre (x + .5) k - .5
            pts = None if d.points is None else (np.asarray(d.points, np.float32) + 0.5) * k - 0.5
            found.append(Detection(box, d.score, pts))
        return found


def unwrap(detector):
    """The detector inside a :class:`ScaledDetector` (or the detector itself)."""
    return detector.detector if isinstance(detector, ScaledDetector) else detector


# Face detectors by name. A spec ``"name"`` builds ``DETECTORS.get(name)(**kwargs)``; ``"name:PATH"`` builds
# ``DETECTORS.get(name)(PATH, **kwargs)`` (a model file). A new detector is a class taking an RGB image and
# returning Detections, registered here or by a plugin.
DETECTORS: Registry = Registry("face detector")
DETECTORS.register("haar")(HaarDetector)
DETECTORS.register("dlib-hog")(functools.partial(ExternalDetector, "dlib-hog"))
DETECTORS.register("dlib-cnn")(functools.partial(ExternalDetector, "dlib-cnn"))
DETECTORS.register("scrfd")(ScrfdDetector)
DETECTORS.register("yunet")(YunetDetector)


def load_detector(spec: str | Path, *, providers=None, **kwargs):
    """A face detector from a spec: a registered name (``"haar"``, ``"dlib-hog"`` / ``"dlib-cnn"``
    (``visrec[dlib]``)), ``"NAME:PATH"`` for one that reads a model file (``"scrfd:PATH"``, ``"yunet:PATH"``), or
    a bare ``PATH.onnx`` whose outputs decide (YuNet by its output names, SCRFD by its output count and widths).
    ``kwargs`` go to the detector's constructor; ``providers`` (onnxruntime execution providers, see
    :mod:`visrec._onnx`) to a detector that reads a model file, and a detector by name alone (Haar, dlib: none
    runs in ONNX Runtime) leaves it. A missing model file raises ``DataError``; an ONNX file that is neither
    format raises ``VisrecError`` naming the outputs it has."""
    text = str(spec)
    name = text.strip().lower()
    if isinstance(spec, str) and ":" not in name and not name.endswith(".onnx"):
        if name not in DETECTORS:
            raise VisrecError(f"unknown face detector {text!r}: expected one of {', '.join(DETECTORS.names())}, "
                              f"NAME:PATH (scrfd:PATH, yunet:PATH) or a path to a .onnx file")
        return DETECTORS.get(name)(**kwargs)
    if providers is not None:
        kwargs["providers"] = providers
    prefix, sep, rest = text.partition(":")
    if sep and len(prefix) > 1 and prefix.lower() in DETECTORS:  # len > 1: not a Windows drive letter
        path = Path(rest)
        if not path.exists():  # a pipe or a device: open_session says so
            raise DataError("face detector model not found", path=path)
        return DETECTORS.get(prefix.lower())(path, **kwargs)
    path = Path(text)
    if path.suffix.lower() != ".onnx":
        raise VisrecError(f"unknown face detector {text!r}: expected one of {', '.join(DETECTORS.names())}, "
                          f"NAME:PATH (scrfd:PATH, yunet:PATH) or a path to a .onnx file")
    if not path.exists():
        raise DataError("face detector model not found", path=path)
    # sized at the input it will be fed: the size asked for, else the larger default (SCRFD's 640; YuNet's 320)
    session = open_session(path, kwargs.get("providers"), "face detector",
                           input_hw=sizing_hw(kwargs.get("input_size", (640, 640))))
    if _is_yunet(session):
        return YunetDetector(path, session=session, **kwargs)
    if _is_scrfd(session):
        return ScrfdDetector(path, session=session, **kwargs)
    raise VisrecError(f"{path}: neither an SCRFD nor a YuNet face detector; outputs seen: "
                      f"{_describe_outputs(session)}")
