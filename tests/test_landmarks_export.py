"""ONNX export of the landmark models (input (N, 3, 112, 112) in [-1, 1], output (N, 106, 2) points
normalised to the crop): onnxruntime agrees with PyTorch, at the exported and at another batch size."""

import numpy as np
import pytest
import torch

from visrec.export import OnnxEmbedder, export_onnx, parity_check
from visrec.models import build_backbone

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", ["pfld", "heatmap_lite"])
@pytest.mark.parametrize("keep_batchnorm", [True, False])
def test_landmark_models_export_to_onnx_with_parity(tmp_path, name, keep_batchnorm):
    torch.manual_seed(0)
    net = build_backbone(name, width_mult=0.25)
    with torch.no_grad():  # realistic, non-trivial BN statistics (folding them is then exercised)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0  # running stats := this batch's
        net.train()(torch.randn(8, 3, 112, 112))
        if name == "heatmap_lite":  # peaky heatmaps: a fresh head gives near-uniform ones (every point ~0.5)
            net.head.weight.mul_(30)
    path = export_onnx(net, tmp_path / f"{name}.onnx", input_size=(1, 3, 112, 112), output_name="points",
                       keep_batchnorm=keep_batchnorm)
    assert net.training  # the caller's model is left as it was

    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["points"]
    assert [i.name for i in sess.get_inputs()] == ["input"]

    batch = np.random.default_rng(1).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    got = OnnxEmbedder(path)(batch)
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(batch)).numpy()
    assert got.shape == ref.shape == (3, 106, 2)
    assert float(np.abs(got - ref).max()) < 1e-4
    assert float(ref.std()) > 1e-2  # points differ: a constant output would make parity trivial

    report = parity_check(net, path, tolerance=1e-4)  # its own batch of 4
    assert report.passed and report.max_abs_diff < 1e-4


def test_default_output_name_is_still_embedding(tmp_path):
    import onnxruntime as ort

    path = export_onnx(build_backbone("pfld", width_mult=0.25), tmp_path / "p.onnx")
    names = [o.name for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()]
    assert names == ["embedding"]
