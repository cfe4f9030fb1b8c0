"""Checkpoints that resume exactly, and the exported-model file other commands load.

Files in a run's output directory:
  ``last.rank{r}.pt``  everything rank r needs to continue: every module's state (PartialFC holds only
                        this rank's class shard), optimizer, scheduler, grad scaler, RNG states (python,
                        numpy, torch CPU, CUDA) and the data position (epoch, step in epoch, global step).
  ``model.pt``          {"model_config": {"name", **kwargs}, "backbone": state_dict, "contract": the model's
                        contract (``visrec.models.contract.ModelContract.to_dict()``), "step", "metrics"}
                        — what ``visrec budget/export/eval/serve`` load via ``visrec.models.load_model``.
                        The rank files hold the same "model_config", "backbone" and "contract" entries.
  ``backbone.pth``      the bare backbone state_dict, as arcface_torch saves it.
Every file is written to a temporary name and renamed, so a crash mid-write leaves the previous file.
Every file is read with ``weights_only=True`` (:func:`visrec._torchfile.read_torch_file`): they hold plain
data only (tensors, dicts, lists, tuples, strings, numbers), so a downloaded file cannot run code on load.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visrec._torchfile import atomic_save, read_torch_file  # noqa: F401 (atomic_save: re-exported)


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


# Model-file reading lives with the models (visrec.models.loading); training code keeps these names.
from visrec.models.model_file import init_backbone, load_backbone, read_model_file as _read_torch_file  # noqa: E402,F401
