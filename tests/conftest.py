"""Shared fixtures: a small random-weight face model saved as a visrec checkpoint; helpers for tests that
start a real server (a free loopback port, waiting until it answers /healthz)."""

import socket
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, timeout=180):
    """Until ``url``/healthz answers 200; fails if the server process exits or the time runs out."""
    import httpx

    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become healthy")


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


@pytest.fixture(scope="session")
def faces_dir():
    """The real-photo fixtures' faces folder (installed by the test set-up), with dlib and its model files."""
    from pathlib import Path

    from visrec.data.fixtures import require_real_fixtures
    from visrec.errors import VisrecError
    from visrec.models.dlib_models import models_dir

    pytest.importorskip("dlib", reason="dlib is not importable: pip install 'visrec[dlib]'", exc_type=ImportError)
    try:
        root = require_real_fixtures()
    except VisrecError as exc:
        pytest.skip(str(exc))
    if models_dir() is None:
        pytest.skip("the dlib model files are not installed: pip install face-recognition-models")
    return Path(root) / "faces"
