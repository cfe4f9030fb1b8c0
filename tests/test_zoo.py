"""InsightFace model-zoo ONNX adapters and local pretrained weights (visrec.models.zoo), offline.

The ONNX files are tiny stand-ins exported here with the layout of the real ones: one NCHW input
(symbolic batch ``'None'`` as arcface_torch's torch2onnx.py writes it, or a fixed batch), one output,
and for the "graph normalises itself" case leading ``Sub``/``Mul`` nodes with the names insightface's
model_zoo looks for. Each computes a known function of its input, so the expected output is worked out
by hand from insightface's documented preprocessing.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visrec.errors import DataError, VisrecError
from visrec.models import build_backbone
from visrec.models.zoo import (ArcFaceOnnx, Landmark106Onnx, graph_normalises_input, load_arcface_torch_backbone,
                               load_timm_weights)

onnx = pytest.importorskip("onnx", reason="the ONNX adapters need visrec[export]")
pytest.importorskip("onnxruntime", reason="the ONNX adapters need visrec[export]")
cv2 = pytest.importorskip("cv2")

HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None


def export(module: nn.Module, path, shape, in_name="input.1", out_name="683", dynamic=True, node_names=None):
    """torch.onnx.export, then give the graph the names of an old-style export: io names as in the
    real files and node names ``{OpType}_{i}`` (or ``node_names``, a dict index -> name)."""
    axes = {"x": {0: "None"}, "y": {0: "None"}} if dynamic else None
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), torch.zeros(*shape), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes, opset_version=13)
    model = onnx.load(str(path))
    g = model.graph
    g.input[0].name, g.output[0].name = in_name, out_name
    for i, node in enumerate(g.node):
        node.input[:] = [in_name if n == "x" else n for n in node.input]
        node.output[:] = [out_name if n == "y" else n for n in node.output]
        node.name = (node_names or {}).get(i, f"{node.op_type}_{i}")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------------------- ArcFace


class Linear(nn.Module):
    """emb = W @ flatten(x); with ``self_norm`` the graph first does (x - 127.5) * 0.0078125 itself
    (Sub then Mul, the MXNet-converted model-zoo layout)."""

    def __init__(self, w: torch.Tensor, self_norm: bool):
        super().__init__()
        self.register_buffer("w", w)
        self.self_norm = self_norm

    def forward(self, x):
        if self.self_norm:
            x = (x - 127.5) * 0.0078125
        return x.flatten(1) @ self.w.t()


def faces(n, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    img[..., 0] = np.clip(img[..., 0].astype(int) + 60, 0, 255)  # channels differ on average: order matters
    return img


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3 * 112 * 112, generator=g, dtype=torch.float64) / 200.0


def by_hand(w: torch.Tensor, rgb: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The documented preprocessing in float64: NCHW RGB, (x - mean) / std, then the linear map."""
    x = (rgb.astype(np.float64).transpose(0, 3, 1, 2) - mean) / std
    return x.reshape(len(rgb), -1) @ w.numpy().T


def test_arcface_plain_graph_127_5_rgb_and_dynamic_batch(tmp_path, weights):
    path = export(Linear(weights.float(), self_norm=False), tmp_path / "w600k_r50.onnx", (1, 3, 112, 112))
    model = ArcFaceOnnx(path, batch_size=2)  # 5 crops -> runs of 2, 2, 1
    assert (model.name, model.dim, model.input_size) == ("w600k_r50", 8, (112, 112))
    assert (model.input_mean, model.input_std) == (127.5, 127.5)  # no Sub/Mul at the start of the graph
    assert (model.input_name, model.output_name, model.fixed_batch) == ("input.1", "683", None)
    rgb = faces(5)
    emb = model(rgb)
    assert emb.shape == (5, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, by_hand(weights, rgb, 127.5, 127.5), rtol=1e-4, atol=1e-4)
    # insightface's own blob: BGR images through cv2.dnn.blobFromImages(..., swapRB=True)
    ref = cv2.dnn.blobFromImages(list(rgb[..., ::-1]), 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    np.testing.assert_allclose(model.blob(rgb), ref, rtol=0, atol=1e-6)
    # feeding BGR by mistake changes the embedding: the channel order reaches the network
    assert np.abs(model(rgb[..., ::-1]) - emb).max() > 0.1
    np.testing.assert_array_equal(model(rgb[0]), emb[:1])  # a single crop is a batch of one
    assert model(rgb[:0]).shape == (0, 8)


@pytest.mark.parametrize("names", [{1: "Sub_1", 3: "Mul_3"}, {1: "_minusscalar0", 3: "_mulscalar0"}],
                         ids=["torch-style", "mxnet-style"])
def test_arcface_graph_that_normalises_itself_gets_0_1(tmp_path, weights, names):
    path = export(Linear(weights.float(), self_norm=True), tmp_path / "r100.onnx", (1, 3, 112, 112),
                  node_names=names)
    kinds = [n.op_type for n in onnx.load(str(path)).graph.node[:4]]
    assert kinds[1] == "Sub" and kinds[3] == "Mul"  # the names sit on the real Sub/Mul nodes
    model = ArcFaceOnnx(path)
    assert (model.input_mean, model.input_std) == (0.0, 1.0)
    rgb = faces(3, seed=1)
    # raw pixels in, the graph's own (x - 127.5) * 0.0078125 = (x - 127.5) / 128
    np.testing.assert_allclose(model(rgb), by_hand(weights, rgb, 127.5, 128.0), rtol=1e-4, atol=1e-4)


def test_arcface_rule_reads_node_names_literally(tmp_path, weights):
    # insightface matches name prefixes, not op types: a modern export's "/Sub", "/Mul" names, or a Sub
    # without a Mul, do not count, so such a file gets 127.5 / 127.5 (pass input_mean/std to override)
    modern = export(Linear(weights.float(), True), tmp_path / "m.onnx", (1, 3, 112, 112),
                    node_names={1: "/Sub", 3: "/Mul"})
    only_sub = export(Linear(weights.float(), True), tmp_path / "s.onnx", (1, 3, 112, 112),
                      node_names={1: "Sub_1", 3: "Times_3"})
    assert not graph_normalises_input(modern) and not graph_normalises_input(only_sub)
    assert (ArcFaceOnnx(modern).input_mean, ArcFaceOnnx(modern).input_std) == (127.5, 127.5)
    fixed = ArcFaceOnnx(modern, input_mean=0, input_std=1)
    rgb = faces(2, seed=2)
    np.testing.assert_allclose(fixed(rgb), by_hand(weights, rgb, 127.5, 128.0), rtol=1e-4, atol=1e-4)
    with pytest.raises(VisrecError, match="together"):
        ArcFaceOnnx(modern, input_mean=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_arcface_fixed_batch_model_loops(tmp_path, weights, batch):
    path = export(Linear(weights.float(), False), tmp_path / "fixed.onnx", (batch, 3, 112, 112), dynamic=False)
    model = ArcFaceOnnx(path, batch_size=64)
    assert model.fixed_batch == batch and model.batch_size == batch
    rgb = faces(3, seed=3)  # 3 crops: batch 1 -> 3 runs; batch 2 -> 2 runs, the last one zero-padded
    np.testing.assert_allclose(model(rgb), by_hand(weights, rgb, 127.5, 127.5), rtol=1e-4, atol=1e-4)


def test_arcface_rejects_wrong_inputs_and_files(tmp_path, weights):
    model = ArcFaceOnnx(export(Linear(weights.float(), False), tmp_path / "a.onnx", (1, 3, 112, 112)))
    with pytest.raises(ValueError, match="112, 112, 3"):
        model(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(DataError, match="absent.onnx"):
        ArcFaceOnnx(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.onnx"):
        ArcFaceOnnx(junk)


# ------------------------------------------------------------------------------------ 2d106 landmarks


class Const(nn.Module):
    """Always outputs ``pred`` (212 values in [-1, 1]); the input only sets the batch size."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.register_buffer("pred", pred.reshape(1, -1))

    def forward(self, x):
        return self.pred.expand(x.shape[0], -1) + x[:, :1, 0, 0] * 0


class ChannelMeans(nn.Module):
    """pred = base + channel means of the input blob @ coef (3 x 212): shows the normalisation and order."""

    def __init__(self, base: torch.Tensor, coef: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base.reshape(1, -1))
        self.register_buffer("coef", coef)

    def forward(self, x):
        return self.base + x.mean(dim=(2, 3)) @ self.coef


def grid_points():
    """106 known outputs in [-1, 1] (the model's normalised crop coordinates)."""
    t = np.linspace(-0.9, 0.9, 106)
    return np.stack([t, np.sin(3 * t) * 0.8], axis=1).astype(np.float32)


def image_points(pred, box):
    """insightface's decoding in closed form: crop pixel (p + 1) * 96, crop scale s = 192 / (1.5 m),
    m = max(w, h), so image x = cx + p_x * 96 / s = cx + p_x * 0.75 m (and the same for y)."""
    x1, y1, x2, y2 = box[:4]
    m = max(x2 - x1, y2 - y1)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2]) + np.asarray(pred, np.float64) * 0.75 * m


def test_landmark_decodes_known_points_on_a_non_square_image(tmp_path):
    pred = grid_points()
    path = export(Const(torch.from_numpy(pred)), tmp_path / "2d106det.onnx", (1, 3, 192, 192),
                  in_name="data", out_name="fc1")
    model = Landmark106Onnx(path)
    assert (model.num_points, model.input_size, model.point_order) == (106, 192, "insightface_2d106")
    assert (model.input_mean, model.input_std) == (127.5, 128.0)  # landmark.py's default: 128, not 127.5
    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)  # H 300, W 500
    box = (200.0, 80.0, 320.0, 240.0)  # w 120, h 160: scale 192 / 240 = 0.8, centre (260, 160)
    pts = model(image, box)
    assert pts.shape == (106, 2) and pts.dtype == np.float32
    np.testing.assert_allclose(pts, image_points(pred, box), atol=1e-3)
    assert np.allclose(pts[0], (260 - 0.9 * 120, 160 + np.sin(-2.7) * 0.8 * 120), atol=1e-3)
    # several boxes at once (a detector's rows may carry a score after the box)
    boxes = np.array([[200, 80, 320, 240, 0.9], [10, 20, 110, 70, 0.8]], np.float32)
    many = model(image, boxes)
    assert many.shape == (2, 106, 2)
    np.testing.assert_allclose(many[0], pts, atol=1e-4)
    np.testing.assert_allclose(many[1], image_points(pred, boxes[1]), atol=1e-3)
    assert model(image, np.zeros((0, 4))).shape == (0, 106, 2)
    # a file with a fixed batch of 2: three boxes run as 2 + (1 and a zero pad)
    fixed = Landmark106Onnx(export(Const(torch.from_numpy(pred)), tmp_path / "fixed.onnx", (2, 3, 192, 192),
                                   in_name="data", out_name="fc1", dynamic=False))
    assert fixed.fixed_batch == 2
    three = fixed(image, np.concatenate([boxes[:, :4], boxes[:1, :4]]))
    np.testing.assert_allclose(three, np.concatenate([many, many[:1]]), atol=1e-4)


def test_landmark_crop_matches_insightface_transform(tmp_path):
    model = Landmark106Onnx(export(Const(torch.zeros(212)), tmp_path / "l.onnx", (1, 3, 192, 192),
                                   in_name="data", out_name="fc1"))
    box = (200.0, 80.0, 320.0, 240.0)
    m = model.transform(box)
    # face_align.transform(center, 192, scale, 0): scale, move the centre to the origin, then by 96
    np.testing.assert_allclose(m, [[0.8, 0, 96 - 260 * 0.8], [0, 0.8, 96 - 160 * 0.8]])
    image = np.zeros((300, 500, 3), np.uint8)
    image[148:153, 298:303] = (255, 0, 0)  # a red square centred on image pixel (x 300, y 150)
    crop, _ = model.crop(image, box)
    ys, xs = np.nonzero(crop[..., 0] > 0)
    w = crop[ys, xs, 0].astype(float)
    centre = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    np.testing.assert_allclose(centre, m @ [300, 150, 1], atol=0.05)  # (128, 88)
    assert crop[..., 2].max() == 0  # RGB stays RGB: no channel swap on an RGB input


@pytest.mark.parametrize("first_node, mean, std", [(None, 127.5, 128.0), ("bn_data", 0.0, 1.0)])
def test_landmark_normalisation_and_channel_order(tmp_path, first_node, mean, std):
    g = torch.Generator().manual_seed(1)
    base = torch.from_numpy(grid_points()).reshape(-1) * 0.5
    coef = torch.randn(3, 212, generator=g) * (0.05 if first_node is None else 0.0004)
    names = {0: first_node} if first_node else None
    path = export(ChannelMeans(base, coef), tmp_path / "m.onnx", (1, 3, 192, 192), in_name="data",
                  out_name="fc1", node_names=names)
    model = Landmark106Onnx(path)
    assert (model.input_mean, model.input_std) == (mean, std)
    rgb = np.array([200, 100, 30], np.float64)
    image = np.empty((400, 600, 3), np.uint8)
    image[:] = rgb.astype(np.uint8)  # one colour: every crop pixel is exactly rgb
    box = (250.0, 150.0, 350.0, 250.0)  # the 1.5x crop stays inside the image
    blob_means = (rgb - mean) / std  # channel 0 = R: the network sees RGB
    expected_pred = base.numpy().astype(np.float64) + blob_means @ coef.numpy().astype(np.float64)
    pts = model(image, box)
    np.testing.assert_allclose(pts, image_points(expected_pred.reshape(-1, 2), box), atol=2e-3)
    swapped = image_points((base.numpy() + blob_means[::-1] @ coef.numpy()).reshape(-1, 2), box)
    assert np.abs(pts - swapped).max() > 0.5  # BGR would be visibly different


# --------------------------------------------------------------------------- arcface_torch weights

# Key names of arcface_torch's backbones (recognition/arcface_torch/backbones/iresnet.py and
# mobilefacenet.py in deepinsight/insightface), written out here so the test does not trust visrec's own.
ARCFACE_TORCH_KEYS = {
    "iresnet": ["conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
                "layer1.0.bn2.weight", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer4.1.conv2.weight",
                "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"],
    "mobilefacenet": ["layers.0.layers.0.weight", "layers.0.layers.1.running_mean", "layers.0.layers.2.weight",
                      "layers.1.layers.0.weight", "layers.2.layers.0.layers.0.weight",
                      "layers.2.layers.1.layers.0.weight", "layers.2.layers.2.layers.1.weight",
                      "layers.3.layers.0.layers.0.layers.0.weight", "conv_sep.layers.0.weight",
                      "features.layers.0.layers.0.weight", "features.layers.0.layers.1.running_var",
                      "features.layers.2.weight", "features.layers.3.weight"],
}

SMALL = {"iresnet": ("iresnet18", {"width": 0.25, "embedding_size": 32}),
         "mobilefacenet": ("mobilefacenet", {"embedding_size": 32, "blocks": (1, 1, 1, 1), "scale": 1})}


def trained(name, kwargs, seed):
    torch.manual_seed(seed)
    model = build_backbone(name, **kwargs)
    with torch.no_grad():  # real BN statistics, so the buffers matter too
        model.train()(torch.randn(4, 3, 112, 112))
    return model.eval()


@pytest.mark.parametrize("family", ["iresnet", "mobilefacenet"])
def test_arcface_torch_backbone_pth_round_trip(tmp_path, family):
    name, kwargs = SMALL[family]
    source = trained(name, kwargs, seed=0)
    state = source.state_dict()
    assert set(ARCFACE_TORCH_KEYS[family]) <= set(state)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)  # what arcface_torch writes: the bare state dict
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = source(x)
        assert not torch.equal(trained(name, kwargs, seed=1)(x), want)  # another init really differs
        loaded = load_arcface_torch_backbone(path, name, **kwargs)
        assert not loaded.training
        assert torch.equal(loaded(x), want)
        # a DDP-saved file and a visrec checkpoint load too
        torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
        assert torch.equal(load_arcface_torch_backbone(tmp_path / "ddp.pth", name, **kwargs)(x), want)
        torch.save({"model_config": {"name": name, **kwargs}, "backbone": state, "step": 1}, tmp_path / "model.pt")
        assert torch.equal(load_arcface_torch_backbone(tmp_path / "model.pt", name, **kwargs)(x), want)


def test_arcface_torch_mismatch_names_file_and_keys(tmp_path):
    name, kwargs = SMALL["iresnet"]
    state = trained(name, kwargs, seed=0).state_dict()
    state["stem.weight"] = state.pop("conv1.weight")
    bad = tmp_path / "tampered_backbone.pth"
    torch.save(state, bad)
    with pytest.raises(DataError) as err:
        load_arcface_torch_backbone(bad, name, **kwargs)
    msg = str(err.value)
    assert "tampered_backbone.pth" in msg and "conv1.weight" in msg and "stem.weight" in msg
    assert "missing" in msg and "unexpected" in msg
    torch.save(trained(name, {**kwargs, "embedding_size": 16}, 0).state_dict(), tmp_path / "other.pth")
    with pytest.raises(DataError, match="other.pth.*wrong shape.*fc.weight"):
        load_arcface_torch_backbone(tmp_path / "other.pth", name, **kwargs)
    torch.save({"model_config": {"name": "mobilefacenet"}, "backbone": {}}, tmp_path / "model.pt")
    with pytest.raises(DataError, match="mobilefacenet"):
        load_arcface_torch_backbone(tmp_path / "model.pt", name, **kwargs)
    with pytest.raises(DataError, match="absent.pth"):
        load_arcface_torch_backbone(tmp_path / "absent.pth", name, **kwargs)


# ---------------------------------------------------------------------------------- timm weights

@pytest.fixture(scope="module")
def timm_resnet18():
    timm_mod = pytest.importorskip("timm", reason="product descriptors need visrec[products]")
    torch.manual_seed(0)
    net = timm_mod.create_model("resnet18", pretrained=False)  # random init, with its classifier
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 64, 64))
    return net.eval()


@pytest.mark.parametrize("kind", [
    "pth", "pth-state_dict", "pth-model",
    pytest.param("safetensors", marks=pytest.mark.skipif(not HAS_SAFETENSORS,
                                                          reason="the safetensors package is not installed")),
])
def test_timm_weights_into_a_product_descriptor(tmp_path, timm_resnet18, kind):
    state = timm_resnet18.state_dict()
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "resnet18.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "resnet18.pth"
        torch.save({"pth": state, "pth-state_dict": {"state_dict": state, "epoch": 3},
                    "pth-model": {"model": state}}[kind], path)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    desc = build_backbone("product", backbone="resnet18", pooling="gem").eval()
    with torch.no_grad():
        want = F.normalize(desc.pool(timm_resnet18.forward_features(x)).float(), dim=1)
        assert not torch.equal(desc(x), want)  # random init differs
        assert load_timm_weights(desc, path) is desc
        assert torch.equal(desc(x), want)
        # the descriptor's own weights= option is the same loader
        built = build_backbone("product", backbone="resnet18", pooling="gem", weights=str(path)).eval()
        assert torch.equal(built(x), want)


def test_timm_weights_mismatch(tmp_path, timm_resnet18):
    state = dict(timm_resnet18.state_dict())
    state["stem.weight"] = state.pop("conv1.weight")
    torch.save(state, tmp_path / "bad.pth")
    desc = build_backbone("product", backbone="resnet18", pooling="gem")
    with pytest.raises(DataError, match="bad.pth.*conv1.weight|bad.pth.*stem.weight"):
        load_timm_weights(desc, tmp_path / "bad.pth")
    with pytest.raises(DataError, match="absent.pth"):
        load_timm_weights(desc, tmp_path / "absent.pth")
