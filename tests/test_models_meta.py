"""A model file's network is built on the meta device for its shapes before any weight is loaded; that build costs
no import of TorchDynamo (1.3-1.8 s of every command that loads a checkpoint, measured on the 2-core VM), and a
network built outside the meta block is initialised as before."""

import subprocess
import sys

import pytest
import torch

from visrec.models import build_backbone
from visrec.models.meta import on_meta_device

LOAD = """
import sys
from pathlib import Path
from visrec.models import load_model
m = load_model(Path(sys.argv[1]))
assert m.module is not None
print("dynamo imported" if "torch._dynamo" in sys.modules else "dynamo not imported")
"""


@pytest.mark.parametrize("config", [
    {"name": "mobilefacenet", "embedding_size": 64, "scale": 1},
    {"name": "iresnet18", "width": 0.25, "embedding_size": 64},
    {"name": "heatmap_lite", "num_points": 106, "width_mult": 0.25},
], ids=lambda c: c["name"])
def test_loading_a_checkpoint_does_not_import_torchdynamo(tmp_path, config):
    from visrec.train.checkpoint import atomic_save

    net = build_backbone(**config)
    atomic_save({"model_config": config, "backbone": net.state_dict()}, tmp_path / "model.pt")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", LOAD, str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "dynamo not imported"


def test_a_meta_build_has_the_shapes_and_a_real_build_its_random_initialisation():
    with on_meta_device():
        shell = build_backbone("iresnet18", width=0.25, embedding_size=64)
    torch.manual_seed(0)
    real = build_backbone("iresnet18", width=0.25, embedding_size=64)
    assert all(p.is_meta for p in shell.parameters())
    assert {k: v.shape for k, v in shell.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    conv = real.layer1[0].conv1.weight
    assert 0.05 < conv.std().item() < 0.15  # iresnet's normal(0, 0.1), not skipped outside the block
    # and the heatmap grid buffer sits beside the weights on either device
    with on_meta_device():
        assert build_backbone("heatmap_lite", num_points=106).grid.is_meta
    grid = build_backbone("heatmap_lite", num_points=106, heatmap_size=4).grid
    assert grid.tolist() == [0.125, 0.375, 0.625, 0.875]
