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
from visrec.errors import DataError, VisrecError
from visrec.models import build_backbone
from visrec.models.contract import ModelContract, contract_from_config
from visrec.models.meta import on_meta_device

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


MAX_UNSAVED_ELEMENTS = 1 << 24  # buffers a network may hold that its state dict does not (non-persistent ones)


def weights_mismatch(own: dict, saved: dict) -> str | None:
    """How ``saved`` (name -> tensor) fails to fit a module whose state dict is ``own``: missing and
    unexpected names and wrong shapes, the first few of each; None when it fits exactly."""
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    shapes = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{label} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    return "weights do not fit the model (" + "; ".join(parts) + ")"


def build_for_weights(cfg, state, path: Path):
    """The network a checkpoint's ``model_config`` describes, with its ``backbone`` weights loaded (eval mode).

    Both come from the file, so neither is trusted: the network is first built on PyTorch's ``meta`` device
    (shapes only, nothing allocated) and its state dict compared with the saved one, so the real network is
    never larger than the weights the file holds (a 2 KB file's ``embedding_size: 2000000`` would otherwise
    ask for gigabytes before anything is checked). Weights that are NaN or inf are refused, naming the tensor.
    Every problem is a :class:`DataError` naming the file."""
    import torch

    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str):
        raise DataError("'model_config' must be a mapping whose 'name' is a registry backbone", path=path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DataError("'backbone' is not a state dict (name -> tensor)", path=path)
    try:
        with on_meta_device():
            shell = _build(cfg)
    except VisrecError as exc:
        raise DataError(f"'model_config' does not build a network: {exc}", path=path) from None
    except (TypeError, ValueError, KeyError, IndexError, AssertionError, RuntimeError, ZeroDivisionError) as exc:
        raise DataError(f"'model_config' (backbone {cfg['name']!r}) does not build a network: "
                        f"{type(exc).__name__}: {str(exc)[:200]}", path=path) from None
    problem = weights_mismatch(shell.state_dict(), state)
    if problem:
        raise DataError(problem, path=path)
    _refuse_non_finite(state, path)
    built = sum(t.numel() for t in shell.parameters()) + sum(t.numel() for t in shell.buffers())
    unsaved = built - sum(t.numel() for t in shell.state_dict().values())
    if unsaved > MAX_UNSAVED_ELEMENTS:
        raise DataError(f"'model_config' builds {unsaved:,} values its weights do not hold", path=path)
    model = _build(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_checkpoint(path: str | Path, map_location: str = "cpu"):
    """``(module in eval mode, model_config, contract)`` of a visrec checkpoint (``model.pt``,
    ``last.rank0.pt`` or a run directory)."""
    path, blob = read_model_file(path, "checkpoint", map_location)
    return _from_checkpoint(path, blob)


def _from_checkpoint(path: Path, blob):
    if not _is_checkpoint(blob):
        raise DataError("not a visrec checkpoint (needs 'model_config' and 'backbone')", path=path)
    model = build_for_weights(blob["model_config"], blob["backbone"], path)
    cfg = dict(blob["model_config"])
    if blob.get("contract") is not None:
        contract = ModelContract.from_dict(blob["contract"], path=path)
        _check_contract_fits(contract, model, cfg, path)
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


def _check_contract_fits(contract: ModelContract, model, cfg: dict, path: Path) -> None:
    """A saved contract must describe the network saved beside it: its kind (landmarks or an embedder), an input
    size it takes, and the embedding size it outputs (one forward of a zero batch where the network does not
    state it); a contract that lies would be used as if true."""
    built = contract_from_config(cfg)
    if (contract.task == "landmarks") != (built.task == "landmarks"):
        raise DataError(f"its contract says task {contract.task!r}, but the network ({cfg.get('name')!r}) is a "
                        f"{built.task} model", path=path)
    problem = contract.model_file_problem()
    if problem:
        raise DataError(problem, path=path)
    if contract.task == "landmarks" or contract.embedding_dim is None or built.task == "video-embedding":
        return
    try:
        dim = embedding_dim(model, contract.input_size)
    except RuntimeError as exc:
        raise DataError(f"the network does not take its contract's input of {contract.input_size[0]}x"
                        f"{contract.input_size[1]} pixels: {str(exc)[:200]}", path=path) from None
    if dim is not None and dim != contract.embedding_dim:
        raise DataError(f"its contract says embedding_dim {contract.embedding_dim}, the network outputs {dim}",
                        path=path)


def load_backbone(path: str | Path, map_location: str = "cpu"):
    """Rebuild the backbone saved in a visrec checkpoint (``model.pt`` or ``last.rank0.pt``).

    Returns ``(module in eval mode, model_config dict)``. A run directory is accepted too. Use
    :func:`load_model` for the model's contract."""
    model, cfg, _ = load_checkpoint(path, map_location)
    return model, cfg


def require_face_network(model_config: dict, role: str, path: str | Path | None = None) -> None:
    """A :class:`DataError` unless ``model_config`` builds a face embedding network (what :func:`contract_from_config`
    calls ``face-embedding``): for a caller that runs it on aligned face crops and reads one embedding per crop
    (``role``: a video quality head's ``model.backbone``, a distillation teacher). A landmark model would fail
    on its point tensor deep inside the first step, and a product descriptor or a video fusion model would
    train on, silently, with the wrong network."""
    task = contract_from_config(model_config).task
    if task != "face-embedding":
        what = f"a {task} model ({model_config.get('name')!r})"
        raise DataError(f"{role} must be a face embedding network (a run of task faces, or a registry spec "
                        f"{{name: <face backbone>, ...}}); this is {what}", path=path)


def load_face_backbone(path: str | Path, role: str, map_location: str = "cpu"):
    """:func:`load_backbone` of a checkpoint that must hold a face embedding network
    (:func:`require_face_network`, checked on the saved ``model_config`` before the network is built)."""
    path, blob = read_model_file(path, "checkpoint", map_location)
    if _is_checkpoint(blob) and isinstance(blob["model_config"], dict):
        require_face_network(blob["model_config"], role, path)
    model, cfg, _ = _from_checkpoint(path, blob)
    return model, cfg


def init_backbone(module, path: str | Path, name: str | None = None) -> None:
    """Load pretrained weights into ``module`` with ``strict=True``: a bare state dict (arcface_torch's
    ``backbone.pth``), a visrec checkpoint (``model.pt`` / ``last.rank0.pt``, whose model name must be
    ``name`` when given) or a run directory. A mismatch names the file and the first differing keys."""
    import torch

    path, blob = read_model_file(path, "pretrained weights")
    if _is_checkpoint(blob):
        saved = blob["model_config"].get("name") if isinstance(blob["model_config"], dict) else None
        if name is not None and saved != name:
            raise DataError(f"holds a {saved!r} backbone, the config builds {name!r}", path=path)
        blob = blob["backbone"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise DataError("not a state dict (name -> tensor) nor a visrec checkpoint", path=path)
    blob = {k.removeprefix("module."): v for k, v in blob.items()}  # saved from a DDP-wrapped model
    problem = weights_mismatch(module.state_dict(), blob)
    if problem:
        raise DataError(problem, path=path)
    _refuse_non_finite(blob, path)
    module.load_state_dict(blob, strict=True)


def _refuse_non_finite(state: dict, path: Path) -> None:
    """A :class:`DataError` naming ``path`` and the first weight holding NaN or inf: a model built from it
    would embed every image as NaN, silently."""
    import torch

    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise DataError(f"weight {bad!r} holds NaN or inf values (a diverged or damaged checkpoint)", path=path)


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
