"""ONNX export (torch's dynamo exporter, dynamic batch, BatchNorm kept or folded), the onnxruntime runner, parity,
latency, and `visrec export` from a checkpoint."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from visrec.budget import check
from visrec.commands.export import app as export_app
from visrec.errors import DataError, StorageError
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


# --- the dynamo exporter, BatchNorm kept or folded -------------------------------------------------------

def _conv_bn_pairs(graph):
    """How many Conv/ConvTranspose outputs feed a BatchNormalization, and how many BN nodes there are."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    pairs = sum("BatchNormalization" in consumers.get(n.output[0], []) for n in graph.node
                if n.op_type in ("Conv", "ConvTranspose"))
    return pairs, sum(n.op_type == "BatchNormalization" for n in graph.node)


def test_export_goes_through_the_dynamo_exporter_without_deprecation_warnings(tmp_path, monkeypatch):
    import warnings

    onnx = pytest.importorskip("onnx")
    dynamo_flags = []
    real_export = torch.onnx.export

    def spy(*args, **kwargs):
        dynamo_flags.append(kwargs.get("dynamo"))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    model = trained_bn("mbf", scale=1, embedding_size=64)
    model.train()  # export_onnx exports it in eval mode and leaves it as it was
    batch = np.random.default_rng(2).uniform(-1, 1, (5, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(batch)).numpy()
    model.train()
    for keep in (True, False):
        with warnings.catch_warnings():  # nothing on our export path may be deprecated
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.simplefilter("error", category)
            path = export_onnx(model, tmp_path / f"bn-{keep}.onnx", keep_batchnorm=keep)
        assert model.training
        proto = onnx.load(str(path))
        # the dynamo exporter's mark: it writes torch's full version string (the TorchScript one wrote
        # torch.onnx.producer_version, without a local build tag) and opset 18 by default
        assert (proto.producer_name, proto.producer_version) == ("pytorch", torch.__version__)
        assert [(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
        # no debug annotations: no stack traces with local source paths in the file
        assert not any(n.metadata_props for n in proto.graph.node) and not proto.graph.metadata_props
        assert [i.name for i in proto.graph.input] == ["input"]
        assert [o.name for o in proto.graph.output] == ["embedding"]
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        pairs, bns = _conv_bn_pairs(proto.graph)
        if keep:  # every ConvBN of MobileFaceNet plus the BN1d after its FC
            assert pairs == 49 and bns == 50
        else:  # every Conv -> BN folded; the BN1d after the FC (no conv before it) stays
            assert pairs == 0 and bns == 1
        report = parity_check(model, path)
        assert report.passed, report
        embed = OnnxEmbedder(path)
        assert embed(batch[:1]).shape == (1, 64)
        got = embed(batch)
        assert got.shape == (5, 64) and float(np.abs(got - ref).max()) < 1e-3
    assert dynamo_flags == [True, True]


class _FoldCases(nn.Module):
    """conv -> BN (folds); conv with bias -> BN (folds); conv whose output also feeds an Add -> BN (stays:
    the conv's output is needed unnormalised); grouped ConvTranspose -> BN (folds)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, 1, 1, bias=True), nn.BatchNorm2d(8)
        self.c, self.bn_c = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.up, self.bn_up = nn.ConvTranspose2d(8, 6, 4, 2, 1, groups=2, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        y = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        z = self.c(y)
        y = self.bn_c(z) + z
        return self.bn_up(self.up(y)).mean(dim=(2, 3))


def test_batchnorm_folds_only_where_the_conv_feeds_it_alone(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = _FoldCases()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()(torch.randn(8, 3, 32, 32))
    model.eval()
    batch = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    kept = export_onnx(model, tmp_path / "kept.onnx", input_size=(1, 3, 32, 32), keep_batchnorm=True)
    folded = export_onnx(model, tmp_path / "folded.onnx", input_size=(1, 3, 32, 32), keep_batchnorm=False)
    assert _conv_bn_pairs(onnx.load(str(kept)).graph) == (4, 4)
    assert _conv_bn_pairs(onnx.load(str(folded)).graph) == (1, 1)  # only the BN whose conv also feeds the Add
    for path in (kept, folded):
        report = parity_check(model, path, batch, tolerance=1e-5)
        assert report.passed, report
    # the folded convs carry the BN's shift as their bias
    convs = [n for n in onnx.load(str(folded)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert [len(n.input) for n in convs] == [3, 3, 2, 3]


def test_export_refuses_an_opset_the_dynamo_exporter_cannot_write(tmp_path):
    from visrec.errors import VisrecError

    with pytest.raises(VisrecError, match="opset 17.*18 or later"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "old.onnx", input_size=(1, 3, 8, 8), opset=17)


# --- what `visrec export` may replace ----------------------------------------------------------------------

def test_export_never_replaces_the_checkpoint_nor_a_file_it_did_not_write(tmp_path):
    from conftest import save_tiny_face_model

    from visrec.export import export_checkpoint

    run = save_tiny_face_model(tmp_path / "run")
    ckpt = run / "model.pt"
    before = ckpt.read_bytes()
    for force in (False, True):  # not even with --force
        with pytest.raises(DataError, match="model.pt.*checkpoint being exported"):
            export_checkpoint(run, ckpt, parity=False, force=force)
    assert ckpt.read_bytes() == before
    mine = tmp_path / "notes.onnx"
    mine.write_text("the user's file")
    with pytest.raises(DataError, match="notes.onnx.*--force"):
        export_checkpoint(run, mine, parity=False)
    assert mine.read_text() == "the user's file"
    done = CliRunner().invoke(export_app, [str(run), "--out", str(mine), "--no-parity", "--force"])
    assert done.exit_code == 0, done.output
    export_checkpoint(run, mine, parity=False)  # an earlier visrec export is replaced without --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.onnx", "run"]
    # nor, with --force, another PyTorch file: a copy of the model here stands for a run's resume file
    resume = tmp_path / "last.rank0.pt"
    resume.write_bytes(before)
    done = CliRunner().invoke(export_app, [str(run), "--out", str(resume), "--no-parity", "--force"])
    assert isinstance(done.exception, DataError) and "is a PyTorch checkpoint" in str(done.exception), done.output
    assert resume.read_bytes() == before


def test_an_output_that_takes_no_file_is_an_error_naming_it(tmp_path, monkeypatch):
    """A folder the up-front checks pass but whose write fails (/proc as root, a full disk) was a traceback
    after the export; it is a StorageError naming the file (the system refused, not the input), and nothing is
    left."""
    from conftest import save_tiny_face_model

    from visrec import export as ex

    run = save_tiny_face_model(tmp_path / "run")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_save_whole", full)
    done = CliRunner().invoke(export_app, [str(run), "--out", str(tmp_path / "m.onnx"), "--no-parity"])
    assert isinstance(done.exception, StorageError), done.output
    assert str(done.exception).endswith("m.onnx: cannot write: No space left on device; make room (disk space, "
                                        "quota or file size limit) and run it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_parity_check_leaves_the_earlier_export_in_place(tmp_path, monkeypatch):
    from conftest import save_tiny_face_model

    from visrec import export as ex

    run = save_tiny_face_model(tmp_path / "run")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the earlier file, which --force allows the export to replace")  # one export fewer to run
    before = out.read_bytes()
    monkeypatch.setattr(ex, "parity_check", lambda *a, **k: ex.ParityReport(1.0, 0.5, 1e-3, False))
    done = CliRunner().invoke(export_app, [str(run), "--out", str(out), "--keep-batchnorm", "--force"])
    assert done.exit_code == 1 and "parity check failed" in done.output
    assert out.read_bytes() == before  # the new, failed file never took its place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "run"]  # no temporary left behind
