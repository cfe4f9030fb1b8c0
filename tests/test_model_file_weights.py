"""A model file's weights are data: NaN or inf values are refused at load, naming the file and the tensor."""

import pytest
import torch

from conftest import save_tiny_face_model
from visrec.errors import DataError
from visrec.models.loading import load_model


def test_a_model_with_nan_weights_is_refused_at_load(tmp_path):
    run = save_tiny_face_model(tmp_path)
    blob = torch.load(run / "model.pt", weights_only=True)
    name = next(k for k, v in blob["backbone"].items() if v.is_floating_point())
    blob["backbone"][name] = torch.full_like(blob["backbone"][name], float("nan"))
    torch.save(blob, run / "model.pt")
    with pytest.raises(DataError, match=rf"model\.pt: weight '{name}' holds NaN or inf"):
        load_model(run)


def test_a_bare_backbone_pth_with_nan_weights_is_refused(tmp_path):
    """init_backbone (arcface_torch's backbone.pth as pretrained weights, visrec finetune) loaded NaN weights."""
    from visrec.models import build_backbone
    from visrec.models.model_file import init_backbone

    net = build_backbone("mobilefacenet", embedding_size=64)
    state = net.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(DataError, match=rf"backbone\.pth: weight '{name}' holds NaN or inf"):
        init_backbone(build_backbone("mobilefacenet", embedding_size=64), tmp_path / "backbone.pth")

