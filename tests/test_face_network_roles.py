"""A network that a face role runs (a video quality head's frozen backbone, a distillation teacher) must be a face
embedding network: a landmark model failed deep inside the first step with a bare traceback or an error about
the teacher-features file, and a product descriptor or a video fusion model trained on silently. Each is refused
before training, with an error naming the file (or the registry name), the role and what the model is."""

import os
import subprocess
import sys

import pytest
import torch

from visrec.config import parse_config
from visrec.data.synth import write_face_dataset
from visrec.data.video import write_video_dataset
from visrec.errors import DataError
from visrec.models import build_backbone
from visrec.models.model_file import default_contract, require_face_network
from visrec.train.trainer import train

FACE = {"name": "mobilefacenet", "embedding_size": 32, "scale": 1}
# one network of every other kind a visrec checkpoint can hold, with the task its contract names
OTHERS = {
    "landmarks": {"name": "heatmap_lite", "width_mult": 0.25},
    "product-embedding": {"name": "product", "backbone": "resnet18", "pooling": "gem", "dim": 16},
    "video-embedding": {"name": "quality_fusion", "hidden": 8, "backbone": FACE},
}


def save_checkpoint(config: dict, path):
    torch.manual_seed(0)
    spec = dict(config)
    model = build_backbone(spec.pop("name"), **spec).eval()
    torch.save({"model_config": config, "backbone": model.state_dict(),
                "contract": default_contract(model, config).to_dict()}, path)
    return path


@pytest.mark.parametrize("task", list(OTHERS))
def test_every_other_kind_is_refused_naming_role_and_kind(task):
    require_face_network(FACE, "a role")  # a face network passes
    with pytest.raises(DataError, match=rf"a role must be a face embedding network.*a {task} model"):
        require_face_network(OTHERS[task], "a role")


def video_config(tmp_path, backbone):
    write_video_dataset(tmp_path / "v", 3, 2, 4, seed=3)
    return parse_config({
        "task": "faces_video", "output": str(tmp_path / "run"), "device": "cpu", "batch_size": 2,
        "model": {"name": "quality_fusion", "hidden": 8, "backbone": backbone},
        "data": {"videos": str(tmp_path / "v" / "videos.csv"), "clip": 4},
        "loss": {"name": "cosface"}, "optim": {"name": "adamw", "lr": 0.01}, "schedule": {"max_steps": 2}})


def kd_config(tmp_path, teacher):
    write_face_dataset(tmp_path / "faces", 4, 2, format="folder", seed=1)
    return parse_config({
        "task": "faces_kd", "output": str(tmp_path / "run"), "device": "cpu", "batch_size": 4, "model": FACE,
        "data": {"train": str(tmp_path / "faces")},
        "loss": {"name": "cosface", "distill": {"teacher": teacher, "feature": 1.0,
                                                "teacher_features": str(tmp_path / "t.npy")}},
        "optim": {"name": "adamw", "lr": 0.01}, "schedule": {"max_steps": 2}})


@pytest.mark.parametrize("task", list(OTHERS))
@pytest.mark.parametrize("role", ["model.backbone of a quality_fusion model", "loss.distill.teacher"])
def test_a_checkpoint_of_another_kind_is_refused_before_training(task, role, tmp_path):
    ckpt = save_checkpoint(OTHERS[task], tmp_path / "other.pt")
    cfg = (video_config if role.startswith("model.") else kd_config)(tmp_path, str(ckpt))
    with pytest.raises(DataError, match=rf"other\.pt: {role} must be a face embedding network.*a {task} model"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "t.npy").exists()  # nothing was started


def test_a_registry_spec_of_another_kind_is_refused_for_both_roles(tmp_path):
    with pytest.raises(DataError, match="model.backbone of a quality_fusion model .* a landmarks model"):
        train(video_config(tmp_path / "v", OTHERS["landmarks"]), progress=False)
    with pytest.raises(DataError, match="loss.distill.teacher .* a product-embedding model"):
        train(kd_config(tmp_path / "kd", OTHERS["product-embedding"]), progress=False)


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    ckpt = save_checkpoint(OTHERS["landmarks"], tmp_path / "lm.pt")
    write_video_dataset(tmp_path / "v", 3, 2, 4, seed=3)
    cfg = tmp_path / "q.yaml"
    cfg.write_text(f"task: faces_video\noutput: {tmp_path / 'run'}\ndevice: cpu\nbatch_size: 2\n"
                   f"model: {{name: quality_fusion, hidden: 8, backbone: {ckpt}}}\n"
                   f"data: {{videos: {tmp_path / 'v' / 'videos.csv'}, clip: 4}}\n"
                   "loss: {name: cosface}\noptim: {name: adamw, lr: 0.01}\nschedule: {max_steps: 2}\n")
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, COLUMNS="300"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "must be a face embedding network" in done.stderr and "landmarks model ('heatmap_lite')" in done.stderr
    assert not (tmp_path / "run").exists()
