"""ONNX export (torch's dynamo exporter, dynamic batch, optional BatchNorm folding), an onnxruntime runner, a
parity check and CPU latency."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visrec._optional import require
from visrec._onnx import OnnxEmbedder  # noqa: F401 - still importable from here (parity_check runs it)
from visrec._files import leftovers, replacing
from visrec.data.text import check_output
from visrec.errors import DataError, StorageError, VisrecError
from visrec.models.contract import CHECKPOINT_KEY, FINGERPRINT_KEY, ONNX_KEY
from visrec.models.loading import FINGERPRINT_HEX, checkpoint_file, file_sha256, fingerprint_of, load_model


# The dynamo exporter writes the ONNX standard opset its torchlib is written in (18) or later; it cannot
# write an older one (a lower ``opset_version`` silently gives 18).
MIN_OPSET = 18


def export_onnx(model: nn.Module, path: str | Path, *, input_size=(1, 3, 112, 112), dynamic_batch: bool = True,
                keep_batchnorm: bool = True, opset: int = MIN_OPSET, output_name: str = "embedding",
                contract=None) -> Path:
    """Export a float32 graph with input ``input`` and output ``output_name`` (default ``embedding``;
    e.g. ``points`` for landmark models), batch axis dynamic (named ``batch``) unless ``dynamic_batch=False``.
    ``keep_batchnorm`` keeps BatchNormalization nodes (no folding into conv biases), which the LFR FLOP
    rule needs; False folds every Conv/ConvTranspose -> BatchNormalization pair into the conv's weight and
    bias (:func:`fold_batchnorm`; smaller, faster to serve). A BatchNormalization after anything else
    (e.g. the BatchNorm1d after a face model's FC) stays either way.

    Uses torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``: ``torch.export`` traces the
    model in eval mode, onnxscript's torchlib translates it) at ONNX opset ``opset``, 18 or later (the
    exporter writes no older one; VisrecError below). The batch axis is traced at batch 2, as
    ``torch.export`` specialises an axis of size 1. The exporter's own optimizer is off (``optimize=False``)
    because it also fuses BatchNorm; visrec runs onnxscript's constant folding and dead-node removal
    instead, then tidies the graph: the exporter's annotations go (per-node stack traces holding local
    source paths, FX node text, ``value_info``: :func:`_strip_annotations`, so a file's bytes depend on
    the model alone), as do the all-zero biases torchlib gives some bias-free convs
    (:func:`_drop_zero_fill_biases`, which the LFR count would take for real ones); BatchNorm is folded
    when asked and identical initializers are stored once. The exporter runs quietly (``verbose=False``,
    no report); nothing is filtered from ``warnings``. It takes seconds per model (tracing and
    decompositions; the TorchScript exporter visrec used before took a fraction of that).

    One self-contained file is written (no external-data file). The caller's model is left as it was (a
    float32 CPU copy is exported when it is on another device/dtype). ``contract`` (a
    :class:`visrec.models.contract.ModelContract`): written as JSON into the file's ``metadata_props``
    under ``visrec.contract``, where ``visrec.models.load_model`` reads it back."""
    onnx = require("onnx", "export")
    optimizer = require("onnxscript.optimizer", "export", package="onnxscript")
    if opset < MIN_OPSET:
        raise VisrecError(f"ONNX opset {opset}: torch's dynamo exporter writes opset {MIN_OPSET} or later")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in model.state_dict().values()
           if t.is_floating_point()):
        model = copy.deepcopy(model).float().cpu()
    batch = max(2, input_size[0]) if dynamic_batch else input_size[0]
    example = torch.zeros(batch, *input_size[1:])
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"],
                                    output_names=[output_name], opset_version=opset,
                                    dynamic_shapes=({0: "batch"},) if dynamic_batch else None,
                                    optimize=False, verbose=False, report=False)
    finally:
        model.train(was_training)
    optimizer.fold_constants(program.model)
    optimizer.remove_unused_nodes(program.model)
    proto = program.model_proto
    _strip_annotations(proto)
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    _drop_zero_fill_biases(proto, own)
    if not keep_batchnorm:
        fold_batchnorm(proto)
    _deduplicate_initializers(proto)
    if contract is not None:
        _set_contract(proto, contract)
    onnx.checker.check_model(proto)
    _save_whole(onnx, proto, path)
    return path


def _save_whole(onnx, proto, path: Path) -> None:
    """``proto`` saved under a temporary name of this process beside ``path``, then renamed over it."""
    with replacing(path) as tmp:
        onnx.save(proto, str(tmp))


def _strip_annotations(proto) -> None:
    """Drop what the dynamo exporter writes beside the computation, in place: every node's and the graph's
    ``metadata_props`` (``pkg.torch.onnx.stack_trace`` holds absolute paths of the model's source files,
    ``pkg.torch.onnx.fx_node``/``class_hierarchy``/``namespace`` the traced FX graph; the graph keeps the
    ExportedProgram's signature) and the intermediate tensors' ``value_info`` (shapes that onnxruntime and
    :func:`visrec.budget.onnx_layer_counts` infer again). Nothing reads them at run time; on MobileFaceNet
    they are ~290 KB, and a file's bytes would otherwise depend on where the source tree lies."""
    proto.graph.ClearField("metadata_props")
    proto.graph.ClearField("value_info")
    for node in proto.graph.node:
        node.ClearField("metadata_props")


def _drop_zero_fill_biases(proto, parameter_names: set[str]) -> None:
    """Remove the all-zero bias the exporter gives a bias-free convolution, in place.

    torchlib writes ``Conv(x, W, zeros)`` for some bias-free convs (``Conv1d``, for one) where the
    model has no bias; left there, the LFR count would take the conv for a biased one (module docstring
    of :mod:`visrec.budget`). A bias input of a Conv, ConvTranspose or Gemm is dropped when it is a
    constant of zeros that is none of the model's own tensors (``parameter_names``: parameters and buffers;
    the exporter names each parameter's initializer after it), so a model's real bias stays even when
    it happens to be zero."""
    graph = proto.graph
    consts = _Constants(graph)
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) == 3 and node.input[2]:
            bias = node.input[2]
            if bias not in parameter_names and bias in consts and not np.any(consts[bias]):
                del node.input[2]
    _drop_unused_initializers(graph)


def _drop_unused_initializers(graph) -> None:
    """Remove initializers and Constant nodes that no node or graph output reads."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type == "Constant" and node.output[0] not in used:
            graph.node.remove(node)
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def _deduplicate_initializers(proto) -> None:
    """Store identical initializers (same dtype, shape and bytes) once, in place, as torch's TorchScript
    exporter did: the first keeps its name and every reader of a copy reads it instead. A fresh model's
    BatchNorm folds into many identical zero biases, so it exports smaller than a trained one of the same
    architecture (:func:`visrec.budget.export_size` measures the latter with distinct weights)."""
    from onnx import numpy_helper

    graph = proto.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return  # subgraphs (If, Loop) read initializers by name too: leave such a graph as it is
    keep: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    outputs = {o.name for o in graph.output}
    for init in graph.initializer:
        if init.name in outputs:
            continue
        value = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), value.tobytes())
        if key in keep:
            rename[init.name] = keep[key]
        else:
            keep[key] = init.name
    if not rename:
        return
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    _drop_unused_initializers(graph)


class _Constants:
    """name -> numpy array of the graph's initializers and ``Constant`` nodes' tensor ``value``s, converted
    when first asked for (a large model's weights are not all copied to find a few biases)."""

    def __init__(self, graph):
        self._protos = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None and value.ByteSize():
                    self._protos[node.output[0]] = value
        self._arrays: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._protos

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            from onnx import numpy_helper

            self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return self._arrays[name]


def fold_batchnorm(proto) -> int:
    """Fold each ``Conv``/``ConvTranspose`` -> ``BatchNormalization`` pair of an ONNX ModelProto into the
    conv, in place; returns how many were folded.

    A pair qualifies when the conv's output feeds that BatchNormalization only (and is no graph output),
    and the conv's weight (and bias, if any) and the BN's scale, bias, mean and variance are constants.
    With ``s = scale / sqrt(var + epsilon)`` per output channel c:

        W'[c] = W[c] * s[c]                  (ConvTranspose: its output channels are weight axis 1, per group)
        b'[c] = (b[c] - mean[c]) * s[c] + bias[c]    (b = 0 for a conv without bias)

    The conv then writes the BN's output tensor and the BN node is removed; initializers nothing uses any
    more (the BN's statistics, a replaced weight) are dropped. A weight shared with another node is
    copied rather than changed. Arithmetic in float64, stored in the weight's dtype."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = _Constants(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    taken = set(inits) | set(producer) | {i.name for i in graph.input}

    def fresh(name: str) -> str:
        k, out = 0, name
        while out in taken:
            k += 1
            out = f"{name}_{k}"
        taken.add(out)
        return out

    def store(name: str, value: np.ndarray, old: str | None) -> str:
        """``value`` under ``old``'s name when only the conv uses that initializer, else under a new one."""
        if old is not None and old in inits and len(consumers.get(old, [])) == 1:
            inits[old].CopyFrom(numpy_helper.from_array(value, old))
            return old
        new = fresh(name)
        graph.initializer.append(numpy_helper.from_array(value, new))
        inits[new] = graph.initializer[-1]
        return new

    folded, drop = 0, []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.input) < 5:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose"):
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in graph_outputs:
            continue
        if any(o and consumers.get(o) for o in bn.output[1:]) or any(o in graph_outputs for o in bn.output[1:]):
            continue  # training-mode outputs (running statistics) in use
        weight = conv.input[1]
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        names = [weight, *bn.input[1:5]] + ([bias] if bias else [])
        if not all(n in consts for n in names):
            continue
        w = consts[weight]
        gamma, beta, mean, var = (consts[n].astype(np.float64) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        if conv.op_type == "Conv":
            w_new = w.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1))
        else:  # ConvTranspose weight (Cin, Cout/groups, *k): output channel g*Cout/groups + j is [g-block, j]
            groups = next((a.i for a in conv.attribute if a.name == "group"), 1)
            per = w.shape[1]
            s = scale.reshape(groups, 1, per, *[1] * (w.ndim - 2))
            w_new = (w.astype(np.float64).reshape(groups, w.shape[0] // groups, *w.shape[1:]) * s).reshape(w.shape)
        b = consts[bias].astype(np.float64) if bias else np.zeros_like(mean)
        b_new = (b - mean) * scale + beta
        w_name = store(weight, w_new.astype(w.dtype), weight)
        b_name = store(f"{weight}.bn_bias", b_new.astype(w.dtype), bias)
        rebuilt = helper.make_node(conv.op_type, [conv.input[0], w_name, b_name], [bn.output[0]],
                                   name=conv.name, domain=conv.domain)
        rebuilt.attribute.extend(conv.attribute)
        old_out = conv.output[0]
        conv.CopyFrom(rebuilt)
        drop.append(bn)
        for vi in list(graph.value_info):  # a shape annotation of the tensor that is gone
            if vi.name == old_out:
                graph.value_info.remove(vi)
        folded += 1
    for bn in drop:
        graph.node.remove(bn)
    _drop_unused_initializers(graph)
    return folded


def _set_contract(proto, contract) -> None:
    """Put ``contract`` (JSON) into the ModelProto's ``metadata_props`` under ``visrec.contract``."""
    _set_prop(proto, ONNX_KEY, contract.to_json())


def _set_prop(proto, key: str, value: str) -> None:
    for prop in list(proto.metadata_props):
        if prop.key == key:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def _stamp_checkpoint(path: Path, sha256: str, fingerprint: str | None = None) -> None:
    """Record the SHA-256 of the checkpoint an export came from (``visrec.checkpoint_sha256``): what lets a
    service run this file in the checkpoint's place (``runtime: auto``), and only for that checkpoint; and the
    checkpoint's fingerprint (``visrec.fingerprint``), which names the export as that checkpoint's model for a
    gallery (``visrec.models.loading``) even after the checkpoint is rewritten with a threshold."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path))
    _set_prop(model, CHECKPOINT_KEY, sha256)
    if fingerprint:
        _set_prop(model, FINGERPRINT_KEY, fingerprint)
    _save_whole(onnx, model, path)


def write_onnx_contract(path: str | Path, contract) -> Path:
    """Store ``contract`` (JSON) in the ONNX file's ``metadata_props`` (key ``visrec.contract``), in place."""
    onnx = require("onnx", "export")
    path = Path(path)
    model = onnx.load(str(path))
    _set_contract(model, contract)
    _save_whole(onnx, model, path)
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
    file with the record a passed parity check adds (:func:`exported_size`), so the two never disagree."""
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
    """Bytes of the file ``visrec export`` writes for ``model`` with its defaults (BatchNorm folded, parity
    checked), exported to a temporary directory that is removed afterwards: :func:`export_model`'s file and,
    with a contract, the checkpoint's SHA-256 that a passed parity check records in it (94 bytes; a
    SHA-256 is always 64 hex digits, so the placeholder recorded here takes the bytes of any checkpoint's).
    Without a contract (a bare module) the file holds no metadata at all."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, Path(tmp) / "model.onnx", contract, input_size=input_size)
        if contract is not None:
            _stamp_checkpoint(path, "0" * 64, "0" * FINGERPRINT_HEX)  # what visrec export stamps, byte for byte
        return os.path.getsize(path)


def export_checkpoint(checkpoint: str | Path, onnx_path: str | Path, *, parity: bool = True,
                      keep_batchnorm: bool = False, force: bool = False) -> tuple[Path, ParityReport | None]:
    """``visrec export``: checkpoint -> ONNX with the checkpoint's contract in its metadata
    (:func:`export_model`), then the parity check (raises if it fails). Landmark models export their
    ``points`` output at the contract's crop size. ``onnx_path`` is checked before anything is loaded or
    exported: an existing folder, or a path under a file, is a ``DataError`` naming it; so is the checkpoint
    itself (always), and any other existing file that is not an ONNX file visrec wrote (unless ``force``).
    The file is written beside ``onnx_path`` under a temporary name and renamed into place only once the
    parity check passed: a failed export leaves an earlier file there as it was."""
    path = check_output(onnx_path, kind="file")
    source = checkpoint_file(checkpoint)
    if path.exists():
        if source.exists() and os.path.samefile(path, source):
            raise DataError("is the checkpoint being exported: name another --out (the export would replace it)",
                            path=path)
        if _torch_file(path):  # a model or a run's resume file: no export stands in for one, --force or not
            raise DataError("is a PyTorch checkpoint (a model or a run's resume file): name another --out; "
                            "--force does not replace one", path=path)
        if not force and not _visrec_onnx(path):
            raise DataError("exists and is no ONNX file visrec exported: name another --out, or pass --force "
                            "to replace it", path=path)
    loaded = load_model(checkpoint)
    model, contract = loaded.module, loaded.contract
    if model is None:
        raise VisrecError(f"{checkpoint}: not a visrec checkpoint (nothing to export)")
    h, w = contract.input_size
    for left in leftovers(path.parent, f"..{path.name}."):  # a killed export's temporary file's own temporary
        left.unlink(missing_ok=True)
    try:
        with replacing(path) as tmp:  # (and the killed export's temporary file, by replacing)
            export_model(model, tmp, contract, keep_batchnorm=keep_batchnorm)
            batch = np.random.default_rng(0).uniform(-1, 1, (4, 3, h, w)).astype(np.float32)
            report = parity_check(model, tmp, batch) if parity else None
            if report is not None and not report.passed:
                raise VisrecError(f"parity check failed: max abs diff {report.max_abs_diff:.2e}, "
                                  f"min cosine {report.min_cosine:.6f} (tolerance {report.tolerance:g}); "
                                  f"{path} was not written")
            if report is not None:  # only an export that passed parity may stand in for its checkpoint
                _stamp_checkpoint(tmp, file_sha256(source), fingerprint_of(loaded.name))
    except OSError as exc:  # a folder the checks passed that takes no file after all (/proc as root)
        raise StorageError.from_os(exc, path) from None
    return path, report


def _torch_file(path: Path) -> bool:
    """Whether ``path`` is a PyTorch zip file (``torch.save``'s format: a zip holding ``<name>/data.pkl``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _visrec_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file holding a visrec contract (one ``visrec export`` may replace)."""
    onnx = require("onnx", "export")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable as ONNX is someone else's file
        return False
    return any(p.key == ONNX_KEY for p in proto.metadata_props)
