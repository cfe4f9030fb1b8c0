"""docs/extending.md's examples run as written: each is one file plus its registration (a backbone and a margin
loss trained for steps, a retrieval metric in `eval products`, a gallery backend, a service route); and a
plugin package registers a backbone through a `visrec.plugins` entry point and `visrec train` trains it without
anyone importing it."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def doc_modules() -> dict[str, str]:
    """{module name: source} for every python block of the doc (each starts with ``# <name>.py``)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    found = {}
    for block in blocks:
        first = block.splitlines()[0]
        assert re.fullmatch(r"# \w+\.py", first), f"a docs/extending.md example must start with '# file.py': {first}"
        found[first[2:-3]] = block
    return found


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The doc's files written out and imported once (registering twice in one process is refused)."""
    folder = tmp_path_factory.mktemp("extending")
    modules = doc_modules()
    assert set(modules) >= {"my_backbones", "my_losses", "my_metrics", "my_gallery", "my_routes"}
    for name, source in modules.items():
        (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        yield {name: importlib.import_module(name) for name in modules}
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    from visrec.data.synth import write_face_dataset

    return write_face_dataset(tmp_path_factory.mktemp("faces") / "train", 6, 4, format="recordio", seed=5)


def face_config(data, out, model, loss) -> dict:
    return {"task": "faces", "output": str(out), "device": "cpu", "seed": 1, "batch_size": 8,
            "model": model, "data": {"train": str(data)}, "loss": loss, "optim": {"name": "sgd", "lr": 0.1},
            "schedule": {"max_steps": 3, "warmup_steps": 0}, "log_every": 1}


def test_the_backbone_and_the_margin_loss_train(examples, face_rec, tmp_path):
    import torch

    from visrec.budget import lfr_flops
    from visrec.config import parse_config
    from visrec.models import build_backbone
    from visrec.models.loading import load_model
    from visrec.train.trainer import train

    net = build_backbone("tiny_cnn", embedding_size=32)
    assert net(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    assert lfr_flops(net, (1, 3, 112, 112)) > 0
    result = train(parse_config(face_config(face_rec, tmp_path / "run", {"name": "tiny_cnn", "embedding_size": 32},
                                            {"name": "additive_cosine", "s": 16.0, "m": 0.2})), progress=False)
    assert result.global_step == 3 and np.isfinite(result.last_loss)
    assert load_model(tmp_path / "run").contract.embedding_dim == 32
    # the loss is what its docstring says: s * (cos - m) on the target only, rows labelled -1 untouched
    cos = torch.tensor([[0.5, 0.2], [0.1, 0.3]])
    loss = examples["my_losses"].AdditiveCosine(s=2.0, m=0.1)
    assert torch.allclose(loss(cos, torch.tensor([1, -1])), torch.tensor([[1.0, 0.2], [0.2, 0.6]]))


def test_the_gallery_backend_answers_as_the_faiss_one(examples):
    from visrec.index.gallery import open_gallery

    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    for metric in ("cosine", "euclidean"):
        mine, ref = (open_gallery(b, model_name="m", dim=8, metric=metric) for b in ("numpy", "faiss"))
        for g in (mine, ref):
            for i in range(4):
                g.enroll(f"person {i}", x[3 * i:3 * i + 3])
        q = x[[1, 5, 10]] + 0.01
        for a, b in zip(mine.search(q, 3), ref.search(q, 3)):
            assert [m.identity for m in a] == [m.identity for m in b]
            np.testing.assert_allclose([m.score for m in a], [m.score for m in b], atol=1e-4)


def test_the_route_is_served(examples, tiny_face_model):
    from fastapi.testclient import TestClient

    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    client = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                     "gallery": {"backend": "numpy"}})))
    assert client.get("/v1/faces/count").json() == {"identities": 0, "templates": 0}
    assert "/v1/faces/count" in client.get("/openapi.json").json()["paths"]


def test_the_retrieval_metric_is_reported(examples):
    from visrec.evaluate.products import retrieval_metrics

    ranked = {"q1": ["a", "b"], "q2": ["c", "d"], "q3": ["e"]}
    gt = {"q1": ["b"], "q2": ["c"], "q3": ["x"]}
    metrics = retrieval_metrics(ranked, gt, k=7)
    assert metrics["mrr@7"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["recall@7"] == pytest.approx(2 / 3)  # the built-in ones are still there


def test_a_plugin_package_registers_a_backbone_by_entry_point_and_trains(face_rec, tmp_path):
    """An installed distribution (a .dist-info on sys.path, as pip leaves it) whose entry point in the group
    visrec.plugins names a module that registers a backbone: `visrec train` finds the name with no import."""
    site = tmp_path / "site"
    (site / "visrec_demo_plugin").mkdir(parents=True)
    (site / "visrec_demo_plugin" / "__init__.py").write_text(textwrap.dedent('''
        from torch import nn

        from visrec.models import BACKBONES


        @BACKBONES.register("plugin_net")
        def plugin_net(embedding_size: int = 512):
            return nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 14 * 14, embedding_size))
        '''))
    info = site / "visrec_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: visrec-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[visrec.plugins]\ndemo = visrec_demo_plugin\n")
    (info / "top_level.txt").write_text("visrec_demo_plugin\n")
    import yaml

    cfg = tmp_path / "plugin.yaml"
    cfg.write_text(yaml.safe_dump(face_config(face_rec, tmp_path / "run", {"name": "plugin_net", "embedding_size": 16},
                                              {"name": "arcface", "s": 16.0, "m": 0.2})))
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    # without the plugin on the path the name is unknown, and the error lists the known ones
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "run"), str(tmp_path / "run2")))
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "unknown backbone 'plugin_net'" in done.stdout + done.stderr
