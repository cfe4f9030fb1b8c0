"""Request images -> faces -> aligned 112x112 crops -> embeddings, with input checks that name the problem.

Decoding (``decode_upload``): the header is read first (Pillow), so a decompression bomb is refused by
its declared size before any pixel is decoded; truncated files, zero-sized and non-image bodies are
refused with a message. Detection (``visrec.data.detectors``): OpenCV's bundled Haar cascade (frontal
faces; offline default) or an ONNX SCRFD / YuNet file -> the largest face; alignment: 5 points (from the
detector, or from a landmark model's points) -> similarity transform to the ArcFace 112x112 template
(``visrec.data.align``); with neither, the face box widened by ``box_margin`` and resized to 112x112. ``aligned=True`` skips both: the upload is already an aligned
crop (resized to 112x112 if needed). Embedding: a visrec checkpoint or an ONNX file, batched.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.errors import VisrecError


class InputError(VisrecError):
    """Bad user input: the service answers 4xx with this message. ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Upload bytes -> RGB uint8 (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("empty body: no image bytes", 400)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w == 0 or h == 0:
                raise InputError(f"image has zero size ({w}x{h})")
            if w * h > max_pixels:
                raise InputError(f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                                 f"(decompression bomb protection)", 413)
            im.draft("RGB", (w, h))
            rgb = im.convert("RGB")
            rgb.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"not an image ({len(data)} bytes in no format Pillow reads)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"decompression bomb refused: {exc}", 413) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image cannot be decoded (truncated or corrupt): {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in the upload's pixels
    crop: np.ndarray  # aligned 112x112 RGB
    points: np.ndarray | None = None  # 5 alignment points in the upload's pixels, when a landmark model ran


def _box_crop(image: np.ndarray, box, margin: float, size: int = 112) -> np.ndarray:
    import cv2

    x1, y1, x2, y2 = box
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (1 + margin)
    m = np.array([[size / side, 0, size / 2 - cx * size / side], [0, size / side, size / 2 - cy * size / side]])
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


class Embedder:
    """A visrec checkpoint (run dir / model.pt) or an ONNX file -> (N, D) float32 embeddings of 112x112 crops."""

    def __init__(self, model: str | Path):
        from visrec.models.embed import images_to_tensor

        self.path = Path(model)
        self._to_tensor = images_to_tensor
        self.lock = threading.Lock()
        if self.path.suffix == ".onnx":
            from visrec.export import OnnxEmbedder

            self.onnx = OnnxEmbedder(self.path)
            self.net = None
            self.name = f"onnx:{self.path.name}"
            self.dim = int(self.onnx(np.zeros((1, 3, 112, 112), np.float32)).shape[1])
        else:
            from visrec.train.checkpoint import load_backbone

            self.net, cfg = load_backbone(self.path)
            self.onnx = None
            self.name = cfg["name"] + ":" + ",".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "name")
            self.dim = int(self(np.zeros((1, 112, 112, 3), np.uint8)).shape[1])

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        import torch

        x = self._to_tensor(crops)
        if self.onnx is not None:
            return self.onnx(x.numpy())
        with self.lock, torch.no_grad():
            return self.net(x).float().numpy()


class FacePipeline:
    def __init__(self, model: str | Path, *, aligned: bool = False, landmarks: str | Path | None = None,
                 detector="haar", box_margin: float = 0.2, max_pixels: int = 40_000_000):
        self.embedder = Embedder(model)
        self.aligned, self.box_margin, self.max_pixels = aligned, box_margin, max_pixels
        self.detector_name = detector if isinstance(detector, str) else type(detector).__name__
        self.detector = None
        if not aligned:
            from visrec.data.detectors import load_detector

            # a spec ("haar", an .onnx path) or any detector object (image -> list[Detection])
            self.detector = load_detector(detector) if isinstance(detector, (str, Path)) else detector
        self.landmarks = None
        if landmarks is not None:
            from visrec.train.checkpoint import load_backbone

            self.landmarks, _ = load_backbone(landmarks)

    def faces(self, image: np.ndarray) -> list[Face]:
        """Faces of an RGB image, largest first (one crop when ``aligned``). Alignment: the detector's 5 points
        when it gives them (SCRFD, YuNet), else a landmark model's, else the widened face box."""
        import cv2

        from visrec.data.align import align_face

        if self.aligned:
            crop = image if image.shape[:2] == (112, 112) else cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
            return [Face((0, 0, image.shape[1], image.shape[0]), crop)]
        faces = []
        found = sorted(self.detector(image), key=lambda d: -float((d.box[2] - d.box[0]) * (d.box[3] - d.box[1])))
        for det in found:
            box = tuple(int(round(float(v))) for v in det.box)
            if det.points is not None:
                crop, _ = align_face(image, np.asarray(det.points, np.float32))
                faces.append(Face(box, crop, np.asarray(det.points, np.float32)))
            elif self.landmarks is not None:
                faces.append(self._align_with_landmarks(image, box))
            else:
                faces.append(Face(box, _box_crop(image, box, self.box_margin)))
        return faces

    def _align_with_landmarks(self, image, box) -> Face:
        from visrec.data.align import align_face, five_points
        from visrec.models.landmark_nets import predict_points

        five = five_points(predict_points(self.landmarks, image, box))
        aligned, _ = align_face(image, five)
        return Face(box, aligned, five)

    def upload_faces(self, data: bytes, *, all_faces: bool = False) -> list[Face]:
        """Upload bytes -> its faces (the largest only unless ``all_faces``); InputError when none is found."""
        image = decode_upload(data, self.max_pixels)
        faces = self.faces(image)
        if not faces:
            raise InputError(f"no face found in the {image.shape[1]}x{image.shape[0]} image ({self.detector_name} "
                             f"detector); send an aligned 112x112 crop to a server started with aligned: true")
        return faces if all_faces else faces[:1]

    def embed_upload(self, data: bytes, *, all_faces: bool = False) -> tuple[np.ndarray, list[Face]]:
        """Upload bytes -> (embeddings (faces, D), faces), one batched embedder call."""
        faces = self.upload_faces(data, all_faces=all_faces)
        return self.embedder(np.stack([f.crop for f in faces])), faces


def open_configured_gallery(faces_cfg, embedder: Embedder):
    """The gallery a serve config's ``faces.gallery`` names, bound to the embedder's model name and dimension."""
    from visrec.index.gallery import open_gallery

    g = faces_cfg.gallery
    kwargs = {"model_name": embedder.name, "dim": embedder.dim, "fusion": g.fusion}
    if g.backend == "milvus":
        kwargs.update(uri=g.uri, collection=g.collection)
    return open_gallery(g.backend, **kwargs)


def calibrate_gallery(config: str | Path, data: str | Path, target_fpr: float = 1e-4, *, batch: int = 64,
                      progress=None) -> dict:
    """``visrec gallery calibrate``: embed a labelled set of aligned faces (image folder or RecordIO) with the
    serve config's model, pick the threshold at ``target_fpr`` over all its pairs (exact engine) and store it
    in the configured gallery. Returns what :func:`visrec.index.gallery.calibrate` returns plus the counts."""
    from visrec.data.datasets import open_face_dataset
    from visrec.errors import ConfigError
    from visrec.index.gallery import calibrate
    from visrec.serve.config import load_serve_config

    cfg = load_serve_config(config)
    if cfg.faces is None:
        raise ConfigError(f"{config}: no faces section, so no gallery to calibrate")
    if cfg.faces.gallery.backend != "milvus":
        raise ConfigError(f"{config}: the {cfg.faces.gallery.backend!r} gallery lives in memory; a calibrated "
                          f"threshold would be lost — calibrate a milvus gallery")
    embedder = Embedder(cfg.faces.model)
    ds = open_face_dataset(data)
    embs = []
    for start in range(0, len(ds), batch):
        idx = range(start, min(len(ds), start + batch))
        embs.append(embedder(np.stack([ds.source.image(i) for i in idx])))
        if progress:
            progress(len(idx))
    gallery = open_configured_gallery(cfg.faces, embedder)
    try:
        out = calibrate(gallery, np.concatenate(embs), ds.labels, target_fpr)
    finally:
        gallery.close()
    return {**out, "images": len(ds), "identities": int(ds.num_classes), "gallery": cfg.faces.gallery.uri}
