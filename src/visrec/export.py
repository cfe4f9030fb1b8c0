"""ONNX export (dynamic batch), an onnxruntime runner, a parity check and CPU latency."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visrec._optional import require
from visrec._onnx import OnnxEmbedder  # noqa: F401 - still importable from here (parity_check runs it)
from visrec.errors import VisrecError


def export_onnx(model: nn.Module, path: str | Path, *, input_size=(1, 3, 112, 112), dynamic_batch: bool = True,
                keep_batchnorm: bool = True, opset: int = 17, output_name: str = "embedding",
                contract=None) -> Path:
    """Export a float32 graph with input ``input`` and output ``output_name`` (default ``embedding``;
    e.g. ``points`` for landmark models), batch axis dynamic unless ``dynamic_batch=False``.
    ``keep_batchnorm`` keeps BatchNormalization nodes (no folding into conv biases), which the LFR FLOP
    rule needs; False folds them (smaller, faster to serve).

    Uses torch's TorchScript exporter (``dynamo=False``): with ``TrainingMode.PRESERVE`` and constant
    folding off it keeps BN nodes, and with ``TrainingMode.EVAL`` + constant folding it folds them. The
    caller's model is left as it was (a float32 CPU copy is exported when it is on another device/dtype).
    ``contract`` (a :class:`visrec.models.contract.ModelContract`): written as JSON into the file's
    ``metadata_props`` under ``visrec.contract``, where ``visrec.models.load_model`` reads it back."""
    require("onnx", "export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in model.state_dict().values()
           if t.is_floating_point()):
        model = copy.deepcopy(model).float().cpu()
    was_training = model.training
    model.eval()
    axes = {"input": {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript exporter: its PRESERVE mode with constant folding off keeps BatchNorm nodes.
        torch.onnx.export(model, torch.zeros(*input_size), str(path), dynamo=False, input_names=["input"],
                          output_names=[output_name], dynamic_axes=axes, opset_version=opset,
                          training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=not keep_batchnorm)
    model.train(was_training)
    if contract is not None:
        write_onnx_contract(path, contract)
    return path


def write_onnx_contract(path: str | Path, contract) -> Path:
    """Store ``contract`` (JSON) in the ONNX file's ``metadata_props`` (key ``visrec.contract``), in place."""
    from visrec.models.contract import ONNX_KEY

    onnx = require("onnx", "export")
    path = Path(path)
    model = onnx.load(str(path))
    for prop in list(model.metadata_props):
        if prop.key == ONNX_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_KEY, contract.to_json()
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


@dataclass
class ParityReport:
    max_abs_diff: float
    min_cosine: float
    tolerance: float
    passed: bool


def parity_check(model: nn.Module, onnx_path: str | Path, batch: np.ndarray | None = None, *,
                 tolerance: float = 1e-3, min_cosine: float = 0.9999) -> ParityReport:
    """Compare PyTorch and onnxruntime embeddings on a batch: fail above ``tolerance`` max abs diff or
    below ``min_cosine``."""
    if batch is None:
        batch = np.random.default_rng(0).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in model.state_dict().values()
           if t.is_floating_point()):
        model = copy.deepcopy(model).float().cpu()  # leave the caller's model where it is
    was_training = model.training
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(batch)).numpy()
    model.train(was_training)
    got = OnnxEmbedder(onnx_path)(batch)
    diff = float(np.abs(ref - got).max())
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    # the cosine is meaningless for (near-)zero embeddings, e.g. a fresh net with default BN statistics
    cos = np.where(norms > 1e-12, (ref * got).sum(1) / np.maximum(norms, 1e-30), 1.0)
    report = ParityReport(diff, float(cos.min()), tolerance, diff <= tolerance and float(cos.min()) >= min_cosine)
    return report


def latency(onnx_path: str | Path, batch_sizes=(1, 8, 32), *, runs: int = 20, warmup: int = 3,
            input_size=(3, 112, 112)) -> dict[int, tuple[float, float]]:
    """p50/p95 milliseconds per batch on the CPU, for each batch size."""
    embed = OnnxEmbedder(onnx_path)
    out = {}
    for bs in batch_sizes:
        x = np.random.default_rng(0).standard_normal((bs, *input_size)).astype(np.float32)
        for _ in range(warmup):
            embed(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            embed(x)
            times.append((time.perf_counter() - t0) * 1e3)
        out[bs] = (float(np.percentile(times, 50)), float(np.percentile(times, 95)))
    return out


def export_model(model: nn.Module, onnx_path: str | Path, contract=None, *, keep_batchnorm: bool = False,
                 input_size=(1, 3, 112, 112)) -> Path:
    """The ONNX file ``visrec export`` writes for ``model``: float32, dynamic batch, BatchNorm folded unless
    ``keep_batchnorm``, the contract (origin ``visrec-onnx``) in its metadata. With a contract the input
    is the contract's size and a landmark model's output is named ``points``; without one (a bare module)
    ``input_size`` is used and no metadata is written. ``visrec budget`` measures the size of this same
    file (:func:`exported_size`), so the two never disagree."""
    if contract is None:
        return export_onnx(model, onnx_path, input_size=input_size, keep_batchnorm=keep_batchnorm)
    h, w = contract.input_size
    landmarks = contract.task == "landmarks"
    # source=None: the loader sets an ONNX model's source to the file's own path, so the checkpoint's path
    # would only leak a local path into the file and make its size depend on where the checkpoint lay
    return export_onnx(model, onnx_path, input_size=(1, 3, h, w), keep_batchnorm=keep_batchnorm,
                       output_name="points" if landmarks else "embedding",
                       contract=contract.replace(origin="visrec-onnx", source=None))


def exported_size(model: nn.Module, contract=None, *, input_size=(1, 3, 112, 112)) -> int:
    """Bytes of the file :func:`export_model` writes for ``model`` (default settings: BatchNorm folded),
    exported to a temporary directory that is removed afterwards."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, Path(tmp) / "model.onnx", contract, input_size=input_size)
        return os.path.getsize(path)


def export_checkpoint(checkpoint: str | Path, onnx_path: str | Path, *, parity: bool = True,
                      keep_batchnorm: bool = False) -> tuple[Path, ParityReport | None]:
    """``visrec export``: checkpoint -> ONNX with the checkpoint's contract in its metadata
    (:func:`export_model`), then the parity check (raises if it fails). Landmark models export their
    ``points`` output at the contract's crop size."""
    from visrec.models.loading import load_model

    loaded = load_model(checkpoint)
    model, contract = loaded.module, loaded.contract
    if model is None:
        raise VisrecError(f"{checkpoint}: not a visrec checkpoint (nothing to export)")
    h, w = contract.input_size
    path = export_model(model, onnx_path, contract, keep_batchnorm=keep_batchnorm)
    batch = np.random.default_rng(0).uniform(-1, 1, (4, 3, h, w)).astype(np.float32)
    report = parity_check(model, path, batch) if parity else None
    if report is not None and not report.passed:
        raise VisrecError(f"parity check failed: max abs diff {report.max_abs_diff:.2e}, "
                          f"min cosine {report.min_cosine:.6f} (tolerance {report.tolerance:g})")
    return path, report
