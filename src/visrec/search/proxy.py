"""One trial of an architecture search: a short proxy training of a candidate on the user's data, scored by the
task's own metric on held-out data, and the candidate's latency when a latency bound is asked for.

- :func:`trial_config`: the run config a trial trains — the search's training settings (defaults per task, or
  the user's run config) with the candidate's spec as the model, ``steps`` optimizer steps, and a validation
  every ``steps / evaluations`` steps (the points where a bad trial can be pruned).
- Scorers (:class:`FaceScorer`, :class:`LandmarkScorer`) read the held-out data once and score a backbone:
  faces by exact TPR at a target FPR over all pairs of held-out identities (:func:`visrec.evaluate.verification.
  tpr_at_fpr`; a ``.bin`` pair file is scored over its listed pairs), landmarks by the mean NME (sqrt_area
  normalisation, :mod:`visrec.evaluate.landmarks`) on held-out faces.
- :func:`onnx_latency_ms`: milliseconds per image at batch 1 on one ONNX Runtime thread on the machine at hand
  (the median of timed runs of the exported, untrained candidate) — MNasNet's latency-aware objective, measured
  rather than modelled, so it holds for this machine only.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visrec._onnx import open_session
from visrec.config import RunConfig, parse_config, read_yaml_mapping
from visrec.data.datasets import FACE_SIZE, open_face_dataset
from visrec.data.landmark_crops import JDCrops
from visrec.data.verification import read_verification_bin
from visrec.errors import ConfigError, DataError
from visrec.evaluate.landmarks import nme
from visrec.evaluate.verification import check_target_fpr, tpr_at_fpr, tpr_at_fpr_pairs
from visrec.export import export_onnx
from visrec.models.embed import embed_images
from visrec.models.landmark_nets import predict_crop_set

# Training settings a trial uses when the user gives no run config: those of the CPU-sized presets
# (configs/faces/synthetic-mbf.yaml, configs/landmarks/synthetic-heatmap.yaml), whose models learn there.
DEFAULT_TRAINING: dict[str, dict] = {
    "faces": {"loss": {"name": "arcface", "s": 32.0, "m": 0.3},
              "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5.0e-4},
              "schedule": {"warmup_steps": 10, "kind": "poly"}, "batch_size": 64},
    "landmarks": {"loss": {"name": "wing", "w": 10.0, "eps": 2.0},
                  "optim": {"name": "adamw", "lr": 0.005, "weight_decay": 1.0e-4},
                  "schedule": {"warmup_steps": 10, "kind": "cosine"}, "batch_size": 32,
                  "data": {"augment": False}},
}
MAX_HELD_OUT = 50_000  # images scored at every evaluation of every trial: a proxy, not a test set


def base_training(task: str, config: str | Path | None) -> dict:
    """The training settings every trial shares: the user's run config (its ``model`` section is replaced by
    each candidate, its schedule length by the trial's steps) or the task's defaults."""
    if config is None:
        return copy.deepcopy(DEFAULT_TRAINING[task])
    raw = read_yaml_mapping(config)
    if raw.get("task", "faces") != task:
        raise ConfigError(f"{config}: task is {raw.get('task', 'faces')!r}, but this search is for {task}")
    raw.pop("model", None)
    raw.pop("output", None)
    return raw


def trial_config(task: str, training: dict, spec: dict, *, data: Path, steps: int, evaluations: int,
                 output: Path, seed: int, device: str = "cpu") -> RunConfig:
    """The run config of one trial (module docstring). The task's own validation is switched off: the
    search scores the held-out data itself, at the same steps."""
    raw = copy.deepcopy(training)
    raw.update(task=task, output=str(output), seed=seed, device=device)
    raw["model"] = {"name": "searched", "spec": spec}
    data_section = dict(raw.get("data") or {})
    data_section["train"] = str(data)
    data_section["val"] = [] if task == "faces" else None
    raw["data"] = data_section
    schedule = dict(raw.get("schedule") or {})
    schedule.pop("epochs", None)
    schedule["max_steps"] = steps
    schedule["warmup_steps"] = min(int(schedule.get("warmup_steps", 0)), max(0, steps // 4))
    raw["schedule"] = schedule
    raw["val_every"] = max(1, steps // max(1, evaluations))
    raw["checkpoint_every"] = steps  # a trial is short: one checkpoint at its end
    raw["log_every"] = max(1, min(int(raw.get("log_every", 10)), steps))
    return parse_config(raw, source=f"trial config ({output})")


@dataclass(frozen=True)
class Score:
    name: str
    direction: str  # "maximize" | "minimize"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


class FaceScorer:
    """TPR at ``target_fpr`` of a backbone's embeddings of held-out faces (module docstring). The held-out
    set must hold enough impostor pairs to resolve the target FPR; that is checked when it is read."""

    def __init__(self, path: str | Path, target_fpr: float = 1e-2):

        self.path, self.target_fpr = Path(path), check_target_fpr(target_fpr, "--target-fpr (target FPR)")
        self.score = Score(f"tpr@{self.target_fpr:g}", "maximize")
        self.issame = None
        if self.path.suffix == ".bin":

            images, issame = read_verification_bin(self.path)
            if images[0].shape[:2] != (FACE_SIZE, FACE_SIZE):  # one size: the reader checks every image
                h, w = images[0].shape[:2]
                raise DataError(f"images are {w}x{h}; a face search's candidate model takes aligned "
                                f"{FACE_SIZE}x{FACE_SIZE} crops", path=self.path, record=0)
            self.images, self.issame = images, np.asarray(issame, dtype=bool)
            genuine, impostor = int(self.issame.sum()), int((~self.issame).sum())
        else:
            ds = open_face_dataset(self.path, scored=True)
            if len(ds) > MAX_HELD_OUT:
                raise DataError(f"{len(ds):,} held-out images; a search scores them at every evaluation of every "
                                f"trial: give at most {MAX_HELD_OUT:,}", path=self.path)
            self.labels = np.asarray(ds.labels)
            # the face trainer makes 112x112 crops (visrec.data.datasets.to_tensor); held-out images are embedded
            # as they are
            whom = "a face search's candidate model"
            self.images = [ds.crop(i, (FACE_SIZE, FACE_SIZE), whom) for i in range(len(ds))]
            counts = np.bincount(self.labels)
            genuine = int((counts * (counts - 1) // 2).sum())
            impostor = len(self.labels) * (len(self.labels) - 1) // 2 - genuine
        if genuine == 0:
            raise DataError("the held-out set has no genuine pair (every identity needs two images)", path=self.path)
        if impostor * self.target_fpr < 1:
            raise DataError(f"{impostor:,} impostor pairs cannot resolve FPR = {self.target_fpr:g} (needs at least "
                            f"{1 / self.target_fpr:,.0f}): use more held-out identities or a larger --target-fpr",
                            path=self.path)

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:

        emb = embed_images(backbone, self.images, device=device)
        if self.issame is not None:
            pairs = np.arange(2 * len(self.issame)).reshape(-1, 2)
            result = tpr_at_fpr_pairs(emb, self.issame, (self.target_fpr,), pairs=pairs)[self.target_fpr]
        else:
            result = tpr_at_fpr(emb, self.labels, (self.target_fpr,), device="cpu")[self.target_fpr]
        return float(result.tpr or 0.0)


class LandmarkScorer:
    """Mean NME (sqrt_area of the ground-truth box) of a landmark backbone on held-out JD-landmark faces."""

    score = Score("nme", "minimize")

    def __init__(self, path: str | Path, points: int = 106, size: int = 112, margin: float = 0.15):

        self.path = Path(path)
        self.crops = JDCrops(self.path, points, size, margin, augment=False)
        if len(self.crops) == 0:
            raise DataError("no held-out faces", path=self.path)
        if len(self.crops) > MAX_HELD_OUT:
            raise DataError(f"{len(self.crops):,} held-out faces; give at most {MAX_HELD_OUT:,}", path=self.path)

    def __call__(self, backbone: nn.Module, device: torch.device) -> float:

        pred, gt = predict_crop_set(backbone, self.crops, device)
        return float(nme(pred, gt).mean())


def scorer_for(task: str, path: str | Path, *, target_fpr: float, training: dict):
    if task == "faces":
        return FaceScorer(path, target_fpr)
    data = training.get("data") or {}
    return LandmarkScorer(path, int(data.get("points", 106)), int(data.get("size", 112)),
                          float(data.get("margin", 0.15)))


def onnx_latency_ms(net: nn.Module, side: int = 112, *, runs: int = 30, warmup: int = 5) -> float:
    """Median milliseconds per image (batch 1) of ``net`` exported to ONNX (BatchNorm folded, as every export),
    on one ONNX Runtime thread of this machine. Speed does not depend on the weights' values, so a candidate is
    timed with fresh ones."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.eval(), Path(tmp) / "candidate.onnx", input_size=(1, 3, side, side),
                           keep_batchnorm=False)
        session = open_session(Path(path), threads=1, what="candidate")
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
        for _ in range(warmup):
            session.run(None, {name: x})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, {name: x})
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
