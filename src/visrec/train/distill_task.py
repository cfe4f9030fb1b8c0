"""Face recognition with knowledge distillation (task ``faces_kd``; the VarGFaceNet LFR'19 light-track recipe).

Same data and margin loss as ``faces`` plus a ``distill`` block inside the ``loss`` section::

    loss:
      name: arcface, s: 64, m: 0.5            # the margin loss, as in `faces`
      distill:
        teacher: runs/teacher                  # visrec run dir / checkpoint, or {name: iresnet50, weights: x.pth, ...}
        feature: 1.0                           # weights of the terms (0 = off); see visrec.losses.distill
        feature_kind: cosine                   # cosine | l2
        logits: 0.5                            # KL on shared class centres, temperature T (x T^2)
        temperature: 4.0
        relational: 1.0                        # pairwise-cosine matrices
        teacher_features: null                 # path.npy: precompute once, then look up by sample index
        teacher_device: null                   # e.g. cpu / cuda:1; default = the training device
        rounds: 1                              # recursive KD, run by `recursive_distill`

Total loss = margin loss + sum(weight * term). The teacher is frozen, in eval mode, held as ``task.teacher``
(not in the modules dict: neither optimised nor checkpointed; a resumed run rebuilds it from the config).
Projectors (when student and teacher dimensions differ) live in the ``"distill"`` module, which is
optimised and checkpointed. Logit KD scores both embeddings against the teacher's PartialFC centres when
the teacher is a visrec run dir holding ``last.rank*.pt`` (shards concatenated), else against the
student's own head centres (detached; needs equal dimensions; under DDP the rank's local shard).

Precomputed teacher features (``teacher_features``): a float32 ``.npy`` (N, D) aligned with the training
set's indices plus a JSON sidecar (the same name with ``.json`` for its suffix: ``t.npy`` -> ``t.json``; teacher
model config, N, D, flip_average) checked at load. If the file is missing it is computed once (main rank) and
then reused; a path the main rank could not write (below a file, a folder, an unwritable folder) is refused
with a ``DataError`` naming the field when the task is built, before the teacher or any data is read. With
random flip augmentation (``data.flip``) the stored feature is the flip-average ``t(x) + t(flip(x))`` of the
image (the loss normalises), so a flipped training image is matched to the same target as the unflipped one;
with online teacher inference the teacher sees exactly the (possibly flipped) image the student sees.

Recursive KD: :func:`recursive_distill` trains ``rounds`` students; round k's run dir (``<output>/round{k}``)
is round k+1's teacher.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from visrec._files import check_regular_file, replacing
from visrec._structured import MAX_METADATA_FILE_BYTES, loads_json
from visrec._torchfile import read_torch_file
from visrec.config import Float, parse_config
from visrec.data.text import check_output, read_bytes
from visrec.errors import ConfigError, DataError
from visrec.losses.distill import DistillLosses
from visrec.models import build_backbone
from visrec.models.embed import for_inference, forward_batch
from visrec.models.model_file import init_backbone, load_face_backbone, require_face_network
from visrec import distributed as dist
from visrec.train.faces_task import FaceLoss, FaceTask
from visrec.train.task import TASKS
from visrec.train.trainer import train

log = logging.getLogger(__name__)


class TeacherSpec(BaseModel):
    """A registry model: ``{name: iresnet50, embedding_size: 512, weights: path}``; ``weights`` is a bare
    state_dict (``backbone.pth``) or a visrec checkpoint. Other keys are constructor kwargs."""

    model_config = ConfigDict(extra="allow")
    name: str
    weights: Path | None = None


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: Path | TeacherSpec = Field(description="visrec run dir/checkpoint, or a registry model spec")
    feature: Float = Field(1.0, ge=0, description="weight of FeatureDistill")
    feature_kind: Literal["cosine", "l2"] = "cosine"
    logits: Float = Field(0.0, ge=0, description="weight of LogitDistill")
    temperature: Float = Field(4.0, gt=0)
    relational: Float = Field(0.0, ge=0, description="weight of RelationalDistill")
    relational_kind: Literal["mse", "smooth_l1"] = "mse"
    teacher_features: Path | None = Field(None, description="precomputed teacher features .npy (N, D)")
    teacher_device: str | None = Field(None, description="device for the teacher; default the training one")
    rounds: int = Field(1, ge=1, description="recursive KD rounds (run by recursive_distill)")

    @model_validator(mode="after")
    def _some_term(self):
        if self.feature == 0 and self.logits == 0 and self.relational == 0:
            raise ValueError("every distillation weight (feature, logits, relational) is 0")
        return self


class DistillLoss(FaceLoss):
    distill: DistillOptions


# --- the teacher -------------------------------------------------------------------------------------------
def _rank_files(run_dir: Path) -> list[Path]:
    files = list(run_dir.glob("last.rank*.pt"))
    return sorted(files, key=lambda p: int(p.name[len("last.rank"):-len(".pt")] or 0))


def _head_centres(files: list[Path]) -> torch.Tensor | None:
    """The PartialFC centres of a visrec run, rank shards concatenated in class order (None if absent)."""
    shards = []
    for path in files:
        state = read_torch_file(path)  # weights_only; a file that needs more is a DataError naming it
        weight = (state.get("modules", {}).get("head") or {}).get("weight") if isinstance(state, dict) else None
        if weight is None:
            return None
        shards.append(weight.float())
    return torch.cat(shards) if shards else None


TEACHER_ROLE = "loss.distill.teacher"


def load_teacher(spec: str | Path | dict | TeacherSpec) -> tuple[nn.Module, dict[str, Any], torch.Tensor | None]:
    """Resolve a teacher: ``(frozen module in eval mode and NHWC, model config, PartialFC centres or None)``; NHWC
    as every network visrec loads to run (:func:`visrec.models.embed.for_inference`)."""
    if isinstance(spec, dict):
        spec = TeacherSpec.model_validate(spec)
    centres = None
    if isinstance(spec, TeacherSpec):
        kwargs = dict(spec.model_extra or {})
        config = {"name": spec.name, **kwargs}
        require_face_network(config, TEACHER_ROLE)
        model = build_backbone(spec.name, **kwargs)
        if spec.weights is not None:
            path = Path(spec.weights)
            init_backbone(model, path, spec.name)  # strict; a mismatch names the file and the keys
            config["weights"] = str(path)
            centres = _head_centres([path])  # a full rank checkpoint also holds the head's class centres
    else:
        path = Path(spec)
        model, config = load_face_backbone(path, TEACHER_ROLE)
        run_dir = path if path.is_dir() else path.parent
        centres = _head_centres(_rank_files(run_dir))
    for_inference(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config, centres


# --- precomputed features ---------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


@torch.no_grad()
def precompute_teacher_features(teacher: nn.Module, dataset: Dataset, path: str | Path, *,
                                model_config: dict[str, Any] | None = None, flip_average: bool = False,
                                source: str | None = None, batch_size: int = 64,
                                device: str | torch.device = "cpu") -> Path:
    """Embed every item of ``dataset`` (items ``(image CHW, ...)``) with ``teacher``; write float32
    ``path`` (N, D), row i = item i (``flip_average``: ``t(x) + t(flip(x))``), and the JSON sidecar
    (``path`` with a ``.json`` suffix) {model_config, num_items, dim, flip_average, source} (``source``: what the
    data set is, e.g. its resolved path). The array is written to a temporary name first; a write that fails is a
    ``DataError`` naming ``path``, and leaves no array without its sidecar."""
    path = Path(path)
    device = torch.device(device)
    was_training = teacher.training
    teacher.eval().to(device)
    rows = []
    batch_size = forward_batch(batch_size, device)
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))]).to(device)
        emb = teacher(x).float()
        if flip_average:
            emb = emb + teacher(x.flip(3)).float()
        rows.append(emb.cpu())
    teacher.train(was_training)
    feats = torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    meta = {"model_config": _jsonable(model_config or {}), "num_items": int(feats.shape[0]),
            "dim": int(feats.shape[1]) if feats.ndim == 2 else 0, "flip_average": bool(flip_average),
            "source": source}
    written = False
    try:  # a write that fails (a full disk, a folder made read-only meanwhile) is an error naming the file
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, suffix=".npy") as tmp:
            np.save(tmp, feats)
        written = True
        _sidecar(path).write_text(json.dumps(meta, indent=2))
    except OSError as exc:
        if written:  # no array without its sidecar: the next run recomputes
            with contextlib.suppress(OSError):  # (under a file, unlink itself fails)
                path.unlink()
        raise DataError(f"cannot write the teacher features: {exc.strerror or exc}", path=path) from None
    return path


def load_teacher_features(path: str | Path, *, model_config: dict[str, Any], num_items: int,
                          flip_average: bool, source: str | None = None) -> np.ndarray:
    """Memory-map precomputed features, checking the sidecar against the teacher and the training set;
    any mismatch or a torn file raises DataError naming the file."""
    path = Path(path)
    side = _sidecar(path)
    if not side.exists():
        raise DataError("sidecar missing (precompute the features with precompute_teacher_features)", path=side)
    try:  # read_bytes: a regular file of bounded length, else a DataError naming it
        meta = loads_json(read_bytes(side, MAX_METADATA_FILE_BYTES))
    except ValueError as exc:
        raise DataError(f"not a teacher-features sidecar: {exc}", path=side) from None
    if not isinstance(meta, dict):
        raise DataError(f"not a teacher-features sidecar: a JSON {type(meta).__name__}, not an object", path=side)
    check_regular_file(path)
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read precomputed teacher features: {exc}", path=path) from None
    expected = {"model_config": _jsonable(model_config), "num_items": int(num_items),
                "flip_average": bool(flip_average)}
    if source is not None:
        expected["source"] = source
    for key, want in expected.items():
        if meta.get(key) != want:
            raise DataError(f"precomputed for {key}={meta.get(key)!r}, this run needs {want!r}: delete the "
                            f"file to recompute it", path=path, field=key)
    if feats.dtype != np.float32 or feats.ndim != 2 or feats.shape[0] != num_items:
        raise DataError(f"expected float32 ({num_items}, D), got {feats.dtype} {feats.shape}", path=path)
    return feats


class IndexedDataset(Dataset):
    """Items ``(*item, index)``: lets a training step look up per-sample precomputed data."""

    def __init__(self, base: Dataset):
        self.base = base
        self.num_classes = getattr(base, "num_classes", None)
        self.labels = getattr(base, "labels", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return (*self.base[i], i)


# --- the task ---------------------------------------------------------------------------------------------
@TASKS.register("faces_kd")
class DistillTask(FaceTask):
    LossOptions = DistillLoss

    def __init__(self, cfg, ctx, source: str = "config"):
        super().__init__(cfg, ctx, source)
        self.source = source
        self.opts: DistillOptions = self.loss_opts.distill
        if self.opts.rounds > 1:
            log.warning("loss.distill.rounds=%d: train() runs one round; visrec train (recursive_distill) runs them all",
                        self.opts.rounds)
        self.teacher = self.teacher_config = self.teacher_centres = None  # loaded with the data (train_dataset)
        self.teacher_device = torch.device(self.opts.teacher_device) if self.opts.teacher_device else ctx.device
        self.features: np.ndarray | None = None
        self.last_terms: dict[str, torch.Tensor] = {}  # last step's unweighted terms, for inspection
        # the main rank writes missing teacher features: a path it cannot write is refused now, before the teacher,
        # the data or the validation sets are read, and every rank learns of it
        dist.on_every_rank("checking loss.distill.teacher_features", self._check_features_path,
                           dist.world_group(ctx))

    def _check_features_path(self) -> None:
        """A ``teacher_features`` file to be written (it does not exist yet; the main rank writes it) must be
        writable, and so must its sidecar: ``DataError`` naming the field and the path (:func:`check_output`).
        An existing file is only read, so a read-only folder of precomputed features is fine."""
        path = self.opts.teacher_features
        if path is None or not self.ctx.is_main or os.path.isfile(path):
            return
        check_output(path, kind="file", what="loss.distill.teacher_features")
        check_output(_sidecar(path), kind="file", what="the sidecar of loss.distill.teacher_features")

    def _config_error(self, field: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: invalid config\n  loss.distill.{field}: {msg}")

    def ensure_teacher(self) -> None:
        """Load the teacher once, when training starts (not when a config is parsed or validated)."""
        if self.teacher is None:
            with torch.random.fork_rng(devices=[]):  # building the teacher must not move the student's seed
                self.teacher, self.teacher_config, self.teacher_centres = load_teacher(self.opts.teacher)

    def train_dataset(self):
        self.ensure_teacher()
        dataset = super().train_dataset()
        if self.opts.teacher_features is None:
            self.teacher.to(self.teacher_device)
            return dataset
        path, flip = Path(self.opts.teacher_features), bool(self.data_opts.flip)
        source = str(Path(self.data_opts.train).resolve())
        def precompute() -> None:
            if self.ctx.is_main and not path.exists():
                log.info("precomputing teacher features -> %s", path)
                precompute_teacher_features(self.teacher, dataset, path, model_config=self.teacher_config,
                                            flip_average=flip, source=source, device=self.teacher_device)

        # rank 0 writes the file; then every rank learns whether that worked (a failure ends them all, naming it)
        dist.on_every_rank("precomputing the teacher features", precompute, dist.world_group(self.ctx))
        self.features = load_teacher_features(path, model_config=self.teacher_config, num_items=len(dataset),
                                              flip_average=flip, source=source)
        return IndexedDataset(dataset)

    def _teacher_dim(self) -> int:
        if self.features is not None:
            return int(self.features.shape[1])
        with torch.no_grad():
            return int(self.teacher(torch.zeros(2, 3, 112, 112, device=self.teacher_device)).shape[1])

    def build_modules(self, num_classes):
        self.ensure_teacher()
        modules = super().build_modules(num_classes)

        student_dim = int(self.cfg.model.kwargs.get("embedding_size", 512))
        teacher_dim = self._teacher_dim()
        o = self.opts
        if o.logits > 0:
            if self.teacher_centres is not None and self.teacher_centres.shape[1] != teacher_dim:
                raise self._config_error("teacher", f"teacher centres are {self.teacher_centres.shape[1]}-d, "
                                                    f"its embedding {teacher_dim}-d")
            if self.teacher_centres is None and student_dim != teacher_dim:
                raise self._config_error("logits", f"the teacher has no PartialFC centres and the student's own "
                                                   f"are {student_dim}-d, not the teacher's {teacher_dim}-d")
        scale = float((self.loss_opts.model_extra or {}).get("s", 64.0))
        terms = {"feature": (o.feature, {"kind": o.feature_kind}),
                 "logits": (o.logits, {"temperature": o.temperature, "scale": scale}),
                 "relational": (o.relational, {"kind": o.relational_kind})}
        modules["distill"] = DistillLosses(student_dim, teacher_dim, terms)
        if self.teacher_centres is not None:
            self.teacher_centres = self.teacher_centres.to(self.ctx.device)
        return modules

    def _teacher_embeddings(self, images: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.features is not None:
            rows = np.asarray(self.features[index.cpu().numpy()], dtype=np.float32)
            return torch.from_numpy(rows).to(images.device)
        with torch.no_grad():
            return self.teacher(images.to(self.teacher_device)).float().to(images.device)

    def batched_decode(self) -> bool:
        return False  # the teacher's features are precomputed from (and looked up by) the decoded data set

    def augment(self, batch):
        return batch  # flipped in training_step, where the teacher sees the same flipped images

    def capture_blocker(self) -> str | None:
        return "task faces_kd: the teacher's features are looked up on the host each step"

    def training_step(self, modules: dict[str, nn.Module], batch) -> torch.Tensor:
        if self.features is not None:
            images, labels, index = batch
        else:
            (images, labels), index = batch, None
        if self.data_opts.flip:
            mask = torch.rand(images.shape[0]) < 0.5
            images = torch.where(mask.to(images.device)[:, None, None, None], images.flip(3), images)
        embeddings = modules["backbone"](images).float()
        margin = modules["head"](embeddings, labels)
        teacher = self._teacher_embeddings(images, index)
        centres = None
        if self.opts.logits > 0:
            centres = self.teacher_centres if self.teacher_centres is not None else modules["head"].weight.detach()
        kd, values = modules["distill"](embeddings, teacher, centres)
        self.last_terms = {"margin": margin.detach(), **{k: v.detach() for k, v in values.items()}}
        return margin + kd


# --- recursive KD -----------------------------------------------------------------------------------------
def recursive_distill(cfg, rounds: int | None = None, *, resume: bool = False, progress: bool = False,
                      source: str = "config") -> list:
    """Run ``rounds`` (default ``loss.distill.rounds``) distillation rounds of a ``faces_kd`` config.

    Round 1 uses the configured teacher; round k+1's teacher is round k's run dir. Round k writes
    ``<output>/round{k}``. With ``teacher_features`` set, round 1 uses that file and later rounds
    ``<output>/round{k}/teacher_features.npy``. Returns the rounds' ``TrainResult``s.
    """
    if cfg.task != "faces_kd":
        raise ConfigError(f"{source}: invalid config\n  task: recursive_distill needs task faces_kd, got {cfg.task!r}")
    distill = cfg.loss.get("distill")
    if not isinstance(distill, dict):
        raise ConfigError(f"{source}: invalid config\n  loss.distill: missing")
    rounds = int(rounds if rounds is not None else distill.get("rounds", 1))
    if rounds < 1:
        raise ConfigError(f"{source}: invalid config\n  loss.distill.rounds: must be >= 1, got {rounds}")
    base, results = Path(cfg.output), []
    teacher = distill["teacher"]
    for k in range(1, rounds + 1):
        raw = copy.deepcopy(cfg.model_dump(mode="json"))
        out = base / f"round{k}"
        raw["output"] = str(out)
        d = raw["loss"]["distill"]
        d["teacher"], d["rounds"] = teacher, 1
        if k > 1 and d.get("teacher_features"):
            d["teacher_features"] = str(out / "teacher_features.npy")
        results.append(train(parse_config(raw, source), resume=resume, progress=progress, source=source))
        teacher = str(out)
    return results
