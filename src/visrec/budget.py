"""Compute budgets: the LFR organisers' FLOP rule, MACs, full FLOPs, size, dtype, and protocol checks.

FLOPs vs MACs: a multiply-accumulate (MAC) is two floating-point operations. Popular counters (thop,
ptflops, and arcface_torch's own ``flops.py``) print MACs and label them "FLOPs"; arcface_torch's "mbf
0.45 GFLOPs" is 0.45 G MACs = 0.9 G FLOPs. visrec labels every figure.

The LFR 2019 rule (what the organisers' counter computed; teams were disqualified on it), on a
1x3x112x112 input, convolution and fully-connected layers only, each layer's count truncated to an int:
  conv without bias: (2*Cin*kh*kw - 1) * Hout*Wout*Cout / groups
  conv with bias:     2*Cin*kh*kw      * Hout*Wout*Cout / groups
  FC:                 2*in*out, minus out without bias
BatchNorm, activations, pooling and element-wise ops count zero. Folding BatchNorm into the preceding
conv (as exporters often do) adds a bias and so Hout*Wout*Cout/groups FLOPs per folded conv: count a
graph exported with BatchNorm kept, and the report says whether BatchNorm was folded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visrec.errors import DataError, VisrecError
from visrec.protocols import Protocol, load_protocol


@dataclass
class LayerCount:
    name: str
    kind: str  # "conv" | "fc"
    macs: int
    lfr_flops: int
    out_shape: tuple[int, ...]
    groups: int = 1  # conv groups (1 for FC)


def conv_lfr_flops(cin: int, cout: int, kh: int, kw: int, hout: int, wout: int, groups: int, bias: bool) -> int:
    return int((2 * cin * kh * kw - (0 if bias else 1)) * hout * wout * cout / groups)


def fc_lfr_flops(fin: int, fout: int, bias: bool) -> int:
    return 2 * fin * fout - (0 if bias else fout)


def _probe(model: nn.Module, input_size) -> torch.Tensor:
    """A zero input on the model's device and in its dtype (meta device: shapes only)."""
    p = next(model.parameters())
    return torch.zeros(*input_size, device=p.device, dtype=p.dtype)


def _measure(model: nn.Module, input_size, every_op: bool = False) -> tuple[list[LayerCount], int | None, tuple]:
    """One eval-mode forward at batch 1: per-layer rows of every Conv2d / Linear in execution order, the
    FlopCounterMode total when ``every_op`` (else None), and the output shape. The model's training flag
    is restored afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    rows: list[LayerCount] = []

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                hout, wout = out.shape[-2:]
                kh, kw = mod.kernel_size
                macs = hout * wout * mod.out_channels * (mod.in_channels // mod.groups) * kh * kw
                flops = conv_lfr_flops(mod.in_channels, mod.out_channels, kh, kw, hout, wout, mod.groups,
                                       mod.bias is not None)
                rows.append(LayerCount(name, "conv", int(macs), flops, tuple(out.shape), mod.groups))
            elif isinstance(mod, nn.Linear):
                rows.append(LayerCount(name, "fc", mod.in_features * mod.out_features,
                                       fc_lfr_flops(mod.in_features, mod.out_features, mod.bias is not None),
                                       tuple(out.shape)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False) if every_op else contextlib.nullcontext()
    try:
        with torch.no_grad(), counter:
            out = model(_probe(model, input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows, (int(counter.get_total_flops()) if every_op else None), tuple(out.shape)


def layer_counts(model: nn.Module, input_size=(1, 3, 112, 112)) -> list[LayerCount]:
    """Per-layer MACs and LFR FLOPs of every Conv2d / Linear, in execution order (batch 1). Works on a
    model built on the meta device (shapes only, no memory or compute)."""
    return _measure(model, input_size)[0]


def lfr_flops(model: nn.Module, input_size=(1, 3, 112, 112)) -> int:
    """FLOPs under the LFR organisers' rule (module docstring), batch 1. An int: each layer is truncated."""
    return sum(r.lfr_flops for r in layer_counts(model, input_size))


def full_flops(model: nn.Module, input_size=(1, 3, 112, 112)) -> int:
    """FLOPs of every op torch's FlopCounterMode knows (convs and matmuls as 2*MACs, no bias rule), batch 1."""
    return _measure(model, input_size, every_op=True)[1]


# --- ONNX graphs --------------------------------------------------------------------------------------

def _load_onnx(path: Path):
    from visrec._optional import require

    onnx = require("onnx", "export")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise DataError(f"not a valid ONNX model: {str(exc).splitlines()[0][:200]}", path=path) from None
    return onnx, model


def _fold_constant_concats(model) -> None:
    """Replace each Concat of constants by one Constant. The TorchScript exporter writes Resize scales as
    Concat(Constant, Constant); shape inference cannot see through it, so every layer after such an
    up-sampling would get unknown spatial sizes (and be counted as 0 FLOPs)."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = numpy_helper.to_array(value)
    for k, node in enumerate(model.graph.node):
        if node.op_type == "Concat" and node.input and all(i in consts for i in node.input):
            axis = next(a.i for a in node.attribute if a.name == "axis")
            value = np.concatenate([consts[i] for i in node.input], axis=axis)
            consts[node.output[0]] = value
            folded = helper.make_node("Constant", [], [node.output[0]], name=node.name or f"folded_concat_{k}",
                                      value=numpy_helper.from_array(value))
            model.graph.node[k].CopyFrom(folded)


def onnx_layer_counts(path: str | Path, input_size=(1, 3, 112, 112)) -> tuple[list[LayerCount], dict]:
    """The LFR count on an ONNX graph (Conv, Gemm, and MatMul with a constant weight), plus graph facts:
    whether BatchNormalization nodes remain, initializer dtypes, output dimension."""
    path = Path(path)
    onnx, model = _load_onnx(path)
    from onnx import shape_inference

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in inits]
    if not real_inputs:
        raise DataError("graph has no input", path=path)
    dims = real_inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_size):
        raise DataError(f"input has rank {len(dims)}, expected {len(input_size)}", path=path)
    for d, v in zip(dims, input_size):
        d.ClearField("dim_param")
        d.dim_value = v
    _fold_constant_concats(model)
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    # the TorchScript exporter writes a bias-free Linear as MatMul(x, Transpose(W)): see through it
    transposed = {n.output[0]: inits[n.input[0]] for n in graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits}
    rows = []
    for k, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{k}"
        if node.op_type == "Conv":
            w = inits.get(node.input[1])
            if w is None:
                raise DataError(f"Conv {name} has a non-constant weight", path=path)
            cout, cin_g, kh, kw = w.dims
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            out = shapes.get(node.output[0])
            if not out or len(out) != 4 or 0 in out:  # 0 = a dimension inference could not resolve
                raise DataError(f"cannot infer the output shape of Conv {name} (got {out})", path=path)
            bias = len(node.input) > 2 and node.input[2] != ""
            macs = out[2] * out[3] * cout * cin_g * kh * kw
            rows.append(LayerCount(name, "conv", int(macs),
                                   conv_lfr_flops(cin_g * groups, cout, kh, kw, out[2], out[3], groups, bias), out,
                                   groups))
        elif node.op_type in ("Gemm", "MatMul") and (node.input[1] in inits or node.input[1] in transposed):
            w = inits.get(node.input[1]) or transposed[node.input[1]]
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            trans_b = trans_b or node.input[1] in transposed
            fin, fout = (w.dims[1], w.dims[0]) if trans_b else (w.dims[0], w.dims[1])
            if node.op_type == "Gemm":
                bias = len(node.input) > 2 and node.input[2] != ""
            else:  # MatMul + Add(constant of size out) is a biased FC
                nxt = consumers.get(node.output[0], [])
                bias = any(n.op_type == "Add" and any(i in inits and int(np.prod(inits[i].dims)) == fout
                                                       for i in n.input) for n in nxt)
            rows.append(LayerCount(name, "fc", fin * fout, fc_lfr_flops(fin, fout, bias),
                                   shapes.get(node.output[0], ())))
    dtypes = sorted({onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in graph.initializer})
    out_shape = shapes.get(graph.output[0].name, ())
    convs = [n for n in graph.node if n.op_type == "Conv"]
    conv_then_bn = sum(any(c.op_type == "BatchNormalization" for c in consumers.get(n.output[0], [])) for n in convs)
    biased_convs = sum(len(n.input) > 2 and n.input[2] != "" for n in convs)
    # BN folded = no conv feeds a BatchNormalization while convs carry biases (what folding leaves behind)
    facts = {"batchnorm_kept": conv_then_bn > 0 or biased_convs == 0,
             "weight_dtypes": dtypes, "embedding_dim": out_shape[-1] if out_shape else None,
             "params": int(sum(np.prod(i.dims) for i in graph.initializer))}
    return rows, facts


# --- reports ------------------------------------------------------------------------------------------

@dataclass
class Limit:
    name: str
    limit: str
    measured: str
    passed: bool


@dataclass
class BudgetReport:
    protocol: Protocol
    source: str
    lfr_flops: int
    macs: int
    full_flops: int | None
    params: int
    size_bytes: int | None  # bytes of the fp32 ONNX file; None when not measured (check(with_size=False))
    weight_dtypes: list[str]
    embedding_dim: int | None
    batchnorm_folded: bool
    layers: list[LayerCount] = field(default_factory=list)
    limits: list[Limit] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(l.passed for l in self.limits)

    @property
    def size_mb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 1e6

    @property
    def size_mib(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 2**20


def _limits(p: Protocol, flops: int, size_bytes: int | None, dtypes: list[str], dim: int | None) -> list[Limit]:
    out = []
    if p.max_gflops is not None:
        limit = round(p.max_gflops * 1e9)
        out.append(Limit("FLOPs (LFR rule)", f"<= {p.max_gflops:g} G", f"{flops / 1e9:.4f} G", flops <= limit))
    if p.max_size_mb is not None:
        allowed = f"{'<' if p.size_strict else '<='} {p.max_size_mb:g} MB"
        if size_bytes is None:  # an unmeasured size never passes a size limit
            out.append(Limit("size (fp32 ONNX, MB=1e6 B)", allowed, "not measured", False))
        else:
            # compare bytes with the limit in bytes, so "exactly at the limit" is exact
            limit_bytes = round(p.max_size_mb * 1e6)
            ok = size_bytes < limit_bytes if p.size_strict else size_bytes <= limit_bytes
            out.append(Limit("size (fp32 ONNX, MB=1e6 B)", allowed,
                             f"{size_bytes / 1e6:.3f} MB ({size_bytes / 2**20:.3f} MiB)", ok))
    if p.dtype == "float32":
        out.append(Limit("weight dtype", "float32", ",".join(dtypes), dtypes == ["float32"]))
    if p.embedding_dim is not None:
        out.append(Limit("feature dimension", str(p.embedding_dim), str(dim), dim == p.embedding_dim))
    return out


def export_size(model: nn.Module, input_size=(1, 3, 112, 112)) -> int:
    """Bytes of the model exported as a float32 ONNX file with BatchNorm kept."""
    from visrec.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, input_size=input_size, keep_batchnorm=True)
        return os.path.getsize(path)


def check(model_or_path, protocol: str | Protocol, *, with_size: bool = True) -> BudgetReport:
    """Measure a model (nn.Module, visrec checkpoint, or ONNX file) against a protocol's limits.

    Figures: ``lfr_flops`` (FLOPs, LFR rule), ``macs`` (conv+FC multiply-accumulates), ``full_flops``
    (FLOPs of every op, torch FlopCounterMode; None for ONNX input), ``params``, ``size_bytes`` (fp32
    ONNX file exported with BatchNorm kept; for ONNX input the file itself), weight dtypes, embedding
    dimension, per-layer rows. ``with_size=False`` skips the ONNX export: size is then None and any size
    limit fails as "not measured"."""
    p = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if isinstance(model_or_path, (str, Path)) and Path(model_or_path).suffix == ".onnx":
        path = Path(model_or_path)
        if not path.exists():
            raise DataError("ONNX file not found", path=path)
        layers, facts = onnx_layer_counts(path, p.input_size)
        flops = sum(l.lfr_flops for l in layers)
        size = path.stat().st_size
        report = BudgetReport(p, str(path), flops, sum(l.macs for l in layers), None, facts["params"], size,
                              facts["weight_dtypes"], facts["embedding_dim"],
                              batchnorm_folded=not facts["batchnorm_kept"], layers=layers)
    else:
        if isinstance(model_or_path, nn.Module):
            model, source = model_or_path, type(model_or_path).__name__
        else:
            from visrec.models.model_file import load_backbone

            model, _ = load_backbone(model_or_path)
            source = str(model_or_path)
        layers, every_op, out_shape = _measure(model, p.input_size, every_op=True)
        dim = int(out_shape[-1])
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in model.state_dict().values()
                         if t.is_floating_point()})
        size = export_size(model, p.input_size) if with_size else None
        report = BudgetReport(p, source, sum(l.lfr_flops for l in layers), sum(l.macs for l in layers),
                              every_op, sum(t.numel() for t in model.parameters()),
                              size, dtypes, dim, batchnorm_folded=False, layers=layers)
    report.limits = _limits(p, report.lfr_flops, report.size_bytes, report.weight_dtypes, report.embedding_dim)
    return report


# --- fit to budget -------------------------------------------------------------------------------------

# family -> (registry name, {knob: candidate values}); every knob keeps the 112x112 input. The last knob
# is scanned smallest first on one line per combination of the others.
_IRESNET_WIDTHS = [0.125, 0.1875] + [round(0.25 + 0.125 * i, 3) for i in range(30)]
FAMILIES: dict[str, tuple[str, dict[str, list]]] = {
    "effnet_face": ("effnet_face", {"depth_mult": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0],
                                    "width_mult": [round(0.5 + 0.1 * i, 2) for i in range(36)]}),
    # MobileFaceNet's width knob is its `scale` (channel multiplier of the arcface_torch design)
    "mobilefacenet": ("mobilefacenet", {"scale": [1, 2, 3, 4, 5, 6, 7, 8]}),
    **{f"iresnet{d}": (f"iresnet{d}", {"width": _IRESNET_WIDTHS}) for d in (18, 34, 50, 100)},
}


@dataclass
class FitResult:
    family: str
    protocol: Protocol
    best_kwargs: dict
    best: BudgetReport
    next_larger_kwargs: dict | None
    next_larger: BudgetReport | None
    tried: int


def _meta_estimate(name: str, kwargs: dict, input_size) -> tuple[int, int]:
    """(LFR FLOPs, parameters) of a registry model built on the meta device: shapes only, no memory."""
    from visrec.models import build_backbone

    with torch.device("meta"):
        model = build_backbone(name, **kwargs)
        return lfr_flops(model, input_size), sum(t.numel() for t in model.parameters())


def fit_to_budget(family: str, protocol: str | Protocol, knobs: dict[str, list] | None = None) -> FitResult:
    """The largest member (by LFR FLOPs) of a scalable family that passes every limit of the protocol,
    and the next larger candidate on the same search line, which fails. FLOPs are counted on the meta
    device (shapes only, no memory); the winner and its neighbour get the full check (the ONNX export for
    the size is done only when the protocol limits size). ``knobs`` replaces the family's candidate values,
    e.g. ``{"width_mult": [0.5, 0.75, 1.0]}``."""
    from visrec.models import build_backbone

    p = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if family not in FAMILIES:
        raise VisrecError(f"unknown family {family!r}; scalable families: {', '.join(FAMILIES)}")
    name, default_knobs = FAMILIES[family]
    knobs = dict(knobs or default_knobs)
    limit = p.max_gflops * 1e9 if p.max_gflops else float("inf")
    size_limit = (p.max_size_mb * 1e6) if p.max_size_mb else float("inf")

    smallest: list = []  # figures of the first candidate, for the "nothing fits" message

    def estimate_ok(kw) -> tuple[bool, int]:
        flops, params = _meta_estimate(name, kw, p.input_size)
        if not smallest:
            smallest.extend([kw, flops, params])
        return flops <= limit and 4 * params < size_limit, flops

    lines = [dict()]
    outer = list(knobs.items())[:-1]
    for key, values in outer:  # e.g. one search line per depth multiplier
        lines = [dict(l, **{key: v}) for l in lines for v in values]
    inner_key, inner_values = list(knobs.items())[-1]
    best, best_flops, neighbour, tried = None, -1, None, 0
    for line in lines:
        last_ok = None
        for i, v in enumerate(inner_values):
            kw = dict(line, **{inner_key: v})
            ok, flops = estimate_ok(kw)
            tried += 1
            if not ok:
                if last_ok is not None and last_ok[1] > best_flops:
                    best, best_flops, neighbour = last_ok[0], last_ok[1], kw
                break
            last_ok = (kw, flops)
        else:
            if last_ok is not None and last_ok[1] > best_flops:
                best, best_flops, neighbour = last_ok[0], last_ok[1], None
    if best is None:
        kw, flops, params = smallest
        raise VisrecError(f"no member of {family} fits {p.name}: the smallest candidate {kw} has "
                          f"{flops / 1e9:.4f} GFLOPs (LFR rule) and {params:,} parameters "
                          f"(~{4 * params / 1e6:.2f} MB at fp32)")
    # the estimate used 4 bytes/param; confirm with the real export, stepping down if ONNX overhead matters
    with_size = p.max_size_mb is not None
    best_report = check(build_backbone(name, **best), p, with_size=with_size)
    while not best_report.passed:
        smaller = [v for v in inner_values if v < best[inner_key]]
        if not smaller:
            raise VisrecError(f"no member of {family} fits {p.name}")
        neighbour, best = best, dict(best, **{inner_key: smaller[-1]})
        best_report = check(build_backbone(name, **best), p, with_size=with_size)
    next_report = check(build_backbone(name, **neighbour), p, with_size=with_size) if neighbour else None
    return FitResult(family, p, best, best_report, neighbour, next_report, tried)
