"""Shared fixtures: a small random-weight face model saved as a visrec checkpoint."""

import pytest


def save_tiny_face_model(directory, embedding_size: int = 64, seed: int = 0):
    """A MobileFaceNet (scale 1, ``embedding_size``-d, random weights) as ``directory/model.pt``."""
    import torch

    from visrec.models import build_backbone
    from visrec.models.contract import contract_from_config
    from visrec.train.checkpoint import atomic_save

    torch.manual_seed(seed)
    config = {"name": "mobilefacenet", "embedding_size": embedding_size, "scale": 1}
    net = build_backbone(**config).eval()
    contract = contract_from_config(config, embedding_dim=embedding_size).to_dict()
    atomic_save({"model_config": config, "backbone": net.state_dict(), "contract": contract}, directory / "model.pt")
    return directory


@pytest.fixture(scope="session")
def tiny_face_model(tmp_path_factory):
    """Run dir of a random-weight 64-d MobileFaceNet (shared by the service, crash and demo tests)."""
    return save_tiny_face_model(tmp_path_factory.mktemp("tiny-face-model"))
