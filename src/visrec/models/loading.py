"""One loader for every model file and adapter: :func:`load_model` -> a :class:`LoadedModel` with its
:class:`~visrec.models.contract.ModelContract`.

Accepted specs:

- a visrec run directory (its ``model.pt``), a ``model.pt`` or a trainer resume file ``last.rank0.pt``:
  ``{"model_config": {name, **kwargs}, "backbone": state_dict, "contract": {...}}``. A checkpoint written
  before contracts existed still loads: its contract is derived from the model config (embedding size from
  the built model, landmark crop margin 0.15 / size 112, lstsq alignment) with a ``warnings.warn`` naming
  the file and the defaults assumed.
- an ``.onnx`` file: visrec-exported (the contract in ``metadata_props["visrec.contract"]``; an export
  written before contracts, recognised by visrec's tensor names ``input`` -> ``embedding``/``points``,
  loads with a warning), else an InsightFace model-zoo file recognised by its layout (ArcFace
  recognition: one (N, 3, 112, 112) input, one (N, D) output; ``2d106det``: 192x192 input, 212 outputs).
- a registered adapter name of :data:`visrec.models.dlib_models.EXTERNAL` (``dlib-resnet``, ``dlib-68``,
  ``dlib-5``).
- a bare state dict (arcface_torch's ``backbone.pth``) with ``arch=`` (a registry backbone name, or a
  ``{"name": ..., **kwargs}`` dict).

A model's ``name`` (what a gallery records, and refuses embeddings of any other model by) carries a fingerprint
of its weights: ``<what it is>@sha256:<the first 16 hex digits of the SHA-256 of its file>``. A visrec checkpoint
is ``<architecture>@sha256:<checkpoint>`` (``mobilefacenet:embedding_size=512,scale=1@sha256:...``); its ONNX
export, which records the checkpoint's SHA-256 (``visrec export``), has the checkpoint's name, run beside it
(``runtime: auto``) or on its own, since its embeddings are that model's; any other ONNX file is
``onnx:<file name>@sha256:<its own bytes>``; a bare state dict ``<arch>@sha256:<its file>``. Adapters whose files
are fixed and published (``dlib-resnet``) keep their plain names. Each file is hashed once per load (1 MB
blocks; the checkpoint's digest also checks its ONNX twin).

Every file is read with ``weights_only=True`` (:func:`visrec._torchfile.read_torch_file`). A path that does
not exist, a file of an unknown kind, or an ONNX file with neither a contract nor a known layout is a
:class:`~visrec.errors.DataError` naming the input.

Images given to ``embed`` are uint8 RGB (N, H, W, 3) crops at the contract's input size, aligned as the
contract says; a list of (H, W, 3) arrays is accepted. ``embed`` returns what the model gives (visrec face
models: raw, not L2-normalised; ``contract.l2_normalised`` says which), float32 (N, D).

ONNX files (and a checkpoint's export under ``runtime="onnx"``/``"auto"``) run on the execution providers
``providers=`` chooses (:mod:`visrec._onnx`: ``cpu`` by default, ``cuda``, ``tensorrt``, ``auto``); a torch module
runs on ``device=``.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from visrec._files import check_regular_file
from visrec._onnx import OnnxEmbedder, describe_providers, open_session
from visrec._torchfile import read_torch_file
from visrec.data.augment import crop_face
from visrec.errors import ConfigError, DataError
from visrec.models.contract import CHECKPOINT_KEY, FINGERPRINT_KEY, ONNX_KEY, VISREC_MEAN, VISREC_STD, ModelContract, Threshold, contract_from_config
from visrec.models.dlib_models import EXTERNAL, build_external
from visrec.models.embed import embed_images, for_inference, forward_batch, images_to_tensor
from visrec.models.landmark_nets import predict_points
from visrec.models.model_file import (_build, _from_checkpoint, _is_checkpoint, default_contract,  # noqa: F401
                                      embedding_dim, init_backbone, load_backbone, load_checkpoint, read_model_file)
from visrec.models.zoo import ArcFaceOnnx, Landmark106Onnx

RUNTIMES = ("torch", "onnx", "auto")
ONNX_TWIN = "model.onnx"  # the export of a checkpoint, beside it, that ``runtime="auto"`` serves through
KINDS = ("a visrec run directory, model.pt or last.rank0.pt; an .onnx file (visrec export or InsightFace zoo); "
         "backbone.pth with arch=; or an adapter name")


def _stack(images) -> np.ndarray:
    arr = images if isinstance(images, np.ndarray) else np.stack(list(images)) if len(images) else np.zeros((0, 0, 0, 3), np.uint8)
    if arr.ndim == 3:
        arr = arr[None]
    return np.ascontiguousarray(arr)


def contract_input(contract: ModelContract, arr: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> the (N, 3, H, W) float32 input the contract declares (``colour_order``, then
    ``(x - pixel_mean) / pixel_std``): one rule for every runtime, so a checkpoint and its ONNX export see the
    same numbers."""
    c = contract
    if c.pixel_mean == VISREC_MEAN and c.pixel_std == VISREC_STD and c.colour_order == "RGB":
        return images_to_tensor(arr)  # bit-identical to the training input
    if c.colour_order == "BGR":
        arr = arr[..., ::-1]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return (t - torch.tensor(c.pixel_mean).view(1, 3, 1, 1)) / torch.tensor(c.pixel_std).view(1, 3, 1, 1)


def _as_boxes(boxes) -> tuple[np.ndarray, bool]:
    b = np.asarray(boxes, dtype=np.float64)
    single = b.ndim == 1
    b = b.reshape(-1, b.shape[-1]) if b.size else b.reshape(0, 4)
    if b.shape[-1] < 4:
        raise DataError(f"a box is (x1, y1, x2, y2), got shape {np.asarray(boxes).shape}")
    return b, single


class LoadedModel:
    """A model with its contract. ``embed(images)`` for embedders, ``predict(image, boxes)`` for landmark
    models, ``module`` the torch module where there is one (else None), ``name`` what a gallery records,
    ``runtime`` what runs it (``torch``, ``onnxruntime``, or an adapter's own library) and ``runtime_note``
    why, when :func:`load_model` chose (for ONNX Runtime, the providers its session got); ``providers`` the
    execution providers of an ONNX Runtime session (``session.get_providers()``), else None."""

    module = None
    runtime = "adapter"
    runtime_note = ""
    providers: list[str] | None = None

    def __init__(self, contract: ModelContract, name: str):
        self.contract, self.name = contract, name

    @property
    def is_embedder(self) -> bool:
        return self.contract.task != "landmarks"

    def embed(self, images, *, flip: bool = False) -> np.ndarray:
        raise DataError(f"a {self.contract.task} model has no embed(); it predicts points", path=self.contract.source)

    def predict(self, image, boxes) -> np.ndarray:
        """(K, P, 2) float32 image-pixel points for (K, 4) boxes, or (P, 2) for one (4,) box."""
        if self.contract.task != "landmarks":
            raise DataError(f"a {self.contract.task} model has no predict(); it embeds", path=self.contract.source)
        image = np.asarray(image)
        b, single = _as_boxes(boxes)
        crops, sides, centres = [], [], []

        c = self.contract
        for x1, y1, x2, y2 in b[:, :4]:
            crop, _ = crop_face(image, np.zeros((1, 2)), (x1, y1, x2, y2), c.crop_size, c.crop_margin)
            crops.append(crop)
            sides.append(max(x2 - x1, y2 - y1) * (1 + 2 * c.crop_margin))
            centres.append(((x1 + x2) / 2, (y1 + y2) / 2))
        if crops:
            x = ((np.stack(crops).astype(np.float32) / np.float32(127.5)) - np.float32(1.0)).transpose(0, 3, 1, 2)
            pts = self.predict_crops(x) * c.crop_size
            out = np.stack([((p - c.crop_size / 2) * (s / c.crop_size) + ctr) for p, s, ctr in zip(pts, sides, centres)])
        else:
            out = np.zeros((0, c.num_points or 0, 2))
        out = out.astype(np.float32)
        return out[0] if single else out

    def predict_crops(self, x: np.ndarray) -> np.ndarray:
        """(B, P, 2) points in [0, 1] of the crop, from (B, 3, S, S) float32 crops in [-1, 1]."""
        raise DataError("this landmark model predicts on whole images only (predict)", path=self.contract.source)

    def _points(self, pts) -> np.ndarray:
        """The model's points, refused (``DataError`` naming the model) unless finite and of the contract's
        count: a NaN point would be drawn as nothing and scored as an anonymous metric error."""
        pts, n, model = np.asarray(pts), self.contract.num_points, self.contract.source or self.name
        if pts.ndim < 2 or pts.shape[-1] != 2 or (n is not None and pts.shape[-2] != n):
            raise DataError(f"the model answered points shaped {list(pts.shape)}; its contract promises "
                            f"({n if n is not None else 'P'}, 2) per face", path=model)
        if not np.isfinite(pts).all():
            raise DataError("the model answered NaN or infinite landmark points", path=model)
        return pts

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.contract.task}>"


class TorchModel(LoadedModel):
    runtime = "torch"

    def __init__(self, module, contract: ModelContract, name: str, device: str = "cpu"):
        super().__init__(contract, name)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.module = for_inference(module, self.device)

    def _tensor(self, images):
        return contract_input(self.contract, _stack(images))

    def embed(self, images, *, flip: bool = False, batch_size: int = 256) -> np.ndarray:
        if not self.is_embedder:
            return super().embed(images)
        arr = _stack(images)
        if not len(arr):
            return np.zeros((0, self.contract.embedding_dim or 0), np.float32)
        return embed_images(self.module, arr, device=self.device, flip=flip, batch_size=batch_size,
                            to_tensor=self._tensor)

    def predict(self, image, boxes) -> np.ndarray:
        if self.contract.task != "landmarks":
            return super().predict(image, boxes)
        b, single = _as_boxes(boxes)
        c = self.contract
        out = [self._points(predict_points(self.module, image, box[:4], margin=c.crop_margin, size=c.crop_size))
               for box in b]
        if single:
            return out[0]
        return np.stack(out) if out else np.zeros((0, c.num_points or 0, 2), np.float32)

    def predict_crops(self, x: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        batch = forward_batch(batch, self.device)
        with torch.no_grad():
            for s in range(0, len(x), batch):
                xb = torch.as_tensor(np.asarray(x[s:s + batch], np.float32)).to(self.device)
                out.append(self._points(self.module(xb).float().cpu().numpy()))
        return np.concatenate(out) if out else np.zeros((0, self.contract.num_points or 0, 2), np.float32)


class OnnxModel(LoadedModel):
    """A visrec-exported ONNX file (onnxruntime, CPU by default)."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, contract: ModelContract, name: str, session=None, providers=None):
        super().__init__(contract, name)

        self.path = Path(path)
        self.onnx = OnnxEmbedder(self.path, session=session, providers=providers)
        self.providers = list(self.onnx.session.get_providers())
        self.runtime_note = describe_providers(self.onnx.session)

    def embed(self, images, *, flip: bool = False) -> np.ndarray:
        if not self.is_embedder:
            return super().embed(images)
        x = contract_input(self.contract, _stack(images)).numpy()
        if len(x) == 0:
            return np.zeros((0, self.contract.embedding_dim or 0), np.float32)
        out = self._embeddings(x)
        return out + self._embeddings(np.ascontiguousarray(x[..., ::-1])) if flip else out

    def _embeddings(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(self.onnx(x))
        dim = self.contract.embedding_dim
        if out.ndim != 2 or len(out) != len(x) or out.dtype.kind != "f" or (dim is not None and out.shape[1] != dim):
            raise DataError(f"the graph answered {out.dtype} {list(out.shape)} for {len(x)} images; its contract "
                            f"promises float (N, {dim if dim is not None else 'D'})", path=self.path)
        if not np.isfinite(out).all():
            raise DataError("the graph answered NaN or infinite embeddings", path=self.path)
        return out.astype(np.float32, copy=False)

    def predict_crops(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        out = np.asarray(self.onnx(x))
        if len(x) and out.size % (2 * len(x)):  # not (x, y) pairs per crop: reshape would raise a bare ValueError
            raise DataError(f"the model answered {list(out.shape)} for {len(x)} crops, not (x, y) points per crop",
                            path=self.contract.source or self.name)
        return self._points(out.reshape(len(x), -1, 2))


class ZooArcFace(LoadedModel):
    runtime = "onnxruntime"

    def __init__(self, zoo, contract: ModelContract, name: str | None = None):
        super().__init__(contract, name or f"onnx:{zoo.path.name}")
        self.zoo = zoo
        self.providers = list(zoo.session.get_providers())
        self.runtime_note = describe_providers(zoo.session)

    def embed(self, images, *, flip: bool = False) -> np.ndarray:
        arr = _stack(images)
        out = self.zoo(arr)
        return out + self.zoo(np.ascontiguousarray(arr[:, :, ::-1])) if flip else out


class ZooLandmarks(LoadedModel):
    runtime = "onnxruntime"

    def __init__(self, zoo, contract: ModelContract, name: str | None = None):
        super().__init__(contract, name or f"onnx:{zoo.path.name}")
        self.zoo = zoo
        self.providers = list(zoo.session.get_providers())
        self.runtime_note = describe_providers(zoo.session)

    def predict(self, image, boxes) -> np.ndarray:
        return self._points(self.zoo(image, boxes))


class ExternalModel(LoadedModel):
    """A registry adapter (dlib). ``adapter`` is the adapter object (dlib-resnet: ``chip``, ``embed_chips``)."""

    def __init__(self, adapter, contract: ModelContract):
        super().__init__(contract, contract.source or type(adapter).__name__)
        self.adapter = adapter

    def embed(self, images, *, flip: bool = False) -> np.ndarray:
        arr = _stack(images)
        out = self.adapter.embed_chips(arr)
        return out + self.adapter.embed_chips(np.ascontiguousarray(arr[:, :, ::-1])) if flip else out

    def predict(self, image, boxes) -> np.ndarray:
        b, single = _as_boxes(boxes)
        out = [self._points(self.adapter(image, box[:4])) for box in b]
        if single:
            return out[0]
        return np.stack(out) if out else np.zeros((0, self.contract.num_points or 0, 2), np.float32)


# --- adapters' contracts ----------------------------------------------------------------------------

DLIB_THRESHOLD = Threshold(value=-0.6, origin="author",
                           citation="dlib's documentation (dlib_face_recognition_resnet_model_v1): two faces "
                                    "are the same person when the Euclidean distance is below 0.6; score = -distance")


def adapter_contract(name: str) -> ModelContract:
    """The declared contract of a registered adapter (``EXTERNAL``)."""
    n = name.lower()
    if n == "dlib-resnet":
        return ModelContract(task="face-embedding", input_size=(150, 150), pixel_mean=(0.0, 0.0, 0.0),
                             pixel_std=(1.0, 1.0, 1.0), embedding_dim=128, metric="euclidean",
                             align_method="dlib-chip", align_template="dlib get_face_chip size=150 padding=0.25",
                             threshold=DLIB_THRESHOLD, source=n, origin="dlib")
    if n in ("dlib-68", "dlib-5"):
        points = 68 if n == "dlib-68" else 5
        return ModelContract(task="landmarks", input_size=(0, 0), pixel_mean=(0.0, 0.0, 0.0),
                             pixel_std=(1.0, 1.0, 1.0), num_points=points,
                             point_scheme="300w68" if points == 68 else "dlib-5", source=n, origin="dlib")
    raise DataError(f"{name!r} is a detector adapter, not a model with a contract (load it as a detector)")


def arcface_zoo_contract(zoo, path: Path) -> ModelContract:
    w, h = zoo.input_size
    mean, std = float(zoo.input_mean), float(zoo.input_std)
    return ModelContract(task="face-embedding", input_size=(h, w), pixel_mean=(mean,) * 3, pixel_std=(std,) * 3,
                         embedding_dim=int(zoo.dim), metric="cosine", align_method="lstsq",
                         align_template="arcface-112", source=str(path), origin="insightface-zoo")


def landmark_zoo_contract(zoo, path: Path) -> ModelContract:
    mean, std = float(zoo.input_mean), float(zoo.input_std)
    return ModelContract(task="landmarks", input_size=(zoo.input_size, zoo.input_size), pixel_mean=(mean,) * 3,
                         pixel_std=(std,) * 3, num_points=int(zoo.num_points), point_scheme=zoo.point_order,
                         crop_margin=0.25, crop_size=int(zoo.input_size), source=str(path), origin="insightface-zoo")


# --- the loader -------------------------------------------------------------------------------------

def read_onnx_contract(path: str | Path, session=None) -> ModelContract | None:
    """The contract in an ONNX file's ``metadata_props`` (key ``visrec.contract``), or None."""
    path = Path(path)
    session = session if session is not None else open_session(path)
    meta = session.get_modelmeta().custom_metadata_map or {}
    if ONNX_KEY not in meta:
        return None
    return ModelContract.from_json(meta[ONNX_KEY], path=path).replace(source=str(path))


def _check_onnx_fits(session, contract: ModelContract | None, path: Path) -> None:
    """The graph takes what visrec feeds every ONNX model (one float32 (N, 3, H, W) input) and, where its
    contract is given, at the contract's size, with an output of the contract's embedding size where the graph
    fixes them: checked when the file opens, so a contract that lies about its graph is refused rather than
    failing (or, worse, answering) at the first image."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise DataError(f"an ONNX model here takes one input and gives an output; this one has {len(inputs)} "
                        f"input(s) and {len(outputs)} output(s)", path=path)
    shape, kind = list(inputs[0].shape), inputs[0].type
    if kind != "tensor(float)" or len(shape) != 4 or shape[1] not in (3, None) and not isinstance(shape[1], str):
        raise DataError(f"its input {inputs[0].name!r} is {kind} {shape}; visrec feeds float32 (N, 3, H, W)",
                        path=path)
    if contract is None:
        return
    problem = contract.model_file_problem()
    if problem:
        raise DataError(problem, path=path)
    fixed = [d if isinstance(d, int) else None for d in shape[2:]]
    if any(f is not None and f != s for f, s in zip(fixed, contract.input_size)):
        raise DataError(f"its contract says input {contract.input_size[0]}x{contract.input_size[1]}, the graph "
                        f"takes {shape[2]}x{shape[3]}", path=path)
    out = list(outputs[0].shape)
    if contract.task != "landmarks" and contract.embedding_dim is not None and out and isinstance(out[-1], int) \
            and out[-1] != contract.embedding_dim:
        raise DataError(f"its contract says embedding_dim {contract.embedding_dim}, the graph outputs {out}",
                        path=path)
    if contract.task == "landmarks":
        points = contract.num_points
        known = [d if isinstance(d, int) else None for d in out]  # None: a dimension the graph leaves free
        fits = (len(known) == 3 and known[2] in (2, None) and (points is None or known[1] in (points, None))) or (
            len(known) == 2 and (points is None or known[1] in (2 * points, None)))
        if not fits:
            raise DataError(f"its contract says a landmark model of {points} points, the graph outputs {out} "
                            f"(expected (N, P, 2) or (N, 2P))", path=path)


def _load_onnx(path: Path, providers=None) -> LoadedModel:
    session = open_session(path, providers, what="model")
    contract = read_onnx_contract(path, session)
    _check_onnx_fits(session, contract, path)
    if contract is not None:
        return OnnxModel(path, contract, _onnx_name(path, session, contract), session=session)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if inputs else []
    out_shape = list(outputs[0].shape) if outputs else []
    hw = [d if isinstance(d, int) else None for d in shape[2:]] if len(shape) == 4 else []
    if len(inputs) == 1 and len(outputs) == 1 and inputs[0].name == "input" and outputs[0].name in ("embedding", "points"):
        # a visrec export written before contracts: its tensor names say so
        size = hw[0] if hw and hw[0] else 112
        if outputs[0].name == "points":
            points = out_shape[1] if len(out_shape) == 3 and isinstance(out_shape[1], int) else 106
            contract = contract_from_config({"name": "pfld", "num_points": points}, crop_size=size,
                                            source=str(path), origin="visrec-onnx").replace(arch=None)
        else:
            dim = int(OnnxEmbedder(path, session=session)(np.zeros((1, 3, size, size), np.float32)).shape[-1])
            contract = contract_from_config({"name": "unknown"}, embedding_dim=dim, source=str(path),
                                            origin="visrec-onnx").replace(arch=None)
        warnings.warn(f"{path}: visrec ONNX export without a model contract (exported before visrec wrote one); "
                      f"assumed defaults: {contract.task}, input {size}x{size} RGB in [-1, 1]"
                      + (f", crop margin {contract.crop_margin}" if contract.task == "landmarks"
                         else f", lstsq alignment, cosine, dim {contract.embedding_dim}"), stacklevel=3)
        return OnnxModel(path, contract, _onnx_name(path, session, None), session=session)
    if len(inputs) == 1 and len(outputs) == 1 and len(shape) == 4:
        flat = out_shape[1] if len(out_shape) == 2 and isinstance(out_shape[1], int) else None
        if flat == 212 or (hw and hw[0] == 192):
            zoo = Landmark106Onnx(path, session=session, **_zoo_norm(path, landmark=True))
            return ZooLandmarks(zoo, landmark_zoo_contract(zoo, path), _onnx_name(path, session, None))
        if hw == [112, 112] and len(out_shape) in (2, 4):
            zoo = ArcFaceOnnx(path, session=session, **_zoo_norm(path, landmark=False))
            return ZooArcFace(zoo, arcface_zoo_contract(zoo, path), _onnx_name(path, session, None))
    raise DataError(f"ONNX file without a visrec model contract (metadata_props {ONNX_KEY!r}) and not a known "
                    f"InsightFace zoo layout (ArcFace: one (N, 3, 112, 112) input and one (N, D) output; "
                    f"2d106det: (N, 3, 192, 192) -> (N, 212)); its input is {shape}, its output {out_shape}. "
                    f"Export it with `visrec export` to record its contract", path=path)


def _zoo_norm(path: Path, landmark: bool) -> dict:
    """insightface reads mean/std from the graph (needs the onnx package); without onnx its defaults."""
    import importlib.util

    if importlib.util.find_spec("onnx") is not None:
        return {}
    return {"input_mean": 127.5, "input_std": 128.0 if landmark else 127.5}


FINGERPRINT = "@sha256:"  # between what a model is and the first 16 hex digits of its weights' SHA-256
FINGERPRINT_HEX = 16


class ModelName(str):
    """A model's name (module docstring), a ``str``; ``earlier``: names earlier versions of visrec gave the same
    model without a fingerprint (a visrec ONNX export was ``onnx:<file name>``), which a gallery they recorded
    still accepts as this model's (``visrec.index.gallery.base``)."""

    earlier: tuple[str, ...] = ()

    def __new__(cls, name: str, earlier=()):
        self = super().__new__(cls, name)
        self.earlier = tuple(earlier)
        return self

    def __reduce__(self):
        return ModelName, (str(self), self.earlier)


def fingerprinted(base: str, sha256: str, earlier=()) -> ModelName:
    """``base@sha256:<first 16 hex digits of sha256>``: a model's name with its weights' fingerprint."""
    return ModelName(f"{base}{FINGERPRINT}{sha256[:FINGERPRINT_HEX].lower()}", earlier)


def recorded_fingerprint(value) -> str | None:
    """A fingerprint a file records (:data:`FINGERPRINT_KEY`: 16 to 64 hex digits), lower-cased, or None."""
    ok = isinstance(value, str) and FINGERPRINT_HEX <= len(value) <= 64 and all(c in "0123456789abcdefABCDEF"
                                                                                  for c in value)
    return value.lower() if ok else None


def fingerprint_of(name: str) -> str | None:
    """The fingerprint part of a model name (``...@sha256:<hex>``), or None for a name without one."""
    return name.rpartition(FINGERPRINT)[2] if FINGERPRINT in name else None


def _checkpoint_name(cfg: dict) -> str:
    """What a visrec checkpoint's architecture is called (the part of its name before the fingerprint)."""
    return cfg["name"] + ":" + ",".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "name")


def _onnx_name(path: Path, session, contract: ModelContract | None) -> ModelName:
    """An ONNX file's model name: a visrec export recording the SHA-256 of the checkpoint it was exported from
    (and the architecture, in its contract) has that checkpoint's name; any other is ``onnx:<file name>``
    fingerprinted by its own bytes."""
    legacy = f"onnx:{path.name}"  # what every ONNX model was called before names carried a fingerprint
    meta = session.get_modelmeta().custom_metadata_map or {}
    # the checkpoint's fingerprint (visrec export), else its SHA-256 (an export before the fingerprint was stamped)
    recorded = recorded_fingerprint(meta.get(FINGERPRINT_KEY)) or recorded_fingerprint(meta.get(CHECKPOINT_KEY))
    arch = getattr(contract, "arch", None)
    if recorded is not None and isinstance(arch, dict) and isinstance(arch.get("name"), str):
        return fingerprinted(_checkpoint_name(arch), recorded, earlier=(legacy,))
    return fingerprinted(legacy, file_sha256(path))


def checkpoint_file(spec: str | Path) -> Path:
    """The file a checkpoint spec names: a run directory's ``model.pt``, else the path itself."""
    path = Path(spec)
    return path / "model.pt" if path.is_dir() else path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _onnx_twin(checkpoint: Path, contract: ModelContract, name: str, providers=None,
               digest: str | None = None) -> LoadedModel | str:
    """The checkpoint's ONNX export beside it (:data:`ONNX_TWIN`, recording this checkpoint's SHA-256, which
    ``visrec export`` writes), run by ONNX Runtime under the checkpoint's name and contract; else why not. A
    ``providers`` request that cannot be honoured (no such provider, or a fallback to the CPU) is raised, not
    passed over: the caller asked for that runtime. ``digest``: the checkpoint's SHA-256 where the caller has it
    (its name's fingerprint), so the file is not read twice."""
    twin = checkpoint.parent / ONNX_TWIN
    if not twin.is_file():
        return f"no {ONNX_TWIN} beside it (visrec export {checkpoint} --out {twin})"
    try:
        session = open_session(twin, providers, what="model")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime missing or a broken file: said, then torch serves
        return f"{twin} does not open: {str(exc).splitlines()[0][:200]}"
    recorded = (session.get_modelmeta().custom_metadata_map or {}).get(CHECKPOINT_KEY)
    if recorded != (digest or file_sha256(checkpoint)):
        return (f"{twin} is not the export of this checkpoint (it records "
                f"{'no checkpoint' if recorded is None else 'another one'}; export it again)")
    model = OnnxModel(twin, contract, name, session=session)
    model.runtime_note = f"{describe_providers(session)}: {twin}, exported from this checkpoint"
    return model


def load_model(spec: str | Path, *, arch: str | dict | None = None, device: str = "cpu",
               runtime: str = "torch", providers=None) -> LoadedModel:
    """The model ``spec`` names, with its contract (module docstring: the kinds accepted). ``arch``: the
    registry architecture of a bare state dict (``backbone.pth``), a name or ``{"name", **kwargs}``.
    ``device``: where a torch module runs (``cpu``, ``cuda``, ``cuda:1``; ``auto``: CUDA when there is one).

    ``runtime`` (visrec checkpoints; other kinds have one runtime): ``torch`` runs the checkpoint eagerly;
    ``onnx`` runs its ONNX export beside it (``model.onnx`` recording the checkpoint's SHA-256, as
    ``visrec export`` writes it) through ONNX Runtime, under the checkpoint's name and contract, and is a
    :class:`DataError` without one; ``auto`` takes the export when there is one and the device is the CPU
    (ONNX Runtime is several times faster than eager PyTorch there: BENCHMARKS.md), else torch, saying why in
    ``runtime_note``.

    ``providers``: the execution providers of whatever runs in ONNX Runtime (an ``.onnx`` file, a checkpoint's
    export): a choice of :mod:`visrec._onnx` (None or ``cpu``: the CPU; ``cuda``, ``tensorrt``, ``auto``, a list);
    a request the machine cannot honour is a ConfigError. A torch module ignores it (``device`` places it)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    text = str(spec)
    path = Path(spec)
    if not path.exists() and text in EXTERNAL:
        contract = adapter_contract(text)  # a detector name: DataError before building anything
        return ExternalModel(build_external(text), contract)
    if not path.exists():
        hint = "" if ("/" in text or path.suffix) else f" (nor an adapter name: {', '.join(EXTERNAL.names())})"
        raise DataError(f"model not found{hint}", path=path)
    if path.is_dir():
        if not (path / "model.pt").exists():
            raise DataError(f"a directory without model.pt; expected {KINDS}", path=path)
        path = path / "model.pt"
    check_regular_file(path)  # before any reader opens it: a pipe would block it, a device never end
    if path.suffix.lower() == ".onnx":
        if arch is not None:
            raise DataError("arch= applies to a bare state dict (backbone.pth), not to an ONNX file", path=path)
        return _load_onnx(path, providers)
    try:
        blob = read_torch_file(path)
    except DataError as exc:
        if exc.message.startswith("refused to load"):  # a torch file that needs code to load: say just that
            raise
        raise DataError(f"unknown kind of model file ({exc.message}); expected {KINDS}", path=path) from None
    if _is_checkpoint(blob):
        if arch is not None:  # it records its own architecture; a second one would be ignored or contradict it
            raise DataError("arch= applies to a bare state dict (backbone.pth), not to a visrec checkpoint, which "
                            "records its own architecture", path=path)
        module, cfg, contract = _from_checkpoint(path, blob)
        digest = file_sha256(path)  # once: the name's fingerprint, and what the ONNX twin must record
        # a checkpoint rewritten in place (models calibrate stores a threshold) keeps the fingerprint it recorded
        name = fingerprinted(_checkpoint_name(cfg), recorded_fingerprint(blob.get(FINGERPRINT_KEY)) or digest)
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        if runtime == "onnx" or (runtime == "auto" and cpu):
            twin = _onnx_twin(path, contract, name, providers, digest)
            if not isinstance(twin, str):
                return twin
            if runtime == "onnx":
                raise DataError(f"runtime onnx: {twin}", path=path)
            note = f"PyTorch: {twin}"
        else:
            note = "PyTorch: asked for" if runtime == "torch" else "PyTorch: on the GPU"
        model = TorchModel(module, contract, name, device)
        model.runtime_note = note
        return model
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        if arch is None:
            raise DataError("a bare state dict (e.g. arcface_torch's backbone.pth): pass the architecture "
                            "(arch=NAME, or --arch NAME), e.g. iresnet50 or mobilefacenet", path=path)
        cfg = {"name": arch} if isinstance(arch, str) else dict(arch)
        module = _build(cfg)
        init_backbone(module, path, name=cfg["name"])
        module.eval()
        contract = default_contract(module, cfg, source=str(path), origin="arcface_torch")
        return TorchModel(module, contract, fingerprinted(_checkpoint_name(cfg), file_sha256(path)), device)
    raise DataError(f"unknown kind of model file (a torch file holding {type(blob).__name__}, neither a visrec "
                    f"checkpoint nor a state dict); expected {KINDS}", path=path)


def model_contract(spec: str | Path, *, arch: str | dict | None = None) -> ModelContract:
    """Just the contract of ``spec``: an adapter's declared one (without building it, so without its optional
    dependencies), else the loaded model's."""
    if not Path(spec).exists() and str(spec) in EXTERNAL:
        return adapter_contract(str(spec))
    return load_model(spec, arch=arch).contract


__all__ = ["load_model", "checkpoint_file", "file_sha256", "fingerprinted", "ModelName", "LoadedModel", "load_backbone", "load_checkpoint", "init_backbone", "default_contract",
           "read_onnx_contract", "read_model_file", "model_contract", "embedding_dim", "adapter_contract"]
