import math

import pytest
import torch

from visrec.losses.landmark import adaptive_wing, l1, l2, pfld, wing


def test_wing_by_hand_and_continuity():
    gt = torch.zeros(1, 1, 2)
    small = torch.tensor([[[1.0, 0.0]]])
    assert wing(small, gt).item() == pytest.approx(10 * math.log1p(1 / 2))
    big = torch.tensor([[[20.0, 0.0]]])
    c = 10 - 10 * math.log1p(10 / 2)
    assert wing(big, gt).item() == pytest.approx(20 - c)
    below, above = torch.tensor([[[10 - 1e-4, 0.0]]]), torch.tensor([[[10 + 1e-4, 0.0]]])
    assert wing(below, gt).item() == pytest.approx(wing(above, gt).item(), abs=1e-3)


def test_l1_l2():
    pred, gt = torch.tensor([[[1.0, -3.0]]]), torch.zeros(1, 1, 2)
    assert l1(pred, gt).item() == 2.0 and l2(pred, gt).item() == 5.0


def test_adaptive_wing_continuous_and_zero_at_zero():
    gt = torch.full((1, 1, 2, 2), 0.3)
    assert adaptive_wing(gt.clone(), gt).item() == pytest.approx(0.0, abs=1e-6)
    lo = adaptive_wing(gt + 0.5 - 1e-4, gt).item()
    hi = adaptive_wing(gt + 0.5 + 1e-4, gt).item()
    assert lo == pytest.approx(hi, rel=1e-2)
    x = (gt + 0.2).requires_grad_(True)
    adaptive_wing(x, gt).backward()
    assert torch.isfinite(x.grad).all()


def test_pfld_weights_by_pose_error():
    pred, gt = torch.ones(2, 3, 2), torch.zeros(2, 3, 2)
    same = pfld(pred, gt, torch.zeros(2, 3), torch.zeros(2, 3))
    assert same.item() == 0.0  # no pose error: zero weight, as the paper's formula gives
    off = pfld(pred, gt, torch.full((2, 3), 0.5), torch.zeros(2, 3))
    assert off.item() == pytest.approx(3 * (1 - math.cos(0.5)) * 6)


def test_pfld_base_weight_keeps_the_landmark_term_when_pose_is_exact():
    pred, gt = torch.ones(2, 3, 2), torch.zeros(2, 3, 2)
    exact = pfld(pred, gt, torch.zeros(2, 3), torch.zeros(2, 3), base_weight=1.0)
    assert exact.item() == pytest.approx(6.0)  # sum over points of the squared error, weight 1
    off = pfld(pred, gt, torch.full((2, 3), 0.5), torch.zeros(2, 3), base_weight=1.0)
    assert off.item() == pytest.approx((1 + 3 * (1 - math.cos(0.5))) * 6)
