"""Residual Attention Network backbones (attention56 / 92 / 152): shapes, mask gating, gradients into the
mask branch, LFR FLOPs within the DeepGlint-Large budget, state-dict round trip.

Real forwards run at small width (width_mult 0.25 or 0.125, batch 2) to stay fast on 1 CPU thread; the
full-width FLOP counts are taken on the meta device (shapes only, no arithmetic)."""

import io

import pytest
import torch

from visrec.budget import layer_counts, lfr_flops
from visrec.models import BACKBONES, build_backbone
from visrec.models.attention_net import LAYOUTS, MASK_LEVELS, AttentionModule, AttentionNet
from visrec.protocols import load_protocol

NAMES = sorted(n for n in BACKBONES.names()
               if BACKBONES.get(n).__module__ == "visrec.models.attention_net" and n != "attention_net")


def faces(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 112, 112, generator=g) * 2 - 1


def test_registered_depths():
    assert NAMES == ["attention152", "attention56", "attention92"]
    assert "attention_net" in BACKBONES
    with pytest.raises(ValueError, match="no AttentionNet layout"):
        AttentionNet(depth=77)


@pytest.mark.parametrize("name", NAMES)
def test_embeds_at_small_width(name):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=128, width_mult=0.25).eval()
    depth = int(name.removeprefix("attention"))
    assert model.layout == LAYOUTS[depth]
    # every stage's mask branch pools down to 7x7: 3 levels at 56x56, 2 at 28x28, 1 at 14x14
    innermost = []
    for stage, levels in enumerate(MASK_LEVELS, start=1):
        mods = [m for m in getattr(model, f"layer{stage}") if isinstance(m, AttentionModule)]
        assert len(mods) == LAYOUTS[depth][stage - 1]
        for m in mods:
            assert m.mask.levels == levels and len(m.mask.skip) == levels - 1
            m.mask.down[-1].register_forward_hook(lambda mod, i, o: innermost.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        out = model(faces())
    assert out.shape == (2, 128)
    assert torch.isfinite(out).all()
    assert innermost == [(7, 7)] * sum(LAYOUTS[depth])


def test_zeroed_mask_gates_trunk_by_one_and_a_half():
    """With the mask's last 1x1 conv (weights and bias) zeroed, sigmoid gives 0.5 everywhere, so the
    gated map fed to the module's last unit is (1 + 0.5) * trunk."""
    torch.manual_seed(0)
    model = build_backbone("attention56", width_mult=0.25).eval()
    module = model.layer1[1]
    assert isinstance(module, AttentionModule)
    seen = {}
    module.trunk.register_forward_hook(lambda m, i, o: seen.__setitem__("trunk", o))
    module.last.register_forward_pre_hook(lambda m, i: seen.__setitem__("gated", i[0]))
    module.mask.register_forward_hook(lambda m, i, o: seen.__setitem__("mask", o))
    x = faces()
    with torch.no_grad():
        model(x)
        mask = seen["mask"]
        assert not torch.allclose(mask, mask.flatten()[0].expand_as(mask))  # a real, spatially varying gate
        assert torch.allclose(seen["gated"], (1 + mask) * seen["trunk"])
        logits = module.mask.out[-1]
        logits.weight.zero_()
        logits.bias.zero_()
        model(x)
    assert torch.allclose(seen["mask"], torch.full_like(seen["mask"], 0.5))
    assert torch.allclose(seen["gated"], 1.5 * seen["trunk"], rtol=1e-5, atol=1e-6)


def test_backward_updates_mask_branch():
    torch.manual_seed(0)
    model = build_backbone("attention_net", modules=[1, 1, 1], embedding_size=64, width_mult=0.125).train()
    mask = model.layer1[1].mask
    watched = {"down": mask.down[0][0].conv2.weight, "skip": mask.skip[0][0].conv1.weight,
               "up": mask.up[0][0].conv3.weight, "logit_w": mask.out[-1].weight, "logit_b": mask.out[-1].bias}
    before = {k: p.detach().clone() for k, p in watched.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    out = model(faces(4))
    loss = -torch.nn.functional.cosine_similarity(out, target).mean()
    loss.backward()
    for k, p in watched.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
    opt.step()
    for k, p in watched.items():
        assert not torch.equal(p.detach(), before[k]), k


def test_flops_fit_deepglint_large():
    """Counted on the meta device. Measured (LFR rule, 1x3x112x112, width 1, 512-d): attention56 12.5071 G,
    attention92 21.0265 G, attention152 29.3840 G (deepglint-large allows 30 G)."""
    limit = load_protocol("deepglint-large").max_gflops * 1e9
    with torch.device("meta"):
        a56, a92, a152 = (build_backbone(f"attention{d}") for d in (56, 92, 152))
    flops = lfr_flops(a152)
    assert 20e9 < flops <= limit
    assert flops == pytest.approx(29.384e9, rel=1e-3)
    # conv+FC multiply-adds of 56 / 92 agree with the paper's 6.2 / 10.4 G (its 224x224 ImageNet nets share
    # the 56-28-14-7 maps; stem and head differ)
    assert sum(r.macs for r in layer_counts(a56)) == pytest.approx(6.2e9, rel=0.03)
    assert sum(r.macs for r in layer_counts(a92)) == pytest.approx(10.4e9, rel=0.03)
    assert lfr_flops(a56) < lfr_flops(a92) < flops


def test_state_dict_round_trip_and_fp16_flag_on_cpu():
    torch.manual_seed(0)
    a = build_backbone("attention56", embedding_size=128, width_mult=0.125).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b = build_backbone("attention56", embedding_size=128, width_mult=0.125, fp16=True).eval()
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = faces()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))  # fp16 autocast applies on CUDA only
