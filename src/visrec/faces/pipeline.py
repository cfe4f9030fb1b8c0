"""Images -> faces -> aligned crops -> embeddings: the one face pipeline every path uses (the HTTP service,
``visrec data prepare``, gallery calibration, the Python API), so one photo gives one crop and one embedding
everywhere. Input checks name the problem (:class:`InputError`, with the HTTP status a service answers).

Decoding: :mod:`visrec.faces.images` (one decoder for every path, EXIF orientation applied, bombs refused
by their declared size). Detection (``visrec.faces.detectors``): OpenCV's bundled Haar cascade (frontal
faces; offline default) or an ONNX SCRFD / YuNet file -> the largest face; alignment: 5 points (from the
detector, or from a landmark model's points) -> similarity transform to the ArcFace 112x112 template
(``visrec.faces.align``); with neither, the face box widened by ``box_margin`` and resized to 112x112.
``aligned=True`` skips both: the upload is already an aligned crop (resized to the embedder's input size).
Embedding: a visrec checkpoint or an ONNX file, batched; or a registry adapter (``dlib-resnet``) that
aligns with its own crop.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.data.augment import crop_face
from visrec.data.images import read_image
from visrec.errors import VisrecError
from visrec.faces.align import align_face, check_method, five_points
from visrec.faces.detectors import Detection, ScaledDetector, load_detector
from visrec.faces.images import InputError, decode_upload


MAX_SIDE = 32767  # pixels: cv2.warpAffine / remap refuse an image with a side of SHRT_MAX or more


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the upload's pixels
    crop: np.ndarray  # the embedder's aligned crop, RGB (112x112 ArcFace; 150x150 dlib chip)
    points: np.ndarray | None = None  # the points the crop was aligned on (upload pixels), if any


def Embedder(model: str | Path, runtime: str = "torch", providers=None):  # noqa: N802 - a factory, once a class
    """The face embedder for ``model``: a registry adapter name (``dlib-resnet``, ``visrec[dlib]``), else a
    visrec checkpoint (run dir / model.pt) or an ONNX file (on the onnxruntime execution ``providers``,
    :mod:`visrec._onnx`; the CPU by default). Every embedder has ``name``, ``dim``, ``metric``
    (how its embeddings compare: ``cosine``, or ``euclidean`` for distance models), ``input_size`` (its crop side), ``align(image, box, five, points)`` -> its crop, and ``__call__(crops)``."""
    from visrec.models.dlib_models import EXTERNAL

    if str(model) in EXTERNAL:
        return ExternalEmbedder(str(model))
    return ArcFaceEmbedder(model, runtime=runtime, providers=providers)


class ExternalEmbedder:
    """A pretrained adapter that aligns with its own crop (dlib-resnet: ``get_face_chip`` on dlib's 5 or 68
    points, 150x150); it needs a landmark model with those points (``dlib-68`` / ``dlib-5``)."""

    def __init__(self, name: str):
        from visrec.models.loading import load_model

        loaded = load_model(name)
        self.model, self.contract = loaded.adapter, loaded.contract
        self.name, self.dim, self.input_size = self.model.name, int(self.contract.embedding_dim), int(self.contract.input_size[0])
        self.metric = self.contract.metric  # dlib-resnet: euclidean (its galleries score by negated distance)
        # dlib's own network object is not safe to share between threads; PyTorch inference is
        self.lock = threading.Lock() if getattr(self.model, "runtime", "dlib") == "dlib" else contextlib.nullcontext()
        self.runtime = getattr(self.model, "runtime", "adapter")  # dlib-resnet: its weights in torch, or dlib
        self.runtime_note = "PyTorch, dlib's weights" if self.runtime == "torch" else ""

    def align(self, image, box, five=None, points=None, box_margin: float = 0.2, method: str = "lstsq") -> np.ndarray:
        """dlib's chip from the landmark model's points (``five``, ``box_margin``, ``method`` do not apply)."""
        if points is None or len(points) not in (5, 68):
            raise VisrecError(f"{self.name} aligns on dlib's own 5- or 68-point shapes: configure "
                              f"faces.landmarks: dlib-68 (or dlib-5)")
        return self.model.chip(image, points)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.model.embed_chips(crops)


class ArcFaceEmbedder:
    """A visrec checkpoint (run dir / model.pt), a visrec-exported or InsightFace zoo ONNX file, or
    ``backbone.pth`` with an architecture, loaded by ``visrec.models.load_model`` -> (N, D) float32
    embeddings of crops aligned to the ArcFace template. ``input_size``, ``dim`` and ``metric`` come from
    the model's contract."""

    def __init__(self, model: str | Path, arch: str | None = None, runtime: str = "torch", providers=None):
        from visrec.models.loading import load_model

        self.path = Path(model)
        self.lock = threading.Lock()
        # CUDA when there is one, as visrec eval; ``runtime``: load_model's (a checkpoint's ONNX export), whose
        # session runs on ``providers``
        self.model = load_model(model, arch=arch, device="auto", runtime=runtime, providers=providers)
        contract = self.model.contract
        if contract.task == "landmarks":
            raise VisrecError(f"{model} is a landmark model, not a face embedder")
        self.runtime, self.runtime_note = self.model.runtime, self.model.runtime_note
        self.contract = contract
        self.name = self.model.name
        self.net = self.model.module
        self.input_size = int(contract.input_size[0])
        self.metric = contract.metric or "cosine"
        self.dim = int(contract.embedding_dim) if contract.embedding_dim else int(
            self(np.zeros((1, self.input_size, self.input_size, 3), np.uint8)).shape[1])

    def align(self, image, box, five=None, points=None, box_margin: float = 0.2, method: str = "lstsq") -> np.ndarray:
        """The ArcFace crop (``method``: ``align.align_face``'s) from the detector's 5 points, else from a
        landmark model's points (68/98/106, reduced to 5), else the face box widened by ``box_margin``."""
        if five is None and points is not None:
            five = five_points(points)
        if five is None:  # ``box_margin`` is the whole enlargement: crop_face takes it per side
            return crop_face(image, np.zeros((1, 2)), box, self.input_size, box_margin / 2)[0]
        return align_face(image, np.asarray(five, np.float32), self.input_size, method)[0]

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.model.embed(crops)


class FacePipeline:
    """image -> faces (detector) -> points (detector's 5, or a landmark model's) -> the embedder's own crop.

    ``landmarks``: a visrec landmark checkpoint, or a registry adapter (``dlib-68`` / ``dlib-5``).
    ``align``: ``lstsq`` or ``eyes`` (:mod:`visrec.faces.align`), as the model's training data was aligned;
    None: the method the model's contract records (``lstsq`` when it records neither).
    ``aligned``: uploads are already crops (resized to the embedder's input size).
    ``detect_size``: faces are found on a copy scaled to this longest side (pixels; None: the full image) and
    aligned on the full image (:class:`visrec.faces.detectors.ScaledDetector`).
    ``providers``: the onnxruntime execution providers (:mod:`visrec._onnx`) of every model here that runs in
    ONNX Runtime (an ONNX embedder, detector or landmark model); None: the CPU."""

    def __init__(self, model: str | Path, *, aligned: bool = False, landmarks: str | Path | None = None,
                 detector="haar", box_margin: float = 0.2, align: str | None = None, max_pixels: int = 40_000_000,
                 detect_size: int | None = 640, runtime: str = "torch", providers=None):
        self.embedder = Embedder(model, runtime, providers)
        if align is None:
            recorded = self.embedder.contract.align_method
            align = recorded if recorded in ("lstsq", "eyes") else "lstsq"
        check_method(align)
        self.aligned, self.box_margin, self.max_pixels, self.align = aligned, box_margin, max_pixels, align
        self.detector_name = detector if isinstance(detector, str) else type(detector).__name__
        self.detector = None
        if not aligned:
            # a spec ("haar", "dlib-hog", an .onnx path) or any detector object (image -> list[Detection])
            found = load_detector(detector, providers=providers) if isinstance(detector, (str, Path)) else detector
            self.detector = ScaledDetector(found, detect_size)
        self.landmarks = None
        if landmarks is not None:
            from visrec.models.dlib_models import EXTERNAL, build_external

            if str(landmarks) in EXTERNAL:
                self.landmarks = build_external(str(landmarks))
                if self.landmarks.num_points == 5 and isinstance(self.embedder, ArcFaceEmbedder):
                    raise VisrecError("dlib-5 points (eye corners, nose base) cannot give the ArcFace five "
                                      "(no mouth corners): use dlib-68 or a visrec landmark model")
            else:
                from visrec.models.loading import load_model

                # the crop margin / size the landmark model was trained with come from its contract
                landmark_model = load_model(landmarks, providers=providers)
                if landmark_model.contract.task != "landmarks":
                    raise VisrecError(f"{landmarks} is a {landmark_model.contract.task} model, not a landmark model")
                self.landmarks = landmark_model.predict
        if isinstance(self.embedder, ExternalEmbedder) and not aligned and self.landmarks is None:
            raise VisrecError(f"{self.embedder.name} needs faces.landmarks: dlib-68 (or dlib-5) to align")

    def detect(self, image: np.ndarray) -> list:
        """The detector's faces of an RGB image (:class:`~visrec.faces.detectors.Detection`), largest first; the
        whole image when ``aligned``. A side of ``MAX_SIDE`` pixels or more is an :class:`InputError` (413): OpenCV
        cannot warp such an image into a crop."""
        if max(image.shape[:2]) >= MAX_SIDE:
            raise InputError(f"the image is {image.shape[1]}x{image.shape[0]}: a side of {MAX_SIDE:,} pixels or more "
                             f"is beyond what OpenCV warps into a face crop", 413)
        if self.aligned:
            return [Detection(np.array([0, 0, image.shape[1], image.shape[0]], np.float32), 1.0)]
        return sorted(self.detector(image), key=lambda d: -float((d.box[2] - d.box[0]) * (d.box[3] - d.box[1])))

    def align_all(self, image: np.ndarray, detections) -> list[Face]:
        """The faces of ``detections`` (from :meth:`detect`): points, then the embedder's crop of each (the
        image resized when ``aligned``)."""
        import cv2

        if self.aligned:
            n = self.embedder.input_size
            crop = image if image.shape[:2] == (n, n) else cv2.resize(image, (n, n), interpolation=cv2.INTER_AREA)
            return [Face((0, 0, image.shape[1], image.shape[0]), crop)][:len(detections)]
        return [self.face_at(image, d.box, d.points) for d in detections]

    def faces(self, image: np.ndarray, limit: int | None = None) -> list[Face]:
        """Faces of an RGB image, largest first (one crop when ``aligned``): the largest ``limit`` only (None:
        all), so a caller wanting one face of a crowd photo does not run the landmark model on every face."""
        return self.align_all(image, self.detect(image)[:limit])

    def face_at(self, image: np.ndarray, box, five=None) -> Face:
        """The face in ``box`` (x1, y1, x2, y2): points, then the embedder's crop."""
        box = tuple(int(round(float(v))) for v in box)
        five = None if five is None else np.asarray(five, np.float32)
        points = None
        if self.landmarks is not None and (five is None or isinstance(self.embedder, ExternalEmbedder)):
            points = np.asarray(self.landmarks(image, box), np.float32)
        crop = self.embedder.align(image, box, five, points, self.box_margin, self.align)
        return Face(box, crop, five if points is None else points)

    def detect_upload(self, data: bytes) -> tuple[np.ndarray, list]:
        """Upload bytes -> (the decoded RGB image, EXIF orientation applied; its detections, largest first, maybe
        none: :meth:`align_all` makes faces of those wanted)."""
        image = decode_upload(data, self.max_pixels)
        return image, self.detect(image)

    def upload_faces(self, data: bytes, *, all_faces: bool = False) -> list[Face]:
        """Upload bytes -> its faces (the largest only unless ``all_faces``); InputError when none is found."""
        image, found = self.detect_upload(data)
        self.require_faces(image, found)
        return self.align_all(image, found if all_faces else found[:1])

    def require_faces(self, image: np.ndarray, faces: list) -> None:
        """InputError (422) saying that no face was found in ``image``, when ``faces`` (or detections) is empty."""
        if not faces:
            raise InputError(f"no face found in the {image.shape[1]}x{image.shape[0]} image ({self.detector_name} "
                             f"detector); send an aligned 112x112 crop to a server started with aligned: true")

    def embed_upload(self, data: bytes, *, all_faces: bool = False) -> tuple[np.ndarray, list[Face]]:
        """Upload bytes -> (embeddings (faces, D), faces), one batched embedder call."""
        faces = self.upload_faces(data, all_faces=all_faces)
        return self.embedder(np.stack([f.crop for f in faces])), faces


def embed_photos(pipe: FacePipeline, photos, batch: int = 32, progress=None) -> tuple[np.ndarray, np.ndarray, list]:
    """Raw photos (a ``folders.ImageList``) through the pipeline: (embeddings of the largest face of each
    photo with one, their labels, the paths of photos where the detector found no face). ``progress(n)``
    after every n photos."""
    crops, labels, no_face, out = [], [], [], []
    for path, label in zip(photos.paths, photos.labels):
        faces = pipe.faces(read_image(path, pipe.max_pixels), 1)
        if faces:
            crops.append(faces[0].crop)
            labels.append(int(label))
        else:
            no_face.append(path)
        if len(crops) == batch:
            out.append(pipe.embedder(np.stack(crops)))
            crops = []
        if progress is not None:
            progress(1)
    if crops:
        out.append(pipe.embedder(np.stack(crops)))
    dim = pipe.embedder.dim
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), np.array(labels, np.int64), no_face
