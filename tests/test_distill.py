"""Fast checks of the distillation losses, the faces_kd config section and the precomputed-features file."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.nn.functional as F
from torch import nn

from visrec.config import parse_config
from visrec.errors import ConfigError, DataError
from visrec.losses.distill import (DISTILL_LOSSES, DistillLosses, FeatureDistill, LogitDistill,
                                   RelationalDistill)
from visrec.train.distill_task import (DistillTask, IndexedDataset, load_teacher_features,
                                       precompute_teacher_features)
from visrec.train.task import TASKS, RunContext

S = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
T = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # row 0 at 45 degrees from the student's, row 1 aligned


def test_feature_loss_hand_computed():
    c = math.cos(math.pi / 4)
    assert FeatureDistill(2, 2, "cosine")(S, T).item() == pytest.approx((1 - c + 0) / 2)
    assert FeatureDistill(2, 2, "l2")(S, T).item() == pytest.approx((2 - 2 * c + 0) / 2)
    for kind in ("cosine", "l2"):
        assert FeatureDistill(2, 2, kind)(T, T).item() == pytest.approx(0.0, abs=1e-7)


def test_logit_loss_hand_computed():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = LogitDistill(2, 2, temperature=2.0, scale=4.0)(S, T, centres)
    kl = 0.0
    for s, t in zip(F.normalize(S), F.normalize(T)):
        ps, pt = torch.softmax(4.0 * (centres @ s) / 2.0, 0), torch.softmax(4.0 * (centres @ t) / 2.0, 0)
        kl += float((pt * (pt / ps).log()).sum())
    assert loss.item() == pytest.approx(kl / 2 * 4.0)  # batch mean, x T^2
    assert loss.item() > 0.01
    assert LogitDistill(2, 2)(T, T, centres).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="centres"):
        LogitDistill(2, 2)(S, T)


def test_relational_loss_hand_computed():
    s3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t3 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    # c = cos(pi/4): student cosines (0,1)=0 (0,2)=c (1,2)=c; teacher 1, c, c -> only the (0,1) pair differs, twice over 6
    assert RelationalDistill(kind="mse")(s3, t3).item() == pytest.approx(2 * 1.0 / 6)
    assert RelationalDistill(kind="smooth_l1", beta=0.1)(s3, t3).item() == pytest.approx(2 * (1 - 0.05) / 6)
    assert RelationalDistill()(t3, t3).item() == pytest.approx(0.0, abs=1e-7)
    # dimension-free: a 5-d student against a 2-d teacher works without a projector
    assert RelationalDistill()(torch.randn(4, 5), torch.randn(4, 2)).item() >= 0


def test_projector_only_when_dimensions_differ():
    assert isinstance(FeatureDistill(8, 8).projector, nn.Identity)
    f = FeatureDistill(4, 6)
    assert isinstance(f.projector, nn.Linear) and f.projector.weight.shape == (6, 4)
    s, t = torch.randn(5, 4), torch.randn(5, 6)
    expected = (1 - F.cosine_similarity(f.projector(s), t)).mean()
    assert f(s, t).item() == pytest.approx(expected.item())
    lg = LogitDistill(4, 6)
    assert lg(s, t, torch.randn(3, 6)).item() >= 0
    assert sum(p.numel() for p in DistillLosses(4, 6, {"feature": (1.0, {}), "logits": (0.0, {})}).parameters()) == 24


def test_gradient_reaches_student_and_projector_not_teacher():
    teacher_net = nn.Linear(3, 6)
    student = torch.randn(5, 4, requires_grad=True)
    teacher = teacher_net(torch.randn(5, 3))
    losses = DistillLosses(4, 6, {"feature": (1.0, {}), "logits": (0.5, {}), "relational": (1.0, {})})
    total, values = losses(student, teacher, torch.randn(7, 6))
    assert set(values) == {"feature", "logits", "relational"}
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in losses.parameters())
    assert teacher_net.weight.grad is None


def test_registry_lists_the_losses():
    assert {"feature", "logits", "relational"} <= set(DISTILL_LOSSES.names())
    with pytest.raises(ConfigError, match="unknown distillation loss"):
        DISTILL_LOSSES.get("nope")


class _Images(torch.utils.data.Dataset):
    num_classes = 2

    def __init__(self, n):
        self.x = torch.randn(n, 3, 8, 8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_precomputed_features_roundtrip_and_mismatch_errors(tmp_path):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    data = _Images(7)
    path = precompute_teacher_features(teacher, data, tmp_path / "t.npy", model_config={"name": "lin"},
                                       batch_size=3, flip_average=True)
    feats = load_teacher_features(path, model_config={"name": "lin"}, num_items=7, flip_average=True)
    with torch.no_grad():
        want = teacher(data.x) + teacher(data.x.flip(3))
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "t.json").read_text())["dim"] == 5
    assert IndexedDataset(data)[4][2] == 4 and IndexedDataset(data).num_classes == 2

    with pytest.raises(DataError, match="num_items") as err:
        load_teacher_features(path, model_config={"name": "lin"}, num_items=8, flip_average=True)
    assert "t.npy" in str(err.value)
    with pytest.raises(DataError, match="model_config"):
        load_teacher_features(path, model_config={"name": "other"}, num_items=7, flip_average=True)
    with pytest.raises(DataError, match="source"):  # features of another data set of the same length
        load_teacher_features(path, model_config={"name": "lin"}, num_items=7, flip_average=True, source="b")
    with pytest.raises(DataError, match="flip_average"):
        load_teacher_features(path, model_config={"name": "lin"}, num_items=7, flip_average=False)
    (tmp_path / "t.npy").write_bytes(b"torn")
    with pytest.raises(DataError, match="t.npy"):
        load_teacher_features(path, model_config={"name": "lin"}, num_items=7, flip_average=True)
    (tmp_path / "t.json").unlink()
    with pytest.raises(DataError, match="t.json"):
        load_teacher_features(path, model_config={"name": "lin"}, num_items=7, flip_average=True)


def _cfg(tmp_path, **distill):
    return parse_config({
        "task": "faces_kd", "output": str(tmp_path / "run"), "device": "cpu",
        "model": {"name": "vargfacenet", "width_mult": 0.25, "embedding_size": 64},
        "data": {"train": str(tmp_path / "train")},
        "loss": {"name": "cosface", "s": 30.0, "m": 0.2, "distill": distill},
        "schedule": {"max_steps": 1},
    })


@pytest.mark.parametrize("distill, field", [
    ({"teacher": "x", "feature_kind": "l1"}, "loss.distill.feature_kind"),
    ({"teacher": "x", "temperature": 0}, "loss.distill.temperature"),
    ({"teacher": "x", "logits": -1}, "loss.distill.logits"),
    ({"teacher": "x", "bogus": 1}, "loss.distill.bogus"),
    ({"feature": 1.0}, "loss.distill.teacher"),
    ({"teacher": "x", "feature": 0}, "loss.distill"),
])
def test_config_errors_name_the_field(tmp_path, distill, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DistillTask(_cfg(tmp_path, **distill), RunContext(torch.device("cpu")))


def test_missing_distill_section_and_missing_teacher(tmp_path):
    cfg = _cfg(tmp_path, teacher="x")
    cfg.loss.pop("distill")
    with pytest.raises(ConfigError, match=r"loss\.distill"):
        TASKS.get("faces_kd")(cfg, RunContext(torch.device("cpu")))
    with pytest.raises(DataError, match="nowhere"):
        DistillTask(_cfg(tmp_path, teacher=str(tmp_path / "nowhere")), RunContext(torch.device("cpu"))).train_dataset()


@pytest.mark.parametrize("case", ["under a file", "deeper under a file", "a folder", "its sidecar a folder",
                                  "an unwritable folder"])
def test_a_teacher_features_path_that_cannot_be_written_is_refused_when_the_task_is_built(tmp_path, monkeypatch, case):
    """Missing features are written by the main rank: a path it cannot write is a DataError naming the field and
    the path when the task is built, before the teacher (here one that does not exist) or any data is read."""
    import os

    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "feats").mkdir()
    path, message = {
        "under a file": (tmp_path / "notes.txt/t.npy", "lies under .*notes.txt, which is a file"),
        "deeper under a file": (tmp_path / "notes.txt/a/b/t.npy", "lies under .*notes.txt, which is a file"),
        "a folder": (tmp_path / "feats", "must be a file; this is a folder"),
        "its sidecar a folder": (tmp_path / "f.npy", "must be a file; this is a folder"),
        "an unwritable folder": (tmp_path / "feats/t.npy", "cannot write into .*feats"),
    }[case]
    if case == "its sidecar a folder":
        (tmp_path / "f.json").mkdir()
    if case == "an unwritable folder":  # as a user without write permission sees it (these tests may run as root)
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path / "feats" and real(p, mode, **kw))
    with pytest.raises(DataError, match=r"loss\.distill\.teacher_features\b.*" + message) as err:
        DistillTask(_cfg(tmp_path, teacher=str(tmp_path / "nowhere"), teacher_features=str(path)),
                    RunContext(torch.device("cpu")))
    named = path.with_suffix(".json") if case == "its sidecar a folder" else path  # the file at fault
    assert str(err.value).startswith(f"{named}: ") and ("sidecar" in str(err.value)) == (case == "its sidecar a folder")


def test_teacher_features_that_exist_are_read_even_from_a_read_only_folder(tmp_path, monkeypatch):
    import os

    (tmp_path / "feats").mkdir()
    (tmp_path / "feats/t.npy").write_bytes(b"")  # read (and checked) when training starts, never written
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path / "feats" and real(p, mode, **kw))
    task = DistillTask(_cfg(tmp_path, teacher="x", teacher_features=str(tmp_path / "feats/t.npy")),
                       RunContext(torch.device("cpu")))
    assert task.teacher is None and task.features is None


def test_writing_teacher_features_that_fails_names_the_file_and_leaves_no_array_without_its_sidecar(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    data = [(torch.randn(3, 8, 8), 0) for _ in range(2)]
    with pytest.raises(DataError, match=r"notes\.txt/t\.npy: cannot write the teacher features"):
        precompute_teacher_features(nn.Flatten(), data, tmp_path / "notes.txt/t.npy")
    (tmp_path / "t.json").mkdir()  # the sidecar cannot be written: the array written before it is taken back
    with pytest.raises(DataError, match=r"t\.npy: cannot write the teacher features"):
        precompute_teacher_features(nn.Flatten(), data, tmp_path / "t.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "t.json"]


def test_visrec_train_refuses_an_unwritable_teacher_features_path_cleanly(tmp_path, monkeypatch, capsys):
    """Through the installed command's entry point: ``error:`` naming the field and the path, exit 2, no
    traceback, and nothing done (no output folder)."""
    import sys

    from visrec.cli import main
    from visrec.data.synth import write_face_dataset

    write_face_dataset(tmp_path / "train", 3, 2, seed=1)
    (tmp_path / "notes.txt").write_text("not a folder")
    raw = _cfg(tmp_path, teacher={"name": "vargfacenet", "width_mult": 0.25, "embedding_size": 32},
               teacher_features=str(tmp_path / "notes.txt/t.npy")).model_dump(mode="json")
    raw["batch_size"] = 3
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(sys, "argv", ["visrec", "train", "--config", str(tmp_path / "kd.yaml"), "--no-progress"])
    with pytest.raises(SystemExit) as done:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: {tmp_path / 'notes.txt/t.npy'}: loss.distill.teacher_features lies under "), err
    assert not (tmp_path / "run").exists()


def test_teacher_spec_is_frozen_outside_modules_and_logit_dims_checked(tmp_path):
    ctx = RunContext(torch.device("cpu"))
    spec = {"name": "vargfacenet", "width_mult": 0.25, "embedding_size": 32}
    task = DistillTask(_cfg(tmp_path, teacher=spec, feature=1.0, relational=1.0), ctx)
    assert task.teacher is None  # loaded when training starts, not when the config is validated
    modules = task.build_modules(num_classes=3)
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    assert set(modules) == {"backbone", "head", "distill"}
    assert modules["distill"].losses["feature"].projector.weight.shape == (32, 64)
    # one step: margin + KD, gradient into the student and the projector only
    images, labels = torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 0])
    for m in modules.values():
        m.train()
    loss = task.training_step(modules, (images, labels))
    loss.backward()
    assert loss.item() > task.last_terms["margin"].item() > 0
    assert modules["distill"].losses["feature"].projector.weight.grad is not None
    assert all(p.grad is None for p in task.teacher.parameters())
    # logits with a centre-less teacher of another dimension cannot share centres
    with pytest.raises(ConfigError, match=r"loss\.distill\.logits"):
        DistillTask(_cfg(tmp_path, teacher=spec, logits=1.0), ctx).build_modules(num_classes=3)


def test_recursive_rounds_chain_teachers_and_a_kd_run_resumes(tmp_path):
    """Two tiny rounds: round 1 has a 32-d registry teacher (its projector is checkpointed), round 2's
    teacher is round 1's run dir; then a run with logit KD on round 1's PartialFC centres is stopped and resumed."""
    from visrec.data.synth import write_face_dataset
    from visrec.train.checkpoint import load_backbone
    from visrec.train.distill_task import recursive_distill
    from visrec.train.trainer import train

    write_face_dataset(tmp_path / "train", 3, 2, seed=1)
    spec = {"name": "vargfacenet", "width_mult": 0.25, "embedding_size": 32}
    raw = _cfg(tmp_path, teacher=spec, feature=1.0, relational=1.0, logits=0.5, rounds=2,
               teacher_features=str(tmp_path / "t.npy")).model_dump(mode="json")
    # round 1's logits need shared centres; a centre-less 32-d teacher cannot give them -> only round 2 uses logits
    raw["loss"]["distill"]["logits"] = 0.0
    raw.update(batch_size=3, schedule={"max_steps": 2}, checkpoint_every=1)
    cfg = parse_config(raw)
    results = recursive_distill(cfg)
    assert [r.output.name for r in results] == ["round1", "round2"]
    r1 = torch.load(tmp_path / "run/round1/last.rank0.pt", weights_only=False)
    assert r1["modules"]["distill"]["losses.feature.projector.weight"].shape == (32, 64)  # Linear(64 -> 32)
    r2_cfg = yaml.safe_load((tmp_path / "run/round2/config.yaml").read_text())
    assert r2_cfg["loss"]["distill"]["teacher"] == str(tmp_path / "run/round1")
    assert json.loads((tmp_path / "run/round2/teacher_features.json").read_text())["model_config"] == \
        load_backbone(tmp_path / "run/round1")[1]
    # round 2 with logits on round 1's PartialFC centres, stopped after 1 step and resumed
    raw2 = dict(raw, output=str(tmp_path / "again"))
    raw2["loss"] = json.loads(json.dumps(raw["loss"]))
    raw2["loss"]["distill"].update(teacher=str(tmp_path / "run/round1"), logits=0.5, rounds=1,
                                   teacher_features=None)
    stopped = train(parse_config(raw2), progress=False, stop_after_steps=1)
    assert stopped.stopped_early and stopped.global_step == 1
    resumed = train(parse_config(raw2), resume=True, progress=False)
    assert resumed.global_step == 2 and np.isfinite(resumed.last_loss)
