"""An ONNX file from elsewhere is sized before onnxruntime opens it (visrec._onnx_check): a graph of a few hundred
bytes whose ConstantOfShape, Expand, Tile, Range or sparse initializer asks for gigabytes is refused with an error
naming the file, the node and the size, and the loader's memory stays far below what the file asked for
(onnxruntime 1.32 took 2.0 GB creating the session of a 250-byte ConstantOfShape [16000, 16000] graph, 4.3 GB
for four of them, 3.1 GB for a 196-byte sparse initializer). Real exports of the shipped networks still load."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from visrec.errors import DataError
from visrec.models import ModelContract, build_backbone, load_model
from visrec.models.contract import ONNX_KEY

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CONTRACT = ModelContract(task="face-embedding", input_size=(112, 112), embedding_dim=3, metric="cosine").to_dict()


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def _bomb(path, kind: str):
    """A face-embedding graph that takes (N, 3, 112, 112) and adds the sum of one large tensor (the bomb) to its
    mean-pooled output: valid ONNX, a visrec contract in its metadata, a few hundred bytes. Returns the path and
    the bomb's nominal bytes (what computing it would hold)."""
    inits, nodes, sparse = [], [], []
    one = numpy_helper.from_array(np.array([1.0], np.float32))

    def cos(shape_name, out="big"):
        nodes.append(helper.make_node("ConstantOfShape", [shape_name], [out], value=one))

    if kind == "ConstantOfShape":  # computed when the session is created (constant folding)
        inits.append(_const("shape", [16000, 16000]))
        cos("shape")
        nominal = 16000 * 16000 * 4
    elif kind == "Expand":
        inits += [_const("one", [[1.0]], np.float32), _const("shape", [16000, 16000])]
        nodes.append(helper.make_node("Expand", ["one", "shape"], ["big"]))
        nominal = 16000 * 16000 * 4
    elif kind == "Tile":
        inits += [_const("one", [[1.0]], np.float32), _const("reps", [16000, 16000])]
        nodes.append(helper.make_node("Tile", ["one", "reps"], ["big"]))
        nominal = 16000 * 16000 * 4
    elif kind == "four ConstantOfShape":  # each under onnxruntime's own 1 GiB folding limit, 3.6 GB together
        inits.append(_const("shape", [15000, 15000]))
        for i in range(4):
            cos("shape", f"big{i}")
        nodes.append(helper.make_node("Sum", [f"big{i}" for i in range(4)], ["big"]))
        nominal = 4 * 15000 * 15000 * 4
    elif kind == "Range":
        inits += [_const("start", 0), _const("limit", 200_000_000), _const("delta", 1)]
        nodes += [helper.make_node("Range", ["start", "limit", "delta"], ["ints"]),
                  helper.make_node("Cast", ["ints"], ["big"], to=TensorProto.FLOAT)]
        nominal = 200_000_000 * 8
    elif kind == "sparse initializer":  # written out in full when the session is created
        sp = helper.make_sparse_tensor(_const("v", [1.0], np.float32), _const("i", [0]), [20000, 20000])
        sp.values.name = "big"
        sparse.append(sp)
        nominal = 20000 * 20000 * 4
    elif kind == "per image":  # (N, 20000, 20000): allocated at the first image, whatever the batch
        inits += [_const("zero", [0]), _const("one_i", [1]), _const("side", [20000, 20000])]
        nodes += [helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Slice", ["xs", "zero", "one_i"], ["n"]),
                  helper.make_node("Concat", ["n", "side"], ["shape"], axis=0)]
        cos("shape")
        nominal = 20000 * 20000 * 4
    else:
        raise AssertionError(kind)
    nodes += [helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
              helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Add", ["f", "s"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])
    graph = helper.make_graph(nodes, "bomb", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              inits, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {ONNX_KEY: json.dumps(CONTRACT)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, nominal


BOMBS = {  # kind -> what the error says
    "ConstantOfShape": r"would compute 1.02 GB of constants when it loads.*ConstantOfShape output 'big'",
    "Expand": r"would compute 1.02 GB of constants.*Expand output 'big'",
    "Tile": r"would compute 1.02 GB of constants.*Tile output 'big'",
    "four ConstantOfShape": r"would compute 4.50 GB of constants when it loads.*, 900.0 MB",
    "Range": r"Range output 'ints' would hold \[200000000\] x 8 bytes = 1.60 GB at batch 1",
    "sparse initializer": r"compute 1.60 GB of constants.*sparse initializer 'big' \[20000, 20000\]",
    "per image": r"ConstantOfShape output 'big' would hold \[1, 20000, 20000\] x 4 bytes = 1.60 GB at batch 1",
}

_LOADER = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, onnx, onnx.reference, onnxruntime
    import visrec.budget, visrec.models.loading
    from visrec.models import load_model
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for kind, path in json.loads(sys.argv[1]).items():
        try:
            model = load_model(path)
            model.embed(np.zeros((1, 112, 112, 3), np.uint8))  # what a hostile graph would do at the first image
            said = "loaded"
        except Exception as exc:
            said = type(exc).__name__ + ": " + str(exc)
        out[kind] = [said, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024]
    print(json.dumps(out))
""")


def test_graph_bombs_are_refused_before_onnxruntime_allocates_them(tmp_path):
    """Each bomb is loaded with visrec.load_model in one fresh process; peak RSS (ru_maxrss only grows) stays
    below a tenth of the smallest bomb's nominal size through all of them."""
    paths, nominal = {}, {}
    for kind in BOMBS:
        path, nominal[kind] = _bomb(tmp_path / f"{kind.replace(' ', '_')}.onnx", kind)
        assert path.stat().st_size < 1000
        paths[kind] = str(path)
    run = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(paths)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for kind, message in BOMBS.items():
        said, grew = results[kind]
        assert said.startswith("DataError: " + paths[kind] + ": "), (kind, said)
        assert re.search(message, said), (kind, said)
        assert grew < nominal[kind] / 10, (kind, grew, nominal[kind])
    assert max(grew for _, grew in results.values()) < 100e6


def _graph(path, nodes, inits=(), in_shape=("N", 3, 112, 112), functions=(), opset=17, contract=CONTRACT):
    """A graph from x (in_shape) to y, through ``nodes`` that end in y."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 8
    if contract is not None:
        helper.set_model_props(model, {ONNX_KEY: json.dumps(contract)})
    onnx.save(model, str(path))
    return path


_HEAD = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]


def test_a_size_taken_from_the_images_values_is_refused(tmp_path):
    """ConstantOfShape(Cast(ReduceMax(x) * 1e9)): its size would be whatever the pixels say, at run time."""
    nodes = _HEAD + [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
                     helper.make_node("Mul", ["m", "k"], ["mk"]),
                     helper.make_node("Cast", ["mk"], ["n"], to=TensorProto.INT64),
                     helper.make_node("Unsqueeze", ["n", "axes"], ["shape"]),
                     helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                     helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                     helper.make_node("Add", ["f", "s"], ["y"])]
    path = _graph(tmp_path / "pixels.onnx", nodes, [_const("k", 1e9, np.float32), _const("axes", [0])])
    with pytest.raises(DataError, match=r"pixels.onnx: ConstantOfShape output 'big' takes its output's size "
                                        r"from the input image's values \('shape'\)"):
        load_model(path)


def test_a_tensor_that_grows_faster_than_the_batch_is_refused(tmp_path):
    """Range(0, 1000 N^2): 1000 values at batch 1, 4 million at batch 64."""
    nodes = _HEAD + [helper.make_node("Shape", ["x"], ["xs"]),
                     helper.make_node("Gather", ["xs", "zero"], ["n"], axis=0),
                     helper.make_node("Mul", ["n", "n"], ["n2"]), helper.make_node("Mul", ["n2", "k"], ["limit"]),
                     helper.make_node("Range", ["zero", "limit", "one"], ["r"]),
                     helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
                     helper.make_node("ReduceSum", ["rf"], ["s"], keepdims=0),
                     helper.make_node("Add", ["f", "s"], ["y"])]
    path = _graph(tmp_path / "square.onnx", nodes, [_const("zero", 0), _const("one", 1), _const("k", 1000)])
    with pytest.raises(DataError, match=r"square.onnx: Range output 'r' grows faster than the batch: \[1000\] at "
                                        r"batch 1, \[4000\] at batch 2"):
        load_model(path)


def _tall(k: int):
    """(nodes, initializers) of ConstantOfShape(H x k), H the input's height, added to the pooled output."""
    nodes = _HEAD + [helper.make_node("Shape", ["x"], ["xs"]),
                     helper.make_node("Slice", ["xs", "two", "three"], ["h"]),
                     helper.make_node("Mul", ["h", "k"], ["shape"]),
                     helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                     helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                     helper.make_node("Add", ["f", "s"], ["y"])]
    return nodes, [_const("two", [2]), _const("three", [3]), _const("k", [k])]


def test_a_graph_with_free_height_and_width_is_sized_at_its_contracts_input(tmp_path):
    """ConstantOfShape(H x 10^7): unknown until the contract's 112 x 112 is the input the check assumes."""
    path = _graph(tmp_path / "tall.onnx", *_tall(10_000_000), in_shape=("N", 3, "H", "W"))
    with pytest.raises(DataError, match=r"tall.onnx: ConstantOfShape output 'big' would hold \[1120000000\] x 4 "
                                        r"bytes = 4.48 GB at batch 1"):
        load_model(path)


def test_a_detector_is_sized_at_the_canvas_it_will_be_fed(tmp_path):
    """A detector graph (no contract, free height and width) holding ConstantOfShape(H x 500,000): sized at the
    input it will be fed (its input_size, rounded up to a multiple of the largest stride, 128) it would hold
    1.28 GB at 640 x 640 and is refused whichever way it is opened; it used to open unsized (a size that depends
    on a free dimension nobody fixed was left to run time). Another input_size is sized at it."""
    from visrec.errors import VisrecError
    from visrec.faces.detectors import ScrfdDetector, YunetDetector, load_detector, sizing_hw

    path = _graph(tmp_path / "det.onnx", *_tall(500_000), in_shape=(1, 3, "H", "W"), contract=None)
    assert sizing_hw((640, 640)) == (640, 640) and sizing_hw((320, 200)) == (256, 384)
    assert sizing_hw((0, 640)) is None
    said = r"det.onnx: ConstantOfShape output 'big' would hold \[320000000\] x 4 bytes = 1.28 GB"
    for open_it in (lambda: load_detector(str(path)), lambda: load_detector(f"scrfd:{path}"),
                    lambda: ScrfdDetector(path), lambda: YunetDetector(path, input_size=(640, 640))):
        with pytest.raises(DataError, match=said):
            open_it()
    # YuNet's default 320 x 320 (384 after rounding): 768 MB, which onnxruntime would compute when it loads the
    # model (the input's size is then fixed); 96 x 96 (128): 256 MB passes, and the file is refused for what it is
    with pytest.raises(DataError, match=r"would compute 768.0 MB of constants"):
        YunetDetector(path)
    with pytest.raises(VisrecError, match="neither an SCRFD nor a YuNet"):
        load_detector(str(path), input_size=(96, 96))


def test_loops_and_function_bombs_are_refused(tmp_path):
    body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"]),
                              helper.make_node("Identity", ["c"], ["c_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("c_out", TensorProto.FLOAT, None)])
    loop = _HEAD + [helper.make_node("Loop", ["trips", "", "f"], ["y"], body=body)]
    with pytest.raises(DataError, match=r"loop.onnx: Loop output 'y': visrec does not run ImageDecoder, Loop, Scan"):
        load_model(_graph(tmp_path / "loop.onnx", loop, [_const("trips", 10**12)]))

    # f0 calls f1 twice, f1 calls f2 twice, ...: 2^40 nodes once inlined
    funcs = [helper.make_function("local", f"f{i}", ["a"], ["b"],
                                  [helper.make_node(f"f{i + 1}", ["a"], ["t"], domain="local"),
                                   helper.make_node(f"f{i + 1}", ["t"], ["b"], domain="local")],
                                  [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]) for i in range(40)]
    funcs.append(helper.make_function("local", "f40", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                      [helper.make_opsetid("", 17)]))
    nested = _HEAD + [helper.make_node("f0", ["f"], ["y"], domain="local")]
    with pytest.raises(DataError, match=r"nested.onnx: its local functions inline to more than 100,\d+ nodes"):
        load_model(_graph(tmp_path / "nested.onnx", nested, functions=funcs))

    # a ConstantOfShape bomb inside a local function is seen once the function is inlined
    inner = helper.make_function("local", "make", ["a"], ["b"],
                                 [helper.make_node("Constant", [], ["shape"], value=_const("v", [16000, 16000])),
                                  helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                                  helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                                  helper.make_node("Add", ["a", "s"], ["b"])], [helper.make_opsetid("", 17)])
    hidden = _HEAD + [helper.make_node("make", ["f"], ["y"], domain="local")]
    with pytest.raises(DataError, match=r"hidden.onnx: onnxruntime would compute 1.02 GB of constants"):
        load_model(_graph(tmp_path / "hidden.onnx", hidden, functions=[inner]))


def test_a_tensor_declaring_more_values_than_it_holds_is_refused(tmp_path):
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[20000, 20000], raw_data=b"\0" * 4)
    nodes = _HEAD + [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
                     helper.make_node("Add", ["f", "s"], ["y"])]
    with pytest.raises(DataError, match=r"liar.onnx: initializer 'w' declares \[20000, 20000\] \(400,000,000 "
                                        r"values\) but holds 1"):
        load_model(_graph(tmp_path / "liar.onnx", nodes, [w]))


def test_every_onnx_session_is_checked_first(tmp_path, monkeypatch):
    """open_session is the one door to onnxruntime (models, zoo adapters, detectors, products): it checks."""
    import visrec._onnx as o
    from visrec.faces.detectors import load_detector

    path, _ = _bomb(tmp_path / "b.onnx", "ConstantOfShape")
    for open_it in (lambda: o.open_session(path), lambda: o.OnnxEmbedder(path), lambda: load_detector(str(path))):
        with pytest.raises(DataError, match="b.onnx: onnxruntime would compute 1.02 GB"):
            open_it()
    seen = []
    monkeypatch.setattr(o, "check_graph", lambda p, hw=None: seen.append(p))
    small = _graph(tmp_path / "small.onnx", _HEAD + [helper.make_node("Identity", ["f"], ["y"])])
    assert load_model(small).onnx(np.zeros((1, 3, 112, 112), np.float32)).shape == (1, 3)
    assert seen == [small]


@pytest.mark.parametrize("cfg", [{"name": "mobilefacenet"}, {"name": "pfld", "num_points": 106, "width_mult": 0.25}])
def test_real_exports_of_the_shipped_networks_still_load(tmp_path, cfg):
    """`visrec export`'s file of a face model and a landmark model (dynamo exporter, dynamic batch) passes the
    check and answers as its module does."""
    import torch

    from visrec._onnx_check import check_graph
    from visrec.export import export_model
    from visrec.models.contract import contract_from_config

    net = build_backbone(**cfg).eval()
    contract = contract_from_config(cfg, crop_size=112)
    path = export_model(net, tmp_path / "real.onnx", contract)
    assert check_graph(path) >= 256  # images a run may take: no batch visrec runs is cut
    model = load_model(path)
    assert model.contract.task == contract.task
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy().reshape(2, -1)
    got = (model.predict_crops(x) if contract.task == "landmarks" else model.onnx(x)).reshape(2, -1)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_the_checks_contract_constants_are_the_contracts():
    """_onnx_check sits below visrec.models and cannot import them: its copies must agree."""
    from visrec import _onnx_check
    from visrec.models import contract

    assert (_onnx_check.CONTRACT_KEY, _onnx_check.MAX_SIDE) == (contract.ONNX_KEY, contract.MAX_INPUT_SIDE)


def test_a_batch_runs_in_slices_that_keep_every_tensor_under_the_bound(tmp_path, monkeypatch):
    """A graph whose one image makes a 4 MB tensor (Expand (N, 1, 1000) -> (N, 1000, 1000), then the mean back to
    (N, 1000)) may take 1 GiB / 4 MB = 256 images a run. Under a bound of 8 MB it takes 2: a batch of 5 runs as
    2 + 2 + 1, with the answer of the whole batch. A graph with a fixed batch is sized at it and runs whole."""
    import visrec._onnx as o
    import visrec._onnx_check as c

    def graph(path, batch):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1000])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1000])
        nodes = [helper.make_node("Unsqueeze", ["x", "axis"], ["x3"]),
                 helper.make_node("Expand", ["x3", "shape"], ["big"]),
                 helper.make_node("ReduceMean", ["big", "axis"], ["y"], keepdims=0)]
        g = helper.make_graph(nodes, "wide", [x], [y], [_const("axis", [1]), _const("shape", [1, 1000, 1000])])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        onnx.save(model, str(path))
        return path

    free = graph(tmp_path / "free.onnx", "N")
    assert c.check_graph(free) == (1 << 30) // 4_000_000
    monkeypatch.setattr(c, "MAX_VALUE_BYTES", 8_000_000)
    session = o.open_session(free)
    assert session.visrec_max_rows == 2
    runs = []
    real_run = session.run
    monkeypatch.setattr(session, "run", lambda names, feeds: runs.append(len(feeds["x"])) or real_run(names, feeds))
    x = np.random.default_rng(0).normal(size=(5, 1000)).astype(np.float32)
    whole = real_run(None, {"x": x})[0]  # the mean of 1000 copies: x, up to float32 rounding
    np.testing.assert_allclose(whole, x, rtol=1e-4)
    embedder = o.OnnxEmbedder(free, session=session)
    np.testing.assert_allclose(embedder(x), whole, rtol=1e-4)  # a slice of 1 sums in another order
    assert runs == [2, 2, 1]
    runs.clear()
    np.testing.assert_allclose(embedder(x[:2]), whole[:2], rtol=1e-4)
    assert runs == [2]
    fixed = graph(tmp_path / "fixed.onnx", 5)  # sized at its batch of 5: 20 MB, over the 8 MB bound
    with pytest.raises(DataError, match=r"fixed.onnx: Expand output 'big' would hold \[5, 1000, 1000\]"):
        o.open_session(fixed)
    monkeypatch.setattr(c, "MAX_VALUE_BYTES", 1 << 30)
    assert c.check_graph(fixed) is None
    session = o.open_session(fixed)
    assert session.visrec_max_rows is None and o.run_batched(session, None, "x", x)[0].shape == (5, 1000)
