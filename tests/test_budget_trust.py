"""`visrec budget` on files from elsewhere and on the fit: every weight an ONNX graph holds is counted however it
reaches its layer, external data is measured and never loaded, an input fixed to another size is refused,
protocol limits are bounded, the fit passes the full check and its next larger point fails it."""

from __future__ import annotations

import resource
import tracemalloc

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli
from visrec.budget import check, onnx_layer_counts
from visrec.errors import ConfigError, DataError
from visrec.protocols import Protocol, load_protocol

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SMALL = (1, 3, 8, 8)  # the probe of the hand-built graphs: flattened, 192 features
N = 16  # FC outputs
FIN = 3 * 8 * 8


def _model(nodes, inits, out_shape, functions=(), input_shape=SMALL, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *extra_opsets],
                              functions=list(functions))
    model.ir_version = 8
    return model


def _w(shape, name="W0", dtype=np.float32):
    return numpy_helper.from_array(np.random.default_rng(0).random(shape).astype(dtype), name)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


FLAT = helper.make_node("Flatten", ["x"], ["f"], axis=1)


def _fc_model(how: str):
    """x (1,3,8,8) -> flatten (1,192) -> an FC of 192 x 16 whose weight reaches it by ``how``."""
    if how == "identity":  # a weight through Identity
        return _model([FLAT, helper.make_node("Identity", ["W0"], ["W"]), helper.make_node("MatMul", ["f", "W"], ["y"])],
                      [_w((FIN, N))], [1, N])
    if how == "constant":  # a weight written as a Constant node
        return _model([FLAT, helper.make_node("Constant", [], ["W"], value=_w((FIN, N), "c")),
                       helper.make_node("MatMul", ["f", "W"], ["y"])], [], [1, N])
    if how == "reshape":  # a flat initializer reshaped on its way in
        return _model([FLAT, helper.make_node("Reshape", ["W0", "shape"], ["W"]),
                       helper.make_node("MatMul", ["f", "W"], ["y"])], [_w((FIN * N,)), _i64("shape", [FIN, N])],
                      [1, N])
    if how == "cast+squeeze":  # float16 weights made float32, then squeezed
        return _model([FLAT, helper.make_node("Cast", ["W0"], ["W1"], to=TensorProto.FLOAT),
                       helper.make_node("Squeeze", ["W1", "axes"], ["W"]),
                       helper.make_node("MatMul", ["f", "W"], ["y"])],
                      [_w((1, FIN, N), dtype=np.float16), _i64("axes", [0])], [1, N])
    if how == "function":  # the FC inside a model-local function, its weight a Constant there
        fn = helper.make_function("local", "Dense", ["a"], ["b"],
                                  [helper.make_node("Constant", [], ["w"], value=_w((FIN, N), "c")),
                                   helper.make_node("MatMul", ["a", "w"], ["b"])],
                                  [helper.make_opsetid("", 17)])
        return _model([FLAT, helper.make_node("Dense", ["f"], ["y"], domain="local")], [], [1, N], [fn],
                      extra_opsets=[helper.make_opsetid("local", 1)])
    if how == "left":  # W @ x^T, then an activation x activation product (no weight: 0 FLOPs)
        return _model([FLAT, helper.make_node("Transpose", ["f"], ["ft"]),
                       helper.make_node("MatMul", ["W0", "ft"], ["z"]),  # (16, 1)
                       helper.make_node("Transpose", ["z"], ["zt"]),
                       helper.make_node("MatMul", ["z", "zt"], ["y"])],  # (16, 16): attention-like, weight-free
                      [_w((N, FIN))], [N, N])
    if how == "gemm-constant":  # Gemm whose weight and bias are Constant nodes
        return _model([FLAT, helper.make_node("Constant", [], ["W"], value=_w((N, FIN), "c")),
                       helper.make_node("Constant", [], ["B"], value=_w((N,), "b")),
                       helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1)], [], [1, N])
    raise AssertionError(how)


BIASED = {"gemm-constant"}


@pytest.mark.parametrize("how", ["identity", "constant", "reshape", "cast+squeeze", "function", "left",
                                 "gemm-constant"])
def test_an_fc_whose_weight_reaches_it_through_nodes_or_a_function_is_counted(tmp_path, how):
    """A MatMul/Gemm counted 0 unless its weight came straight from an initializer: a model over the FLOP limit
    passed. A constant operand on either side makes an FC layer, its values parameters."""
    path = tmp_path / f"{how.replace('+', '_')}.onnx"
    onnx.save(_fc_model(how), str(path))
    rows, facts = onnx_layer_counts(path, SMALL)
    assert [(r.kind, r.macs) for r in rows] == [("fc", FIN * N)]
    bias = how in BIASED
    assert rows[0].lfr_flops == 2 * FIN * N - (0 if bias else N)
    assert facts["params"] == FIN * N + (N if bias else 0)
    report = check(path, Protocol(name="tight", input_size=SMALL, max_gflops=1e-6))  # 1,000 FLOPs
    assert report.lfr_flops == rows[0].lfr_flops and not report.passed


def test_an_unknown_op_applying_a_constant_node_weight_is_an_error_not_zero(tmp_path):
    path = tmp_path / "einsum.onnx"
    onnx.save(_model([FLAT, helper.make_node("Constant", [], ["W"], value=_w((FIN, N), "c")),
                      helper.make_node("Einsum", ["f", "W"], ["y"], name="proj", equation="ij,jk->ik")], [], [1, N]),
              str(path))
    with pytest.raises(DataError, match=r"einsum.onnx: op proj \(Einsum\) takes constant weights.*no rule"):
        onnx_layer_counts(path, SMALL)


def test_an_fc_inside_a_branch_is_an_error_not_zero(tmp_path):
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["f", "W0"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, N])])
    nodes = [FLAT, helper.make_node("ReduceSum", ["f"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], name="choose", then_branch=branch("a"), else_branch=branch("b"))]
    path = tmp_path / "branch.onnx"
    onnx.save(_model(nodes, [_w((FIN, N)), numpy_helper.from_array(np.array(0, np.float32), "zero")], [1, N]),
              str(path))
    with pytest.raises(DataError, match=r"branch.onnx: op choose \(If\) holds a subgraph with a MatMul"):
        onnx_layer_counts(path, SMALL)


# --- external data: measured, never loaded -----------------------------------------------------------------

def _save_pair(tmp_path, rows=256, cols=1024):
    """The same FC model saved as one file and with its weights as external data."""
    model = _model([FLAT, helper.make_node("MatMul", ["f", "W0"], ["m"]),
                    helper.make_node("MatMul", ["m", "W1"], ["y"])],
                   [_w((FIN, rows)), _w((rows, cols), "W1")], [1, cols])
    single = tmp_path / "single.onnx"
    onnx.save_model(model, str(single))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(ext_dir / "ext.onnx"), save_as_external_data=True, location="w.data",
                    size_threshold=0)
    return single, ext_dir / "ext.onnx"


def test_a_model_with_external_data_is_measured_as_its_one_file(tmp_path, monkeypatch, capsys):
    """The .onnx stub of a model saved with external data is a few hundred bytes: it used to be the size
    (0.000 MB, passing "< 20 MB" for a 77 MB model). The size is the file the same model saves to."""
    single, ext = _save_pair(tmp_path)
    assert ext.stat().st_size < 1000
    proto = Protocol(name="small", input_size=SMALL, max_size_mb=0.5, size_strict=True)
    one, split = check(single, proto), check(ext, proto)
    assert split.size_bytes == one.size_bytes == single.stat().st_size > 1e6
    assert not split.passed and [l.name for l in split.limits if not l.passed] == ["size (fp32 ONNX, MB=1e6 B)"]
    assert split.lfr_flops == one.lfr_flops and split.params == one.params == FIN * 256 + 256 * 1024
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({"name": "small", "max_size_mb": 0.5, "size_strict": True,
                                                         "input_size": list(SMALL)}))
    code, out, _ = run_cli(["budget", "check", ext, "-p", tmp_path / "small.yaml"], monkeypatch, capsys)
    assert code == 1 and "FAIL" in out, out


def test_external_data_is_never_loaded_and_must_hold_what_it_declares(tmp_path):
    """`onnx.load` read every external byte (a 3 GB sparse file took 6.4 GB): the count needs shapes only."""
    side = 10_000  # a 400 MB weight in a sparse file: no disk, but 400 MB were it read
    model = _model([FLAT, helper.make_node("MatMul", ["f", "W0"], ["m"]), helper.make_node("MatMul", ["m", "W1"], ["y"])],
                   [_w((FIN, side)), _w((1, 1), "W1")], [1, 1])
    big = onnx.TensorProto()
    big.name, big.data_type = "W1", TensorProto.FLOAT
    big.dims.extend([side, side])
    big.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "big.data"), ("offset", "0"), ("length", str(4 * side * side))):
        e = big.external_data.add()
        e.key, e.value = k, v
    model.graph.initializer[1].CopyFrom(big)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side]))
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    with open(tmp_path / "big.data", "wb") as fh:
        fh.truncate(4 * side * side)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        rows, facts = onnx_layer_counts(path, SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak:,} bytes traced"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024  # KiB
    assert [r.macs for r in rows] == [FIN * side, side * side]
    assert facts["size_bytes"] > 4 * side * side
    # a declared tensor its external file does not hold is refused, naming the tensor
    with open(tmp_path / "big.data", "r+b") as fh:
        fh.truncate(4 * side)
    with pytest.raises(DataError, match=r"big.onnx: initializer 'W1' declares \[10000, 10000\].*but holds"):
        onnx_layer_counts(path, SMALL)


# --- the protocol's input size ------------------------------------------------------------------------------

def test_an_onnx_input_fixed_to_another_size_is_refused_not_counted_at_the_protocols(tmp_path):
    conv = helper.make_node("Conv", ["x", "K"], ["c"], strides=[2, 2])
    pool = [helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"], axis=1)]
    path = tmp_path / "big_input.onnx"
    onnx.save(_model([conv, *pool], [_w((8, 3, 3, 3), "K")], [1, 8], input_shape=[1, 3, 224, 224]), str(path))
    with pytest.raises(DataError, match=r"big_input.onnx: input 'x' is fixed to \[1, 3, 224, 224\].*"
                                        r"\[1, 3, 112, 112\]"):
        check(path, "deepglint-light")
    # free dimensions take the protocol's sizes, as before
    free = tmp_path / "free.onnx"
    onnx.save(_model([conv, *pool], [_w((8, 3, 3, 3), "K")], [1, 8], input_shape=["n", 3, "h", "w"]), str(free))
    assert check(free, "deepglint-light").macs == 55 * 55 * 8 * 27


# --- protocol fields ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("max_gflops", 1.0e300), ("max_size_mb", 1.0e305),
                                          ("embedding_dim", 10**30)])
def test_a_protocol_limit_too_large_to_compare_is_refused_when_it_loads(tmp_path, field, value, monkeypatch,
                                                                        capsys):
    """`max_gflops: 1.0e+300` passed `allow_inf_nan=False` and crashed with an OverflowError (exit 1) when the
    limit was turned into FLOPs."""
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump({"name": "huge", field: value}))
    with pytest.raises(ConfigError, match=rf"huge.yaml: invalid protocol: {field}: .*less than or equal"):
        load_protocol(path)
    code, _, err = run_cli(["budget", "check", "mbf", "-p", path], monkeypatch, capsys)
    assert code == 2 and f"huge.yaml: invalid protocol: {field}" in err and "Traceback" not in err, err


def test_an_invalid_architecture_spec_is_named_by_its_file(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "faces", "input_size": 112, "stem": {"channels": "many"},
                                    "stages": [{"block": "mbconv", "channels": 16}]}))
    from visrec.commands.budget import _model_from_spec

    with pytest.raises(ConfigError, match=r"spec.yaml: architecture spec: stem.channels"):
        _model_from_spec(str(spec), [])
    code, _, err = run_cli(["budget", "check", spec, "-p", "deepglint-light"], monkeypatch, capsys)
    assert code == 2 and "spec.yaml: architecture spec: stem.channels" in err, err


# --- budget fit: the full check decides -------------------------------------------------------------------------

def test_fit_walks_up_when_the_next_larger_member_passes_the_full_check():
    """The screen counts 4 bytes a parameter, BatchNorm's included, where the exported file folds BatchNorm: a
    limit between scale 2's file and its screen estimate made scale 1 the fit and scale 2 the "next larger"
    that passes (its own row said yes). The fit is the largest member passing the full check."""
    from visrec.budget import export_size, registry_contract
    from visrec.models import build_backbone
    from visrec.search.fit import fit_to_budget

    torch.manual_seed(0)
    two = build_backbone("mobilefacenet", scale=2)
    file_bytes = export_size(two, contract=registry_contract(two, "mobilefacenet", {"scale": 2}), untrained=True)
    screen = 4 * sum(t.numel() for t in two.parameters())
    assert file_bytes < screen  # what the screen misses: the folded BatchNorm weights
    limit_mb = (file_bytes + screen) / 2 / 1e6
    proto = Protocol(name="between", max_gflops=30, max_size_mb=limit_mb, size_strict=True, embedding_dim=512)
    result = fit_to_budget("mobilefacenet", proto, knobs={"scale": [1, 2, 3]})
    assert result.best_kwargs == {"scale": 2} and result.best.passed and result.best.size_bytes == file_bytes
    assert result.next_larger_kwargs == {"scale": 3} and not result.next_larger.passed
