"""Margin losses: formulas on crafted cosines, gradients, fp16/bf16 safety at theta = 0 and pi."""

import math

import pytest
import torch
import torch.nn.functional as F

from visrec.losses import MARGIN_LOSSES, build_margin_loss

NAMES = ["softmax", "cosface", "arcface", "combined", "arcnegface", "curricularface"]


def test_registry_has_all():
    for n in NAMES:
        assert n in MARGIN_LOSSES


def test_arcface_and_cosface_formulas():
    cos = torch.tensor([[1.0 - 1e-7, 0.2], [0.5, -0.3]])
    labels = torch.tensor([0, -1])
    arc = build_margin_loss("arcface", s=10.0, m=0.5)(cos, labels)
    assert arc[0, 0].item() == pytest.approx(10 * math.cos(0.5), abs=5e-3)  # theta clamped >= ~5e-4
    assert arc[0, 1].item() == pytest.approx(2.0)
    assert torch.allclose(arc[1], cos[1] * 10)  # label -1: untouched but scaled
    cf = build_margin_loss("cosface", s=10.0, m=0.35)(cos, labels)
    assert cf[0, 0].item() == pytest.approx(10 * (1 - 0.35), abs=1e-3)


def test_combined_reduces_to_arcface_and_cosface():
    torch.manual_seed(0)
    cos = torch.rand(8, 5) * 2 - 1
    labels = torch.randint(0, 5, (8,))
    a = build_margin_loss("combined", s=64, m1=1.0, m2=0.5, m3=0.0)(cos, labels)
    b = build_margin_loss("arcface", s=64, m=0.5)(cos, labels)
    assert torch.allclose(a, b)
    c = build_margin_loss("combined", s=64, m1=1.0, m2=0.0, m3=0.35)(cos, labels)
    d = build_margin_loss("cosface", s=64, m=0.35)(cos, labels)
    assert torch.allclose(c, d, atol=1e-4)


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.35, 0.0, 0.0), (1.2, 0.3, 0.2), (0.9, 0.4, 0.1), (2.0, 0.5, 0.35)])
def test_every_combination_is_monotone_in_theta(m1, m2, m3):
    loss = build_margin_loss("combined", s=1.0, m1=m1, m2=m2, m3=m3)
    theta = torch.linspace(0.0, math.pi, 400)
    cos = torch.cos(theta)[:, None]
    target = loss(cos, torch.zeros(400, dtype=torch.long))[:, 0]
    assert torch.isfinite(target).all()
    assert (target[1:] <= target[:-1] + 1e-6).all()  # penalty never decreases with the angle


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_nan_at_extremes(name, dtype):
    loss_fn = build_margin_loss(name)
    emb = torch.randn(4, 8)
    w = emb.clone()
    w[1] = -emb[1]  # theta = 0 for row 0's class, pi for row 1's
    cos = F.linear(F.normalize(emb), F.normalize(w)).to(dtype).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, -1])
    logits = loss_fn(cos, labels)
    out = F.cross_entropy(logits.float(), labels.clamp(min=0))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(cos.grad.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow(name):
    torch.manual_seed(1)
    emb = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(10, 16, requires_grad=True)
    cos = F.linear(F.normalize(emb), F.normalize(w))
    labels = torch.randint(0, 10, (6,))
    F.cross_entropy(build_margin_loss(name)(cos, labels), labels).backward()
    assert emb.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_arcnegface_matches_per_sample_loop():
    torch.manual_seed(2)
    cos = (torch.rand(5, 7) * 2 - 1)
    labels = torch.tensor([3, -1, 0, 6, 2])
    fn = build_margin_loss("arcnegface", s=8.0, m=0.4, scale=1.2, sigma=2.0)
    fast = fn(cos, labels)
    slow = cos.clone() * 8.0
    for i in range(5):
        if labels[i] < 0:
            continue
        y = int(labels[i])
        cy = max(-1 + 1e-7, min(1 - 1e-7, float(cos[i, y])))
        ty = math.acos(cy)
        a_y = math.cos(ty + 0.4) if ty + 0.4 <= math.pi else cy - 0.4 * math.sin(0.4)
        for j in range(7):
            c = max(-1 + 1e-7, min(1 - 1e-7, float(cos[i, j])))
            if j == y:
                slow[i, j] = 8.0 * a_y
            else:
                t = 1.2 * math.exp(-((c - a_y) ** 2) / 2.0)  # closeness in cosines, as the paper
                slow[i, j] = 8.0 * (t * c + t - 1)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_curricularface_reweights_hard_negatives_and_tracks_t():
    fn = build_margin_loss("curricularface", s=1.0, m=0.5)
    cos = torch.tensor([[0.6, 0.59, -0.2]])
    out = fn(cos, torch.tensor([0]))
    target = math.cos(math.acos(0.6) + 0.5)
    assert out[0, 0].item() == pytest.approx(target, abs=1e-4)
    t = fn.t.item()
    assert t == pytest.approx(0.01 * 0.6, abs=1e-5)
    assert out[0, 1].item() == pytest.approx(0.59 * (t + 0.59), abs=1e-4)  # hard (0.59 > cos(theta+m))
    assert out[0, 2].item() == pytest.approx(-0.2, abs=1e-6)  # easy: unchanged
