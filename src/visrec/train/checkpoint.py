"""Checkpoints that resume exactly, and the exported-model file other commands load.

Files in a run's output directory:
  ``last.rank{r}.pt``  everything rank r needs to continue: every module's state (PartialFC holds only
                        this rank's class shard), optimizer, scheduler, grad scaler, RNG states (python,
                        numpy, torch CPU, CUDA) and the data position (epoch, step in epoch, global step).
  ``model.pt``          {"model_config": {"name", **kwargs}, "backbone": state_dict, "step", "metrics"}
                        — what ``visrec budget/export/eval`` load via :func:`load_backbone`.
  ``backbone.pth``      the bare backbone state_dict, as arcface_torch saves it.
Every file is written to a temporary name and renamed, so a crash mid-write leaves the previous file.
Every file is read with ``weights_only=True`` (:func:`visrec._torchfile.read_torch_file`): they hold plain
data only (tensors, dicts, lists, tuples, strings, numbers), so a downloaded file cannot run code on load.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visrec._torchfile import read_torch_file
from visrec.errors import DataError


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every RNG state as plain data (tuples, ints, floats, strings, tensors), so that the resume file
    loads with ``weights_only=True``: numpy's ``get_state()`` holds an ndarray, stored here as a tensor."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: a resume file of visrec before the plain layout
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_path(output: Path, rank: int) -> Path:
    return Path(output) / f"last.rank{rank}.pt"


def load_rank_state(output: Path, rank: int) -> dict[str, Any] | None:
    path = rank_path(output, rank)
    if not path.exists():
        return None
    return read_torch_file(path)  # weights_only; a torn, foreign or code-carrying file: DataError naming it


def _read_torch_file(path: str | Path, what: str, map_location: str = "cpu") -> tuple[Path, Any]:
    """(resolved path, loaded object) of a torch file or a run directory (its ``model.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise DataError(f"{what} not found", path=path)
    return path, read_torch_file(path, map_location)


def load_backbone(path: str | Path, map_location: str = "cpu"):
    """Rebuild the backbone saved in a visrec checkpoint (``model.pt`` or ``last.rank0.pt``).

    Returns ``(module in eval mode, model_config dict)``. A run directory is accepted too.
    """
    from visrec.models import build_backbone

    path, blob = _read_torch_file(path, "checkpoint", map_location)
    if not isinstance(blob, dict) or "model_config" not in blob or "backbone" not in blob:
        raise DataError("not a visrec checkpoint (needs 'model_config' and 'backbone')", path=path)
    cfg = dict(blob["model_config"])
    model = build_backbone(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})
    model.load_state_dict(blob["backbone"], strict=True)
    return model.eval(), cfg


def init_backbone(module: torch.nn.Module, path: str | Path, name: str | None = None) -> None:
    """Load pretrained weights into ``module`` with ``strict=True``: a bare state dict (arcface_torch's
    ``backbone.pth``), a visrec checkpoint (``model.pt`` / ``last.rank0.pt``, whose model name must be
    ``name`` when given) or a run directory. A mismatch names the file and the first differing keys."""
    path, blob = _read_torch_file(path, "pretrained weights")
    if isinstance(blob, dict) and "backbone" in blob and "model_config" in blob:
        saved = blob["model_config"].get("name")
        if name is not None and saved != name:
            raise DataError(f"holds a {saved!r} backbone, the config builds {name!r}", path=path)
        blob = blob["backbone"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise DataError("not a state dict (name -> tensor) nor a visrec checkpoint", path=path)
    blob = {k.removeprefix("module."): v for k, v in blob.items()}  # saved from a DDP-wrapped model
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(blob)), sorted(set(blob) - set(own))
    shapes = [k for k in own if k in blob and own[k].shape != blob[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise DataError("weights do not fit the model (" + "; ".join(parts) + ")", path=path)
    module.load_state_dict(blob, strict=True)
