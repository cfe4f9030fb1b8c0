"""Resume edge cases: --resume before the first checkpoint, no step logged twice in metrics.jsonl (and the
log rewrite is crash-safe), and resuming under another number of processes (refused, naming both)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_face_rec  # noqa: E402
from visrec.errors import ConfigError, StorageError
from visrec.train import checkpoint as ckpt
from visrec.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _write_yaml, make_cfg  # noqa: E402  (the trainer tests' tiny face config)


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    return small_face_rec(tmp_path_factory, 6, 6, seed=3)


def logged_steps(out: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if l.startswith("{") and '"loss"' in l]


def test_resume_before_the_first_checkpoint_says_so_and_starts_fresh(face_rec, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # what a run killed before its first checkpoint leaves: rows for steps 1-2, no checkpoint; and a note
    (out / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 9.0}\n{"step": 2, "epoch": 0, "loss": 9.0}\n'
                                       'a line that is not JSON\n')
    res = train(make_cfg(face_rec, out, schedule={"max_steps": 3}, checkpoint_every=10), resume=True, progress=False)
    assert res.global_step == 3
    err = capsys.readouterr().err
    said = [l for l in err.splitlines() if "no checkpoint" in l]
    assert len(said) == 1 and str(out) in said[0] and "step 0" in said[0]
    assert "the 2 rows in its metrics.jsonl" in said[0] and "replaced" in said[0]  # what becomes of the dead run's log
    assert logged_steps(out) == [1, 2, 3]  # the dead run's rows were replaced, not duplicated
    assert 9.0 not in [json.loads(l).get("loss") for l in (out / "metrics.jsonl").read_text().splitlines()
                       if l.startswith("{")]
    assert "a line that is not JSON" in (out / "metrics.jsonl").read_text()


def test_resume_drops_rows_logged_after_the_checkpoint(face_rec, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(face_rec, out), progress=False, stop_after_steps=4)  # checkpoint at step 4
    with open(out / "metrics.jsonl", "a") as fh:  # a run killed at step 6 had logged 5 and 6 past it
        fh.write('{"step": 5, "epoch": 0, "loss": -1.0}\n{"step": 6, "epoch": 1, "loss": -1.0}\n')
    train(make_cfg(face_rec, out), resume=True, progress=False)
    assert logged_steps(out) == list(range(1, 10))
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert -1.0 not in losses


def test_resuming_a_finished_run_trains_and_logs_nothing(face_rec, tmp_path, capsys):
    from visrec.data.synth import write_verification_pairs

    out = tmp_path / "run"
    val = write_verification_pairs(tmp_path / "val.bin", 4, 12, seed=5, first_identity=100_000)
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 3}, checkpoint_every=10,
                   data={"train": str(face_rec), "val": [str(val)]})
    first = train(cfg, progress=False)
    log_before = (out / "metrics.jsonl").read_text()
    assert '"val"' in log_before  # the final validation was logged once
    model_before = (out / "model.pt").read_bytes()
    again = train(cfg, resume=True, progress=False)
    assert again.global_step == 3 and again.metrics == first.metrics and first.metrics
    assert again.last_loss == first.last_loss and math.isfinite(first.last_loss)
    assert "already reached step 3 of 3" in capsys.readouterr().err
    # no step logged twice (the final validation row included), and the model file is not rewritten
    assert (out / "metrics.jsonl").read_text() == log_before
    assert (out / "model.pt").read_bytes() == model_before


def test_a_finished_run_answers_from_its_log_and_validates_only_when_the_log_lacks_the_row(face_rec, tmp_path,
                                                                                         monkeypatch):
    from visrec.data.synth import write_verification_pairs
    from visrec.train.faces_task import FaceTask

    out = tmp_path / "run"
    val = write_verification_pairs(tmp_path / "val.bin", 4, 12, seed=5, first_identity=100_000)
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 3}, checkpoint_every=10,
                   data={"train": str(face_rec), "val": [str(val)]})
    first = train(cfg, progress=False)
    calls = []
    real = FaceTask.validate
    monkeypatch.setattr(FaceTask, "validate", lambda self, backbone: calls.append(1) or real(self, backbone))
    assert train(cfg, resume=True, progress=False).metrics == first.metrics
    assert calls == []  # the final row of the log answered
    log = out / "metrics.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("".join(r + "\n" for r in rows if '"val"' not in r) + "not json\n[1, 2]\n")
    again = train(cfg, resume=True, progress=False)
    assert calls == [1] and again.metrics == pytest.approx(first.metrics)  # validated again, same answer


def test_log_rewrite_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\n{"step": 2, "val": {"acc": 0.5}}\nnote\n{"step": 3}\n'
    log.write_text(text)
    assert ckpt.truncate_log(log, 3) == 0 and log.read_text() == text  # nothing after step 3: untouched

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="metrics.jsonl: cannot write: disk gone"):  # named, not a traceback
        ckpt.truncate_log(log, 1)
    assert log.read_text() == text  # a crash mid-rewrite leaves the original whole
    monkeypatch.undo()
    assert ckpt.truncate_log(log, 1) == 2
    assert log.read_text() == '{"step": 1}\nnote\n'
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temporary left behind


def test_check_resume_from_the_files_alone(tmp_path):
    """The verdict needs only the files: recorded world size, or (older files) the rank files' count."""
    for r in (0, 1):
        torch.save({"global_step": 4, "world_size": 2, "rank": r,
                    "sharding": {"head": {"class_start": 3 * r, "num_local": 3, "num_classes": 6, "world_size": 2}}},
                   ckpt.rank_path(tmp_path, r))
    ckpt.check_resume(tmp_path, 0, 2, ckpt.load_rank_state(tmp_path, 0))  # same world size: fine
    with pytest.raises(ConfigError, match=r"checkpointed by 2 processes at step 4.*classes 0\.\.2 of 6.*this run has 1"):
        ckpt.check_resume(tmp_path, 0, 1, ckpt.load_rank_state(tmp_path, 0))
    with pytest.raises(ConfigError, match=r"2 processes.*this run has 3.*nproc_per_node=2"):
        ckpt.check_resume(tmp_path, 2, 3, None)  # a new rank without a file refuses too, not start at 0
    os.remove(ckpt.rank_path(tmp_path, 1))
    with pytest.raises(ConfigError, match=r"lacks the file of rank\(s\) \[1\]"):
        ckpt.check_resume(tmp_path, 0, 2, ckpt.load_rank_state(tmp_path, 0))
    old = tmp_path / "old"  # written before the world size was recorded: two rank files = 2 processes
    old.mkdir()
    for r in (0, 1):
        torch.save({"global_step": 2}, ckpt.rank_path(old, r))
    with pytest.raises(ConfigError, match="checkpointed by 2 processes.*this run has 1"):
        ckpt.check_resume(old, 0, 1, ckpt.load_rank_state(old, 0))


def test_two_processes_then_resume_with_one_is_refused(face_rec, tmp_path):
    """2 gloo processes train 2 steps; resuming with 1 is refused naming both world sizes, and rank 0's
    file records the world size and its class shard. The reverse (1 -> 2) is refused by both ranks."""
    out = tmp_path / "ddp"
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 2}, batch_size=3, deterministic=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "visrec.cli", "train", "--config"]
    done = subprocess.run(torchrun + [str(_write_yaml(cfg, tmp_path / "ddp.yaml")), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = ckpt.load_rank_state(out, 0)
    assert r0["world_size"] == 2 and r0["rank"] == 0
    assert r0["sharding"]["head"] == {"class_start": 0, "num_local": 3, "num_classes": 6, "world_size": 2}
    before = {k: v.clone() for k, v in r0["modules"]["head"].items()}
    with pytest.raises(ConfigError) as refused:
        train(make_cfg(face_rec, out, schedule={"max_steps": 4}, batch_size=3, deterministic=False),
              resume=True, progress=False)
    msg = str(refused.value)
    assert "checkpointed by 2 processes at step 2" in msg and "this run has 1" in msg
    assert "nproc_per_node=2" in msg and "finetune" in msg
    after = ckpt.load_rank_state(out, 0)  # nothing was overwritten by the refused run
    assert after["global_step"] == 2 and all(torch.equal(before[k], after["modules"]["head"][k]) for k in before)

    single = tmp_path / "single"
    train(make_cfg(face_rec, single, schedule={"max_steps": 2}, batch_size=3, deterministic=False), progress=False)
    cfg2 = make_cfg(face_rec, single, schedule={"max_steps": 4}, batch_size=3, deterministic=False)
    again = subprocess.run(torchrun + [str(_write_yaml(cfg2, tmp_path / "single.yaml")), "--no-progress", "--resume"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode != 0
    said = " ".join(again.stderr.split())  # the console wraps its line where the temporary path's length puts it
    assert "checkpointed by 1 process at step 2" in said and "this run has 2" in said
    assert not ckpt.rank_path(single, 1).exists()  # rank 1 did not start a run of its own from step 0


def test_a_changed_class_shard_is_named():
    saved = {"head": {"class_start": 0, "num_local": 6, "num_classes": 6, "world_size": 1}}
    ckpt.check_sharding(saved, {"head": dict(saved["head"])}, Path("last.rank0.pt"))  # same shard: fine
    with pytest.raises(ConfigError, match=r"head was checkpointed with head: classes 0\.\.5 of 6.*classes 0\.\.4 of 5"):
        ckpt.check_sharding(saved, {"head": {"class_start": 0, "num_local": 5, "num_classes": 5, "world_size": 1}},
                            Path("last.rank0.pt"))


def test_a_finished_run_validated_on_resume_logs_the_row_once_and_fills_model_pt(face_rec, tmp_path, monkeypatch):
    from visrec.data.synth import write_verification_pairs
    from visrec.train.faces_task import FaceTask

    out = tmp_path / "run"
    val = write_verification_pairs(tmp_path / "val.bin", 4, 12, seed=5, first_identity=100_000)
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 3}, checkpoint_every=10,
                   data={"train": str(face_rec), "val": [str(val)]})
    first = train(cfg, progress=False)
    log = out / "metrics.jsonl"
    log.write_text("".join(r + "\n" for r in log.read_text().splitlines() if '"val"' not in r))  # killed mid-validation
    blob = torch.load(out / "model.pt", weights_only=False)
    blob["metrics"] = {}
    torch.save(blob, out / "model.pt")
    calls = []
    real = FaceTask.validate
    monkeypatch.setattr(FaceTask, "validate", lambda self, backbone: calls.append(1) or real(self, backbone))
    assert train(cfg, resume=True, progress=False).metrics == pytest.approx(first.metrics)
    assert train(cfg, resume=True, progress=False).metrics == pytest.approx(first.metrics)
    assert calls == [1]  # the second resume answered from the row the first one logged
    assert sum('"val"' in r for r in log.read_text().splitlines()) == 1
    assert torch.load(out / "model.pt", weights_only=False)["metrics"] == pytest.approx(first.metrics)


# --- what a run finds in its output folder (visrec.train.outdir) ---------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("left", ["killed_before_checkpoint", "another_runs_model"])
def test_a_fresh_run_refuses_an_earlier_runs_files_and_leaves_them_as_they_are(face_rec, tmp_path, left):
    out = tmp_path / "run"
    out.mkdir()
    if left == "killed_before_checkpoint":  # a log with rows and the config of a run killed before step 10
        (out / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 9.0}\n')
        (out / "config.yaml").write_text("# the user's own notes\ntask: faces\nseed: 1\n")
        named, advice = ["metrics.jsonl", "config.yaml"], "--resume"
    else:  # a finished run whose checkpoints were removed (as visrec search removes a trial's)
        (out / "model.pt").write_bytes(b"weights of another run")
        (out / "backbone.pth").write_bytes(b"its backbone")
        named, advice = ["model.pt", "backbone.pth"], "move them away"
    (out / "NOTES.txt").write_text("the user's file")
    before = _snapshot(out)
    with pytest.raises(ConfigError) as err:
        train(make_cfg(face_rec, out, schedule={"max_steps": 1}), progress=False)
    msg = str(err.value)
    assert str(out) in msg and all(name in msg for name in named) and advice in msg and "--set output=" in msg
    assert "NOTES.txt" not in msg
    assert _snapshot(out) == before  # nothing emptied, overwritten or added


def test_the_cli_refuses_a_folder_with_a_log_and_exits_2(face_rec, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": 9.0}\n')
    cfg = _write_yaml(make_cfg(face_rec, out, schedule={"max_steps": 1}), tmp_path / "run.yaml")
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "error:" in said and "Traceback" not in said, done.stderr
    assert "metrics.jsonl" in said and "--resume" in said
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "epoch": 0, "loss": 9.0}\n'


def test_a_fresh_run_writes_beside_files_it_would_not_lose(face_rec, tmp_path):
    """Unrelated files, an empty log and a config.yaml that already holds this very config (the --config given may
    be that file) lose nothing: the run goes on, and leaves them (the config with its comments) as they are."""
    import yaml

    out = tmp_path / "run"
    out.mkdir()
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 1})
    mine = "# my run, written by hand\n" + yaml.safe_dump(cfg.model_dump(mode="json"))
    (out / "config.yaml").write_text(mine)
    (out / "metrics.jsonl").write_text("")
    (out / "teacher_features.npy").write_bytes(b"precomputed")
    assert train(cfg, progress=False).global_step == 1
    assert (out / "config.yaml").read_text() == mine
    assert (out / "teacher_features.npy").read_bytes() == b"precomputed"
    assert logged_steps(out) == [1]


def test_resume_without_a_checkpoint_refuses_to_train_over_model_files(face_rec, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(face_rec, out, schedule={"max_steps": 1}), progress=False)
    for path in ckpt.rank_files(out).values():  # what visrec search does to a finished trial
        path.unlink()
    before = _snapshot(out)
    with pytest.raises(ConfigError) as err:
        train(make_cfg(face_rec, out, schedule={"max_steps": 1}), resume=True, progress=False)
    assert "model.pt" in str(err.value) and "no checkpoint" in str(err.value)
    assert _snapshot(out) == before


def test_a_resume_under_another_config_keeps_the_former_config_yaml(face_rec, tmp_path, capsys):
    """--resume after changing the config (here the schedule) replaces config.yaml with the config the run now
    follows, and keeps the former one, byte for byte, as config.before-1.yaml, then -2; a resume under the same
    config renames nothing. A config.yaml written by hand into a folder with no checkpoint is kept the same way."""
    import yaml

    out = tmp_path / "run"
    train(make_cfg(face_rec, out, schedule={"max_steps": 4}), progress=False)
    first = (out / "config.yaml").read_text()
    train(make_cfg(face_rec, out, schedule={"max_steps": 6}), resume=True, progress=False)
    assert (out / "config.before-1.yaml").read_text() == first
    said = [line for line in capsys.readouterr().err.splitlines() if "config.before-1.yaml" in line]
    assert len(said) == 1 and "held another config" in said[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["schedule"]["max_steps"] == 6
    second = (out / "config.yaml").read_text()
    train(make_cfg(face_rec, out, schedule={"max_steps": 6}), resume=True, progress=False)  # the same config
    assert (out / "config.yaml").read_text() == second and not (out / "config.before-2.yaml").exists()
    train(make_cfg(face_rec, out, schedule={"max_steps": 7}), resume=True, progress=False)
    assert (out / "config.before-1.yaml").read_text() == first
    assert (out / "config.before-2.yaml").read_text() == second

    mine = tmp_path / "mine"
    mine.mkdir()
    hand = "# written by hand: lr tried last week\n" + yaml.safe_dump({"task": "faces", "optim": {"lr": 0.5}})
    (mine / "config.yaml").write_text(hand)
    assert train(make_cfg(face_rec, mine, schedule={"max_steps": 1}), resume=True, progress=False).global_step == 1
    assert (mine / "config.before-1.yaml").read_text() == hand
    assert yaml.safe_load((mine / "config.yaml").read_text())["schedule"]["max_steps"] == 1
