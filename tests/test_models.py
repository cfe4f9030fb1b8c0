"""Face backbones: every registered name embeds; arcface_torch key names and shapes; published MAC counts.

The expected arcface_torch layouts below are written out in this file (no download, no import of
InsightFace): a ``backbone.pth`` from arcface_torch is exactly a state dict with these keys and shapes.
"""

import pytest
import torch

from visrec.models import BACKBONES, build_backbone
from visrec.models.heads import GDC, BNDropoutFC

FACE_MODULES = {f"visrec.models.{m}" for m in ("mobilefacenet", "iresnet", "irse", "vargfacenet", "effnet_face")}
FACE_NAMES = sorted(n for n in BACKBONES.names() if BACKBONES.get(n).__module__ in FACE_MODULES)
DEPTH_LIST = {"iresnet": {"layers": [1, 1, 1, 1]}, "irse": {"layers": [1, 1, 1, 1]}, "ir_se": {"layers": [1, 1, 1, 1]}}


def on_meta(name: str, **kw) -> torch.nn.Module:
    """Build on torch's "meta" device: real shapes, no storage and no arithmetic, so shape and MAC checks
    of the deep nets (r100: 12 GMACs) cost nothing on a 2-core CI machine."""
    with torch.device("meta"):
        return build_backbone(name, **kw)


def conv_linear_macs(model: torch.nn.Module, input_size=(1, 3, 112, 112)) -> tuple[int, tuple]:
    """Multiply-accumulates of Conv2d and Linear layers (bias and every other op ignored), counted with
    forward hooks, independently of visrec.budget. Runs on the model's device (meta: shapes only).
    Returns (MACs, output shape)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            per_output = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += out.numel() * per_output
        elif isinstance(mod, torch.nn.Linear):
            total[0] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(*input_size, device=next(model.parameters()).device))
    for h in handles:
        h.remove()
    return total[0], tuple(out.shape)


def expand_layout(lines: list[str]) -> dict[str, tuple]:
    """``"prefix kind dims"`` per module -> {state-dict key: shape}, the way torch names their tensors."""
    keys = {}
    for line in lines:
        prefix, kind, dims, *flags = line.split()
        shape = tuple(int(d) for d in dims.split(","))
        if kind in ("conv", "prelu"):
            keys[f"{prefix}.weight"] = shape
        elif kind == "linear":
            keys[f"{prefix}.weight"] = shape
            if "bias" in flags:
                keys[f"{prefix}.bias"] = shape[:1]
        elif kind == "bn":
            for name in ("weight", "bias", "running_mean", "running_var"):
                keys[f"{prefix}.{name}"] = shape
            keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


# arcface_torch backbones/mobilefacenet.py, get_mbf(fp16, 512): every module holding tensors, in order.
MBF_LAYOUT = [
    "layers.0.layers.0 conv 128,3,3,3",
    "layers.0.layers.1 bn 128",
    "layers.0.layers.2 prelu 128",
    "layers.1.layers.0 conv 128,2,3,3",
    "layers.1.layers.1 bn 128",
    "layers.1.layers.2 prelu 128",
    "layers.2.layers.0.layers.0 conv 128,128,1,1",
    "layers.2.layers.0.layers.1 bn 128",
    "layers.2.layers.0.layers.2 prelu 128",
    "layers.2.layers.1.layers.0 conv 128,1,3,3",
    "layers.2.layers.1.layers.1 bn 128",
    "layers.2.layers.1.layers.2 prelu 128",
    "layers.2.layers.2.layers.0 conv 128,128,1,1",
    "layers.2.layers.2.layers.1 bn 128",
    "layers.3.layers.0.layers.0.layers.0 conv 128,128,1,1",
    "layers.3.layers.0.layers.0.layers.1 bn 128",
    "layers.3.layers.0.layers.0.layers.2 prelu 128",
    "layers.3.layers.0.layers.1.layers.0 conv 128,1,3,3",
    "layers.3.layers.0.layers.1.layers.1 bn 128",
    "layers.3.layers.0.layers.1.layers.2 prelu 128",
    "layers.3.layers.0.layers.2.layers.0 conv 128,128,1,1",
    "layers.3.layers.0.layers.2.layers.1 bn 128",
    "layers.3.layers.1.layers.0.layers.0 conv 128,128,1,1",
    "layers.3.layers.1.layers.0.layers.1 bn 128",
    "layers.3.layers.1.layers.0.layers.2 prelu 128",
    "layers.3.layers.1.layers.1.layers.0 conv 128,1,3,3",
    "layers.3.layers.1.layers.1.layers.1 bn 128",
    "layers.3.layers.1.layers.1.layers.2 prelu 128",
    "layers.3.layers.1.layers.2.layers.0 conv 128,128,1,1",
    "layers.3.layers.1.layers.2.layers.1 bn 128",
    "layers.3.layers.2.layers.0.layers.0 conv 128,128,1,1",
    "layers.3.layers.2.layers.0.layers.1 bn 128",
    "layers.3.layers.2.layers.0.layers.2 prelu 128",
    "layers.3.layers.2.layers.1.layers.0 conv 128,1,3,3",
    "layers.3.layers.2.layers.1.layers.1 bn 128",
    "layers.3.layers.2.layers.1.layers.2 prelu 128",
    "layers.3.layers.2.layers.2.layers.0 conv 128,128,1,1",
    "layers.3.layers.2.layers.2.layers.1 bn 128",
    "layers.3.layers.3.layers.0.layers.0 conv 128,128,1,1",
    "layers.3.layers.3.layers.0.layers.1 bn 128",
    "layers.3.layers.3.layers.0.layers.2 prelu 128",
    "layers.3.layers.3.layers.1.layers.0 conv 128,1,3,3",
    "layers.3.layers.3.layers.1.layers.1 bn 128",
    "layers.3.layers.3.layers.1.layers.2 prelu 128",
    "layers.3.layers.3.layers.2.layers.0 conv 128,128,1,1",
    "layers.3.layers.3.layers.2.layers.1 bn 128",
    "layers.4.layers.0.layers.0 conv 256,128,1,1",
    "layers.4.layers.0.layers.1 bn 256",
    "layers.4.layers.0.layers.2 prelu 256",
    "layers.4.layers.1.layers.0 conv 256,1,3,3",
    "layers.4.layers.1.layers.1 bn 256",
    "layers.4.layers.1.layers.2 prelu 256",
    "layers.4.layers.2.layers.0 conv 256,256,1,1",
    "layers.4.layers.2.layers.1 bn 256",
    "layers.5.layers.0.layers.0.layers.0 conv 256,256,1,1",
    "layers.5.layers.0.layers.0.layers.1 bn 256",
    "layers.5.layers.0.layers.0.layers.2 prelu 256",
    "layers.5.layers.0.layers.1.layers.0 conv 256,1,3,3",
    "layers.5.layers.0.layers.1.layers.1 bn 256",
    "layers.5.layers.0.layers.1.layers.2 prelu 256",
    "layers.5.layers.0.layers.2.layers.0 conv 256,256,1,1",
    "layers.5.layers.0.layers.2.layers.1 bn 256",
    "layers.5.layers.1.layers.0.layers.0 conv 256,256,1,1",
    "layers.5.layers.1.layers.0.layers.1 bn 256",
    "layers.5.layers.1.layers.0.layers.2 prelu 256",
    "layers.5.layers.1.layers.1.layers.0 conv 256,1,3,3",
    "layers.5.layers.1.layers.1.layers.1 bn 256",
    "layers.5.layers.1.layers.1.layers.2 prelu 256",
    "layers.5.layers.1.layers.2.layers.0 conv 256,256,1,1",
    "layers.5.layers.1.layers.2.layers.1 bn 256",
    "layers.5.layers.2.layers.0.layers.0 conv 256,256,1,1",
    "layers.5.layers.2.layers.0.layers.1 bn 256",
    "layers.5.layers.2.layers.0.layers.2 prelu 256",
    "layers.5.layers.2.layers.1.layers.0 conv 256,1,3,3",
    "layers.5.layers.2.layers.1.layers.1 bn 256",
    "layers.5.layers.2.layers.1.layers.2 prelu 256",
    "layers.5.layers.2.layers.2.layers.0 conv 256,256,1,1",
    "layers.5.layers.2.layers.2.layers.1 bn 256",
    "layers.5.layers.3.layers.0.layers.0 conv 256,256,1,1",
    "layers.5.layers.3.layers.0.layers.1 bn 256",
    "layers.5.layers.3.layers.0.layers.2 prelu 256",
    "layers.5.layers.3.layers.1.layers.0 conv 256,1,3,3",
    "layers.5.layers.3.layers.1.layers.1 bn 256",
    "layers.5.layers.3.layers.1.layers.2 prelu 256",
    "layers.5.layers.3.layers.2.layers.0 conv 256,256,1,1",
    "layers.5.layers.3.layers.2.layers.1 bn 256",
    "layers.5.layers.4.layers.0.layers.0 conv 256,256,1,1",
    "layers.5.layers.4.layers.0.layers.1 bn 256",
    "layers.5.layers.4.layers.0.layers.2 prelu 256",
    "layers.5.layers.4.layers.1.layers.0 conv 256,1,3,3",
    "layers.5.layers.4.layers.1.layers.1 bn 256",
    "layers.5.layers.4.layers.1.layers.2 prelu 256",
    "layers.5.layers.4.layers.2.layers.0 conv 256,256,1,1",
    "layers.5.layers.4.layers.2.layers.1 bn 256",
    "layers.5.layers.5.layers.0.layers.0 conv 256,256,1,1",
    "layers.5.layers.5.layers.0.layers.1 bn 256",
    "layers.5.layers.5.layers.0.layers.2 prelu 256",
    "layers.5.layers.5.layers.1.layers.0 conv 256,1,3,3",
    "layers.5.layers.5.layers.1.layers.1 bn 256",
    "layers.5.layers.5.layers.1.layers.2 prelu 256",
    "layers.5.layers.5.layers.2.layers.0 conv 256,256,1,1",
    "layers.5.layers.5.layers.2.layers.1 bn 256",
    "layers.6.layers.0.layers.0 conv 512,256,1,1",
    "layers.6.layers.0.layers.1 bn 512",
    "layers.6.layers.0.layers.2 prelu 512",
    "layers.6.layers.1.layers.0 conv 512,1,3,3",
    "layers.6.layers.1.layers.1 bn 512",
    "layers.6.layers.1.layers.2 prelu 512",
    "layers.6.layers.2.layers.0 conv 256,512,1,1",
    "layers.6.layers.2.layers.1 bn 256",
    "layers.7.layers.0.layers.0.layers.0 conv 256,256,1,1",
    "layers.7.layers.0.layers.0.layers.1 bn 256",
    "layers.7.layers.0.layers.0.layers.2 prelu 256",
    "layers.7.layers.0.layers.1.layers.0 conv 256,1,3,3",
    "layers.7.layers.0.layers.1.layers.1 bn 256",
    "layers.7.layers.0.layers.1.layers.2 prelu 256",
    "layers.7.layers.0.layers.2.layers.0 conv 256,256,1,1",
    "layers.7.layers.0.layers.2.layers.1 bn 256",
    "layers.7.layers.1.layers.0.layers.0 conv 256,256,1,1",
    "layers.7.layers.1.layers.0.layers.1 bn 256",
    "layers.7.layers.1.layers.0.layers.2 prelu 256",
    "layers.7.layers.1.layers.1.layers.0 conv 256,1,3,3",
    "layers.7.layers.1.layers.1.layers.1 bn 256",
    "layers.7.layers.1.layers.1.layers.2 prelu 256",
    "layers.7.layers.1.layers.2.layers.0 conv 256,256,1,1",
    "layers.7.layers.1.layers.2.layers.1 bn 256",
    "conv_sep.layers.0 conv 512,256,1,1",
    "conv_sep.layers.1 bn 512",
    "conv_sep.layers.2 prelu 512",
    "features.layers.0.layers.0 conv 512,1,7,7",
    "features.layers.0.layers.1 bn 512",
    "features.layers.2 linear 512,512",
    "features.layers.3 bn 512",
]

# arcface_torch backbones/iresnet.py, iresnet50(): a sample, and the totals of the whole state dict.
R50_KEYS_SAMPLE = {
    "conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,), "bn1.num_batches_tracked": (), "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3), "layer1.0.bn2.running_mean": (64,),
    "layer1.0.prelu.weight": (64,), "layer1.0.conv2.weight": (64, 64, 3, 3), "layer1.0.bn3.running_var": (64,),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer1.0.downsample.1.weight": (64,),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.running_var": (128,),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1), "layer3.13.conv2.weight": (256, 256, 3, 3),
    "layer3.13.bn1.num_batches_tracked": (), "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.2.prelu.weight": (512,), "layer4.2.bn3.bias": (512,), "bn2.weight": (512,),
    "fc.weight": (512, 25088), "fc.bias": (512,), "features.weight": (512,), "features.running_var": (512,),
}
# (state-dict entries, parameter elements) of arcface_torch's iresnet18/50/100
IRESNET_TOTALS = {"r18": (187, 24_025_600), "r50": (475, 43_590_848), "r100": (925, 65_156_160)}


def shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_mobilefacenet_state_dict_is_arcface_torch_layout():
    expected = expand_layout(MBF_LAYOUT)
    assert len(expected) == 333
    got = shapes(build_backbone("mbf"))
    assert sorted(set(got) ^ set(expected)) == []  # no missing and no extra key
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_iresnet_state_dicts_are_arcface_torch_layout():
    r50 = build_backbone("r50")
    got = shapes(r50)
    for key, shape in R50_KEYS_SAMPLE.items():
        assert got[key] == shape, key
    assert "layer3.14.conv1.weight" not in got and "layer1.1.downsample.0.weight" not in got
    assert not r50.features.weight.requires_grad  # arcface_torch freezes the last BN's scale at 1
    for name, (entries, params) in IRESNET_TOTALS.items():
        model = r50 if name == "r50" else on_meta(name)
        assert len(model.state_dict()) == entries, name
        assert sum(p.numel() for p in model.parameters()) == params, name


def test_strict_load_round_trip_and_mismatch_is_refused():
    src, dst = build_backbone("mbf"), build_backbone("mbf")
    x = torch.randn(2, 3, 112, 112)
    torch.manual_seed(0)
    with torch.no_grad():  # make running stats non-trivial so a wrong mapping would show
        src.train()(x)
    dst.load_state_dict(src.state_dict(), strict=True)
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    bad = dict(src.state_dict())
    bad["features.layers.2.weight"] = torch.zeros(256, 512)  # embedding_size 256 checkpoint into a 512 net
    with pytest.raises(RuntimeError):
        dst.load_state_dict(bad, strict=True)


def test_every_face_backbone_name_embeds():
    assert {"mobilefacenet", "mbf", "iresnet18", "r18", "iresnet34", "r34", "iresnet50", "r50", "iresnet100", "r100",
            "iresnet152", "r152", "iresnet", "vargfacenet", "effnet_face", "irse50", "irse100", "irse"} <= set(FACE_NAMES)
    x = torch.empty(2, 3, 112, 112, device="meta")
    built = set()
    for name in FACE_NAMES:  # shapes on the meta device; real arithmetic is in the train/eval test below
        if BACKBONES.get(name) in built:  # an alias of a name already checked
            continue
        built.add(BACKBONES.get(name))
        assert on_meta(name, **DEPTH_LIST.get(name, {})).train()(x).shape == (2, 512), name


@pytest.mark.parametrize("name", ["mobilefacenet", "vargfacenet", "effnet_face", "iresnet", "irse"])
def test_train_and_eval_modes_and_embedding_size(name):
    torch.manual_seed(0)
    kw = DEPTH_LIST.get(name, {})
    if name == "vargfacenet":  # same code path; CPU backward of its 8-channel group convs is slow at full width
        kw = {"width_mult": 0.5}
    x = torch.randn(2, 3, 112, 112)
    model = build_backbone(name, embedding_size=128, **kw).train()
    out = model(x)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x[:1])
    assert a.shape == (2, 128)
    # eval mode: running stats, so a sample's embedding does not depend on its batch
    assert torch.allclose(a[:1], b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_published_mac_counts_within_3_percent():
    # arcface_torch README: mbf 0.45 GMACs, r100 12.1 GMACs ("GFLOPs" there are MACs)
    macs, out = conv_linear_macs(build_backbone("mbf"))  # one real forward
    assert macs == pytest.approx(0.45e9, rel=0.03) and out == (1, 512)
    macs, out = conv_linear_macs(on_meta("r100"))
    assert macs == pytest.approx(12.1e9, rel=0.03) and out == (1, 512)


def test_irse_is_iresnet_plus_squeeze_excitation():
    plain, se = shapes(on_meta("iresnet", layers=[1, 2, 2, 1])), shapes(on_meta("irse", layers=[1, 2, 2, 1]))
    extra = set(se) - set(plain)
    assert set(plain) <= set(se)
    assert extra == {f"layer{i}.{j}.se.fc{k}.weight" for i, n in enumerate([1, 2, 2, 1], 1) for j in range(n)
                     for k in (1, 2)}
    assert se["layer4.0.se.fc1.weight"] == (32, 512, 1, 1)  # reduction 16
    assert len(on_meta("irse50").state_dict()) == 475 + 2 * 24  # r50 + two SE convs in 24 units


def test_effnet_face_scales_monotonically():
    def cost(**kw):
        model = on_meta("effnet_face", **kw)
        return conv_linear_macs(model)[0], sum(p.numel() for p in model.parameters())

    base = cost()
    widths = [cost(width_mult=w) for w in (0.75, 1.25)]
    depths = [cost(depth_mult=d) for d in (1.5, 2.0)]
    assert widths[0] < base < widths[1]  # MACs and params both grow
    assert base < depths[0] < depths[1]
    assert cost(expand_ratio=4) < base  # expansion 6 -> 4 shrinks it
    assert 2 * base[0] < 0.5e9  # default sits well inside the 1 GFLOPs light track


def test_vargfacenet_inside_light_budget_and_width_scales():
    macs, out = conv_linear_macs(on_meta("vargfacenet"))
    assert out == (1, 512) and 0.3e9 < 2 * macs < 1e9
    assert conv_linear_macs(on_meta("vargfacenet", width_mult=1.0))[0] < macs


def test_heads_standalone():
    x = torch.randn(2, 64, 7, 7)
    gdc = GDC(64, 32).eval()
    assert gdc(x).shape == (2, 32)
    assert gdc.layers[0].layers[0].groups == 64  # depthwise
    head = BNDropoutFC(64, 7, 16, dropout=0.5)
    assert sorted(dict(head.named_children())) == ["bn2", "dropout", "fc", "features"]
    assert head.train()(x).shape == (2, 16) and head.fc.in_features == 64 * 49
    with pytest.raises(RuntimeError):  # the FC is tied to the 7x7 map size
        head(torch.randn(2, 64, 6, 6))
