"""What a model needs to be used right: its contract (as timm's ``pretrained_cfg``), saved with the model.

A :class:`ModelContract` is written into every visrec checkpoint (``model.pt`` and the trainer's
``last.rank*.pt``, key ``"contract"``), into exported ONNX files (``metadata_props`` key
:data:`ONNX_KEY`, the JSON of :meth:`ModelContract.to_json`), and declared by every adapter of a foreign
model (InsightFace zoo ONNX files, arcface_torch ``backbone.pth``, dlib). Callers read sizes, margins,
dimensions, the metric and the threshold from it; none assumes them.

Units, stated once:

- ``input_size``: (height, width) of the network input in pixels.
- ``pixel_mean`` / ``pixel_std``: per channel, in the **0-255** scale of uint8 pixels, in the colour order
  of ``colour_order``: the network input is ``(pixel - mean) / std``. visrec's own models use
  127.5 / 127.5 (i.e. [-1, 1]); InsightFace ArcFace files 127.5 / 127.5; dlib does its own.
- ``crop_margin``: landmark models only: the face box is enlarged by this fraction of its longer side on
  *each* side (``visrec.data.augment.crop_face``), the square crop then resized to ``crop_size`` pixels.
- ``threshold.value``: a score in the model's metric as visrec scores it: a cosine similarity for
  ``cosine``, the *negated* Euclidean distance for ``euclidean`` (dlib's documented 0.6 distance is -0.6).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from visrec._structured import loads_json
from visrec.data.landmarks import MAX_POINTS
from visrec.data.products import IMAGENET_MEAN, IMAGENET_STD
from visrec.errors import DataError, shown

ONNX_KEY = "visrec.contract"
CHECKPOINT_KEY = "visrec.checkpoint_sha256"  # an ONNX export: SHA-256 of the checkpoint it was exported from
# A model file rewritten in place (a threshold stored by `visrec models calibrate`), or an export: the
# weights' fingerprint its name keeps (hex digits of a SHA-256), so a gallery still knows it
# (visrec.models.loading)
FINGERPRINT_KEY = "visrec.fingerprint"
CONTRACT_VERSION = 1

TASKS = ("face-embedding", "landmarks", "product-embedding", "video-embedding", "other")
METRICS = ("cosine", "euclidean")
ALIGN_METHODS = ("lstsq", "eyes", "none", "dlib-chip")
THRESHOLD_ORIGINS = ("calibrated", "author")

#: visrec's own input convention: uint8 RGB -> (x - 127.5) / 127.5, i.e. [-1, 1] (``models.embed.images_to_tensor``)
VISREC_MEAN = (127.5, 127.5, 127.5)
VISREC_STD = (127.5, 127.5, 127.5)
#: bounds on what a contract may declare: it comes from files nobody vetted, and callers allocate by it
#: (an input of 60000 x 60000 pixels is 10.8 GB per face)
MAX_INPUT_SIDE = 4096
MAX_EMBEDDING_DIM = 1 << 16
MAX_CROP_MARGIN = 10.0  # landmark crop margin per side, a fraction of the face box's side
MAX_TEXT = 4096  # characters of any text field (a source path, a citation)
MAX_CONTRACT_JSON = 1 << 20
#: the landmark task's defaults (``visrec.train.landmarks_task.LandmarkData``): old checkpoints assumed them
DEFAULT_LANDMARK_MARGIN = 0.15
DEFAULT_LANDMARK_SIZE = 112


@dataclass(frozen=True)
class Threshold:
    """A verification threshold: accept a pair when score >= ``value`` (score in the contract's metric, see
    the module docstring). ``origin``: ``calibrated`` (``fpr`` reached on ``data``) or ``author`` (a value
    documented by the model's authors, ``citation`` says where)."""

    value: float
    origin: str
    fpr: float | None = None
    data: str | None = None
    citation: str | None = None

    def __post_init__(self):
        if self.origin not in THRESHOLD_ORIGINS:
            raise ValueError(f"threshold origin must be one of {THRESHOLD_ORIGINS}, got {shown(self.origin, 60)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"threshold value must be a finite number, got {shown(self.value, 60)}")
        object.__setattr__(self, "value", float(self.value))
        if self.fpr is not None and (isinstance(self.fpr, bool) or not isinstance(self.fpr, (int, float))
                                     or not 0 < self.fpr <= 1):
            raise ValueError(f"threshold fpr must be in (0, 1], got {shown(self.fpr, 60)}")
        for name in ("data", "citation"):
            _check_text(name, getattr(self, name))

    def describe(self) -> str:
        """The value and where it came from: ``0.42 (calibrated at FPR 0.001 on lfw.bin (...))``."""
        return f"{self.value:g} ({self.origin_text()})"

    def origin_text(self) -> str:
        """Where the value came from, without it: ``calibrated at FPR 0.001 on lfw.bin (...)``, ``author: ...``."""
        if self.origin == "calibrated":
            fpr = f" at FPR {self.fpr:g}" if self.fpr is not None else ""
            return f"calibrated{fpr}{' on ' + self.data if self.data else ''}"
        return f"author{': ' + self.citation if self.citation else ''}"


@dataclass(frozen=True)
class ModelContract:
    """Everything a caller needs to feed a model and read its output. JSON-serialisable
    (:meth:`to_dict` / :meth:`from_dict`); frozen: derive a changed one with :meth:`replace`."""

    task: str  # one of TASKS
    input_size: tuple[int, int]  # (height, width) pixels
    pixel_mean: tuple[float, float, float] = VISREC_MEAN  # 0-255 scale, per channel of colour_order
    pixel_std: tuple[float, float, float] = VISREC_STD  # 0-255 scale
    colour_order: str = "RGB"  # RGB | BGR: the channel order the network input expects
    embedding_dim: int | None = None  # embedders: length of one embedding
    metric: str | None = None  # embedders: cosine | euclidean (scored as the negated distance)
    l2_normalised: bool = False  # embedders: whether the model's output is already unit length
    align_method: str = "none"  # lstsq | eyes (visrec.faces.align) | dlib-chip | none (box crops)
    align_template: str | None = None  # e.g. arcface-112 (the ArcFace 5-point template at 112x112)
    num_points: int | None = None  # landmark models: points per face
    point_scheme: str | None = None  # landmark models: jd106 | 300w68 | wflw98 | insightface_2d106 | dlib-5 ...
    crop_margin: float | None = None  # landmark models: box enlargement per side (fraction of the longer side)
    crop_size: int | None = None  # landmark models: side of the square crop, pixels
    threshold: Threshold | None = None
    source: str | None = None  # the file or adapter name it came from
    origin: str | None = None  # visrec-checkpoint | visrec-onnx | insightface-zoo | arcface_torch | dlib | ...
    arch: dict[str, Any] | None = None  # visrec models: {"name": registry name, **kwargs}
    version: int = CONTRACT_VERSION

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.align_method not in ALIGN_METHODS:
            raise ValueError(f"align_method must be one of {ALIGN_METHODS}, got {self.align_method!r}")
        if self.colour_order not in ("RGB", "BGR"):
            raise ValueError(f"colour_order must be RGB or BGR, got {shown(self.colour_order, 60)}")
        # (0, 0): an adapter that crops itself (dlib); else each side 1..MAX_INPUT_SIDE pixels
        size = _ints("input_size", self.input_size, 2, 0, MAX_INPUT_SIDE)
        if 0 in size and size != (0, 0):
            raise ValueError(f"input_size must be two sides of 1-{MAX_INPUT_SIDE} pixels, got {list(size)}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "pixel_mean", _floats("pixel_mean", self.pixel_mean, 3))
        object.__setattr__(self, "pixel_std", _floats("pixel_std", self.pixel_std, 3))
        if min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_std must be positive, got {list(self.pixel_std)}")
        for name, high in (("embedding_dim", MAX_EMBEDDING_DIM), ("num_points", MAX_POINTS),
                           ("crop_size", MAX_INPUT_SIDE)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _ints(name, [value], 1, 1, high)[0])
        if self.crop_margin is not None:
            margin = _floats("crop_margin", [self.crop_margin], 1)[0]
            if not 0 <= margin <= MAX_CROP_MARGIN:
                raise ValueError(f"crop_margin must be in [0, {MAX_CROP_MARGIN:g}] (a fraction of the box side), got "
                                 f"{margin}")
            object.__setattr__(self, "crop_margin", margin)
        if not isinstance(self.l2_normalised, bool):
            raise ValueError(f"l2_normalised must be true or false, got {shown(self.l2_normalised, 60)}")
        for name in ("align_template", "point_scheme", "source", "origin"):
            _check_text(name, getattr(self, name))
        if self.arch is not None and not isinstance(self.arch, dict):
            raise ValueError(f"arch must be a mapping, got {type(self.arch).__name__}")
        if isinstance(self.threshold, dict):
            object.__setattr__(self, "threshold", Threshold(**self.threshold))
        if self.threshold is not None:
            if not isinstance(self.threshold, Threshold):
                raise ValueError(f"threshold must be a mapping, got {type(self.threshold).__name__}")
            v = self.threshold.value
            if (self.metric or "cosine") == "cosine" and not -1 <= v <= 1:
                raise ValueError(f"a cosine threshold must be in [-1, 1], got {v:g}")
            if self.metric == "euclidean" and v > 0:
                raise ValueError(f"a euclidean threshold is a negated distance (<= 0), got {v:g}")

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["pixel_mean"], d["pixel_std"] = (list(self.input_size), list(self.pixel_mean),
                                                            list(self.pixel_std))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, *, path=None) -> "ModelContract":
        """A contract from :meth:`to_dict`'s output; anything else is a ``DataError`` naming ``path``.
        Keys of a later version that this one does not know are ignored."""
        if not isinstance(data, dict):
            raise DataError(f"model contract is not a mapping but {type(data).__name__}", path=path)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError, RecursionError) as exc:
            raise DataError(f"invalid model contract: {exc}", path=path) from None

    @classmethod
    def from_json(cls, text: str | bytes, *, path=None) -> "ModelContract":
        if len(text) > MAX_CONTRACT_JSON:
            raise DataError(f"model contract is {len(text):,} characters of JSON, above {MAX_CONTRACT_JSON:,}",
                            path=path)
        try:
            data = loads_json(text)
        except ValueError as exc:  # not JSON, or nested too deep
            raise DataError(f"model contract is not JSON: {exc}", path=path) from None
        return cls.from_dict(data, path=path)

    def model_file_problem(self) -> str | None:
        """What a contract read from a model file (a checkpoint or an ONNX file, not an adapter's declaration)
        may not say, or None: no input size (0 x 0 is for adapters that crop themselves), and for a landmark
        model any input but visrec's (its predictions normalise crops to [-1, 1] on every runtime)."""
        if 0 in self.input_size:
            return "its contract declares no input size (0 x 0 is for adapters that crop themselves)"
        if self.task == "landmarks" and (self.pixel_mean, self.pixel_std, self.colour_order) != \
                (VISREC_MEAN, VISREC_STD, "RGB"):
            return ("a visrec landmark model takes RGB in [-1, 1] (pixel_mean = pixel_std = 127.5); its contract "
                    "declares another input")
        return None

    def replace(self, **changes) -> "ModelContract":
        return replace(self, **changes)

    # --- for people -------------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs for a table (``visrec models info``)."""
        def fmt(v):
            return "-" if v is None else str(v)

        rows = [("task", self.task), ("source", fmt(self.source)), ("origin", fmt(self.origin))]
        if self.arch:
            rows.append(("architecture", ", ".join(f"{k}={v}" for k, v in self.arch.items())))
        rows += [("input size (h, w)", f"{self.input_size[0]} x {self.input_size[1]} px"),
                 ("colour order", self.colour_order),
                 ("pixel normalisation", f"(x - {list(self.pixel_mean)}) / {list(self.pixel_std)}, x in 0-255"),
                 ("alignment", self.align_method + (f" ({self.align_template})" if self.align_template else ""))]
        if self.task != "landmarks":
            rows += [("embedding dim", fmt(self.embedding_dim)), ("metric", fmt(self.metric)),
                     ("L2-normalised output", "yes" if self.l2_normalised else "no"),
                     ("threshold", self.threshold.describe() if self.threshold else "none (not calibrated)"),
                     ("threshold origin", self.threshold.origin if self.threshold else "none")]
        else:
            rows += [("points", f"{fmt(self.num_points)} ({fmt(self.point_scheme)})"),
                     ("crop margin (per side)", fmt(self.crop_margin)),
                     ("crop size", f"{fmt(self.crop_size)} px")]
        return rows


def _ints(name: str, values, n: int, low: int, high: int) -> tuple[int, ...]:
    """``values`` as ``n`` integers in [low, high] (whole floats allowed, as JSON may write them)."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or len(values) != n:
        raise ValueError(f"{name} must be {n} integer(s), got {shown(values, 60)}")
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ValueError(f"{name} must be integer(s) in [{low}, {high}], got {shown(values, 60)}")
        out.append(v)
    return tuple(out)


def _floats(name: str, values, n: int) -> tuple[float, ...]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or len(values) != n:
        raise ValueError(f"{name} must be {n} number(s), got {shown(values, 60)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers, got {shown(values, 60)}")
    return tuple(float(v) for v in values)


def _check_text(name: str, value) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
        raise ValueError(f"{name} must be text of at most {MAX_TEXT} characters, got "
                         f"{type(value).__name__} of {len(value) if hasattr(value, '__len__') else '?'}")


LANDMARK_ARCHS = ("pfld", "heatmap_lite")
POINT_SCHEMES = {106: "jd106", 68: "300w68", 98: "wflw98", 5: "5"}


def contract_from_config(model_config: dict[str, Any], *, embedding_dim: int | None = None,
                         crop_margin: float | None = None, crop_size: int | None = None,
                         align_method: str = "lstsq", source: str | None = None,
                         origin: str = "visrec-checkpoint", image_size: int | None = None) -> ModelContract:
    """The contract of a visrec model built from ``model_config`` (``{"name", **kwargs}``). Face models: 112x112
    RGB in [-1, 1], aligned to the ArcFace template (``align_method``), cosine. Landmark models: the crop the
    landmark task trained on (``crop_margin``/``crop_size``, defaults 0.15 / 112). Products: the descriptor's
    ImageNet-normalised square input of ``image_size`` (default 224) pixels, L2-normalised output."""
    cfg = dict(model_config)
    name = str(cfg.get("name", ""))
    spec = cfg.get("spec") if name == "searched" and isinstance(cfg.get("spec"), dict) else {}
    if name in LANDMARK_ARCHS or spec.get("task") == "landmarks":
        default = spec.get("input_size", DEFAULT_LANDMARK_SIZE)  # a searched network's input is its crop
        size = int(crop_size if crop_size is not None else default)
        points = int(cfg.get("num_points", 106))
        return ModelContract(task="landmarks", input_size=(size, size), num_points=points,
                             point_scheme=POINT_SCHEMES.get(points, f"{points}-points"),
                             crop_margin=float(crop_margin if crop_margin is not None else DEFAULT_LANDMARK_MARGIN),
                             crop_size=size, source=source, origin=origin, arch=cfg)
    if name in ("product", "product_ensemble"):
        size = int(image_size or 224)
        return ModelContract(task="product-embedding", input_size=(size, size),
                             pixel_mean=tuple(255.0 * float(m) for m in IMAGENET_MEAN),
                             pixel_std=tuple(255.0 * float(s) for s in IMAGENET_STD), embedding_dim=embedding_dim,
                             metric="cosine", l2_normalised=True, source=source, origin=origin, arch=cfg)
    task = "video-embedding" if name == "quality_fusion" else "face-embedding"
    side = int(spec.get("input_size", 112))
    return ModelContract(task=task, input_size=(side, side), embedding_dim=embedding_dim, metric="cosine",
                         align_method=align_method, align_template="arcface-112" if align_method != "none" else None,
                         source=source, origin=origin, arch=cfg)


def contract_field_names() -> list[str]:
    return [f.name for f in fields(ModelContract)]


__all__ = ["ModelContract", "Threshold", "ONNX_KEY", "contract_from_config"]
