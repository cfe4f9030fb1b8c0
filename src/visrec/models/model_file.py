"""visrec model files: reading a checkpoint (``model.pt``, ``last.rank{r}.pt``, a run directory) into its
backbone and contract, and loading pretrained weights into a module. Below :mod:`visrec.models.loading` (the
one loader for every kind) and the zoo adapters, which both use it; every file is read with
``weights_only=True`` (:func:`visrec._torchfile.read_torch_file`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from visrec._torchfile import read_torch_file
from visrec.errors import DataError
from visrec.models import build_backbone
from visrec.models.contract import ModelContract, contract_from_config

# --- reading visrec torch files -----------------------------------------------------------------------

def read_model_file(path: str | Path, what: str = "checkpoint", map_location: str = "cpu") -> tuple[Path, Any]:
    """(resolved path, loaded object) of a torch file or a run directory (its ``model.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise DataError(f"{what} not found", path=path)
    return path, read_torch_file(path, map_location)


def _is_checkpoint(blob) -> bool:
    return isinstance(blob, dict) and "model_config" in blob and "backbone" in blob


def _build(cfg: dict):
    cfg = dict(cfg)
    return build_backbone(cfg.pop("name"), **cfg)


def load_checkpoint(path: str | Path, map_location: str = "cpu"):
    """``(module in eval mode, model_config, contract)`` of a visrec checkpoint (``model.pt``,
    ``last.rank0.pt`` or a run directory)."""
    path, blob = read_model_file(path, "checkpoint", map_location)
    return _from_checkpoint(path, blob)


def _from_checkpoint(path: Path, blob):
    if not _is_checkpoint(blob):
        raise DataError("not a visrec checkpoint (needs 'model_config' and 'backbone')", path=path)
    cfg = dict(blob["model_config"])
    model = _build(cfg)
    model.load_state_dict(blob["backbone"], strict=True)
    model.eval()
    if blob.get("contract") is not None:
        contract = ModelContract.from_dict(blob["contract"], path=path)
    else:
        contract = default_contract(model, cfg, source=str(path))
        assumed = (f"crop margin {contract.crop_margin}, crop size {contract.crop_size}, {contract.num_points} points"
                   if contract.task == "landmarks" else
                   f"embedding dim {contract.embedding_dim} (from the built model), input {contract.input_size[0]}x"
                   f"{contract.input_size[1]} RGB in [-1, 1], alignment {contract.align_method}, metric "
                   f"{contract.metric}, no threshold")
        warnings.warn(f"{path}: no model contract (saved before visrec stored one); assumed defaults: {assumed}",
                      stacklevel=4)
    return model, cfg, contract.replace(source=str(path))


def load_backbone(path: str | Path, map_location: str = "cpu"):
    """Rebuild the backbone saved in a visrec checkpoint (``model.pt`` or ``last.rank0.pt``).

    Returns ``(module in eval mode, model_config dict)``. A run directory is accepted too. Use
    :func:`load_model` for the model's contract."""
    model, cfg, _ = load_checkpoint(path, map_location)
    return model, cfg


def init_backbone(module, path: str | Path, name: str | None = None) -> None:
    """Load pretrained weights into ``module`` with ``strict=True``: a bare state dict (arcface_torch's
    ``backbone.pth``), a visrec checkpoint (``model.pt`` / ``last.rank0.pt``, whose model name must be
    ``name`` when given) or a run directory. A mismatch names the file and the first differing keys."""
    import torch

    path, blob = read_model_file(path, "pretrained weights")
    if _is_checkpoint(blob):
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


def embedding_dim(module, input_size: tuple[int, int] = (112, 112)) -> int | None:
    """The output size of an embedder: its ``embedding_size`` / ``dim`` attribute, else one forward of a
    zero batch (eval mode, no grad; the module's training flag is restored)."""
    import torch

    for attr in ("embedding_size", "dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    try:
        p = next(module.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    was = module.training
    try:
        with torch.no_grad():
            out = module.eval()(torch.zeros(2, 3, *input_size, device=device, dtype=dtype))
    finally:
        module.train(was)
    return int(out.shape[-1]) if out.ndim == 2 else None


def default_contract(module, model_config: dict, *, source: str | None = None, crop_margin: float | None = None,
                     crop_size: int | None = None, align_method: str = "lstsq", image_size: int | None = None,
                     origin: str = "visrec-checkpoint") -> ModelContract:
    """The contract of a visrec model (``contract_from_config``) with the embedding size read off ``module``."""
    c = contract_from_config(model_config, crop_margin=crop_margin, crop_size=crop_size, align_method=align_method,
                             source=source, origin=origin, image_size=image_size)
    if c.task != "landmarks":
        c = c.replace(embedding_dim=embedding_dim(module, c.input_size))
    return c


# --- loaded models ----------------------------------------------------------------------------------
