"""Bring your own models: InsightFace model-zoo ONNX files and local pretrained weights.

ONNX adapters (onnxruntime, CPU by default; the ``export`` extra):

- :class:`ArcFaceOnnx` — an InsightFace recognition model (buffalo_l ``w600k_r50.onnx``, antelopev2
  ``glintr100.onnx``, ...): aligned 112x112 RGB crops -> raw (not L2-normalised) embeddings.
- :class:`Landmark106Onnx` — InsightFace ``2d106det.onnx``: image + face box -> 106 points in image
  pixels, in the MODEL'S OWN point order (not visrec's JD-106 order; see the class docstring).

Both reproduce the preprocessing of the ``insightface`` python package (deepinsight/insightface,
``python-package/insightface/model_zoo/``), established from its source:

- ``model_zoo.py`` (``ModelRouter.get_model``): a file whose input is 192x192 is routed to the landmark
  class; a square input of side >= 112 and a multiple of 16 with fewer than 5 outputs is a recognition
  model (``ArcFaceONNX``). The adapters here are chosen by the caller instead, and only check the shapes.
- ``arcface_onnx.py`` (``ArcFaceONNX.__init__``): looks at the NAMES of the first 8 graph nodes; if one
  starts with ``Sub`` or ``_minus`` AND one starts with ``Mul`` or ``_mul``, the graph normalises its own
  input (the "mxnet arcface model" case) and ``input_mean, input_std = 0.0, 1.0``; otherwise
  ``127.5, 127.5``. The input size is the model input's (W, H) = ``shape[3], shape[2]``; exactly one
  output, whatever its name. ``get_feat``: ``cv2.dnn.blobFromImages(imgs, 1.0 / input_std, input_size,
  (input_mean,) * 3, swapRB=True)``, i.e. NCHW float32 ``(pixel - mean) / std`` of BGR images swapped
  to RGB: the network sees RGB. The embedding is returned as the network gives it (``normed_embedding``
  is a separate L2 normalisation in ``insightface/app/common.py``).
- ``landmark.py`` (``Landmark.__init__`` / ``get``): the same node-name test, plus a node named
  ``bn_data`` among the first 3 also counting as both; matched -> ``0.0, 1.0``, else ``127.5, 128.0``
  (note: 128, not 127.5). Number of points = ``output_shape[1] // 2``. Crop: box width/height ``w, h``,
  centre ``((x1 + x2) / 2, (y1 + y2) / 2)``, ``scale = input_size / (max(w, h) * 1.5)``, no rotation,
  ``face_align.transform`` (``insightface/utils/face_align.py``: scale, translate the centre to the
  origin, translate by ``input_size / 2``; ``cv2.warpAffine`` with a black border) to a 192x192 crop,
  then the same blob as above (``swapRB=True``: RGB). Output decoding: first output, first item,
  reshape ``(-1, 2)``, keep the last ``lmk_num`` rows, ``(pred + 1) * (input_size // 2)`` (crop pixels),
  then ``cv2.invertAffineTransform`` of the crop matrix back to image pixels.

Local weights:

- :func:`load_arcface_torch_backbone` — arcface_torch ``backbone.pth`` (a bare state dict) or a visrec
  checkpoint into a registry backbone, ``strict=True`` (``visrec.models.loading.init_backbone``).
  ``visrec.models.load_model(path, arch=NAME)`` does the same and returns the model with its contract.
- :func:`load_timm_weights` — a timm ``.pth`` / ``.safetensors`` file into a product descriptor's
  backbone (the same loader as ``build_backbone("product", weights=...)``).

The module imports neither onnxruntime, onnx nor cv2 at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from visrec._files import check_regular_file
from visrec._onnx import open_session, run_batched
from visrec._optional import require
from visrec.errors import DataError, VisrecError
from visrec.models import build_backbone
from visrec.models.model_file import init_backbone
from visrec.models.products import _load_weights

# Node-name prefixes that insightface's model_zoo takes as "the graph normalises its own input".
_SUB_PREFIXES = ("Sub", "_minus")
_MUL_PREFIXES = ("Mul", "_mul")


def graph_normalises_input(path: str | Path, *, landmark: bool = False) -> bool:
    """insightface's test for "the graph subtracts the mean and scales by itself" (module docstring):
    among the first 8 nodes, a name starting with ``Sub``/``_minus`` and one starting with ``Mul``/``_mul``;
    for the landmark model also a node named ``bn_data`` among the first 3. Needs the ``onnx`` package."""
    onnx = require("onnx", "export")
    path = check_regular_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise DataError(f"onnx cannot read it: {str(exc).splitlines()[0][:200]}", path=path) from None
    find_sub = find_mul = False
    for i, node in enumerate(model.graph.node[:8]):
        find_sub |= node.name.startswith(_SUB_PREFIXES)
        find_mul |= node.name.startswith(_MUL_PREFIXES)
        if landmark and i < 3 and node.name == "bn_data":
            find_sub = find_mul = True
    return find_sub and find_mul


def _mean_std(path: Path, mean: float | None, std: float | None, landmark: bool) -> tuple[float, float]:
    if (mean is None) != (std is None):
        raise VisrecError("give input_mean and input_std together (or neither, to read them from the graph)")
    if mean is not None:
        return float(mean), float(std)
    if graph_normalises_input(path, landmark=landmark):
        return 0.0, 1.0
    return (127.5, 128.0) if landmark else (127.5, 127.5)


def _image_in_one_out(session, path: Path, what: str) -> tuple[str, list, str, list]:
    """(input name, input shape, output name, output shape) of a model with one (N, 3, H, W) image input and
    one output, or DataError naming the file."""
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4 or (_static(shape[1]) not in (None, 3)):
        raise DataError(f"a {what} model takes one (N, 3, H, W) input, got {inp.name}{shape}", path=path)
    outputs = session.get_outputs()
    if len(outputs) != 1:
        raise DataError(f"a {what} model has exactly one output, got {[o.name for o in outputs]}", path=path)
    return inp.name, shape, outputs[0].name, list(outputs[0].shape)


def _static(dim) -> int | None:
    """A fixed positive dimension of an onnxruntime shape, else None (symbolic name or unknown)."""
    return dim if isinstance(dim, int) and dim > 0 else None


def _blob(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, 3, H, W) float32 ``(x - mean) * (1 / std)``, the arithmetic of
    ``cv2.dnn.blobFromImages`` (float32 subtract, then multiply by the scale factor)."""
    x = images.astype(np.float32) - np.float32(mean)
    x *= np.float32(1.0 / std)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class ArcFaceOnnx:
    """InsightFace model-zoo recognition ONNX (``w600k_r50.onnx``, ``glintr100.onnx``, ...).

    ``__call__(aligned)``: ``aligned`` is (N, H, W, 3) uint8 RGB face crops at the model's input size
    (112x112 for every model-zoo recognition file), aligned with the ArcFace 5-point template; a single
    (H, W, 3) crop is taken as N = 1. Returns (N, dim) float32 raw embeddings (not L2-normalised, as
    insightface's ``ArcFaceONNX.get_feat``). Preprocessing as ``insightface/model_zoo/arcface_onnx.py``
    (module docstring): ``(rgb - input_mean) / input_std``, NCHW; the images are RGB already, so
    insightface's BGR->RGB ``swapRB`` is not repeated. ``input_mean``/``input_std`` are read from the graph
    (node names; needs ``onnx``) unless both are given.

    Batching: a model whose batch dimension is symbolic (``'None'``, as arcface_torch's ``torch2onnx.py``
    writes it) runs ``batch_size`` crops per call; a fixed batch B runs B at a time (the last group
    padded with zeros, padding rows dropped). Attributes: ``name`` (file stem), ``dim``, ``input_mean``,
    ``input_std``, ``input_size`` (W, H), ``input_name``, ``output_name``, ``path``.
    Thread-safe: calls keep no state besides the onnxruntime session.
    """

    def __init__(self, path: str | Path, *, input_mean: float | None = None, input_std: float | None = None,
                 batch_size: int = 32, providers: Sequence[str] | None = None, session=None):
        self.path = Path(path)
        self.name = self.path.stem
        self.session = session if session is not None else open_session(self.path, providers, "recognition")
        self.input_name, shape, self.output_name, out_shape = _image_in_one_out(self.session, self.path, "recognition")
        self.input_size = (_static(shape[3]) or 112, _static(shape[2]) or 112)  # (W, H), as insightface
        self.fixed_batch = _static(shape[0])
        self.batch_size = self.fixed_batch or max(1, int(batch_size))
        self.input_mean, self.input_std = _mean_std(self.path, input_mean, input_std, landmark=False)
        dim = _static(out_shape[-1]) if len(out_shape) == 2 else None
        if dim is None:  # symbolic or (N, D, 1, 1): ask the model once
            w, h = self.input_size
            dim = self._run(np.zeros((1, h, w, 3), np.uint8)).shape[1]
        self.dim = int(dim)

    def blob(self, aligned: np.ndarray) -> np.ndarray:
        """The network input for (N, H, W, 3) RGB crops: (N, 3, H, W) float32."""
        return _blob(aligned, self.input_mean, self.input_std)

    def _run(self, aligned: np.ndarray) -> np.ndarray:
        out = run_batched(self.session, [self.output_name], self.input_name, self.blob(aligned))[0]
        return np.asarray(out, dtype=np.float32).reshape(len(aligned), -1)

    def __call__(self, aligned: np.ndarray) -> np.ndarray:
        aligned = np.asarray(aligned)
        if aligned.ndim == 3:
            aligned = aligned[None]
        w, h = self.input_size
        if aligned.ndim != 4 or aligned.shape[1:] != (h, w, 3):
            raise ValueError(f"{self.name}: expects (N, {h}, {w}, 3) aligned RGB crops, got {aligned.shape}")
        if len(aligned) == 0:
            return np.zeros((0, self.dim), np.float32)
        parts = []
        step = self.batch_size
        for start in range(0, len(aligned), step):
            chunk = aligned[start:start + step]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - n, h, w, 3), chunk.dtype)])
            parts.append(self._run(chunk)[:n])
        return np.concatenate(parts).astype(np.float32, copy=False)


class Landmark106Onnx:
    """InsightFace ``2d106det.onnx`` (2D 106-point coordinate regression, 192x192 input).

    ``__call__(image, box)``: ``image`` (H, W, 3) uint8 RGB, ``box`` ``(x1, y1, x2, y2[, score...])`` in
    image pixels, or (K, >=4) for several faces. Returns (106, 2) float32 image-pixel points, or
    (K, 106, 2). Crop, normalisation (``127.5`` / ``128.0`` unless the graph normalises itself) and
    decoding as ``insightface/model_zoo/landmark.py`` (module docstring); ``transform(box)`` gives the
    2x3 image -> crop matrix, ``crop(image, box)`` the network's view.

    POINT ORDER: the model's own, NOT visrec's JD-106 order (``visrec.data.schemes``) — do not pass these
    points to code that assumes ``jd106``. insightface documents the order only as a figure
    (``alignment/coordinate_reg/README.md``: "Points mark-up (ordered by point names)", image
    ``2d106markup.jpg`` in nttstar/insightface-resources); no index table, no mapping to another
    106-point order, and no 5-point index set is published, and insightface never aligns from these
    points (its ``FaceAnalysis`` aligns recognition crops with the detector's 5 keypoints). So this class
    offers no ``five_points()`` and no JD-106 conversion: align with your detector's 5 points.
    Attributes: ``num_points``, ``input_size``, ``input_mean``, ``input_std``, ``point_order``
    (``"insightface_2d106"``).
    """

    point_order = "insightface_2d106"

    def __init__(self, path: str | Path, *, input_mean: float | None = None, input_std: float | None = None,
                 providers: Sequence[str] | None = None, session=None):
        self.path = Path(path)
        self.name = self.path.stem
        self.session = session if session is not None else open_session(self.path, providers, "landmark")
        self.input_name, shape, self.output_name, out_shape = _image_in_one_out(self.session, self.path, "landmark")
        side = _static(shape[2]) or _static(shape[3]) or 192
        if (_static(shape[2]) or side) != (_static(shape[3]) or side):
            raise DataError(f"a landmark model takes a square input, got {shape}", path=self.path)
        self.input_size = side
        self.fixed_batch = _static(shape[0])
        flat = _static(out_shape[1]) if len(out_shape) == 2 else None
        self.num_points = flat // 2 if flat else 106
        self.input_mean, self.input_std = _mean_std(self.path, input_mean, input_std, landmark=True)

    def transform(self, box) -> np.ndarray:
        """The 2x3 float64 matrix taking image pixels to crop pixels for one box (no rotation)."""
        x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)[:4])
        w, h = x2 - x1, y2 - y1
        if not (w > 0 and h > 0):
            raise ValueError(f"box needs x2 > x1 and y2 > y1, got {(x1, y1, x2, y2)}")
        cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        s = self.input_size / (max(w, h) * 1.5)
        half = self.input_size / 2.0
        return np.array([[s, 0.0, half - cx * s], [0.0, s, half - cy * s]], dtype=np.float64)

    def crop(self, image: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        """(input_size, input_size, 3) crop of ``image`` around ``box`` and its 2x3 matrix."""
        import cv2

        m = self.transform(box)
        size = (self.input_size, self.input_size)
        return cv2.warpAffine(np.ascontiguousarray(image), m, size, borderValue=0.0), m

    def _decode(self, pred: np.ndarray, m: np.ndarray) -> np.ndarray:
        import cv2

        pts = np.asarray(pred, dtype=np.float64).reshape(-1, 2)[-self.num_points:]
        pts = (pts + 1.0) * (self.input_size // 2)  # insightface: integer half of the input size
        inv = cv2.invertAffineTransform(m)
        return (pts @ inv[:, :2].T + inv[:, 2]).astype(np.float32)

    def __call__(self, image: np.ndarray, box) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{self.name}: expects an (H, W, 3) RGB image, got {image.shape}")
        boxes = np.asarray(box, dtype=np.float64)
        single = boxes.ndim == 1
        boxes = boxes.reshape(-1, boxes.shape[-1]) if boxes.size else boxes.reshape(0, 4)
        if boxes.shape[-1] < 4:
            raise ValueError(f"a box is (x1, y1, x2, y2), got {np.asarray(box).shape}")
        crops, mats = zip(*(self.crop(image, b) for b in boxes)) if len(boxes) else ((), ())
        out = []
        step = self.fixed_batch or max(1, len(crops))
        for start in range(0, len(crops), step):
            chunk = np.stack(crops[start:start + step])
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - n, *chunk.shape[1:]), chunk.dtype)])
            blob = _blob(chunk, self.input_mean, self.input_std)
            pred = np.asarray(run_batched(self.session, [self.output_name], self.input_name, blob)[0])
            out.extend(self._decode(pred[i], mats[start + i]) for i in range(n))
        if single:
            return out[0]
        return np.stack(out) if out else np.zeros((0, self.num_points, 2), np.float32)


def load_arcface_torch_backbone(path: str | Path, name: str, **kwargs):
    """Build registry backbone ``name`` (``build_backbone(name, **kwargs)``, e.g. ``iresnet50``,
    ``mobilefacenet``) and load ``path`` into it with ``strict=True``: an arcface_torch ``backbone.pth``
    (a bare state dict; a DDP ``module.`` prefix is dropped), a visrec checkpoint (``model.pt``, whose
    ``"backbone"`` entry is used; its saved model name must be ``name``) or a visrec run directory.
    A mismatch raises :class:`visrec.errors.DataError` naming the file and the first missing /
    unexpected / wrongly shaped keys. Returns the module in eval mode."""
    model = build_backbone(name, **kwargs)
    init_backbone(model, path, name=name)
    return model.eval()


def load_timm_weights(model, path: str | Path):
    """Load a timm checkpoint into a product descriptor's backbone (``build_backbone("product", ...)``,
    ``source`` timm / torchvision / visrec) or into a bare ``nn.Module``.

    ``path``: ``.pth``/``.pt`` (a state dict, or a dict holding it under ``"state_dict"``/``"model"``) or
    ``.safetensors`` (needs the ``safetensors`` package). Classifier keys (``fc.``, ``classifier.``,
    ``head.``, ``last_linear.``) may be missing or extra, since the descriptor's trunk has no classifier;
    any other difference raises :class:`visrec.errors.DataError`. This is the loader behind the
    descriptor's own ``weights=`` option (``visrec.models.products._load_weights``), for weights chosen
    after construction. Returns ``model``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        require("safetensors.torch", "products", "safetensors")
    trunk = getattr(model, "trunk", None)
    target = trunk.net if trunk is not None and hasattr(trunk, "net") else model
    _load_weights(target, path)
    return model
