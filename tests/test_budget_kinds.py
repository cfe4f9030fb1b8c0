"""Every convolution kind is counted, by one rule on the PyTorch and ONNX paths; every registered model
counts the same on both; a layer with weights the counter does not know is an error, never 0 FLOPs; and
`budget` reports the size of the very file `export` writes."""

import os
import warnings

import pytest
import torch
from torch import nn

from visrec.budget import check, layer_counts, lfr_flops, onnx_layer_counts, registry_contract
from visrec.errors import DataError, VisrecError
from visrec.export import export_checkpoint, export_onnx
from visrec.models import BACKBONES, build_backbone
from visrec.models.attention_net import LAYOUTS as ATTENTION_LAYOUTS
from visrec.models.contract import CHECKPOINT_KEY
from visrec.models.iresnet import DEPTHS as RESNET_DEPTHS

onnx = pytest.importorskip("onnx")


def onnx_rows(model, tmp_path, input_size, name="m.onnx"):
    path = export_onnx(model, tmp_path / name, input_size=input_size, keep_batchnorm=True, dynamic_batch=False)
    return onnx_layer_counts(path, input_size)[0]


# (module, input size, expected MACs, expected LFR FLOPs), worked out by hand from the budget docstring
KINDS = {
    # 1-D: Lout = 16, K = 3
    "conv1d": (nn.Conv1d(4, 6, 3, padding=1, bias=False), (1, 4, 16), 16 * 6 * 4 * 3, (2 * 4 * 3 - 1) * 16 * 6),
    # 3-D: Dout*Hout*Wout = 4*4*4 (stride 2 of 8^3), K = 27, with bias
    "conv3d": (nn.Conv3d(2, 3, 3, 2, 1), (1, 2, 8, 8, 8), 64 * 3 * 2 * 27, 2 * 2 * 27 * 64 * 3),
    # dilation 2, padding 2 keeps 10x10: the same 9 taps per output
    "dilated": (nn.Conv2d(3, 5, 3, padding=2, dilation=2, bias=False), (1, 3, 10, 10),
                100 * 5 * 3 * 9, (2 * 3 * 9 - 1) * 100 * 5),
    # grouped: Cin/groups = 2 per output channel
    "grouped": (nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (1, 4, 6, 6),
                36 * 6 * 2 * 9, int((2 * 4 * 9 - 1) * 36 * 6 / 2)),
    # transposed 2-D: 5x5 input positions, Cin 4, Cout/groups 3, K 16 (grouped, no bias)
    "convtranspose2d": (nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2, bias=False), (1, 4, 5, 5),
                        25 * 4 * 3 * 16, int((2 * 6 * 16 - 1) * 25 * 4 / 2)),
    "convtranspose1d": (nn.ConvTranspose1d(3, 2, 5, 1, 2, bias=True), (1, 3, 7), 7 * 3 * 2 * 5, 2 * 2 * 5 * 7 * 3),
    "convtranspose3d": (nn.ConvTranspose3d(2, 2, 2, 2, bias=False), (1, 2, 3, 3, 3),
                        27 * 2 * 2 * 8, (2 * 2 * 8 - 1) * 27 * 2),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_conv_kind_by_hand_and_on_both_paths(kind, tmp_path):
    module, size, macs, flops = KINDS[kind]
    rows = layer_counts(module, size)
    assert [(r.macs, r.lfr_flops) for r in rows] == [(macs, flops)]
    assert [(r.macs, r.lfr_flops) for r in onnx_rows(module, tmp_path, size)] == [(macs, flops)]


def test_heatmap_lite_counts_its_transposed_convs(tmp_path):
    """heatmap_lite x1.0 was 121.2 MFLOPs with its two ConvTranspose2d (7->14->28) left out; they are
    49*96*64*16 + 196*64*64*16 MACs."""
    model = build_backbone("heatmap_lite")
    rows = layer_counts(model)
    up = [r for r in rows if r.kind == "convtranspose"]
    assert [r.macs for r in up] == [49 * 96 * 64 * 16, 196 * 64 * 64 * 16]
    total = sum(r.lfr_flops for r in rows)
    assert total == pytest.approx(156.5e6, rel=1e-3) and total - sum(r.lfr_flops for r in up) == pytest.approx(121.2e6, rel=1e-3)


# One small build per registry constructor (aliases build the same model): every registered name must map
# to a constructor listed here or in NAMED_MEMBERS, so a new registration without an entry fails the test.
SMALL = {
    "attention_net": [dict(modules=[1, 0, 1], width_mult=0.125, embedding_size=64)],
    "effnet_face": [dict(width_mult=0.5, depth_mult=1.0, embedding_size=64)],
    "heatmap_lite": [dict(width_mult=0.25, num_points=20)],
    "pfld": [dict(width_mult=0.25, num_points=20)],
    "irse": [dict(layers=[1, 1, 1, 1], width=0.125, embedding_size=64)],
    "iresnet": [dict(layers=[1, 1, 1, 1], width=0.125, embedding_size=64)],
    "mobilefacenet": [dict(scale=1, embedding_size=64)],
    "vargfacenet": [dict(width_mult=0.5, embedding_size=64)],
    "quality_fusion": [dict(backbone={"name": "mbf", "scale": 1, "embedding_size": 64}, hidden=8)],
    "product": [dict(backbone="resnet18", pooling="gem", dim=32, source="timm"),
                dict(backbone="mobilenet_v3_small", pooling="mac", source="torchvision")],
    "searched": [dict(embedding_size=64, spec={  # every block kind, SE, every activation, a strided bottleneck
        "stem": {"channels": 8, "act": "hswish"},
        "stages": [{"block": "mbconv", "kernel": 3, "expand": 1, "channels": 8, "se": True, "act": "silu"},
                   {"block": "fused_mbconv", "kernel": 5, "expand": 2, "repeats": 2, "channels": 16, "stride": 2},
                   {"block": "fused_mbconv", "kernel": 3, "expand": 1, "channels": 16, "act": "relu"},
                   {"block": "bottleneck", "kernel": 3, "expand": 2, "channels": 32, "stride": 2, "se": True},
                   {"block": "mbconv", "kernel": 7, "expand": 3, "channels": 32, "stride": 2, "act": "hswish"}],
        "head": {"channels": 64}}),
                 dict(num_points=20, spec={"task": "landmarks", "stem": {"channels": 8},
                                           "stages": [{"block": "mbconv", "expand": 2, "channels": 16, "stride": 2}],
                                           "head": {"channels": 32}})],
    "product_ensemble": [dict(heads=[{"backbone": "mbf", "source": "visrec",
                                      "backbone_kwargs": {"scale": 1, "embedding_size": 64}},
                                     {"backbone": "resnet18", "source": "timm", "pooling": "spoc", "dim": 16}])],
}


# Named members of a family: the same network as the family's generic constructor with the member's layout
# (checked module by module below), so their counts follow from the generic entry's parity in SMALL without
# exporting twelve deep networks (a minute and a half of the dynamo exporter).
NAMED_MEMBERS = {
    **{f"attention{d}": ("attention_net", {"modules": list(m)}, dict(width_mult=0.125, embedding_size=64))
       for d, m in ATTENTION_LAYOUTS.items()},
    **{f"iresnet{d}": ("iresnet", {"layers": layers}, dict(width=0.125, embedding_size=64))
       for d, layers in RESNET_DEPTHS.items()},
    "irse50": ("irse", {"layers": RESNET_DEPTHS[50]}, dict(width=0.125, embedding_size=64)),
    "irse100": ("irse", {"layers": RESNET_DEPTHS[100]}, dict(width=0.125, embedding_size=64)),
    "mobilefacenet_large": ("mobilefacenet", {"blocks": (2, 8, 12, 4), "scale": 4}, dict(embedding_size=64)),
}


def _factory_key(name):
    return BACKBONES.get(name)


def test_every_registered_name_has_a_small_build():
    covered = {_factory_key(n) for n in [*SMALL, *NAMED_MEMBERS]}
    # visrec's own registrations (other tests register example and plug-in backbones in the same session)
    own = [n for n in BACKBONES.names() if _factory_key(n).__module__.startswith("visrec.")]
    assert len(own) >= 30
    missing = [n for n in own if _factory_key(n) not in covered]
    assert not missing, f"registered without a budget-parity entry in SMALL or NAMED_MEMBERS: {missing}"


@pytest.mark.parametrize("name", list(NAMED_MEMBERS))
def test_a_named_member_is_its_familys_generic_network(name):
    generic, layout, kwargs = NAMED_MEMBERS[name]
    assert generic in SMALL
    named, general = build_backbone(name, **kwargs), build_backbone(generic, **layout, **kwargs)
    assert [(n, type(m)) for n, m in named.named_modules()] == [(n, type(m)) for n, m in general.named_modules()]
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in general.state_dict().items()}
    assert sum(r.lfr_flops for r in layer_counts(named)) == sum(r.lfr_flops for r in layer_counts(general)) > 0


@pytest.mark.parametrize("name,kwargs", [(n, kw) for n, kws in SMALL.items() for kw in kws],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_pytorch_and_onnx_counts_agree_for_every_registered_model(name, kwargs, tmp_path):
    if name in ("product", "product_ensemble"):
        pytest.importorskip("timm")
        pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = build_backbone(name, **kwargs).eval()
    size = (1, 3, 112, 112)
    torch_rows = layer_counts(model, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = onnx_rows(model, tmp_path, size)
    assert torch_rows, f"{name}: no conv/FC counted"
    assert [(r.kind, r.macs, r.lfr_flops) for r in rows] == [(r.kind, r.macs, r.lfr_flops) for r in torch_rows]


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.rnn = nn.LSTM(8, 5, batch_first=True)

    def forward(self, x):
        return self.rnn(self.conv(x).transpose(1, 2))[0][:, -1]


def test_a_weighted_layer_without_a_rule_is_an_error_not_zero(tmp_path):
    with pytest.raises(VisrecError, match=r"rnn \(LSTM\)"):
        lfr_flops(WithLSTM(), (1, 4, 6))
    bilinear = nn.Sequential(nn.Flatten())
    bilinear.add_module("pair", nn.Bilinear(3, 3, 2))
    with pytest.raises(VisrecError, match=r"pair \(Bilinear\)"):
        layer_counts(bilinear, (1, 3))
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(VisrecError, match="MultiheadAttention"):
        layer_counts(attention, (1, 4, 8))
    # the ONNX path: the exported LSTM op takes initializer weights and has no rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(WithLSTM(), tmp_path / "lstm.onnx", input_size=(1, 4, 6), keep_batchnorm=True,
                           dynamic_batch=False)
    with pytest.raises(DataError, match=r"lstm.onnx.*\(LSTM\).*no rule"):
        onnx_layer_counts(path, (1, 4, 6))


def test_zero_count_layers_with_weights_still_pass():
    """BatchNorm, PReLU, LayerNorm and GeM's learned exponent hold parameters but are not refused."""
    from visrec.models.pooling import GeM

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), GeM(), nn.LayerNorm(4), nn.Linear(4, 2))
    assert lfr_flops(model, (1, 3, 8, 8)) == (2 * 27) * 36 * 4 + 2 * 4 * 2


# --- one size: budget reports the bytes of the file `visrec export` writes ---------------------------

def test_budget_size_is_the_exported_file_from_every_path(tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.commands.budget import _model_from_spec
    from visrec.models.model_file import default_contract

    torch.manual_seed(0)
    # a shallow mbf (one block per stage): every path exports it, and export time grows with the graph
    model = build_backbone("mbf", scale=1, blocks=(1, 1, 1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # two training steps: every weight and BN statistic moves off its initial value
        opt.zero_grad()
        model.train()(torch.randn(4, 3, 112, 112)).pow(2).mean().backward()
        opt.step()
    model.eval()
    config = {"name": "mbf", "scale": 1, "blocks": [1, 1, 1, 1]}
    contract = default_contract(model, config)
    ckpt = tmp_path / "model.pt"
    torch.save({"model_config": config, "backbone": model.state_dict(),
                "contract": contract.to_dict()}, ckpt)
    exported, parity = export_checkpoint(ckpt, tmp_path / "exported.onnx")  # as `visrec export` does by default
    assert parity.passed and CHECKPOINT_KEY in {p.key for p in onnx.load(str(exported)).metadata_props}
    file_size = os.path.getsize(exported)
    # checkpoint path and the ONNX file itself
    assert check(ckpt, "deepglint-light").size_bytes == file_size
    assert check(exported, "deepglint-light").size_bytes == file_size
    # the same module with the same contract (what the registry path passes) exports the same bytes
    assert check(model, "deepglint-light", contract=contract).size_bytes == file_size
    # a registry name builds fresh weights standing for the architecture: its size is that of a trained
    # model's exported file — the same bytes as the checkpoint's (fresh constant initial values would
    # export smaller: the exporter stores identical tensors once)
    spec_model, spec_contract = _model_from_spec("mbf", ["scale=1", "blocks=[1,1,1,1]"])
    assert spec_contract == registry_contract(spec_model, "mbf", {"scale": 1, "blocks": [1, 1, 1, 1]})
    assert check(spec_model, "deepglint-light", contract=spec_contract, untrained=True).size_bytes == file_size
    assert check(spec_model, "deepglint-light", contract=spec_contract).size_bytes < file_size  # why untrained=
    # and the CLI prints the same number of bytes for the checkpoint and for the registry name
    for args in ([str(ckpt)], ["mbf", "--set", "scale=1", "--set", "blocks=[1,1,1,1]"]):
        out = CliRunner().invoke(app, ["budget", "check", *args, "--protocol", "deepglint-light"])
        assert f"{file_size:,} B" in out.output, out.output


def test_budget_size_of_a_landmark_checkpoint_is_the_file_the_export_command_writes(tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.models.model_file import default_contract

    torch.manual_seed(0)
    model = build_backbone("heatmap_lite", width_mult=0.25).eval()
    config = {"name": "heatmap_lite", "width_mult": 0.25}
    ckpt = tmp_path / "lm.pt"
    torch.save({"model_config": config, "backbone": model.state_dict(),
                "contract": default_contract(model, config).to_dict()}, ckpt)
    done = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "lm.onnx")])
    assert done.exit_code == 0, done.output
    size = os.path.getsize(tmp_path / "lm.onnx")
    assert check(ckpt, "icme21-landmarks").size_bytes == size
    out = CliRunner().invoke(app, ["budget", "check", str(ckpt), "--protocol", "icme21-landmarks"])
    assert f"{size:,} B" in out.output, out.output
    # against a face budget it failed only on 'feature dimension', as a face model of the wrong size would
    from visrec.errors import ConfigError

    for model_file in (ckpt, tmp_path / "lm.onnx"):
        with pytest.raises(ConfigError, match=f"{model_file.name} is a landmarks model; protocol deepglint-light "
                                              f"budgets faces models: use icpr20-landmarks or icme21-landmarks"):
            check(model_file, "deepglint-light")
