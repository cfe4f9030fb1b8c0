"""The LFR FLOP rule, ONNX-graph counting, protocol boundaries, fit-to-budget, export parity."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from visrec.budget import check, fit_to_budget, layer_counts, lfr_flops, onnx_layer_counts
from visrec.errors import ConfigError, DataError
from visrec.export import OnnxEmbedder, export_onnx, latency, parity_check
from visrec.models import build_backbone
from visrec.protocols import BUILTIN, Protocol, load_protocol


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


def test_grouped_conv_uses_the_organisers_formula():
    conv = nn.Conv2d(6, 9, 3, 2, 1, groups=3, bias=False)  # total Cin in the formula, divided by groups
    assert lfr_flops(conv, (1, 6, 112, 112)) == (2 * 6 * 9 - 1) * 56 * 56 * 9 // 3


def test_published_mac_figures():
    assert sum(r.macs for r in layer_counts(build_backbone("mbf"))) == pytest.approx(0.45e9, rel=0.03)
    assert sum(r.macs for r in layer_counts(build_backbone("r100"))) == pytest.approx(12.1e9, rel=0.03)


@pytest.mark.parametrize("name", ["mbf", "effnet_face"])
def test_onnx_graph_count_equals_pytorch(name, tmp_path):
    model = build_backbone(name)
    path = export_onnx(model, tmp_path / "m.onnx", keep_batchnorm=True)
    layers, facts = onnx_layer_counts(path)
    assert sum(l.lfr_flops for l in layers) == lfr_flops(model)
    assert facts["batchnorm_kept"] and facts["embedding_dim"] == 512 and facts["weight_dtypes"] == ["float32"]
    # folding BN adds one bias per folded conv: the count rises, and the report says so
    folded = export_onnx(model, tmp_path / "f.onnx", keep_batchnorm=False)
    report = check(folded, "deepglint-light")
    assert report.batchnorm_folded and report.lfr_flops > lfr_flops(model)


def test_onnx_biased_fc_counts(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, 512))
    path = export_onnx(model, tmp_path / "fc.onnx")
    assert sum(l.lfr_flops for l in onnx_layer_counts(path)[0]) == 2 * 3 * 112 * 112 * 512


def exact(flops: int, size_mb=None, strict=False):
    return Protocol(name="edge", max_gflops=flops / 1e9, max_size_mb=size_mb, size_strict=strict, embedding_dim=16)


def test_boundaries_exactly_at_the_limit_pass():
    model = Tiny()
    n = lfr_flops(model)
    assert check(model, exact(n), with_size=False).passed
    assert not check(model, exact(n - 1), with_size=False).passed
    size = check(model, exact(n)).size_bytes
    assert check(model, exact(n, size / 1e6)).passed                   # <= at the limit passes
    assert not check(model, exact(n, size / 1e6, strict=True)).passed  # "< 20 MB" is strict
    assert not check(model, Protocol(name="x", embedding_dim=512)).passed  # wrong feature dimension


def test_protocols_builtin_and_yaml(tmp_path):
    assert {"deepglint-light", "deepglint-large", "iqiyi-light", "iqiyi-large", "icpr20-landmarks",
            "icme21-landmarks"} <= set(BUILTIN)
    assert BUILTIN["icme21-landmarks"].max_gflops == 0.1 and BUILTIN["icme21-landmarks"].max_size_mb == 2
    user = load_protocol("configs/protocols/example.yaml")
    assert user.max_gflops == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmax_gflops: -1\n")
    with pytest.raises(ConfigError, match="max_gflops"):
        load_protocol(bad)
    with pytest.raises(ConfigError, match="unknown protocol"):
        load_protocol("nope")


def test_bad_onnx_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(DataError, match="broken.onnx.*not a valid ONNX model"):
        check(bad, "deepglint-light")
    with pytest.raises(DataError, match="not found"):
        check(tmp_path / "missing.onnx", "deepglint-light")


def test_fit_returns_a_passing_model_and_a_failing_larger_one():
    proto = Protocol(name="tiny-track", max_gflops=0.4, max_size_mb=20, embedding_dim=512)
    result = fit_to_budget("effnet_face", proto)
    assert result.best.passed
    assert result.next_larger is not None and not result.next_larger.passed
    assert result.next_larger.lfr_flops > result.best.lfr_flops
    assert result.best.lfr_flops <= 0.4e9 < result.next_larger.lfr_flops


def test_export_parity_and_latency(tmp_path):
    model = build_backbone("mbf")
    with torch.no_grad():  # give BN real statistics so embeddings have a scale worth comparing
        model.train()(torch.randn(8, 3, 112, 112))
    path = export_onnx(model, tmp_path / "mbf.onnx", keep_batchnorm=False)
    report = parity_check(model, path)
    assert report.passed and report.max_abs_diff < 1e-3
    out = OnnxEmbedder(path)(torch.zeros(3, 3, 112, 112).numpy())  # dynamic batch
    assert out.shape == (3, 512)
    lat = latency(path, batch_sizes=(1, 2), runs=3, warmup=1)
    assert set(lat) == {1, 2} and all(p50 <= p95 for p50, p95 in lat.values())
    other = build_backbone("mbf")  # different weights: parity must fail
    with torch.no_grad():
        other.train()(torch.randn(8, 3, 112, 112))
    assert not parity_check(other, path).passed


def test_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "visrec.cli", "budget", "mbf", "--protocol", "deepglint-light"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "MACs" in ok.stdout and "FLOPs" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "visrec.cli", "budget", "r50", "--protocol", "deepglint-light"],
                          capture_output=True, text=True)
    assert fail.returncode == 1 and "FAIL" in fail.stdout


def test_export_and_budget_from_a_checkpoint(tmp_path):
    model = build_backbone("effnet_face", embedding_size=512)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 112, 112))
    ckpt = tmp_path / "model.pt"
    torch.save({"model_config": {"name": "effnet_face", "embedding_size": 512}, "backbone": model.state_dict()}, ckpt)
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "export", str(ckpt), "--onnx", str(tmp_path / "e.onnx")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "parity" in done.stdout and (tmp_path / "e.onnx").exists()
    for target in (ckpt, tmp_path / "e.onnx"):
        res = subprocess.run([sys.executable, "-m", "visrec.cli", "budget", str(target), "--protocol", "deepglint-light"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
