"""The LFR FLOP rule (PyTorch hooks and ONNX graphs), protocol boundaries, fit-to-budget, `visrec budget`."""

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from visrec.budget import check, full_flops, layer_counts, lfr_flops, onnx_layer_counts
from visrec.search.fit import fit_to_budget
from visrec.errors import DataError
from visrec.export import export_onnx
from visrec.models import build_backbone
from visrec.protocols import Protocol


class Tiny(nn.Module):
    """conv 3->8 3x3 s2 p1 no bias (56x56), depthwise 8 3x3 s1 p1 with bias, BN, FC 8*56*56 -> 16 no bias."""

    def __init__(self, emb=16):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 56 * 56, emb, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c2(self.c1(x)))).flatten(1))


def test_lfr_count_of_a_hand_built_net():
    c1 = (2 * 3 * 3 * 3 - 1) * 56 * 56 * 8 // 1       # no bias
    c2 = int(2 * 8 * 3 * 3 * 56 * 56 * 8 / 8)         # bias, groups 8
    fc = 2 * 8 * 56 * 56 * 16 - 16                    # no bias
    assert lfr_flops(Tiny()) == c1 + c2 + fc
    macs = [r.macs for r in layer_counts(Tiny())]
    assert macs == [56 * 56 * 8 * 27, 56 * 56 * 8 * 9, 8 * 56 * 56 * 16]
    # every op counted: conv+FC as 2*MACs plus what FlopCounterMode adds, never less than 2*MACs
    assert full_flops(Tiny()) >= 2 * sum(macs)


def test_grouped_conv_uses_the_organisers_formula():
    conv = nn.Conv2d(6, 9, 3, 2, 1, groups=3, bias=False)  # total Cin in the formula, divided by groups
    assert lfr_flops(conv, (1, 6, 112, 112)) == (2 * 6 * 9 - 1) * 56 * 56 * 9 // 3
    truncated = nn.Conv2d(3, 4, 3, 1, 1, groups=1, bias=False)  # integer per layer
    assert lfr_flops(truncated, (1, 3, 5, 5)) == (2 * 3 * 9 - 1) * 25 * 4


def test_published_mac_figures():
    """arcface_torch's "mbf 0.45 G" and "r100 12.1 G" are MACs. Counted on the meta device (shapes only)."""
    with torch.device("meta"):
        mbf, r100 = build_backbone("mbf"), build_backbone("r100")
    assert sum(r.macs for r in layer_counts(mbf)) == pytest.approx(0.45e9, rel=0.03)
    assert sum(r.macs for r in layer_counts(r100)) == pytest.approx(12.1e9, rel=0.03)
    assert lfr_flops(r100) > 24e9  # FLOPs ~ 2 x MACs: r100 is a Large-track model, not Light


def test_onnx_graph_count_equals_pytorch(tmp_path):
    # depthwise and grouped convs, bias-free convs, FC + BatchNorm1d head (one block per stage: exported twice)
    model = build_backbone("mbf", blocks=(1, 1, 1, 1))
    torch_layers = layer_counts(model)
    path = export_onnx(model, tmp_path / "m.onnx", keep_batchnorm=True)
    layers, facts = onnx_layer_counts(path)
    assert [l.lfr_flops for l in layers] == [l.lfr_flops for l in torch_layers]
    assert [l.macs for l in layers] == [l.macs for l in torch_layers]
    assert facts["batchnorm_kept"] and facts["embedding_dim"] == 512 and facts["weight_dtypes"] == ["float32"]
    # folding BN gives every folded conv a bias: the count rises by Hout*Wout*Cout/groups per conv, and the
    # report says so
    folded = check(export_onnx(model, tmp_path / "f.onnx", keep_batchnorm=False), "deepglint-light")
    convs = [l for l in torch_layers if l.kind == "conv"]
    assert folded.batchnorm_folded and not check(path, "deepglint-light").batchnorm_folded
    assert folded.lfr_flops - sum(l.lfr_flops for l in torch_layers) == sum(
        int(l.out_shape[1] * l.out_shape[2] * l.out_shape[3] / l.groups) for l in convs)


@pytest.mark.parametrize("bias", [True, False])
def test_onnx_fc_counts(tmp_path, bias):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=bias), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 512, bias=bias))
    path = export_onnx(model, tmp_path / "fc.onnx")
    conv = (2 * 27 - (0 if bias else 1)) * 56 * 56 * 4
    fc = 2 * 4 * 512 - (0 if bias else 512)
    assert [l.lfr_flops for l in onnx_layer_counts(path)[0]] == [conv, fc] == [l.lfr_flops for l in layer_counts(model)]


def exact(flops: int, size_mb=None, strict=False):
    return Protocol(name="edge", max_gflops=flops / 1e9, max_size_mb=size_mb, size_strict=strict, embedding_dim=16)


def test_boundaries_exactly_at_the_limit_pass():
    model = Tiny()
    n = lfr_flops(model)
    assert check(model, exact(n), with_size=False).passed
    assert not check(model, exact(n - 1), with_size=False).passed
    assert not check(model, exact(n, 100), with_size=False).passed  # a size limit is never passed unmeasured
    size = check(model, exact(n)).size_bytes
    assert check(model, exact(n, size / 1e6)).passed                   # <= at the limit passes
    assert not check(model, exact(n, (size - 1) / 1e6)).passed
    assert not check(model, exact(n, size / 1e6, strict=True)).passed  # "< 20 MB" is strict
    assert check(model, exact(n, (size + 1) / 1e6, strict=True)).passed
    wrong_dim = check(model, Protocol(name="x", embedding_dim=512), with_size=False)
    assert not wrong_dim.passed and [l.name for l in wrong_dim.limits if not l.passed] == ["feature dimension"]
    double = check(model.double(), Protocol(name="x"), with_size=False)  # float32 weights required
    assert not double.passed and double.weight_dtypes == ["float64"]


def test_bad_onnx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(DataError, match="broken.onnx.*not a valid ONNX model"):
        check(bad, "deepglint-light")
    with pytest.raises(DataError, match="missing.onnx.*not found"):
        check(tmp_path / "missing.onnx", "deepglint-light")


def test_fit_returns_a_passing_model_and_a_failing_larger_one():
    proto = Protocol(name="tiny-track", max_gflops=0.4, embedding_dim=512)
    knobs = {"depth_mult": [1.0, 1.2], "width_mult": [0.6, 0.7, 0.8, 0.9, 1.0]}
    result = fit_to_budget("effnet_face", proto, knobs=knobs)
    assert result.best.passed
    assert result.next_larger is not None and not result.next_larger.passed
    assert result.best.lfr_flops <= 0.4e9 < result.next_larger.lfr_flops
    # the winner is the largest passing candidate of all lines, and its neighbour is one step wider
    line = result.best_kwargs["depth_mult"]
    assert result.next_larger_kwargs == dict(result.best_kwargs, width_mult=round(result.best_kwargs["width_mult"] + 0.1, 2))
    assert result.next_larger_kwargs["depth_mult"] == line


def test_fit_mobilefacenet_with_a_size_limit():
    """MobileFaceNet's width knob is `scale`; the size limit (fp32 ONNX bytes) decides here, not FLOPs."""
    with torch.device("meta"):
        params = [sum(t.numel() for t in build_backbone("mobilefacenet", scale=s).parameters()) for s in (1, 2)]
    limit_mb = 4 * (params[0] + params[1]) / 2 / 1e6  # between the two fp32 sizes
    proto = Protocol(name="small", max_gflops=30, max_size_mb=limit_mb, embedding_dim=512)
    result = fit_to_budget("mobilefacenet", proto, knobs={"scale": [1, 2, 3]})
    assert result.best_kwargs == {"scale": 1} and result.next_larger_kwargs == {"scale": 2}
    assert result.best.passed and result.best.size_bytes <= limit_mb * 1e6
    assert not result.next_larger.passed and result.next_larger.size_bytes > limit_mb * 1e6


def test_fit_steps_down_to_the_largest_member_that_can_be_built(monkeypatch, tmp_path):
    """A protocol with no size limit and a loose FLOP limit: the grid's last points have more parameters than
    visrec builds (MAX_BUILD_PARAMS, lowered here between scale 1 and 2); fit answers the largest buildable one and
    says why the next is not measured, where it used to stop with an error about the winner."""
    import visrec.budget
    import visrec.search.fit
    from typer.testing import CliRunner

    from visrec.cli import app

    with torch.device("meta"):
        params = [sum(t.numel() for t in build_backbone("mobilefacenet", scale=s).parameters()) for s in (1, 2)]
    cap = (params[0] + params[1]) // 2
    monkeypatch.setattr(visrec.budget, "MAX_BUILD_PARAMS", cap)
    monkeypatch.setattr(visrec.search.fit, "MAX_BUILD_PARAMS", cap)
    proto = Protocol(name="loose", max_gflops=1000, embedding_dim=512)
    result = fit_to_budget("mobilefacenet", proto, knobs={"scale": [1, 2, 3]})
    assert result.best_kwargs == {"scale": 1} and result.best.passed
    assert result.next_larger_kwargs == {"scale": 2} and result.next_larger is None
    assert f"{params[1]:,} parameters > {cap:,}" in result.next_larger_why
    (tmp_path / "loose.yaml").write_text("name: loose\nmax_gflops: 1000\nembedding_dim: 512\n")
    monkeypatch.setitem(visrec.search.fit.FAMILIES, "mobilefacenet", ("mobilefacenet", {"scale": [1, 2, 3]}))
    out = CliRunner().invoke(app, ["budget", "fit", "mobilefacenet", "-p", str(tmp_path / "loose.yaml")],
                             terminal_width=250)
    assert out.exit_code == 0, out.output
    assert "too large to build" in " ".join(out.output.split())


def test_fit_scales_a_landmark_family_and_judges_every_grid_point_as_the_search_judges_a_candidate():
    """`budget fit` is the search's budget code over a grid: the winner is the last point of its line that
    `over_budget` lets through, the next one is the first it refuses, and the full check agrees."""
    from visrec.search.space import model_cost, over_budget

    result = fit_to_budget("heatmap_lite", "icme21-landmarks")
    proto = result.protocol
    assert result.best.passed and not result.next_larger.passed
    for kw, ok in ((result.best_kwargs, True), (result.next_larger_kwargs, False)):
        cost = model_cost("heatmap_lite", kw, proto.input_size)
        assert (over_budget(cost, proto.max_gflops, proto.max_size_mb) is None) is ok
        assert cost.flops == (result.best if ok else result.next_larger).lfr_flops


runner = CliRunner()


def test_budget_cli_exit_codes_and_labels(tmp_path):
    from visrec.cli import app

    one = lambda args: runner.invoke(app, ["budget", "check", *args])  # noqa: E731
    ok = one(["effnet_face", "--set", "width_mult=0.5", "--protocol", "deepglint-light"])
    assert ok.exit_code == 0, ok.output
    assert "MACs" in ok.output and "FLOPs, LFR rule" in ok.output and "MiB" in ok.output
    tight = tmp_path / "tight.yaml"
    tight.write_text("name: tight\nmax_gflops: 0.2\nembedding_dim: 512\n")
    fail = one(["mbf", "--protocol", str(tight), "--layers"])  # 0.9 G FLOPs
    assert fail.exit_code == 1 and "FAIL" in fail.output and "per layer" in fail.output
    # `budget fit` is a subcommand of its own: a family and a protocol, a table of the fit and the next larger
    roomy = tmp_path / "roomy.yaml"
    roomy.write_text("name: roomy\nmax_gflops: 2.0\nembedding_dim: 512\n")  # FLOPs only: no export per candidate
    fit = runner.invoke(app, ["budget", "fit", "mobilefacenet", "--protocol", str(roomy)])
    assert fit.exit_code == 0 and "largest mobilefacenet inside roomy" in fit.output, fit.output
    words = " ".join(fit.output.replace("│", " ").split())  # the table wraps cells at the runner's width
    assert "1.7581 G" in words and "2.2118 G" in words  # scale 4 fits 2 GFLOPs, scale 5 is the next larger
    missing = runner.invoke(app, ["budget", "fit", "--protocol", str(tight)])
    assert missing.exit_code == 2 and "family" in missing.output.lower()


def test_onnx_count_sees_through_upsampling_scales(tmp_path):
    """AttentionNet's mask branch up-samples with Resize whose scales the exporter writes as a Concat of
    Constants; without folding them, shape inference loses every later layer's size (counted as 0)."""
    pytest.importorskip("onnx")
    import warnings

    from visrec.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("attention56", width_mult=0.125).eval()
    path = tmp_path / "attn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    onnx_rows = onnx_layer_counts(path)[0]
    assert sum(r.lfr_flops for r in onnx_rows) == sum(r.lfr_flops for r in layer_counts(model))


def test_the_figures_name_a_landmark_models_output_as_points_not_an_embedding():
    from rich.console import Console

    from visrec.commands.budget import _figures_table

    report = check(build_backbone("pfld", num_points=106, width_mult=0.25).eval(), "icpr20-landmarks", with_size=False)
    assert report.output_shape == (106, 2)
    shown = Console(width=200, record=True)
    shown.print(_figures_table(report))
    text = shown.export_text()
    assert "output per image" in text and "106 x 2" in text and "embedding dim" not in text
    face = check(build_backbone("mobilefacenet", embedding_size=128, scale=1).eval(), "deepglint-light", with_size=False)
    assert face.output_shape == (128,) and face.embedding_dim == 128


def _graph_with(nodes, inits, tail):
    """A tiny ONNX model: an FC of 9 MACs on the pooled input, plus ``nodes`` whose result ``tail`` (a float
    scalar) is added to the output, so the extra arithmetic is part of the graph the counter walks."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "W")
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["g"]), helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "W"], ["m"]), *nodes, helper.make_node("Add", ["m", tail], ["fc1"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 3])], [w, *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("bomb", ["ConstantOfShape", "Range", "Concat", "broadcast", "Shape"])
def test_a_tiny_onnx_whose_shape_arithmetic_would_make_gigabytes_is_counted_without_building_it(tmp_path, bomb):
    """`visrec budget check` is what SECURITY.md says to run first on an untrusted ONNX: a few hundred bytes
    of ConstantOfShape([20000, 20000]) or Range(0, 1e9) used to be evaluated (GBs) before the 64-value fold
    limit was checked. The size is now computed from the inputs first, and the count is still right."""
    import resource
    import time
    import tracemalloc

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    total = [helper.make_node("ReduceSum", ["big"], ["s0"], keepdims=0),
             helper.make_node("Cast", ["s0"], ["s"], to=TensorProto.FLOAT)]
    nodes, inits = {
        "ConstantOfShape": ([helper.make_node("ConstantOfShape", ["shape"], ["big"])], [i64("shape", [20000, 20000])]),
        "Range": ([helper.make_node("Range", ["start", "limit", "delta"], ["big"])],
                  [i64("start", 0), i64("limit", 10**9), i64("delta", 1)]),
        # one 80 kB initializer named 20,000 times: 1.6 GB if concatenated
        "Concat": ([helper.make_node("Concat", ["v"] * 20000, ["big"], axis=0)], [i64("v", np.zeros(10**4))]),
        # (30000, 1) + (1, 30000): 7.2 GB from 480 kB
        "broadcast": ([helper.make_node("Add", ["a", "b"], ["big"])],
                      [i64("a", np.zeros((30000, 1))), i64("b", np.zeros((1, 30000)))]),
        # Shape of a tensor shape inference knows to be 20000 x 20000: read off the shape, not from zeros
        "Shape": ([helper.make_node("ConstantOfShape", ["shape"], ["huge"]),
                   helper.make_node("Shape", ["huge"], ["big"])], [i64("shape", [20000, 20000])]),
    }[bomb]
    path = tmp_path / f"{bomb}.onnx"
    onnx.save(_graph_with(nodes + total, inits, "s"), str(path))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    tracemalloc.start()
    try:
        report = check(path, Protocol(name="x"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.macs == 9 and [r.name for r in report.layers] == ["MatMul_2"]  # the FC, counted right
    assert peak < 64 * 2**20, f"{peak:,} bytes traced"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 300 * 1024  # KiB
    assert time.monotonic() - start < 30


def test_the_budget_cli_on_a_constant_of_shape_bomb_stays_small(tmp_path):
    """The command itself, in a process of its own: its peak RSS is that of the interpreter and its imports,
    not of the 20000 x 20000 float32 tensor (1.6 GB) the fold used to build."""
    import os
    import subprocess
    import sys

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = tmp_path / "bomb.onnx"
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0)]
    shape = numpy_helper.from_array(np.array([20000, 20000], np.int64), "shape")
    onnx.save(_graph_with(nodes, [shape], "s"), str(path))
    assert path.stat().st_size < 400
    script = ("import resource, sys\nfrom visrec.cli import main\n"
              "sys.argv = ['visrec', 'budget', 'check', sys.argv[1], '-p', 'deepglint-light']\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
              "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, 'CODE', code)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert "Traceback" not in out.stderr, out.stderr
    words = out.stdout.split()
    peak_kib, code = int(words[words.index("PEAK") + 1]), words[words.index("CODE") + 1]
    assert code == "1" and "MACs" in out.stdout  # fails the protocol (dim 3), a full report, no traceback
    assert peak_kib < 300 * 1024, f"{peak_kib} KiB above the imports"
