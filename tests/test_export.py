"""ONNX export (dynamic batch), the onnxruntime runner, parity, latency, and `visrec export` from a checkpoint."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from visrec.budget import check
from visrec.commands.export import app as export_app
from visrec.errors import DataError
from visrec.export import OnnxEmbedder, export_onnx, latency, parity_check
from visrec.models import build_backbone


def trained_bn(name, seed=0, **kw):
    """A backbone whose BN layers have real running statistics, so embeddings have a scale worth comparing."""
    torch.manual_seed(seed)
    model = build_backbone(name, **kw)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 112, 112))
    return model.eval()


def test_export_parity_and_latency(tmp_path):
    model = trained_bn("effnet_face", width_mult=0.5)
    path = export_onnx(model, tmp_path / "e.onnx", keep_batchnorm=False)
    report = parity_check(model, path)
    assert report.passed and report.max_abs_diff < 1e-3 and report.min_cosine > 0.9999
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    out = OnnxEmbedder(path)(batch)  # dynamic batch: exported at batch 1, run at 3
    assert out.shape == (3, 512) and out.dtype == np.float32
    lat = latency(path, batch_sizes=(1, 2), runs=3, warmup=1)
    assert set(lat) == {1, 2} and all(0 < p50 <= p95 for p50, p95 in lat.values())
    other = trained_bn("effnet_face", seed=1, width_mult=0.5)
    assert not parity_check(other, path).passed  # different weights: parity must fail


def test_onnx_runner_rejects_bad_files(tmp_path):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(DataError, match="junk.onnx"):
        OnnxEmbedder(bad)
    with pytest.raises(DataError, match="absent.onnx.*not found"):
        OnnxEmbedder(tmp_path / "absent.onnx")


def test_export_cli_from_a_checkpoint_then_budget(tmp_path):
    model = trained_bn("effnet_face", width_mult=0.5)
    ckpt = tmp_path / "model.pt"
    torch.save({"model_config": {"name": "effnet_face", "width_mult": 0.5}, "backbone": model.state_dict()}, ckpt)
    out = tmp_path / "m.onnx"
    done = CliRunner().invoke(export_app, [str(ckpt), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "parity" in done.output and out.exists()
    from_ckpt, from_onnx = check(ckpt, "deepglint-light"), check(out, "deepglint-light")
    assert from_ckpt.passed and from_onnx.passed
    # the default export folds BN (smaller, faster to serve): the ONNX count then includes the folded biases
    assert from_onnx.batchnorm_folded and from_onnx.lfr_flops > from_ckpt.lfr_flops
    assert from_onnx.macs == from_ckpt.macs
