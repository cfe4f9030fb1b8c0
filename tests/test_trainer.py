"""The Trainer: exact resume after a stop and after kill -9, refusal to overwrite, torchrun with 2 gloo
processes, and the JSONL metrics log."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from visrec.config import parse_config
from visrec.errors import ConfigError
from visrec.train.trainer import EpochBatchSampler, train


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    from visrec.data.synth import write_face_dataset

    root = tmp_path_factory.mktemp("faces") / "train"
    write_face_dataset(root, 6, 6, format="recordio", seed=3, difficulty=0.2)
    return root


# The smallest MobileFaceNet (scale 1, one block per stage): these tests are about the Trainer's mechanics,
# which are the same for every backbone, and a step of it costs ~2/5 of the default network's on a CPU.
MODEL = {"name": "mobilefacenet", "embedding_size": 64, "scale": 1, "blocks": [1, 1, 1, 1]}


def make_cfg(data_dir, out, **over):
    raw = {
        "task": "faces", "output": str(out), "device": "cpu", "seed": 7, "deterministic": True,
        "batch_size": 6,
        "model": MODEL,
        "data": {"train": str(data_dir), "flip": True},
        # sample_rate < 1 exercises PartialFC's random negative sampling across the resume.
        "loss": {"name": "arcface", "s": 16.0, "m": 0.3, "sample_rate": 0.5},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"max_steps": 9, "warmup_steps": 2},
        "checkpoint_every": 2, "log_every": 1,
    }
    raw.update(over)
    return parse_config(raw)


def final_state(out: Path) -> dict:
    return torch.load(out / "last.rank0.pt", map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict):
    assert a["global_step"] == b["global_step"]
    for module in a["modules"]:
        sa, sb = a["modules"][module], b["modules"][module]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{module}.{key} differs"


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    s = EpochBatchSampler(20, 3, rank=0, world_size=2, seed=5)
    assert s.steps_per_epoch == 3
    s.set_position(1, 0)
    full = list(s)
    s.set_position(1, 2)
    assert list(s) == full[2:]
    other = EpochBatchSampler(20, 3, rank=1, world_size=2, seed=5)
    other.set_position(1, 0)
    assert not set(sum(full, [])) & set(sum(list(other), []))


def test_stop_and_resume_is_bit_exact(face_rec, tmp_path):
    # 36 images / batch 6 = 6 steps per epoch: the stop at step 4 resumes mid-epoch and crosses an epoch.
    train(make_cfg(face_rec, tmp_path / "a"), progress=False)
    stopped = train(make_cfg(face_rec, tmp_path / "b"), progress=False, stop_after_steps=4)
    assert stopped.stopped_early and stopped.global_step == 4
    resumed = train(make_cfg(face_rec, tmp_path / "b"), resume=True, progress=False)
    assert resumed.global_step == 9 and not resumed.stopped_early
    assert_same_weights(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    # and the log holds one line per step (resumed steps appended, none repeated)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in l]
    assert steps == list(range(1, 10))


def test_resume_differs_if_rng_not_restored(face_rec, tmp_path):
    """Guard the guard: without the RNG restore, PartialFC sampling and flips diverge (so the exact test
    above really checks something)."""
    train(make_cfg(face_rec, tmp_path / "a", schedule={"max_steps": 5}), progress=False)
    train(make_cfg(face_rec, tmp_path / "b", schedule={"max_steps": 5}), progress=False, stop_after_steps=2)
    state = final_state(tmp_path / "b")
    torch.manual_seed(12345)
    state["rng"]["torch"] = torch.get_rng_state()
    torch.save(state, tmp_path / "b" / "last.rank0.pt")
    train(make_cfg(face_rec, tmp_path / "b", schedule={"max_steps": 5}), resume=True, progress=False)
    with pytest.raises(AssertionError):
        assert_same_weights(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_refuses_to_overwrite_a_checkpoint(face_rec, tmp_path):
    cfg = make_cfg(face_rec, tmp_path / "a", schedule={"max_steps": 1})
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)


def test_model_pt_loads_back(face_rec, tmp_path):
    from visrec.train.checkpoint import load_backbone

    cfg = make_cfg(face_rec, tmp_path / "a", schedule={"max_steps": 2})
    train(cfg, progress=False)
    # the run dir's config.yaml is YAML, and the same config read back
    import yaml

    assert parse_config(yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())) == cfg
    model, spec = load_backbone(tmp_path / "a")
    assert spec == MODEL
    state = final_state(tmp_path / "a")["modules"]["backbone"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    bare = torch.load(tmp_path / "a" / "backbone.pth", weights_only=True)
    assert bare.keys() == model.state_dict().keys()


def test_finetune_starts_from_the_pretrained_backbone_with_a_fresh_head(face_rec, tmp_path):
    """visrec finetune = train with init: step 0's backbone is the pretrained one (arcface_torch backbone.pth
    or a visrec run dir), the margin head is built for the new data set's classes; mismatches are named."""
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.data.synth import write_face_dataset
    from visrec.errors import DataError

    train(make_cfg(face_rec, tmp_path / "pre", schedule={"max_steps": 2}), progress=False)
    new_data = write_face_dataset(tmp_path / "new", 4, 3, format="recordio", seed=11)
    pretrained = torch.load(tmp_path / "pre" / "backbone.pth", weights_only=True)
    cfg = make_cfg(new_data, tmp_path / "ft", schedule={"max_steps": 1},
                   optim={"name": "sgd", "lr": 1e-12, "weight_decay": 0.0})
    yaml_path = _write_yaml(cfg, tmp_path / "ft.yaml")
    res = CliRunner().invoke(app, ["finetune", "--config", str(yaml_path), "--model", str(tmp_path / "pre" / "backbone.pth"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    state = final_state(tmp_path / "ft")["modules"]
    for k, v in pretrained.items():  # one step at lr 1e-12: still the pretrained weights (BN stats move)
        if v.is_floating_point() and "running_" not in k:
            assert torch.allclose(state["backbone"][k], v, atol=1e-6), k
    heads = [v for k, v in state["head"].items() if v.ndim == 2]
    assert heads and heads[0].shape[0] == 4  # the new set's 4 classes, not the pretraining's 6
    scratch = make_cfg(new_data, tmp_path / "scratch", schedule={"max_steps": 1})
    train(scratch, progress=False)
    first = next(k for k, v in pretrained.items() if v.ndim == 4)
    assert not torch.allclose(final_state(tmp_path / "scratch")["modules"]["backbone"][first], pretrained[first])
    with pytest.raises(DataError, match="wrong shape|missing"):
        train(make_cfg(new_data, tmp_path / "bad", init=str(tmp_path / "pre"),
                       model={"name": "mobilefacenet", "embedding_size": 32}), progress=False)
    with pytest.raises(DataError, match="'mobilefacenet' backbone, the config builds 'iresnet18'"):
        train(make_cfg(new_data, tmp_path / "bad2", init=str(tmp_path / "pre"),
                       model={"name": "iresnet18", "embedding_size": 64}), progress=False)


def _write_yaml(cfg, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_exact(face_rec, tmp_path):
    steps = 14
    # The reference runs as a process of its own, like the killed run: one started in this pytest process
    # would use whatever thread count an earlier test left, and CPU results depend on it
    # (test_resume_under_another_thread_count_says_so).
    ref = _write_yaml(make_cfg(face_rec, tmp_path / "ref", schedule={"max_steps": steps}, checkpoint_every=1),
                      tmp_path / "ref.yaml")
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(ref), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cfg = _write_yaml(make_cfg(face_rec, tmp_path / "run", schedule={"max_steps": steps}, checkpoint_every=1),
                      tmp_path / "run.yaml")
    cmd = [sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "run" / "last.rank0.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["global_step"] >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["global_step"]
    assert 3 <= killed_at < steps
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_weights(final_state(tmp_path / "ref"), final_state(tmp_path / "run"))


def test_resume_under_another_thread_count_says_so(face_rec, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(make_cfg(face_rec, tmp_path / "a", schedule={"max_steps": 4}), progress=False, stop_after_steps=2)
        assert final_state(tmp_path / "a")["cpu_threads"] == 1
        capsys.readouterr()
        train(make_cfg(face_rec, tmp_path / "a", schedule={"max_steps": 4}), resume=True, progress=False)
        assert "CPU thread" not in capsys.readouterr().err  # the same count: nothing to say
        train(make_cfg(face_rec, tmp_path / "b", schedule={"max_steps": 4}), progress=False, stop_after_steps=2)
        torch.set_num_threads(2)
        train(make_cfg(face_rec, tmp_path / "b", schedule={"max_steps": 4}), resume=True, progress=False)
        err = capsys.readouterr().err
        assert "written with 1 CPU thread, this process runs 2" in err and "OMP_NUM_THREADS=1" in err
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_torchrun_two_gloo_processes(face_rec, tmp_path):
    cfg = _write_yaml(make_cfg(face_rec, tmp_path / "ddp", schedule={"max_steps": 3}, batch_size=3,
                               deterministic=False), tmp_path / "ddp.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "visrec.cli", "train", "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "ddp" / f"last.rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 3
    # DDP keeps the backbone's parameters replicated (BN running statistics stay per rank, as in DDP);
    # PartialFC centres are split between the ranks.
    for k, v in r0["modules"]["backbone"].items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, r1["modules"]["backbone"][k]), k
    w0 = next(iter(r0["modules"]["head"].values()))
    w1 = next(iter(r1["modules"]["head"].values()))
    assert w0.shape[0] + w1.shape[0] == 6


_FAILING_VALIDATION = """
import sys
from visrec.errors import DataError
from visrec.train.faces_task import FaceTask

def went_away(self, backbone):  # a validation set that goes bad after the start check passed
    raise DataError("went away after the start check", path=self.data_opts.val[0])

FaceTask.validate = went_away
from visrec.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["in_the_loop", "at_the_end"])
def test_a_rank_0_validation_failure_ends_every_rank_with_a_clear_error(face_rec, tmp_path, when):
    """Under 2 gloo processes rank 0 validates alone; when that fails, rank 1 (which would be waiting in the next
    step's all-reduce, or at the end's barrier) learns it and exits 2 with an error naming rank 0 and its message,
    and rank 0 exits 2 with its own error, with no traceback on either. The timeout only guards against a hang (gloo
    would wait 30 minutes)."""
    import socket

    from visrec.data.synth import write_verification_pairs

    good = write_verification_pairs(tmp_path / "good.bin", 4, 12, seed=5)
    over = {"val_every": 2, "checkpoint_every": 10} if when == "in_the_loop" else {}
    cfg = _write_yaml(make_cfg(face_rec, tmp_path / "ddp", schedule={"max_steps": 4}, batch_size=3,
                               deterministic=False, data={"train": str(face_rec), "val": [str(good)]}, **over),
                      tmp_path / "ddp.yaml")
    (tmp_path / "failing.py").write_text(_FAILING_VALIDATION)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "failing.py"), "train", "--config", str(cfg),
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in (0, 1)]
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=240)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    step = 2 if when == "in_the_loop" else 4
    errs = [" ".join(err.split()) for err in errs]  # the CLI's console wraps long lines
    for rank, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 2 and "error:" in err and "Traceback" not in err, f"rank {rank}: {err[-3000:]}"
        assert "went away after the start check" in err and f"validation at step {step} failed" in err, err
    assert "failed on rank 0" in errs[1] and "failed on rank 0" not in errs[0]
    assert torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["step"] == step  # rank 0 kept the weights
    # every rank's resume file holds the failing step (in the loop too, where no checkpoint was due: every rank
    # saves before rank 0 validates alone), so --resume goes on from there, as the error says
    for r in (0, 1):
        assert torch.load(tmp_path / "ddp" / f"last.rank{r}.pt", weights_only=False)["global_step"] == step
    assert "last.rank0.pt" in "".join(errs[0].split()) and "--resume" in errs[0]  # the console may wrap the path


# --- nothing trained is lost to a bad input: validation sets and outputs checked first, weights saved first ---
from visrec.errors import DataError  # noqa: E402
from visrec.train.faces_task import FaceTask  # noqa: E402
from visrec.train.trainer import ValidationFailed  # noqa: E402


def _bins(tmp_path):
    """(a good 12-pair .bin, a 6-pair one, one holding a truncated JPEG, a path that does not exist)."""
    import pickle

    from visrec.data.synth import write_verification_pairs

    good = write_verification_pairs(tmp_path / "good.bin", 4, 12, seed=5)
    few = write_verification_pairs(tmp_path / "few.bin", 4, 6, seed=5)
    bins, issame = pickle.loads(good.read_bytes(), encoding="bytes")
    bins[5] = bins[5][:len(bins[5]) // 2]
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(pickle.dumps((bins, issame), protocol=2))
    return good, few, trunc, tmp_path / "nowhere.bin"


def test_a_bad_validation_set_is_refused_before_the_first_step(face_rec, tmp_path, monkeypatch):
    import cv2

    from visrec.data.verification import read_verification_bin, write_verification_bin

    good, few, trunc, missing = _bins(tmp_path)
    images, issame = read_verification_bin(good)  # the same pairs as 150x150 crops: the model takes 112x112
    big = write_verification_bin(tmp_path / "big.bin", [cv2.resize(i, (150, 150)) for i in images], issame)
    steps = []
    monkeypatch.setattr(FaceTask, "training_step", lambda *a: steps.append(1))
    for bad, words in ((few, "6 pairs cannot be split into 10 folds"), (trunc, "record 5"), (missing, "nowhere.bin"),
                       (big, "images are 150x150; the face models train on aligned 112x112 crops")):
        out = tmp_path / f"run-{bad.stem}"
        with pytest.raises(DataError) as err:
            train(make_cfg(face_rec, out, data={"train": str(face_rec), "val": [str(good), str(bad)]}), progress=False)
        assert str(bad) in str(err.value) and words in str(err.value)
        assert not out.exists()  # before any work: no folder, no log
    assert steps == []


def test_two_validation_sets_with_one_name_are_refused(face_rec, tmp_path):
    good = _bins(tmp_path)[0]
    (tmp_path / "other").mkdir()
    twin = (tmp_path / "other" / "good.bin")
    twin.write_bytes(good.read_bytes())
    with pytest.raises(ConfigError, match="both log as 'good/accuracy'"):
        train(make_cfg(face_rec, tmp_path / "run", data={"train": str(face_rec), "val": [str(good), str(twin)]}),
              progress=False)


def test_a_validation_that_fails_after_training_keeps_the_weights(face_rec, tmp_path, monkeypatch):
    good = _bins(tmp_path)[0]
    out = tmp_path / "run"
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 3}, checkpoint_every=10,
                   data={"train": str(face_rec), "val": [str(good)]})
    real = FaceTask.validate
    monkeypatch.setattr(FaceTask, "validate", lambda self, backbone: (_ for _ in ()).throw(
        DataError("went away", path=good)))
    with pytest.raises(ValidationFailed) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "went away" in msg and str(out / "model.pt") in msg and "--resume" in msg
    assert final_state(out)["global_step"] == 3
    model = torch.load(out / "model.pt", weights_only=False)
    assert model["step"] == 3 and torch.equal(next(iter(model["backbone"].values())),
                                              next(iter(final_state(out)["modules"]["backbone"].values())))
    assert (out / "backbone.pth").exists()
    # fixed: --resume validates the saved weights without training again, logs the row once, fills model.pt
    monkeypatch.setattr(FaceTask, "validate", real)
    again = train(cfg, resume=True, progress=False)
    assert again.global_step == 3 and again.metrics and "good/accuracy" in again.metrics
    assert torch.load(out / "model.pt", weights_only=False)["metrics"] == again.metrics
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val" in r] == [3]


def test_a_periodic_validation_that_fails_saves_its_step(face_rec, tmp_path, monkeypatch):
    good = _bins(tmp_path)[0]
    out = tmp_path / "run"
    cfg = make_cfg(face_rec, out, schedule={"max_steps": 6}, checkpoint_every=4, val_every=3,
                   data={"train": str(face_rec), "val": [str(good)]})
    monkeypatch.setattr(FaceTask, "validate", lambda self, backbone: (_ for _ in ()).throw(DataError("bad", path=good)))
    with pytest.raises(ValidationFailed, match="validation at step 3 failed"):
        train(cfg, progress=False)
    assert final_state(out)["global_step"] == 3  # step 3 is no checkpoint step: saved because validation failed
    assert torch.load(out / "model.pt", weights_only=False)["step"] == 3


def test_an_observer_that_ends_the_run_at_validation_passes_through(face_rec, tmp_path):
    from visrec.train.trainer import Observer

    class Prune(Observer):
        def on_validate(self, step, backbone):
            raise KeyError("pruned")

    with pytest.raises(KeyError, match="pruned"):
        train(make_cfg(face_rec, tmp_path / "run", val_every=2, checkpoint_every=10), progress=False,
              observer=Prune())


@pytest.mark.parametrize("layout", ["file", "under_file"])
def test_an_output_that_is_or_lies_under_a_file_is_refused_first(face_rec, tmp_path, layout, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("user's notes")
    out = afile if layout == "file" else afile / "run"
    opened = []
    monkeypatch.setattr(FaceTask, "train_dataset", lambda self: opened.append(1))
    with pytest.raises(DataError) as err:
        train(make_cfg(face_rec, out), progress=False)
    assert str(out) in str(err.value) and opened == []
    assert afile.read_text() == "user's notes"


def test_cli_train_output_file_and_bad_val_exit_2(face_rec, tmp_path, monkeypatch, capsys):
    from conftest import cli_status

    few = _bins(tmp_path)[1]
    (tmp_path / "afile").write_text("x")
    for i, over in enumerate(([f"output={tmp_path / 'afile'}"], [f"output={tmp_path / 'afile' / 'sub'}"],
                              [f"output={tmp_path / 'r'}", f"data.val=[{few}]"])):
        cfg = _write_yaml(make_cfg(face_rec, tmp_path / "unused"), tmp_path / "run.yaml")
        args = ["train", "--config", str(cfg), "--no-progress"]
        for o in over:
            args += ["--set", o]
        # the real entry point once; the other cases through the function it takes its status from
        code, err = cli_status(args, monkeypatch, capsys, real=i == 0)
        assert code == 2 and "error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_synth_faces_refuses_fewer_pairs_than_folds(tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.errors import VisrecError

    res = CliRunner().invoke(app, ["data", "synth", "faces", "--out", str(tmp_path / "s"), "--identities", "2",
                                   "--per-identity", "1", "--pairs", "6"])
    assert isinstance(res.exception, VisrecError) and "--pairs 6" in str(res.exception)
    assert "10" in str(res.exception) and not (tmp_path / "s").exists()  # refused before rendering
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "data", "synth", "faces", "--out", str(tmp_path / "t"),
                           "--identities", "2", "--per-identity", "1", "--pairs", "9"], capture_output=True, text=True)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


def test_a_record_file_that_is_a_directory_is_a_data_error(face_rec, tmp_path):
    import shutil

    data = tmp_path / "rec"
    shutil.copytree(face_rec, data)
    (data / "train.rec").unlink()
    (data / "train.rec").mkdir()
    with pytest.raises(DataError, match="train.rec: cannot open the record file"):
        train(make_cfg(data, tmp_path / "run"), progress=False)


# --- data.skip_bad: unreadable records skipped, counted, reported ------------------------------------------------
@pytest.fixture()
def bad_folder(tmp_path):
    from visrec.data.synth import write_face_dataset

    root = tmp_path / "folder"
    write_face_dataset(root, 3, 4, format="folder", seed=3)
    (root / "000001" / "00009.jpg").write_bytes(b"not a jpeg")  # decodes nowhere
    (root / "000002" / "notes.txt").write_text("left out when indexing")
    return root


def test_skip_bad_skips_undecodable_images_and_reports_the_count(bad_folder, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_cfg(bad_folder, out, batch_size=4, schedule={"max_steps": 6}, checkpoint_every=3,
                   data={"train": str(bad_folder), "skip_bad": True})
    res = train(cfg, progress=False)  # 13 images, 3 steps an epoch: every image read twice
    assert res.global_step == 6 and res.skipped == 2
    err = capsys.readouterr().err
    assert "skipped 2 unreadable" in err and "00009.jpg" in err
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped"] for r in rows if "skipped" in r]
    assert len(skipped) == 1 and skipped[0]["count"] == 2 and skipped[0]["when_reading"] == 1
    assert final_state(out)["skipped"]["items"].numel() == 1
    (bad_folder / "000002" / "notes.txt").unlink()
    with pytest.raises(DataError, match="00009.jpg"):  # without skip_bad the same data fails, naming the file
        train(make_cfg(bad_folder, tmp_path / "strict", batch_size=4, schedule={"max_steps": 6},
                       data={"train": str(bad_folder)}), progress=False)


def test_skip_bad_count_survives_a_resume(bad_folder, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(bad_folder, out, batch_size=4, schedule={"max_steps": 6}, checkpoint_every=3,
                   data={"train": str(bad_folder), "skip_bad": True})
    train(cfg, progress=False, stop_after_steps=3)
    assert train(cfg, resume=True, progress=False).skipped == 2


def test_skip_bad_on_a_recordio_record_and_with_workers(face_rec, tmp_path):
    import shutil

    data = tmp_path / "rec"
    shutil.copytree(face_rec, data)
    offsets = [int(l.split("\t")[1]) for l in (data / "train.idx").read_text().splitlines()]
    raw = bytearray((data / "train.rec").read_bytes())
    raw[offsets[3] + 8 + 24:offsets[3] + 8 + 24 + 4] = b"AAAA"  # record 3's JPEG loses its start marker
    (data / "train.rec").write_bytes(raw)
    res = train(make_cfg(data, tmp_path / "run", num_workers=1, schedule={"max_steps": 6},
                         data={"train": str(data), "skip_bad": True}), progress=False)
    assert res.skipped == 1


def test_skip_bad_batched_decode_replaces_an_image_the_device_cannot_decode(face_rec, tmp_path, monkeypatch):
    from visrec.data import jpeg_batches

    def fail_batch(datas, device):
        raise RuntimeError("device decoder refused the batch")

    real_one = jpeg_batches.EncodedFaces._decode_one

    def fail_index_2(self, data, i, device):
        if i == 2:
            raise DataError("corrupt entropy data", path="train.rec", record=2)
        return real_one(self, data, i, device)

    monkeypatch.setattr(jpeg_batches, "_decode_jpegs", fail_batch)
    monkeypatch.setattr(jpeg_batches.EncodedFaces, "_decode_one", fail_index_2)
    res = train(make_cfg(face_rec, tmp_path / "run", schedule={"max_steps": 6},
                         data={"train": str(face_rec), "skip_bad": True, "decode": "batched"}), progress=False)
    assert res.global_step == 6 and res.skipped == 1
