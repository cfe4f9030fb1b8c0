"""visrec from Python in a few lines: faces in a photo, verify two photos, a gallery to enroll and identify.

    import visrec
    fa = visrec.FaceAnalysis("dlib-resnet")
    print(fa.verify("obama.jpg", "obama2.jpg"))     # same: True, the score, and the threshold with its origin

An image may be a path, the file's bytes, an RGB uint8 array (H, W, 3) or a PIL image; EXIF orientation is
applied as every other visrec path applies it. A model is anything :func:`visrec.models.load_model` takes
(a visrec run directory, ``model.pt``, an ``.onnx`` file, ``dlib-resnet``) and carries its contract:
embedding size, alignment, score metric and, when known, a threshold with where it came from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.errors import DataError
from visrec.faces.images import load_image
from visrec.faces.pipeline import FacePipeline
from visrec.index.enroll import enroll_face, enroll_folder
from visrec.index.gallery import open_gallery, pair_scores

# what a model needs around it when the caller names no detector / landmarks
PIPELINE_DEFAULTS = {"dlib-resnet": {"detector": "dlib-hog", "landmarks": "dlib-68"}}


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the image's pixels (upright)
    points: np.ndarray | None  # the points the crop was aligned on, (P, 2) pixels
    embedding: np.ndarray  # (D,) float32, as the model gives it
    crop: np.ndarray  # the aligned crop the model saw, RGB uint8


@dataclass(frozen=True)
class Verdict:
    """Two faces compared: ``score`` in the model's metric (cosine, or negated Euclidean distance), ``same``
    when score >= threshold (None without a threshold), and where the threshold came from."""

    score: float
    same: bool | None
    threshold: float | None
    threshold_origin: str
    metric: str

    def __str__(self) -> str:
        if self.threshold is None:
            return f"score {self.score:.4f} ({self.metric}); no threshold: {self.threshold_origin}"
        sign = ">=" if self.same else "<"
        return (f"same: {self.same} (score {self.score:.4f} {sign} threshold {self.threshold:g}, {self.metric}; "
                f"threshold from {self.threshold_origin})")


class FaceAnalysis:
    """Detect, align and embed faces with one model. ``detector`` / ``landmarks`` default to what the model
    needs (``dlib-resnet``: dlib's HOG detector and 68 points; visrec and ArcFace models: OpenCV's Haar
    detector, points from ``landmarks`` when given). ``threshold`` overrides the model's own. ``detect_size``:
    faces are found on a copy scaled to this longest side (pixels; None: the full photo), then aligned and
    embedded from the full photo."""

    def __init__(self, model="dlib-resnet", *, detector=None, landmarks=None, align: str | None = None,
                 threshold: float | None = None, detect_size: int | None = 640):
        defaults = PIPELINE_DEFAULTS.get(str(model), {})
        self.pipeline = FacePipeline(model, detector=detector or defaults.get("detector", "haar"),
                                     landmarks=landmarks if landmarks is not None else defaults.get("landmarks"),
                                     align=align, detect_size=detect_size)
        self.embedder = self.pipeline.embedder
        self.contract = self.embedder.contract
        self._threshold = threshold

    @property
    def threshold(self) -> tuple[float | None, str]:
        """(value, where it came from): the caller's, else the model contract's, else (None, why)."""
        if self._threshold is not None:
            return float(self._threshold), "the caller"
        t = self.contract.threshold
        if t is not None:
            return float(t.value), t.origin_text()
        return None, "the model records none: calibrate one (visrec gallery calibrate) or pass threshold="

    def faces(self, image, limit: int | None = None) -> list[DetectedFace]:
        """Every face of ``image`` (the largest ``limit``), largest first, with its box, points, aligned crop and
        embedding."""
        found = self.pipeline.faces(load_image(image, self.pipeline.max_pixels), limit)
        if not found:
            return []
        embeddings = self.embedder(np.stack([f.crop for f in found]))
        return [DetectedFace(tuple(int(v) for v in f.box), f.points, e, f.crop) for f, e in zip(found, embeddings)]

    def embed(self, image) -> np.ndarray:
        """The embedding (D,) of the largest face; :class:`DataError` when there is none."""
        found = self.faces(image, 1)
        if not found:
            raise DataError(f"no face found in {_describe(image)}")
        return found[0].embedding

    def verify(self, a, b) -> Verdict:
        """Compare the largest faces of two images (module docstring)."""
        score = float(pair_scores(self.embed(a), self.embed(b), self.embedder.metric)[0, 0])
        t, origin = self.threshold
        return Verdict(score, None if t is None else score >= t, t, origin, self.embedder.metric)


@functools.lru_cache(maxsize=4)
def _analysis(model: str) -> FaceAnalysis:
    return FaceAnalysis(model)


def verify(a, b, model: str = "dlib-resnet") -> Verdict:
    """:meth:`FaceAnalysis.verify` with a model by name or path (loaded once and kept for the next call)."""
    return _analysis(str(model)).verify(a, b)


def _is_sqlite(path: Path) -> bool:
    if path.suffix.lower() in (".sqlite", ".sqlite3"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


class Gallery:
    """People enrolled from photos, identified in photos. ``path``: a file that keeps the gallery (None: in
    memory, FAISS): a ``.sqlite`` file (or an existing SQLite database) is the durable FAISS gallery the CLI and
    the service keep by default (``gallery.sqlite``), any other name a Milvus Lite file. ``model``: a
    :class:`FaceAnalysis` or anything it takes."""

    def __init__(self, model="dlib-resnet", path: str | Path | None = None, *, fusion: str = "max"):
        self.analysis = model if isinstance(model, FaceAnalysis) else FaceAnalysis(model)
        e = self.analysis.embedder
        kwargs = {"model_name": e.name, "dim": e.dim, "metric": e.metric, "fusion": fusion}
        if path is None:
            self.store = open_gallery("faiss", **kwargs)
        elif _is_sqlite(Path(path)):
            self.store = open_gallery("faiss", path=str(path), **kwargs)
        else:
            self.store = open_gallery("milvus", uri=str(path), **kwargs)

    def enroll(self, name: str, image) -> int:
        """Enroll the largest face of ``image`` as ``name``; returns the identity's template count."""
        face = self.analysis.faces(image, 1)
        if not face:
            raise DataError(f"no face found in {_describe(image)}")
        enroll_face(self.store, name, face[0].crop, face[0].embedding, self.analysis.embedder.name)
        return self.store.identity(name)["templates"]

    def enroll_folder(self, root: str | Path):
        """Enroll ``root/<identity>/<photo>``; returns an :class:`visrec.index.enroll.EnrollReport` (enrolled,
        no face, several faces (the largest enrolled), duplicates (a copy of a photo already taken for the same
        person, left out: one template each), other_person (the same face as a photo in another person's folder:
        enrolled for both, listed as a likely labelling mistake), errors)."""
        return enroll_folder(self.analysis.pipeline, self.store, root)

    def identify(self, image, top_k: int = 1):
        """The best ``top_k`` identities for the largest face of ``image`` (``Match``: identity, score,
        accepted against the gallery's calibrated threshold, else the model's)."""
        threshold = self.store.threshold
        if threshold is None:
            threshold, _ = self.analysis.threshold  # the caller's, else the model contract's
        return self.store.search(self.analysis.embed(image)[None], top_k, threshold=threshold)[0]

    def names(self) -> list[str]:
        return [r["identity"] for r in self.store.list()]

    def close(self) -> None:
        self.store.close()


def _describe(image) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"the {type(image).__name__} image"
