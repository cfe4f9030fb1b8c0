"""Backbones: every registered name builds and embeds; arcface_torch key names; published MAC counts."""

import pytest
import torch

from visrec.models import BACKBONES, build_backbone


def conv_linear_macs(model: torch.nn.Module) -> int:
    """Multiply-accumulates of conv and linear layers at 1x3x112x112 (independent of visrec.budget)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += out[0].numel() * k
        elif isinstance(mod, torch.nn.Linear):
            total[0] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 112, 112))
    for h in handles:
        h.remove()
    return total[0]


LIGHT = ["mobilefacenet", "vargfacenet", "effnet_face", "iresnet18"]


@pytest.mark.parametrize("name", LIGHT)
def test_shapes_train_and_eval(name):
    model = build_backbone(name)
    x = torch.randn(2, 3, 112, 112)
    model.train()
    out = model(x)
    assert out.shape == (2, 512)
    out.sum().backward()
    model.eval()
    assert model(x).shape == (2, 512)
    assert build_backbone(name, embedding_size=128).eval()(x).shape == (2, 128)


def test_every_registered_name_builds():
    for name in BACKBONES.names():
        if name in ("iresnet", "irse"):
            model = build_backbone(name, layers=[1, 1, 1, 1])
        else:
            model = build_backbone(name)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_deep_nets_embed_once():
    x = torch.randn(1, 3, 112, 112)
    for name in ("iresnet50", "irse50", "iresnet", "irse"):
        kw = {"layers": [1, 2, 2, 1]} if name in ("iresnet", "irse") else {}
        assert build_backbone(name, **kw).eval()(x).shape == (1, 512)


# arcface_torch's MobileFaceNet (blocks 1-4-6-2, scale 2): key -> shape, written out by hand from its layout.
MBF_KEYS_SAMPLE = {
    "layers.0.layers.0.weight": (128, 3, 3, 3),
    "layers.0.layers.1.running_var": (128,),
    "layers.0.layers.2.weight": (128,),
    "layers.1.layers.0.weight": (128, 2, 3, 3),
    "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),
    "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),
    "layers.2.layers.2.layers.0.weight": (128, 128, 1, 1),
    "layers.3.layers.3.layers.2.layers.1.bias": (128,),
    "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
    "layers.4.layers.2.layers.0.weight": (256, 256, 1, 1),
    "layers.5.layers.5.layers.1.layers.0.weight": (256, 1, 3, 3),
    "layers.6.layers.1.layers.0.weight": (512, 1, 3, 3),
    "layers.6.layers.2.layers.0.weight": (256, 512, 1, 1),
    "layers.7.layers.1.layers.2.layers.1.num_batches_tracked": (),
    "conv_sep.layers.0.weight": (512, 256, 1, 1),
    "conv_sep.layers.2.weight": (512,),
    "features.layers.0.layers.0.weight": (512, 1, 7, 7),
    "features.layers.0.layers.1.weight": (512,),
    "features.layers.2.weight": (512, 512),
    "features.layers.3.running_mean": (512,),
}
MBF_KEY_COUNT = 333  # every parameter and buffer of arcface_torch's mbf

R50_KEYS_SAMPLE = {
    "conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,), "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3), "layer1.0.bn2.weight": (64,),
    "layer1.0.prelu.weight": (64,), "layer1.0.conv2.weight": (64, 64, 3, 3), "layer1.0.bn3.running_mean": (64,),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer1.0.downsample.1.weight": (64,),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer3.13.conv2.weight": (256, 256, 3, 3),
    "layer4.2.bn3.bias": (512,), "bn2.weight": (512,), "fc.weight": (512, 25088), "fc.bias": (512,),
    "features.weight": (512,), "features.running_var": (512,),
}
R50_KEY_COUNT = 475


def test_mobilefacenet_keys_match_arcface_torch():
    sd = build_backbone("mbf").state_dict()
    assert len(sd) == MBF_KEY_COUNT
    for key, shape in MBF_KEYS_SAMPLE.items():
        assert tuple(sd[key].shape) == shape, key


def test_iresnet50_keys_match_arcface_torch():
    sd = build_backbone("r50").state_dict()
    assert len(sd) == R50_KEY_COUNT
    for key, shape in R50_KEYS_SAMPLE.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer3.14.conv1.weight" not in sd  # 14 units in stage 3


def test_strict_load_of_an_arcface_layout_state_dict():
    src = build_backbone("mbf").state_dict()
    renamed = {k: v.clone() for k, v in src.items()}  # a backbone.pth is exactly this dict
    dst = build_backbone("mbf")
    dst.load_state_dict(renamed, strict=True)


def test_published_mac_counts_within_3_percent():
    # arcface_torch README: mbf 0.45 GMACs, r100 12.1 GMACs (they print MACs, labelled GFLOPs)
    assert conv_linear_macs(build_backbone("mbf")) == pytest.approx(0.45e9, rel=0.03)
    assert conv_linear_macs(build_backbone("r100")) == pytest.approx(12.1e9, rel=0.03)


def test_effnet_scales_with_multipliers():
    base = conv_linear_macs(build_backbone("effnet_face"))
    wider = conv_linear_macs(build_backbone("effnet_face", width_mult=1.4))
    deeper = conv_linear_macs(build_backbone("effnet_face", depth_mult=1.6))
    assert wider > base and deeper > base
    assert 2 * base < 1e9  # default sits inside the 1 GFLOPs light track


def test_vargfacenet_inside_light_budget():
    assert 2 * conv_linear_macs(build_backbone("vargfacenet")) < 1e9
