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

Every convolution kind, by one rule on both paths (PyTorch modules and ONNX graphs). With K = the kernel
area/volume (kh*kw; k for 1-D; kd*kh*kw for 3-D), P_out = output positions (Hout*Wout; Lout; Dout*Hout*Wout)
and P_in = input positions likewise, and b = 0 with a bias, 1 without:
  conv (1-D, 2-D, 3-D; dilated; grouped, depthwise):
      MACs = P_out * Cout * (Cin/groups) * K            LFR FLOPs = (2*Cin*K - b) * P_out*Cout / groups
      Dilation spreads the same K taps further apart: it changes P_out (through the padding arithmetic),
      never the work per output.
  transposed conv (ConvTranspose 1-D/2-D/3-D): every input position is multiplied by the whole kernel
  once and scattered into the output, so
      MACs = P_in * Cin * (Cout/groups) * K             LFR FLOPs = (2*Cout*K - b) * P_in*Cin / groups
      i.e. 2*MACs minus one addition per (input position, input channel)/groups without a bias, the
      organisers' conv formula applied to the transposed conv's own direction (it is the conv whose
      gradient it computes). The organisers' counter had no rule of its own for it (the LFR models had
      no transposed convs); this is visrec's, and it never counts a transposed conv as 0.
  FC (Linear, ONNX Gemm / MatMul with a constant weight) on R rows (R = 1 for a (1, in) input; tokens
  of a (1, T, in) input are T rows):
      MACs = R * in * out                               LFR FLOPs = R * (2*in*out - b*out)
Layers holding weights that no rule covers (an LSTM, attention with packed projection weights, a
bilinear layer, ...) are an error naming the layer, never 0 FLOPs: on the PyTorch path, a module with
parameters of its own that is neither a counted kind nor a known zero-count kind (normalisation,
PReLU, learned pooling exponent); on the ONNX path, an op applying weights (a constant: an initializer,
a Constant node, or a node computing from constants only) to a per-image tensor that is neither a counted
op (Conv, ConvTranspose, Gemm, MatMul) nor a known weight-free op (element-wise, shape, normalisation,
pooling, resize), and a branch (If) holding counted or weighted ops.
ONNX graphs: local functions are inlined first, and a weight is a constant however it reaches its layer
(Identity, Reshape, Transpose, Cast, Squeeze of an initializer or a Constant node): a Gemm or MatMul with a
constant operand (on either side) is an FC layer (K = the contracted dimension; MACs = output values x K,
LFR FLOPs = output values x (2K - b)). A product of two activations (attention's scores and weighted
values) holds no weight: the LFR rule counts conv and FC layers only, so it counts 0, like pooling. A
node computing from constants alone (two weights multiplied, a weight transposed) is a weight transform
done at load, not per image: the layer applying its result to the image is counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visrec._files import check_regular_file
from visrec._onnx_check import (_check_held, _count, _graphs, _inline, _itemsize, _skeleton,
                                fold_shape_computations)
from visrec._optional import require
from visrec.errors import ConfigError, DataError, VisrecError, shown
from visrec.export import exported_size
from visrec.models import build_backbone
from visrec.models.contract import ONNX_KEY, ModelContract
from visrec.models.loading import load_model
from visrec.models.meta import on_meta_device
from visrec.models.model_file import default_contract
from visrec.models.pooling import GeM
from visrec.protocols import BUILTIN as BUILTIN_PROTOCOLS
from visrec.protocols import Protocol, load_protocol


@dataclass
class LayerCount:
    name: str
    kind: str  # "conv" | "convtranspose" | "fc"
    macs: int
    lfr_flops: int
    out_shape: tuple[int, ...]
    groups: int = 1  # conv groups (1 for FC)


def conv_lfr_flops(cin: int, cout: int, kh: int, kw: int, hout: int, wout: int, groups: int, bias: bool) -> int:
    """LFR FLOPs of a 2-D conv (module docstring): ``(2*Cin*kh*kw - b) * Hout*Wout*Cout / groups``."""
    return conv_nd_lfr_flops(cin, cout, kh * kw, hout * wout, groups, bias)


def conv_nd_lfr_flops(cin: int, cout: int, kernel: int, positions: int, groups: int, bias: bool) -> int:
    """LFR FLOPs of a conv of any dimensionality: ``(2*Cin*K - b) * P*Cout / groups``, truncated to an int.
    ``kernel`` = K, the number of kernel taps; ``positions`` = P, the output positions. For a transposed
    conv pass (Cout, Cin, K, input positions): see the module docstring."""
    return int((2 * cin * kernel - (0 if bias else 1)) * positions * cout / groups)


def fc_lfr_flops(fin: int, fout: int, bias: bool, rows: int = 1) -> int:
    """LFR FLOPs of a fully-connected layer on ``rows`` rows: ``rows * (2*in*out - (0 with bias else out))``."""
    return rows * (2 * fin * fout - (0 if bias else fout))


def conv_counts(cin: int, cout: int, kernel: int, groups: int, bias: bool, transposed: bool,
                in_positions: int, out_positions: int) -> tuple[int, int]:
    """(MACs, LFR FLOPs) of a convolution by the module docstring's rule, the one both paths use."""
    if transposed:
        return (in_positions * cin * (cout // groups) * kernel,
                conv_nd_lfr_flops(cout, cin, kernel, in_positions, groups, bias))
    return (out_positions * cout * (cin // groups) * kernel,
            conv_nd_lfr_flops(cin, cout, kernel, out_positions, groups, bias))


# Modules with parameters of their own that cost no FLOPs under the LFR rule: normalisation (an affine
# per channel, foldable), PReLU (an activation) and GeM's learned exponent (pooling). Extend the tuple for
# another weight-free kind; anything else that holds parameters and is neither a conv nor a Linear is an
# error rather than silently 0 FLOPs.
ZERO_COUNT_KINDS: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def _zero_count_kinds() -> tuple[type, ...]:

    extra = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    return ZERO_COUNT_KINDS + extra + (GeM,)


def _unknown_weighted_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, type) of every module holding parameters of its own that no rule covers."""
    known = (nn.modules.conv._ConvNd, nn.Linear) + _zero_count_kinds()
    return [(name or "<model>", type(m).__name__) for name, m in model.named_modules()
            if not isinstance(m, known) and next(m.parameters(recurse=False), None) is not None]


def _probe(model: nn.Module, input_size) -> torch.Tensor:
    """A zero input on the model's device and in its dtype (meta device: shapes only)."""
    p = next(model.parameters())
    return torch.zeros(*input_size, device=p.device, dtype=p.dtype)


def _positions(shape) -> int:
    """Spatial positions of an (N, C, *spatial) tensor: the product of the spatial sizes."""
    return int(np.prod(tuple(shape[2:]), dtype=np.int64))


def _measure(model: nn.Module, input_size, every_op: bool = False) -> tuple[list[LayerCount], int | None, tuple]:
    """One eval-mode forward at batch 1: per-layer rows of every convolution (1-D/2-D/3-D, transposed or
    not) and Linear in execution order, the FlopCounterMode total when ``every_op`` (else None), and the
    output shape. The model's training flag is restored afterwards. A module holding weights that no rule
    covers is a VisrecError naming it (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    unknown = _unknown_weighted_layers(model)
    if unknown:
        listed = ", ".join(f"{n} ({t})" for n, t in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise VisrecError(f"the FLOP counter has no rule for layers holding weights: {listed}; it counts "
                          f"convolutions (1-D/2-D/3-D, transposed, grouped, dilated) and Linear, and counts "
                          f"normalisation, PReLU and pooling as 0 — a layer it does not know is refused rather "
                          f"than counted as 0 FLOPs")
    rows: list[LayerCount] = []

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.modules.conv._ConvNd):
                kernel = int(np.prod(mod.kernel_size))
                macs, flops = conv_counts(mod.in_channels, mod.out_channels, kernel, mod.groups, mod.bias is not None,
                                          mod.transposed, _positions(inp[0].shape), _positions(out.shape))
                kind = "convtranspose" if mod.transposed else "conv"
                rows.append(LayerCount(name, kind, int(macs), flops, tuple(out.shape), mod.groups))
            elif isinstance(mod, nn.Linear):
                r = int(np.prod(tuple(out.shape[:-1]), dtype=np.int64))
                rows.append(LayerCount(name, "fc", r * mod.in_features * mod.out_features,
                                       fc_lfr_flops(mod.in_features, mod.out_features, mod.bias is not None, r),
                                       tuple(out.shape)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
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
    """Per-layer MACs and LFR FLOPs of every convolution and Linear, in execution order (batch 1). Works on a
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
    """The ONNX file's ModelProto, its external data left unread (counting needs shapes, not values), after
    onnx's checker (which refuses external data outside the file's folder)."""
    onnx = require("onnx", "export")
    check_regular_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))  # by path: external data is looked for beside the file, not read
    except Exception as exc:
        raise DataError(f"not a valid ONNX model: {str(exc).splitlines()[0][:200]}", path=path) from None
    return onnx, model


# ONNX ops that take initializers but hold no weights the LFR rule counts: normalisation, activations with a
# learned slope, element-wise arithmetic (BatchNorm-free affine, bias Add after MatMul, GeM's Pow), pooling,
# resizing and shape/index plumbing whose constant inputs are shapes, scales, axes or pads.
ONNX_ZERO_COUNT_OPS = frozenset({
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "PRelu", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Clip",
    "Where", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not",
    "Reshape", "Resize", "Upsample", "Expand", "Tile", "Pad", "Slice", "Gather", "Squeeze", "Unsqueeze",
    "Concat", "Split", "Transpose", "Flatten", "Cast", "ConstantOfShape", "Range", "Shape", "Identity",
    "ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2", "Sqrt", "Exp", "Log", "Abs", "Neg",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid",
    "HardSwish", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Mish", "Softplus", "Tanh", "Erf", "Dropout",
    "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Constant"})
ONNX_COUNTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

_LD_TAG = 1  # bytes of the tag of TensorProto.raw_data, GraphProto.initializer and ModelProto.graph (fields < 16)


def _delimited(n: int) -> int:
    """Bytes a length-delimited protobuf field of ``n`` bytes takes: tag, length varint, payload."""
    varint, rest = 1, n
    while rest >= 0x80:
        rest >>= 7
        varint += 1
    return _LD_TAG + varint + n


def _tensor_bytes(tensor) -> int:
    """The bytes a dense tensor's values take as ``raw_data`` (4-bit types pack two values a byte)."""
    from onnx import TensorProto

    packed = {getattr(TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, t)}
    n = _count(tensor.dims)
    return (n + 1) // 2 if tensor.data_type in packed else n * _itemsize(tensor.data_type)


def _single_file_bytes(model, path: Path) -> int:
    """The bytes of the ONNX file: ``path``'s own, or for a model whose weights are saved as external data
    (the main graph's initializers, what ``onnx.save_model(..., save_as_external_data=True)`` moves), the
    bytes of the one file holding them inline that the same model saves to (each external tensor's declared
    values as ``raw_data``) — what the size rule measures. External data anywhere else (a Constant node, a
    subgraph, a sparse tensor) is refused: no saver visrec knows writes it."""
    from onnx import TensorProto

    file_bytes = path.stat().st_size
    main = model.graph
    for graph, where in _graphs(main):
        tensors = [(f"{where}initializer {shown(t.name)}", t) for t in graph.initializer if graph is not main]
        tensors += [(f"{where}sparse initializer {shown(t.values.name)}", t.values) for t in graph.sparse_initializer]
        tensors += [(f"{where}{n.op_type} node {shown(n.name or n.output[0] if n.output else '')}", t)
                    for n in graph.node for t in _attribute_tensors(n)]
        for what, t in tensors:
            if t.data_location == TensorProto.EXTERNAL:
                raise DataError(f"{what} keeps its values in external data; visrec measures external data of the "
                                f"main graph's initializers only", path=path)
    for f in model.functions:
        for n in f.node:
            if any(t.data_location == TensorProto.EXTERNAL for t in _attribute_tensors(n)):
                raise DataError(f"function {f.domain}:{f.name} > {n.op_type} node keeps its values in external "
                                f"data; visrec measures external data of the main graph's initializers only",
                                path=path)
    external = [t for t in main.initializer if t.data_location == TensorProto.EXTERNAL]
    if not external:
        return file_bytes
    graph_old = main.ByteSize()
    graph_new = graph_old
    for t in external:
        inline = type(t)()
        inline.CopyFrom(t)
        inline.ClearField("external_data")
        inline.ClearField("data_location")
        inline.ClearField("raw_data")
        graph_new += _delimited(inline.ByteSize() + _delimited(_tensor_bytes(t))) - _delimited(t.ByteSize())
    return file_bytes + _delimited(graph_new) - _delimited(graph_old)


def _attribute_tensors(node):
    """The tensors a node's attributes hold (a Constant's value, ...), sparse ones by their values."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
        for sp in attr.sparse_tensors:
            yield sp.values


def _constant_sources(onnx, graph) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (dims, ONNX element type) of every tensor whose values the file holds: initializers (dense and
    sparse) and the outputs of Constant nodes (a weight written as a Constant is a weight like any other)."""
    T = onnx.TensorProto
    out = {t.name: (tuple(t.dims), t.data_type) for t in graph.initializer}
    out.update({sp.values.name: (tuple(sp.dims), sp.values.data_type) for sp in graph.sparse_initializer})
    lists = {"value_float": ((), T.FLOAT), "value_int": ((), T.INT64), "value_string": ((), T.STRING)}
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        for attr in node.attribute:
            if attr.name == "value":
                out[node.output[0]] = (tuple(attr.t.dims), attr.t.data_type)
            elif attr.name == "sparse_value":
                out[node.output[0]] = (tuple(attr.sparse_tensor.dims), attr.sparse_tensor.values.data_type)
            elif attr.name in lists:
                out[node.output[0]] = lists[attr.name]
            elif attr.name in ("value_floats", "value_ints", "value_strings"):
                values = getattr(attr, attr.name[6:])
                out[node.output[0]] = ((len(values),), {"value_floats": T.FLOAT, "value_ints": T.INT64,
                                                        "value_strings": T.STRING}[attr.name])
    return out


def _has_subgraphs(node) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def onnx_layer_counts(path: str | Path, input_size=(1, 3, 112, 112)) -> tuple[list[LayerCount], dict]:
    """The LFR count on an ONNX graph by the module docstring's rule, plus graph facts: whether
    BatchNormalization nodes remain, weight dtypes, parameters, output dimension, and ``size_bytes`` (the
    bytes of the ONNX file, external data included: :func:`_single_file_bytes`).

    The file is read without its external data (never loaded: counting needs shapes, not values), and
    checked first as :func:`visrec._onnx_check.check_graph` checks a file from elsewhere: each tensor holds
    what it declares, external data included (onnx's checker keeps its location beside the file); local
    functions inline to a bounded size (:data:`visrec._onnx_check.MAX_INLINED_NODES`). Shape arithmetic is
    folded as :func:`~visrec._onnx_check.fold_shape_computations` folds it (bounded before it is computed);
    nothing else is evaluated, so a graph whose constants would take gigabytes at run time is still counted.
    The graph's input must take the protocol's ``input_size``: free (symbolic) dimensions are set to it, a
    fixed one that differs is a DataError naming the file, the input and both sizes.

    Local functions are inlined before counting. A tensor is constant when the file holds its values (an
    initializer, a Constant node) or a node computes it from constants alone (Identity, Reshape, Transpose,
    Cast, Squeeze, ... of a weight); it holds weights when it comes from a non-int64 one (int64 constants are
    shapes, axes and indices). Counted: Conv and ConvTranspose with a constant weight, and Gemm and MatMul
    with one constant operand, on either side (an FC layer: MACs = output values x the contracted dimension
    K, LFR FLOPs = output values x (2K - b); a bias is Gemm's C, or an Add of a constant of the output
    features after a MatMul); the constant operand's values are parameters. A product of two
    activations (attention's scores and weighted sums) holds no weight: it is not a layer the LFR rule
    counts (conv and FC only; the organisers' counter hooked layers) and counts 0, like pooling. A node
    computing from constants only (a product of two constants, a weight dequantised or transposed) is a
    weight transform done once when the model loads, not per image: the layer applying its result to the
    image is the one counted. A node that applies weights to a per-image tensor and is neither counted nor
    in :data:`ONNX_ZERO_COUNT_OPS`, and a branch (If) holding counted or weighted ops, are a DataError naming
    them, never 0 FLOPs."""
    path = Path(path)
    onnx, model = _load_onnx(path)
    graph = model.graph
    sources = _constant_sources(onnx, graph)
    real_inputs = [i for i in graph.input if i.name not in sources]
    if not real_inputs:
        raise DataError("graph has no input", path=path)
    image = real_inputs[0]
    dims = image.type.tensor_type.shape.dim
    if len(dims) != len(input_size):
        raise DataError(f"input has rank {len(dims)}, expected {len(input_size)}", path=path)
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if any(v is not None and v != want for v, want in zip(fixed, input_size)):
        shown_dims = [v if v is not None else (d.dim_param or "?") for v, d in zip(fixed, dims)]
        raise DataError(f"input {shown(image.name)} is fixed to {shown_dims}, but the protocol counts every model on "
                        f"{list(input_size)}; export the model with that input size (or free dimensions)", path=path)
    # checked before anything is read or counted: every tensor holds what it declares, external data too (its
    # location beside the file, checked by onnx's checker; its bytes there, by their declared length), so
    # nothing below sizes a weight from a declaration its file does not back; functions inline to a bounded size
    _check_held(model, path)
    size_bytes = _single_file_bytes(model, path)
    model = _inline(model, path)
    graph = model.graph
    sources = _constant_sources(onnx, graph)  # Constant nodes of inlined functions too

    skeleton = _skeleton(model)  # large and external tensors as typed inputs: shapes without their values
    for vi in skeleton.graph.input:
        if vi.name == image.name:
            for d, v in zip(vi.type.tensor_type.shape.dim, input_size):
                d.ClearField("dim_param")
                d.dim_value = v
    inferred = fold_shape_computations(skeleton)  # shape arithmetic, sized before it is computed
    shapes = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    # constants (values known without the input) and, among them, weights (from a non-int64 constant); nodes
    # are topologically sorted in a valid ONNX graph
    const = set(sources)
    weights = {n for n, (_, dtype) in sources.items() if dtype not in (onnx.TensorProto.INT64,
                                                                       onnx.TensorProto.STRING)}
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or _has_subgraphs(node):
            continue
        if all(i in const for i in ins):
            const.update(o for o in node.output if o)
            if any(i in weights for i in ins):
                weights.update(o for o in node.output if o)

    def known_shape(name: str, node_name: str, op: str, rank: int | None = None) -> tuple:
        shape = sources[name][0] if name in sources else shapes.get(name)
        if not shape or (rank is not None and len(shape) != rank) or 0 in shape:  # 0 = unresolved
            raise DataError(f"cannot infer the shape of {op} {node_name}'s tensor {name!r} (got {shape})", path=path)
        return tuple(int(v) for v in shape)

    def numel(name: str) -> int | None:
        shape = sources[name][0] if name in sources else shapes.get(name)
        return None if shape is None or 0 in shape else int(np.prod(shape, dtype=np.int64))

    rows = []
    for k, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{k}"
        op = node.op_type
        ins = [i for i in node.input if i]
        if _has_subgraphs(node):
            for sub, _ in (s for a in node.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))
                           for s in _graphs(g)):
                inner = [n for n in sub.node if n.op_type in ONNX_COUNTED_OPS or
                         (n.op_type not in ONNX_ZERO_COUNT_OPS and not _has_subgraphs(n))]
                if inner or any(t.data_type != onnx.TensorProto.INT64 for t in sub.initializer):
                    what = f"{inner[0].op_type} node" if inner else "weights"
                    raise DataError(f"op {name} ({op}) holds a subgraph with a {what}; the FLOP counter counts the "
                                    f"main graph's layers only and refuses layers it cannot count", path=path)
        elif op in ("Conv", "ConvTranspose"):
            if node.input[1] not in const:
                raise DataError(f"{op} {name} has a non-constant weight", path=path)
            w = known_shape(node.input[1], name, op)
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            kernel = int(np.prod(w[2:]))
            rank = len(w)
            out = known_shape(node.output[0], name, op, rank)
            inp = known_shape(node.input[0], name, op, rank)
            bias = len(node.input) > 2 and node.input[2] != ""
            if op == "Conv":  # weight (Cout, Cin/groups, *kernel)
                cout, cin = w[0], w[1] * groups
            else:  # ConvTranspose weight (Cin, Cout/groups, *kernel)
                cin, cout = w[0], w[1] * groups
            transposed_conv = op == "ConvTranspose"
            macs, flops = conv_counts(cin, cout, kernel, groups, bias, transposed_conv,
                                      _positions(inp), _positions(out))
            rows.append(LayerCount(name, "convtranspose" if transposed_conv else "conv", int(macs), flops, out,
                                   groups))
        elif op in ("Gemm", "MatMul") and len(node.input) >= 2 and (node.input[0] in const) != (node.input[1] in const):
            a, b = node.input[0], node.input[1]
            attrs = {x.name: x.i for x in node.attribute}
            if b in const:  # x @ W: W is (in, out), or (out, in) with transB
                w = known_shape(b, name, op)
                if op == "Gemm":
                    fin, fout = (w[1], w[0]) if attrs.get("transB", 0) else (w[0], w[1])
                else:
                    fin, fout = (w[0], 1) if len(w) == 1 else (w[-2], w[-1])
            else:  # W @ x: W is (out, in), or (in, out) with transA
                w = known_shape(a, name, op)
                if op == "Gemm":
                    fin, fout = (w[0], w[1]) if attrs.get("transA", 0) else (w[1], w[0])
                else:
                    fin, fout = (w[-1], 1) if len(w) == 1 else (w[-1], w[-2])
            if op == "Gemm":
                bias = len(node.input) > 2 and node.input[2] != ""
            else:  # MatMul + Add(constant of size out) is a biased FC
                bias = any(n.op_type == "Add" and any(i != node.output[0] and i in const and numel(i) == fout
                                                       for i in n.input)
                           for n in consumers.get(node.output[0], []))
            out = known_shape(node.output[0], name, op)
            values = int(np.prod(out, dtype=np.int64))  # R rows x out features
            rows.append(LayerCount(name, "fc", values * fin, fc_lfr_flops(fin, values, bias), out))
        elif op not in ONNX_ZERO_COUNT_OPS and op not in ("Gemm", "MatMul") and not all(i in const for i in ins):
            held = [i for i in ins if i in weights]
            if held:
                raise DataError(f"op {name} ({op}) takes constant weights ({', '.join(held[:3])}) but the "
                                f"FLOP counter has no rule for {op}; it counts Conv, ConvTranspose, Gemm "
                                f"and MatMul, and refuses an unknown weighted op rather than count it as 0", path=path)
    # weights: every tensor the file holds but int64 ones (shapes, axes, pads and indices: the type ONNX requires
    # for them; the dynamo exporter stores e.g. a flatten's target shape as one) and strings
    held = [sources[n] for n in sources if n in weights]
    dtypes = sorted({onnx.helper.tensor_dtype_to_np_dtype(dtype).name for _, dtype in held})
    out_shape = shapes.get(graph.output[0].name, ())
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    conv_then_bn = sum(any(c.op_type == "BatchNormalization" for c in consumers.get(n.output[0], [])) for n in convs)
    biased_convs = sum(len(n.input) > 2 and n.input[2] != "" for n in convs)
    # BN folded = no conv feeds a BatchNormalization while convs carry biases (what folding leaves behind)
    facts = {"batchnorm_kept": conv_then_bn > 0 or biased_convs == 0,
             "weight_dtypes": dtypes, "embedding_dim": out_shape[-1] if out_shape else None,
             "output_shape": tuple(int(v) for v in out_shape[1:]) if out_shape else None,
             "params": int(sum(_count(d) for d, _ in held)), "size_bytes": size_bytes}
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
    embedding_dim: int | None  # the output's last dimension (an embedder's feature size)
    batchnorm_folded: bool
    layers: list[LayerCount] = field(default_factory=list)
    output_shape: tuple[int, ...] | None = None  # one image's output (512,) for an embedder, (106, 2) for points
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


def _with_distinct_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters and buffers all hold distinct random values.

    visrec's export stores identical initializers once: a freshly built model (BatchNorm at mean 0 /
    var 1 / weight 1 / bias 0, so many folded conv biases are the same zeros) exports a smaller file than
    any trained model of the same architecture. Values never change a float32 tensor's byte count, so the
    copy exports to exactly the size of a trained model's file."""
    import copy

    twin = copy.deepcopy(model).float().cpu()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point():
                # positive values in [0.5, 1.5): valid as variances too, so BN folding stays finite
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return twin


def export_size(model: nn.Module, input_size=(1, 3, 112, 112), contract=None, *, untrained: bool = False) -> int:
    """Bytes of the ONNX file ``visrec export`` writes for ``model`` (float32, BatchNorm folded, the
    contract and the checkpoint's SHA-256 in its metadata when a contract is given):
    :func:`visrec.export.exported_size`, the one export both
    commands use, so ``budget`` and ``export`` report one size for one model. ``untrained``: the model
    is a fresh build standing for its architecture (a registry name); its size is that of a trained
    model's file (:func:`_with_distinct_weights`), not the smaller file of its constant initial values."""

    return exported_size(_with_distinct_weights(model) if untrained else model, contract, input_size=input_size)


def check(model_or_path, protocol: str | Protocol, *, with_size: bool = True, contract=None,
          untrained: bool = False) -> BudgetReport:
    """Measure a model (nn.Module, visrec checkpoint, or ONNX file) against a protocol's limits.

    Figures: ``lfr_flops`` (FLOPs, LFR rule, counted on the model itself = its graph with BatchNorm kept),
    ``macs`` (conv+FC multiply-accumulates), ``full_flops`` (FLOPs of every op, torch FlopCounterMode; None
    for ONNX input), ``params``, ``size_bytes``, weight dtypes, embedding dimension, per-layer rows.

    ``size_bytes`` is the size of the file ``visrec export`` writes for the model (float32, BatchNorm
    folded, the model's contract and the checkpoint's SHA-256 in its metadata:
    :func:`visrec.export.exported_size`); for ONNX input,
    the file itself. ``contract`` is the module's contract (a checkpoint brings its own; a bare module
    without one is exported with no metadata). ``untrained=True`` (a module freshly built from the
    registry, standing for its architecture): the size of a trained model's file, see :func:`export_size`.
    ``with_size=False`` skips the ONNX export: size is then None and any size limit fails as "not
    measured"."""
    p = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if isinstance(model_or_path, (str, Path)) and Path(model_or_path).suffix == ".onnx":
        path = Path(model_or_path)
        if not path.exists():
            raise DataError("ONNX file not found", path=path)
        _check_task(p, _onnx_contract(path), str(path))
        layers, facts = onnx_layer_counts(path, p.input_size)
        flops = sum(l.lfr_flops for l in layers)
        size = facts["size_bytes"]  # the file's bytes, its external data included
        report = BudgetReport(p, str(path), flops, sum(l.macs for l in layers), None, facts["params"], size,
                              facts["weight_dtypes"], facts["embedding_dim"],
                              batchnorm_folded=not facts["batchnorm_kept"], layers=layers,
                              output_shape=facts["output_shape"])
    else:
        if isinstance(model_or_path, nn.Module):
            model, source = model_or_path, type(model_or_path).__name__
        else:

            # the loader `visrec export` uses, so both see the same module and contract
            loaded = load_model(model_or_path)
            if loaded.module is None:
                raise DataError("not a visrec checkpoint (no torch module to measure)", path=model_or_path)
            model, contract, source = loaded.module, loaded.contract, str(model_or_path)
            _check_task(p, contract, source)
        try:
            layers, every_op, out_shape = _measure(model, p.input_size, every_op=True)
        except RuntimeError as exc:  # torch's shape errors: the model cannot take the protocol's probe
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            named = p.name if isinstance(protocol, Protocol) else str(protocol)
            raise ConfigError(f"{source} does not take the input_size {list(p.input_size)} of protocol {named}: "
                              f"{reason}") from None
        dim = int(out_shape[-1])
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in model.state_dict().values()
                         if t.is_floating_point()})
        size = export_size(model, p.input_size, contract, untrained=untrained) if with_size else None
        report = BudgetReport(p, source, sum(l.lfr_flops for l in layers), sum(l.macs for l in layers),
                              every_op, sum(t.numel() for t in model.parameters()),
                              size, dtypes, dim, batchnorm_folded=False, layers=layers,
                              output_shape=tuple(int(v) for v in out_shape[1:]))
    report.limits = _limits(p, report.lfr_flops, report.size_bytes, report.weight_dtypes, report.embedding_dim)
    return report


# the model tasks (visrec.models.contract.TASKS) each protocol task budgets; "other" (an adapter's) is not judged
PROTOCOL_MODEL_TASKS = {"faces": {"face-embedding"}, "faces-video": {"face-embedding", "video-embedding"},
                        "landmarks": {"landmarks"}, "products": {"product-embedding"}}


def _check_task(p: Protocol, contract, source: str) -> None:
    """A model file of another task than the protocol's is refused (a landmark model against a face budget
    would only fail on its 'feature dimension', as if it were a face model of the wrong size)."""
    task = getattr(contract, "task", None)
    wanted = PROTOCOL_MODEL_TASKS.get(p.task, set())
    if task is None or task == "other" or task in wanted:
        return
    fitting = [q.name for q in BUILTIN_PROTOCOLS.values() if task in PROTOCOL_MODEL_TASKS.get(q.task, set())]
    raise ConfigError(f"{source} is a {task} model; protocol {p.name} budgets {p.task} models"
                      + (f": use {' or '.join(fitting)}, or a protocol file of task "
                         f"{next(t for t, m in PROTOCOL_MODEL_TASKS.items() if task in m)}" if fitting else ""))


def _onnx_contract(path: Path):
    """The visrec contract in an ONNX file's metadata, or None (a file visrec did not write)."""
    onnx = require("onnx", "export")
    check_regular_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
        text = next((m.value for m in proto.metadata_props if m.key == ONNX_KEY), None)
        return None if text is None else ModelContract.from_json(text, path=path)
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the count that reads it next
        return None


# The most parameters a registry model may have before it is built with real weights: 2^29 float32 weights =
# 2 GiB, the most an ONNX file (one protobuf) holds, so the most whose exported size a protocol can measure.
# Building, copying and exporting one takes several times that in memory, so it is counted first.
MAX_BUILD_PARAMS = 2**29


def check_buildable(name: str, kwargs: dict, where: str) -> int:
    """The parameter count of registry model ``name(**kwargs)``, counted on the meta device (shapes only, no
    memory), or a :class:`ConfigError` naming ``where`` (the option or file that asked for it) when it is over
    :data:`MAX_BUILD_PARAMS`: refused before real weights are allocated. An architecture the registry refuses
    (an invalid spec field) is a :class:`ConfigError` naming ``where`` too."""
    try:
        with on_meta_device():
            params = sum(p.numel() for p in build_backbone(name, **kwargs).parameters())
    except ConfigError as exc:  # an invalid architecture (a spec's field): said with the file that holds it
        if str(exc).startswith(f"{where}:"):
            raise
        raise ConfigError(f"{where}: {exc}") from None
    if params > MAX_BUILD_PARAMS:
        raise ConfigError(f"{where}: {name} has {params:,} parameters ({4 * params / 2**30:.1f} GiB of float32 "
                          f"weights), over the {MAX_BUILD_PARAMS:,} (2 GiB) that visrec builds and measures")
    return params


def registry_contract(model: nn.Module, name: str, kwargs: dict | None = None):
    """The contract a registry-built model gets when saved (``default_contract``), so that a budget of
    ``mbf`` measures the file ``visrec export`` would write for that model's checkpoint."""

    return default_contract(model, {"name": name, **(kwargs or {})})
