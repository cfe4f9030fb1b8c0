"""The sizes an ONNX graph from elsewhere would make onnxruntime allocate, told before it opens the file.

onnxruntime computes a graph's constant parts when it creates the session (constant folding): a 250-byte
graph whose ConstantOfShape (or Expand, Tile) reads the constant [16000, 16000] made ``InferenceSession``
take 2.0 GB (onnxruntime 1.32), four of them 4.3 GB, a 196-byte sparse initializer of [20000, 20000] 3.1 GB;
the same ops fed sizes derived from the input's shape allocate at the first image instead. :func:`check_graph`
refuses such a file with a :class:`~visrec.errors.DataError` naming it, the node and the size, before
:func:`visrec._onnx.open_session` gives it to onnxruntime:

- every tensor the file holds declares no more values than it holds (initializers, Constant nodes, in every
  subgraph and function); a sparse tensor's dense size counts as computed at load (below);
- model-local functions are inlined first (a bomb inside one is seen), when that makes at most
  :data:`MAX_INLINED_NODES` nodes beyond the file's own (a function calling another twice, 40 deep, would be
  2^40);
- no ``Loop``, ``Scan`` or ``ImageDecoder`` (their memory depends on values no check sees before they run),
  and no size-making op (:data:`SIZE_INPUTS`: ConstantOfShape, Expand, Tile, Range, Resize, Pad, ...) takes
  its size from the input's values: sizes come from constants and shapes only;
- the sizes are told by ONNX shape inference on a copy holding only the file's small tensors (large weights
  become typed inputs), with the input's free batch dimension set to 1 and its free height and width to what
  visrec feeds (``input_hw``, else the input size of a visrec contract in the file). Shape arithmetic is folded
  first as ``visrec budget`` folds it (:func:`fold_shape_computations`: nothing it evaluates holds more than
  64 values, each result sized from its inputs before it is computed). ONNX's own data propagation
  (``infer_shapes(data_prop=True)``) is not used: it writes a Range's values out as shape dimensions (a Range
  to 2 million took it 280 MB);
- no tensor holds more than :data:`MAX_VALUE_BYTES` at batch 1 (the shipped face and landmark networks' largest
  activation is 3.2 MB per image), and none grows faster than the batch (sized again at batch 2); the same
  bound holds at the batch visrec runs: :func:`check_graph` returns how many images one run may take (1 GiB
  over the largest tensor of one image; 334 for iresnet50, 668 for MobileFaceNet), and
  :func:`visrec._onnx.run_batched` cuts a larger batch into runs of that many;
- what onnxruntime may compute at load (values that depend on no input's values: constants, and shape
  arithmetic) holds at most :data:`CONSTANT_BYTES` plus :data:`CONSTANT_FILE_FACTOR` times the file's bytes in
  all (room for a model's own weight transforms: transposes, fp16 or int8 weights made float32; the shipped
  networks compute a few hundred bytes), and each one that depends on no input at all has a size shape
  inference can tell.

A face detector's free height and width are given as ``input_hw`` too: the canvas it will be fed
(:func:`visrec.faces.detectors.sizing_hw`). Left to run time: a size that depends on an input dimension the
graph leaves free and nobody fixed, and a size shape inference cannot tell (ops outside the ONNX standard).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec._files import check_regular_file
from visrec._optional import require
from visrec._structured import loads_json
from visrec.errors import DataError, shown

MAX_VALUE_BYTES = 1 << 30  # one tensor at batch 1, and at the batch of one run (check_graph's rows)
CONSTANT_BYTES = 256 << 20  # what the load may compute, beyond CONSTANT_FILE_FACTOR x the file's bytes
CONSTANT_FILE_FACTOR = 4  # int8 weights dequantised to float32
FOLD_LIMIT_BYTES = 256 << 20  # onnxruntime's optimization.constant_folding_max_output_size_in_bytes (open_session)
MAX_INLINED_NODES = 100_000
_KEEP_VALUES = 4096  # tensors up to this many values stay in the copy that shape inference reads
CONTRACT_KEY = "visrec.contract"  # visrec.models.contract.ONNX_KEY and MAX_INPUT_SIDE (a layer above this one)
MAX_SIDE = 4096

# the inputs of each op that say how large its output is (ONNX standard domain)
SIZE_INPUTS = {"ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,), "Range": (0, 1, 2), "Resize": (2, 3),
               "Upsample": (1,), "Pad": (1,), "OneHot": (1,), "CenterCropPad": (1,), "Col2Im": (1, 2),
               "MaxUnpool": (2,), "DFT": (1,), "STFT": (1, 3), "MelWeightMatrix": (0, 1),
               "HannWindow": (0,), "HammingWindow": (0,), "BlackmanWindow": (0,)}
UNBOUNDED_OPS = frozenset({"Loop", "Scan", "ImageDecoder"})
_STANDARD = ("", "ai.onnx")
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # read only their input's shape, never its values


def _mb(n: int) -> str:
    """Bytes for a message: 253 bytes, 12.5 MB, 1.60 GB."""
    return f"{n:,} bytes" if n < 10**5 else f"{n / 1e6:,.1f} MB" if n < 10**9 else f"{n / 1e9:,.2f} GB"


def _binary(n: int) -> str:
    """A limit for a message: 1 GiB, 256 MiB."""
    return f"{n >> 30} GiB" if n % (1 << 30) == 0 else f"{n >> 20} MiB"


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    try:
        return max(int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize), 1)
    except Exception:  # string, undefined: a pointer's worth at least
        return 8


def _count(dims) -> int:
    """The number of values of a tensor of shape ``dims``: exact (Python ints, no int64 overflow)."""
    n = 1
    for d in dims:
        n *= int(d)
    return n


# Shape arithmetic :func:`fold_shape_computations` evaluates: what exporters compute target shapes, axes
# and scales with. Only results of at most _FOLD_LIMIT values are folded, so weights are never touched; that
# size is computed from the inputs (:func:`_fold_size`) before anything is evaluated.
_SHAPE_OPS = frozenset({"Shape", "Size", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Gather", "Slice", "Cast",
                        "Identity", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Floor", "Ceil",
                        "Equal", "Where", "Range", "ReduceProd", "ConstantOfShape", "Constant"})
_FOLD_LIMIT = 64
_SAME_SIZE_OPS = frozenset({"Identity", "Cast", "Neg", "Abs", "Floor", "Ceil", "Squeeze", "Unsqueeze", "Reshape"})
_AT_MOST_INPUT_OPS = frozenset({"Slice", "ReduceProd"})
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Where"})


def _fold_size(node, known: dict) -> int | None:
    """How many values folding ``node`` would produce, computed from its inputs' values and shapes (``known``)
    without evaluating it; ``None`` when that cannot be told (the node is then not folded).

    A graph from elsewhere is untrusted: a 311-byte ONNX whose ConstantOfShape reads an int64 initializer
    [20000, 20000], or a Range 0..4e8, would make the reference evaluator build gigabytes before the result's
    size could be compared with :data:`_FOLD_LIMIT`. Every input of a folded node is a Constant of at most
    that size or an initializer (bytes the file holds), so an op whose output is bounded by its inputs'
    sizes cannot grow past the file; ops that create values (ConstantOfShape, Range, Concat of one input
    named many times, Gather, broadcasting) are sized here from their inputs first."""
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    ins = [known[i] if i else None for i in node.input]
    if op == "Constant":
        for name in ("value", "sparse_value"):
            if name in attrs:
                tensor = attrs[name].t if name == "value" else attrs[name].sparse_tensor
                return _count(tensor.dims)
        for name in ("value_ints", "value_floats", "value_strings"):
            if name in attrs:
                return len(getattr(attrs[name], name[6:]))
        return 1 if attrs else None
    if op == "Size":
        return 1
    if not ins or ins[0] is None:
        return None
    if op in _SAME_SIZE_OPS or op in _AT_MOST_INPUT_OPS:
        return int(ins[0].size)
    if op == "Concat":
        return sum(int(v.size) for v in ins if v is not None)
    if op in _BROADCAST_OPS:
        try:
            return _count(np.broadcast_shapes(*(v.shape for v in ins if v is not None)))
        except ValueError:
            return None
    if op == "Gather":
        data, indices = ins[0], ins[1] if len(ins) > 1 else None
        axis = attrs["axis"].i if "axis" in attrs else 0
        if indices is None or not -data.ndim <= axis < data.ndim:
            return None
        axis %= data.ndim
        return _count(data.shape[:axis] + indices.shape + data.shape[axis + 1:])
    if op == "ConstantOfShape":
        dims = ins[0].reshape(-1)
        return _count(dims) if ins[0].ndim == 1 and dims.dtype.kind in "iu" and (dims >= 0).all() else None
    if op == "Range":
        if len(ins) != 3 or any(v is None or v.size != 1 for v in ins):
            return None
        start, limit, delta = (v.reshape(-1)[0].item() for v in ins)
        if isinstance(start, int) and isinstance(limit, int) and isinstance(delta, int):
            return max(-((start - limit) // delta), 0) if delta else None  # ceil((limit - start) / delta)
        try:
            n = math.ceil((limit - start) / delta)
        except (ArithmeticError, ValueError, TypeError):  # delta 0, inf or NaN bounds
            return None
        return max(n, 0)
    return None


def _fold_shape(node, shape: list) -> np.ndarray:
    """What ``Shape`` of a tensor of ``shape`` returns (``start``/``end`` attributes, opset 15): read from the
    shape, never from a zero tensor of that shape (shape inference may give a tensor gigabytes of values)."""
    attrs = {a.name: a.i for a in node.attribute}
    return np.array(shape, np.int64)[attrs.get("start", 0):attrs.get("end", len(shape))]  # ONNX clamps as Python


def fold_shape_computations(model):
    """With the graph input's shape fixed, evaluate the shape arithmetic in the graph and write each
    result as a Constant node, so that shape inference knows every layer's sizes. Exporters compute
    shapes at run time: the dynamo exporter takes a flatten's target shape from the batch size
    (Shape -> Squeeze -> Reshape -> Concat), and torch's TorchScript exporter writes Resize scales as
    Concat(Constant, Constant); shape inference sees through neither, so every layer after them would get
    unknown sizes (a convolution then cannot be counted, a token FC would count one row). A node is
    folded when it is shape arithmetic (:data:`_SHAPE_OPS`), all its inputs are known (Constant nodes,
    int64 initializers, earlier results, or for ``Shape`` a tensor whose shape inference knows) and its
    result has at most :data:`_FOLD_LIMIT` values. That size is computed from the inputs before the node is
    evaluated (:func:`_fold_size`; ``Shape`` is read off the inferred shape), so an untrusted graph cannot
    make this check allocate more than its own initializers hold. Each round runs shape inference again, as
    a folded target shape lets it resolve later tensors. Returns the shape-inferred model of the last round."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opset = {o.domain or "": o.version for o in model.opset_import}
    known = {}
    for init in graph.initializer:
        if init.data_type != TensorProto.INT64:
            continue
        try:  # to_array of an initializer holding fewer values than its dims declare is an error, not a read
            known[init.name] = numpy_helper.to_array(init)
        except Exception:
            continue
    too_large: set[str] = set()

    def run(node, feeds):
        return ReferenceEvaluator(node, opsets=opset).run(None, feeds)

    for _ in range(8):  # a round per level of shape dependency; graphs need one or two
        inferred = shape_inference.infer_shapes(model)
        shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                  for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
                  if vi.type.tensor_type.HasField("shape")}
        changed = False
        for k, node in enumerate(graph.node):
            if node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
                continue
            if node.output[0] in known or node.output[0] in too_large:
                continue
            try:
                if node.op_type == "Shape":
                    shape = shapes.get(node.input[0])
                    if shape is None or None in shape:
                        continue
                    value = _fold_shape(node, shape)
                elif all(i == "" or i in known for i in node.input):
                    size = _fold_size(node, known)
                    if size is None or size > _FOLD_LIMIT:
                        if size is not None:
                            too_large.add(node.output[0])
                        continue
                    value = run(node, {i: known[i] for i in node.input if i})[0]
                else:
                    continue
            except Exception:  # an op the reference runtime cannot evaluate here: leave it to shape inference
                continue
            value = np.asarray(value)
            if value.size > _FOLD_LIMIT:
                too_large.add(node.output[0])
                continue
            known[node.output[0]] = value
            if node.op_type != "Constant":
                folded = helper.make_node("Constant", [], [node.output[0]], name=node.name or f"folded_{k}",
                                          value=numpy_helper.from_array(value))
                graph.node[k].CopyFrom(folded)
                changed = True
        if not changed:
            break
    else:
        inferred = shape_inference.infer_shapes(model)
    return inferred


def _held_values(tensor, base: Path) -> int | None:
    """How many values ``tensor`` holds (its raw bytes over its item size, or its typed field's length);
    None for data held in another file that is not there (onnxruntime then refuses the file itself)."""
    from onnx import TensorProto

    item = _itemsize(tensor.data_type)
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        target = base / info.get("location", "")
        try:
            size = target.stat().st_size if target.is_file() else None
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except (OSError, ValueError):
            return None
        if size is None:
            return None
        have = max(size - offset, 0) if length is None else min(length, max(size - offset, 0))
        return have // item
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) // item
    fields = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
    return max(len(getattr(tensor, f)) for f in fields)


def _node(node) -> str:
    """A node for a message: ``Conv node 'stem'``, or ``Range output 'r'`` when it has no name of its own."""
    if not node.name or (node.output and node.name == node.output[0]):
        return f"{node.op_type} output {shown(node.output[0] if node.output else '')}"
    return f"{node.op_type} node {shown(node.name)}"


def _graphs(graph, where: str = ""):
    """``graph`` and every subgraph in it (If branches, ...), each with where it sits."""
    yield graph, where
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                yield from _graphs(sub, f"{where}{_node(node)} > ")


def _node_tensors(node):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.name, attr.t
        for t in attr.tensors:
            yield attr.name, t
        if attr.HasField("sparse_tensor"):
            yield attr.name, attr.sparse_tensor
        for t in attr.sparse_tensors:
            yield attr.name, t


def _check_held(model, path: Path) -> list[tuple[int, str]]:
    """Every dense tensor declares no more values than it holds; returns the dense bytes of each sparse one
    (which onnxruntime writes out in full at load) with what it is."""
    from onnx import SparseTensorProto

    base = path.parent
    sparse: list[tuple[int, str]] = []

    def check(tensor, what: str):
        if isinstance(tensor, SparseTensorProto):
            check(tensor.values, what + " (its values)")
            check(tensor.indices, what + " (its indices)")
            sparse.append((_count(tensor.dims) * _itemsize(tensor.values.data_type), f"{what} {list(tensor.dims)}"))
            return
        if any(d < 0 for d in tensor.dims):
            raise DataError(f"{what} declares a negative dimension {list(tensor.dims)}", path=path)
        declared = _count(tensor.dims)
        held = _held_values(tensor, base)
        if held is not None and declared > held:
            raise DataError(f"{what} declares {list(tensor.dims)} ({declared:,} values) but holds {held:,}",
                            path=path)

    functions = [(f.node, f"function {f.domain}:{f.name} > ") for f in model.functions]
    for graph, where in _graphs(model.graph):
        for t in graph.initializer:
            check(t, f"{where}initializer {shown(t.name)}")
        for t in graph.sparse_initializer:
            check(t, f"{where}sparse initializer {shown(t.values.name)}")
        functions.append((graph.node, where))
    for nodes, where in functions:
        for node in nodes:
            for attr, t in _node_tensors(node):
                check(t, f"{where}{_node(node)}, attribute {attr}")
    return sparse


def _inline(model, path: Path):
    """``model`` with its local functions inlined, after counting what that makes (a function that calls
    another twice, 30 deep, would be a billion nodes)."""
    if not len(model.functions):
        return model
    funcs = {(f.domain, f.name): f for f in model.functions}
    sizes: dict = {}

    def size(key, stack=()):
        if key in sizes:
            return sizes[key]
        if key in stack:
            raise DataError(f"local function {key[0]}:{key[1]} calls itself", path=path)
        n = 0
        for node in funcs[key].node:
            sub = (node.domain, node.op_type)
            n += size(sub, stack + (key,)) if sub in funcs else 1
            if n > MAX_INLINED_NODES:
                break
        sizes[key] = n
        return n

    own = sum(len(g.node) for g, _ in _graphs(model.graph))
    total = 0
    for graph, _ in _graphs(model.graph):
        for node in graph.node:
            key = (node.domain, node.op_type)
            total += size(key) if key in funcs else 1
    if total > own + MAX_INLINED_NODES:
        raise DataError(f"its local functions inline to more than {own + MAX_INLINED_NODES:,} nodes", path=path)
    try:
        from onnx import inliner
    except ImportError:
        raise DataError("it has local functions, which this onnx cannot inline to check (onnx >= 1.16 can)",
                        path=path) from None
    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:
        raise DataError(f"its local functions cannot be inlined: {str(exc).splitlines()[0][:200]}",
                        path=path) from None


def _skeleton(model):
    """A copy of ``model`` for shape inference: its main graph's large or external tensors become typed
    graph inputs (shape inference needs their shapes only), and no shape it declares for an intermediate
    or output is kept (inference tells them again; a declared one could hide a larger one)."""
    from onnx import ModelProto, TensorProto, helper

    out = ModelProto()
    for field in ("ir_version", "producer_name", "domain"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    graph = out.graph
    src = model.graph
    graph.name = src.name
    inputs = {i.name for i in src.input}
    graph.input.extend(src.input)
    for init in src.initializer:
        if _count(init.dims) <= _KEEP_VALUES and init.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(init)
        elif init.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for sp in src.sparse_initializer:
        graph.input.append(helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims)))
    for node in src.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if node.op_type == "Constant" and node.domain in _STANDARD and value is not None \
                and _count(value.dims) > _KEEP_VALUES:
            graph.input.append(helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims)))
        else:
            graph.node.append(node)
    for o in src.output:
        graph.output.append(helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None)
                            if o.type.HasField("tensor_type") else o)
    for g, _ in list(_graphs(graph))[1:]:
        g.ClearField("value_info")
    return out


def _implicit_inputs(node) -> set[str]:
    """Names a node's subgraphs read from outside (an If branch reads its outer scope by name)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
            for g, _ in _graphs(sub):
                for n in g.node:
                    names.update(i for i in n.input if i)
    return names


def _dependence(graph, inputs: set[str]) -> tuple[set[str], set[str]]:
    """The values of ``graph`` (its subgraphs flattened) that depend on the ``inputs``' values, and those
    that depend on them at all (through their shapes too). Forward reachability: any node order."""
    consumers = defaultdict(list)
    for g, _ in _graphs(graph):
        for node in g.node:
            for name in set(node.input) | _implicit_inputs(node):
                if name:
                    consumers[name].append(node)

    def reach(through_shapes: bool) -> set[str]:
        seen, todo = set(inputs), list(inputs)
        while todo:
            for node in consumers[todo.pop()]:
                if not through_shapes and node.op_type in _SHAPE_ONLY and node.domain in _STANDARD:
                    continue
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        todo.append(o)
        return seen

    return reach(False), reach(True)


def _pin(model, real_inputs: list[str], batch: int, input_hw) -> None:
    """Fix the image input's free dimensions, in place: the batch, and the height and width when given."""
    for vi in model.graph.input:
        if vi.name not in real_inputs or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        fixed = {0: batch}
        if input_hw is not None and len(dims) == 4 and len(real_inputs) == 1:
            fixed.update({2: int(input_hw[0]), 3: int(input_hw[1])})
        for k, value in fixed.items():
            if k < len(dims) and not dims[k].HasField("dim_value"):
                dims[k].Clear()
                dims[k].dim_value = value


def _sizes(inferred) -> dict[str, tuple[list, int, int, bool]]:
    """name -> (dims as told, element size, bytes counting the unknown dimensions as 1, all dims known)."""
    out = {}
    for g, _ in _graphs(inferred.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            item = _itemsize(tt.elem_type)
            nbytes = _count(d if isinstance(d, int) else 1 for d in dims) * item
            prev = out.get(vi.name)
            if prev is None or nbytes > prev[2]:
                out[vi.name] = (dims, item, nbytes, all(isinstance(d, int) for d in dims))
    return out


def _infer(skeleton, real_inputs, batch: int, input_hw, path: Path):
    from onnx import ModelProto

    model = ModelProto()
    model.CopyFrom(skeleton)
    _pin(model, real_inputs, batch, input_hw)
    try:
        return _sizes(fold_shape_computations(model))
    except Exception as exc:  # shape inference refused the graph: onnxruntime runs the same checks
        raise DataError(f"ONNX shape inference cannot size the graph: {str(exc).splitlines()[0][:200]}",
                        path=path) from None


def _contract_hw(model) -> tuple[int, int] | None:
    """The (height, width) a visrec contract in the file's metadata declares (what the loader feeds), or None
    (no contract, or one the loader will refuse with its own message)."""
    text = next((p.value for p in model.metadata_props if p.key == CONTRACT_KEY), None)
    if text is None or len(text) > 1 << 20:
        return None
    try:
        size = loads_json(text).get("input_size")
    except (ValueError, AttributeError):
        return None
    if isinstance(size, list) and len(size) == 2 and all(type(v) is int and 1 <= v <= MAX_SIDE for v in size):
        return size[0], size[1]
    return None


def check_graph(path: str | Path, input_hw: Sequence[int] | None = None) -> int | None:
    """Refuse (DataError naming ``path``, the node and the size) an ONNX file whose graph would make
    onnxruntime allocate more than the module docstring's bounds, at load or per image; nothing is
    computed but shape arithmetic of at most 64 values. ``input_hw``: the (height, width) the caller feeds
    when the graph leaves them free (the graph's own fixed sizes win); when None, those a visrec contract in
    the file declares, which the loader feeds.

    Returns the most images one run may take so that no tensor holds more than :data:`MAX_VALUE_BYTES`
    (the largest tensor of one image, at batch 1, divides it; at least 1), or None when the graph fixes its
    batch (it was sized at that batch)."""
    onnx = require("onnx", "export")
    path = check_regular_file(path)
    try:
        file_bytes = path.stat().st_size
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's own errors
        raise DataError(f"not an ONNX model onnx can read: {str(exc).splitlines()[0][:200]}", path=path) from None
    sparse = _check_held(model, path)
    base = path.parent
    for graph, _ in _graphs(model.graph):  # weights held in files beside it count as the file's bytes
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                file_bytes += (_held_values(t, base) or 0) * _itemsize(t.data_type)
    if input_hw is None:
        input_hw = _contract_hw(model)
    model = _inline(model, path)
    for graph, where in _graphs(model.graph):
        for node in graph.node:
            if node.op_type in UNBOUNDED_OPS and node.domain in _STANDARD:
                raise DataError(f"{where}{_node(node)}: visrec does "
                                f"not run {', '.join(sorted(UNBOUNDED_OPS))} (their memory depends on values no "
                                f"check can see before they run)", path=path)
    graph = model.graph
    init_names = {t.name for g, _ in _graphs(graph) for t in g.initializer} | \
                 {t.values.name for g, _ in _graphs(graph) for t in g.sparse_initializer}
    real_inputs = [i.name for i in graph.input if i.name not in init_names]
    by_values, by_shape = _dependence(graph, set(real_inputs))
    producer = {o: n for g, _ in _graphs(graph) for n in g.node for o in n.output if o}

    def where(name: str) -> str:
        node = producer.get(name)
        if node is None:
            return f"input {shown(name)}"
        if not node.name or node.name == name:
            return f"{node.op_type} output {shown(name)}"
        return f"{_node(node)}'s output {shown(name)}"

    for g, loc in _graphs(graph):
        for node in g.node:
            if node.domain not in _STANDARD:
                continue
            for k in SIZE_INPUTS.get(node.op_type, ()):
                if k < len(node.input) and node.input[k] in by_values:
                    raise DataError(f"{loc}{_node(node)} takes its "
                                    f"output's size from the input image's values ({shown(node.input[k])}); "
                                    f"sizes may come from constants and shapes only", path=path)
    skeleton = _skeleton(model)
    del model
    batch_free = False
    for vi in skeleton.graph.input:
        if vi.name in real_inputs and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            batch_free |= bool(len(dims)) and not dims[0].HasField("dim_value")
    one = _infer(skeleton, real_inputs, 1, input_hw, path)
    at_batch = "at batch 1 " if batch_free else ""
    computed = list(sparse)  # (bytes, what) of each value onnxruntime may compute at load
    for name, (dims, item, nbytes, known) in one.items():
        if name in init_names:
            continue  # weights: bounded by the bytes the file holds
        if nbytes > MAX_VALUE_BYTES:
            raise DataError(f"{where(name)} would hold {dims} x {item} bytes = {_mb(nbytes)} {at_batch}(more than "
                            f"the {_binary(MAX_VALUE_BYTES)} visrec lets one tensor of a model take)", path=path)
        if name in producer and name not in by_values:
            computed.append((nbytes, where(name)))
    for name in producer:
        if name not in by_shape and name not in init_names and not (name in one and one[name][3]):
            raise DataError(f"{where(name)} is computed from constants when onnxruntime loads the model, and shape "
                            f"inference cannot tell its size ({one[name][0] if name in one else 'no shape'}) "
                            f"before it is", path=path)
    allowed = CONSTANT_BYTES + CONSTANT_FILE_FACTOR * file_bytes
    total = sum(n for n, _ in computed)
    if total > allowed:
        big, what = max(computed)
        raise DataError(f"onnxruntime would compute {_mb(total)} of constants when it loads the model (more than "
                        f"{_binary(CONSTANT_BYTES)} + {CONSTANT_FILE_FACTOR} x the file's {_mb(file_bytes)}); the "
                        f"largest: {what}, {_mb(big)}", path=path)
    if not batch_free:
        return None
    two = _infer(skeleton, real_inputs, 2, input_hw, path)
    for name, (dims, item, nbytes, known) in two.items():
        first = one.get(name)
        if known and first is not None and first[3] and nbytes > 2 * first[2] and name not in init_names:
            raise DataError(f"{where(name)} grows faster than the batch: {first[0]} at batch 1, {dims} at "
                            f"batch 2", path=path)
    largest = max((nbytes for name, (_, _, nbytes, _) in one.items() if name not in init_names), default=0)
    return max(1, MAX_VALUE_BYTES // max(1, largest))
