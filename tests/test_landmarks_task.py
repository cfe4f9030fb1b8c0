"""Landmark models and their training task through the one Trainer (a few CPU steps), budgets, ONNX."""

from pathlib import Path

import numpy as np
import pytest
import torch

from visrec.budget import check
from visrec.config import parse_config
from visrec.data.synth import write_synthetic_jd
from visrec.models import build_backbone
from visrec.train.checkpoint import load_backbone
from visrec.train.trainer import train


@pytest.mark.parametrize("name", ["pfld", "heatmap_lite"])
def test_models_output_normalised_points_and_scale(name):
    small, big = build_backbone(name, width_mult=0.25), build_backbone(name, width_mult=1.0)
    with torch.no_grad():
        out = small.eval()(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 106, 2) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert build_backbone(name, num_points=68).eval()(torch.randn(1, 3, 112, 112)).shape == (1, 68, 2)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())


def test_landmark_budgets():
    assert check(build_backbone("pfld", width_mult=0.25), "icme21-landmarks").passed   # <= 100 MFLOPs, 2 MB
    assert check(build_backbone("pfld", width_mult=1.0), "icpr20-landmarks").passed    # <= 1 GFLOPs, 20 MB
    assert not check(build_backbone("pfld", width_mult=1.0), "icme21-landmarks").passed


@pytest.mark.parametrize("model,loss", [("pfld", "wing"), ("heatmap_lite", "awing"), ("pfld", "l1")])
def test_trainer_runs_the_landmark_task(tmp_path, model, loss):
    write_synthetic_jd(tmp_path / "train", 12, seed=1)
    write_synthetic_jd(tmp_path / "val", 6, seed=2)
    cfg = parse_config({"task": "landmarks", "output": str(tmp_path / "run"), "device": "cpu", "batch_size": 4,
                        "model": {"name": model, "width_mult": 0.25},
                        "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")},
                        "loss": {"name": loss}, "optim": {"name": "adamw", "lr": 1e-3},
                        "schedule": {"max_steps": 3}, "checkpoint_every": 2})
    res = train(cfg, progress=False)
    assert res.global_step == 3 and np.isfinite(res.last_loss)
    assert set(res.metrics) == {"val/nme", "val/auc@0.08", "val/fr@0.08"}
    assert 0 <= res.metrics["val/auc@0.08"] <= 1
    net, spec = load_backbone(tmp_path / "run")
    assert spec["num_points"] == 106 and net(torch.zeros(1, 3, 112, 112)).shape == (1, 106, 2)


def test_eval_landmarks_cli_report_and_single_image(tmp_path):
    import re

    from typer.testing import CliRunner

    from visrec.cli import app

    write_synthetic_jd(tmp_path / "val", 6, seed=2)
    net = build_backbone("pfld", width_mult=0.25)
    torch.save({"model_config": {"name": "pfld", "width_mult": 0.25, "num_points": 106},
                "backbone": net.state_dict()}, tmp_path / "model.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "landmarks", str(tmp_path / "model.pt"), "--data",
                              str(tmp_path / "val"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "sqrt_area" in res.output and "inter_ocular" in res.output
    page = (tmp_path / "rep" / "report.html").read_text()
    for img in re.findall(r'src="([^"]+)"', page):
        assert (tmp_path / "rep" / img).exists() and not img.startswith(("http", "/"))
    assert len(list((tmp_path / "rep" / "submission").glob("*.txt"))) == 6
    # the submission maps crop predictions back to picture pixels: ground truth in -> the annotation out
    from visrec.data.landmarks import read_landmark_txt
    from visrec.evaluate.landmark_report import write_submission
    from visrec.train.landmarks_task import JDCrops

    ds = JDCrops(tmp_path / "val", 106, 112, 0.15, augment=False)
    sub = write_submission(tmp_path / "sub", ds, np.stack([ds[i][1].numpy() for i in range(len(ds))]) * 112,
                           coordinates="decimal")  # the challenge's integer default would round them
    for path, pts in zip(ds.paths, ds.points):
        assert np.allclose(read_landmark_txt(sub / f"{Path(path).name}.txt", 106), pts, atol=2e-3)
    image = sorted((tmp_path / "val" / "picture").glob("*.jpg"))[0]
    res = runner.invoke(app, ["landmarks", str(image), "--model", str(tmp_path / "model.pt"), "--box",
                              "10,10,100,100", "--out", str(tmp_path / "drawn.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "drawn.png").exists() and "106 points" in res.output


def _pfld_cfg(tmp_path, model="pfld", steps=3):
    return parse_config({"task": "landmarks", "output": str(tmp_path / "run"), "device": "cpu", "batch_size": 4,
                         "model": {"name": model, "width_mult": 0.25},
                         "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")},
                         "loss": {"name": "pfld", "pose_weight": 1.0}, "optim": {"name": "adamw", "lr": 1e-3},
                         "schedule": {"max_steps": steps}, "checkpoint_every": 100})


def test_pfld_loss_trains_the_pose_branch_from_pose_files(tmp_path):
    write_synthetic_jd(tmp_path / "train", 12, seed=1, difficulty=0.6)
    write_synthetic_jd(tmp_path / "val", 6, seed=2)
    from visrec.train.landmarks_task import JDCrops

    ds = JDCrops(tmp_path / "train", 106, 112, 0.15, augment=True, with_pose=True)
    torch.manual_seed(0)
    for i in range(len(ds)):
        _, pts, pose = ds[i]  # normalised points, radians; the eye line (74 -> 77) gives the roll
        v = (pts[77] - pts[74]).numpy()
        assert abs(np.arctan2(-v[1], v[0]) - float(pose[2])) < 1e-3
    assert len(JDCrops(tmp_path / "train", 106, 112, 0.15, augment=False)[0]) == 2  # no pose unless asked

    # one step by hand: the landmark head and the pose branch both get gradients
    from torch.utils.data import default_collate

    from visrec.train.task import TASKS, RunContext

    cfg = _pfld_cfg(tmp_path)
    task = TASKS.get("landmarks")(cfg, RunContext(torch.device("cpu")))
    modules = task.build_modules(None)
    loss = task.training_step(modules, default_collate([ds[i] for i in range(4)]))
    loss.backward()
    net = modules["backbone"]
    assert float(net.fc.weight.grad.abs().sum()) > 0 and float(net.aux[-1].weight.grad.abs().sum()) > 0

    res = train(cfg, progress=False)
    assert res.global_step == 3 and np.isfinite(res.last_loss) and "val/nme" in res.metrics


def test_pfld_loss_without_pose_data_or_pose_branch_is_refused(tmp_path):
    import shutil

    from visrec.errors import ConfigError

    write_synthetic_jd(tmp_path / "train", 4, seed=1)
    write_synthetic_jd(tmp_path / "val", 2, seed=2)
    with pytest.raises(ConfigError, match="heatmap_lite.*no"):
        train(_pfld_cfg(tmp_path, model="heatmap_lite"), progress=False)
    shutil.rmtree(tmp_path / "train" / "pose")
    with pytest.raises(ConfigError, match="pfld needs head-pose ground truth.*pose"):
        train(_pfld_cfg(tmp_path), progress=False)
