"""On a CPU every inference path runs the network on at most CPU_FORWARD_BATCH images per call, whatever batch
its caller reads, and gives what one call per image gives; on an accelerator the caller's batch is kept."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visrec.models import build_backbone
from visrec.models.embed import CPU_FORWARD_BATCH, embed_images, forward_batch

ROOT = Path(__file__).resolve().parents[1]


class Counting(nn.Module):
    """Wraps a network and records how many images each call received."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x):
        self.calls.append(len(x))
        return self.net(x)


def small_mbf():
    torch.manual_seed(0)
    return build_backbone("mobilefacenet", scale=1, embedding_size=32).eval()


def test_forward_batch_caps_the_cpu_only():
    assert forward_batch(256, "cpu") == CPU_FORWARD_BATCH == 8
    assert forward_batch(3, torch.device("cpu")) == 3
    assert forward_batch(256, "cuda") == 256 and forward_batch(256, "meta") == 256
    assert forward_batch(0, "cpu") == 1  # a zero or negative batch never loops forever


def test_embed_images_runs_small_calls_and_gives_the_per_image_embeddings():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (21, 112, 112, 3), dtype=np.uint8)
    net = Counting(small_mbf())
    emb = embed_images(net, images, batch_size=256, flip=True)
    assert net.calls == [8, 8, 8, 8, 5, 5]  # 21 images in calls of 8, each with its mirrored batch
    one_by_one = np.concatenate([embed_images(net.net, images[i:i + 1], flip=True) for i in range(21)])
    assert emb.shape == (21, 32)
    np.testing.assert_allclose(emb, one_by_one, rtol=1e-4, atol=1e-5)


def test_every_torch_inference_path_is_capped(tmp_path):
    from visrec.models.contract import ModelContract
    from visrec.models.inference import describe, frame_outputs
    from visrec.models.landmark_nets import predict_crop_set
    from visrec.models.loading import TorchModel

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (19, 112, 112, 3), dtype=np.uint8)
    # a loaded model with a contract of its own normalisation (not visrec's): TorchModel.embed's own tensor path
    net = Counting(small_mbf())
    contract = ModelContract(task="face-embedding", input_size=(112, 112), embedding_dim=32, pixel_mean=(127.0,) * 3,
                             pixel_std=(128.0,) * 3, colour_order="BGR", source="test")
    assert TorchModel(net, contract, "m").embed(images, batch_size=64).shape == (19, 32)
    assert net.calls == [8, 8, 3]
    net.calls.clear()
    assert frame_outputs(net, list(images), batch=256)[0].shape == (19, 32)
    assert net.calls == [8, 8, 3]

    torch.manual_seed(0)
    desc = Counting(build_backbone("product", backbone="resnet18", dim=16, source="timm").eval())
    out = describe(desc, list(images[:10]), size=64, multiscale=(1.0, 0.5))
    assert desc.calls == [8, 2, 8, 2] and out.shape == (10, 16)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)

    class Crops:  # the JDCrops item protocol: (image tensor in [-1, 1], points in [0, 1])
        size = 112

        def __len__(self):
            return 11

        def __getitem__(self, i):
            return torch.rand(3, 112, 112) * 2 - 1, torch.rand(20, 2)

    torch.manual_seed(0)
    lm = Counting(build_backbone("pfld", num_points=20, width_mult=0.25).eval())
    pred, gt = predict_crop_set(lm, Crops(), batch=64)
    assert lm.calls == [8, 3] and pred.shape == gt.shape == (11, 20, 2)


@pytest.mark.parametrize("args", [["--only", "pfld", "--images", "16", "--repeats", "1", "--threads", "1"]])
def test_the_benchmark_prints_both_rates(args):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forward_batch.py"), *args],
                          capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "calls of 256 images vs visrec's 8" in done.stdout
    row = next(line for line in done.stdout.splitlines() if "pfld" in line)
    assert row.rstrip(" │").endswith("x")
