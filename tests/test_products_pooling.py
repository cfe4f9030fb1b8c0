import torch

from visrec.models.pooling import GeM, MAC, RMAC, SPoC, AttentionMAC


def test_pooling_known_values():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    assert MAC()(x).item() == 6.0
    assert SPoC()(x).item() == 3.0
    assert torch.allclose(GeM(p=1.0)(x), torch.tensor([[3.0]]))
    assert torch.allclose(GeM(p=2.0)(x), torch.tensor([[12.5 ** 0.5]]))
    assert GeM().p.requires_grad
    assert AttentionMAC()(x).item() == 6.0
    assert RMAC(levels=2)(torch.rand(2, 4, 6, 8)).shape == (2, 4)
