"""Architecture search, its second half: Optuna trials trained on the user's data and scored on held-out data,
the budget enforced before training, pruning, the study in a journal file that survives kill -9 and is shared
by two workers, the report, the export that `visrec train` takes, and the bad-input cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("optuna")

from visrec.config import load_config
from visrec.data.synth import write_face_dataset, write_synthetic_jd
from visrec.errors import ConfigError
from visrec.search.space import candidate_cost
from visrec.search.study import (SearchSettings, counted_trials, export_spec, load_search_study, resolve_budget,
                                 run_worker, summarise)

ROOT = Path(__file__).resolve().parents[1]
# Tiny spaces: a trial trains in about a second on one CPU core, and the budget below cuts a part of them.
TINY_FACES = """
task: faces
input_size: 112
stem: {channels: [8, 16], kernel: 3, stride: 2, act: prelu}
stages:
  - {block: mbconv, kernel: 3, expand: [1, 2], repeats: 1, channels: [8, 16], stride: 2, se: false, act: relu}
  - {block: [mbconv, fused_mbconv], kernel: 3, expand: 2, repeats: 1, channels: [16, 24], stride: 2,
     se: [false, true], act: relu}
  - {block: mbconv, kernel: 3, expand: 2, repeats: 1, channels: 32, stride: 2, se: false, act: relu}
head: {channels: [32, 64]}
"""
TINY_LANDMARKS = """
task: landmarks
input_size: 112
stem: {channels: 8, kernel: 3, stride: 2, act: relu}
stages:
  - {block: [mbconv, fused_mbconv], kernel: 3, expand: 2, repeats: 1, channels: [8, 16], stride: 2, se: false, act: relu}
  - {block: mbconv, kernel: [3, 5], expand: 2, repeats: 1, channels: [16, 24], stride: 2, se: false, act: relu}
head: {channels: 32}
"""
FACE_BUDGET = 0.006  # GFLOPs: the tiny face space's least candidate costs ~0.003, its largest ~0.012


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-faces")
    write_face_dataset(root / "train", 20, 6, seed=1)
    write_face_dataset(root / "val", 10, 4, seed=2, first_identity=50_000, format="folder")
    (root / "space.yaml").write_text(TINY_FACES)
    return root


def face_settings(root: Path, out: Path, **kw) -> SearchSettings:
    args = dict(task="faces", data=root / "train", val=root / "val", out=out,
                budget=resolve_budget(None, FACE_BUDGET, None, None), trials=4, steps=6, evaluations=2,
                space_file=root / "space.yaml", target_fpr=0.05)
    args.update(kw)
    return SearchSettings(**args)


def search_cli(root: Path, out: Path, *extra: str, trials: int = 4, steps: int = 6) -> list[str]:
    return [sys.executable, "-m", "visrec.cli", "search", "faces", "--data", str(root / "train"), "--val",
            str(root / "val"), "--out", str(out), "--max-gflops", str(FACE_BUDGET), "--trials", str(trials),
            "--steps", str(steps), "--evaluations", "2", "--space", str(root / "space.yaml"), "--target-fpr", "0.05",
            "--no-progress", *extra]


def test_a_search_trains_only_candidates_inside_the_budget_and_its_best_trains_counts_and_exports(faces, tmp_path):
    out = tmp_path / "run"
    worker = run_worker(face_settings(faces, out), progress=False)
    study, desc = load_search_study(None, out)
    result = summarise(study, desc)
    assert worker.ran == 4 and len(counted_trials(study)) == 4 and desc == str(out / "study.journal")
    for row in result.rows:
        # the recorded cost is the spec's own, counted again here; over-budget ones never reached training
        assert row.gflops == pytest.approx(candidate_cost(row.spec).gflops)
        trained_dir = out / "trials" / f"{row.number:04d}"
        if row.status == "rejected":
            assert row.gflops > FACE_BUDGET and "GFLOPs >" in row.note and not trained_dir.exists()
        else:
            assert row.gflops <= FACE_BUDGET and row.status in ("complete", "pruned", "repeat") and 0 <= row.score <= 1
    assert worker.rejected == sum(r.status == "rejected" for r in result.rows)
    complete = [r for r in result.rows if r.status == "complete"]
    assert result.best.score == max(r.score for r in complete) and result.best.number in result.pareto
    # the intermediate scores were logged by the trainer (every steps/evaluations steps), once per step
    rows = [json.loads(l) for l in (out / "trials" / f"{result.best.number:04d}" / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in rows if "val" in r]
    assert val_steps == [3, 6] and rows[-1]["val"]["search/tpr@0.05"] == pytest.approx(result.best.score)
    assert not list((out / "trials").glob("*/last.rank*.pt"))  # no optimizer state left behind per trial

    from visrec.search.report import write_search_report

    page = write_search_report(out, result).read_text()
    assert "pareto.png" in page and f"Best: trial {result.best.number}" in page and "budget" in page
    assert (out / "pareto.png").stat().st_size > 1000

    # the exported run config trains the best architecture; it passes the budget, exports and loads
    best = tmp_path / "best.yaml"
    export_spec(result, out, None, best, steps=2, output=str(tmp_path / "retrain"))
    cfg = load_config(best)
    assert cfg.model.name == "searched" and cfg.model.kwargs["spec"] == result.best.spec
    from typer.testing import CliRunner

    from visrec.cli import app

    def run(*args):  # the commands in this process (a fresh interpreter paid ~3 s of imports per command)
        done = CliRunner().invoke(app, list(args))
        assert done.exit_code == 0, done.output + repr(done.exception)
        return done.output

    run("train", "--config", str(best), "--no-progress")
    checked = run("budget", "check", str(tmp_path / "retrain" / "model.pt"), "--protocol", "deepglint-light")
    assert "FAIL" not in checked and "pass" in checked, checked  # and the exit status was 0
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(result.best.spec))  # the bare spec is checked alike
    bare = run("budget", "check", str(tmp_path / "spec.yaml"), "--protocol", "deepglint-light")
    assert "SearchedNet vs deepglint-light" in bare, bare
    run("export", str(tmp_path / "retrain"), "--out", str(tmp_path / "best.onnx"))
    from visrec.models import load_model

    model = load_model(tmp_path / "best.onnx")
    emb = model.embed(np.zeros((2, 112, 112, 3), np.uint8))
    assert emb.shape == (2, 512) and model.contract.embedding_dim == 512

    # a finished study is not searched again, with or without --resume; nothing in it changes
    journal = (out / "study.journal").read_bytes()
    with pytest.raises(ConfigError, match="is finished: 4 trials trained of --trials 4; raise --trials"):
        run_worker(face_settings(faces, out), resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds a search .* pass --resume"):
        run_worker(face_settings(faces, out), progress=False)
    with pytest.raises(ConfigError, match="started with steps = 6; this run asks 9"):
        run_worker(face_settings(faces, out, steps=9, trials=5), resume=True, progress=False)
    assert (out / "study.journal").read_bytes() == journal


def test_a_landmark_search_minimises_nme_on_held_out_faces(tmp_path):
    write_synthetic_jd(tmp_path / "train", 40, seed=3)
    write_synthetic_jd(tmp_path / "val", 8, seed=4)
    (tmp_path / "space.yaml").write_text(TINY_LANDMARKS)
    settings = SearchSettings(task="landmarks", data=tmp_path / "train", val=tmp_path / "val", out=tmp_path / "run",
                              budget=resolve_budget("icme21-landmarks", None, None, None), trials=3, steps=4,
                              evaluations=1, space_file=tmp_path / "space.yaml")
    run_worker(settings, progress=False)
    study, desc = load_search_study(None, tmp_path / "run")
    result = summarise(study, desc)
    complete = [r for r in result.rows if r.status == "complete"]
    assert result.score_name == "nme" and result.direction == "minimize" and len(complete) >= 2
    assert result.best.score == min(r.score for r in complete) and 0 < result.best.score < 1
    from visrec.search.report import write_search_report

    page = write_search_report(tmp_path / "run", result).read_text()
    assert "icme21-landmarks: FLOPs" in page  # the protocol's own check of the best network


def _trials(out: Path):
    study, _ = load_search_study(None, out)
    return study.get_trials(deepcopy=True)


def test_two_workers_share_one_study_and_a_resume_after_kill_9_keeps_every_finished_trial(faces, tmp_path):
    out = tmp_path / "run"
    # 30 steps a trial (a few seconds each): the second worker joins while the first is still searching
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(search_cli(faces, out, trials=8, steps=30), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    workers = [first]
    try:
        deadline = time.time() + 300
        while not (out / "study.journal").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.5)
        time.sleep(2)  # the study's settings are recorded right after the journal appears
        workers.append(subprocess.Popen(search_cli(faces, out, "--resume", trials=8, steps=30), env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
        # kill both once each has finished a trial and one is in the middle of training another
        while True:
            assert time.time() < deadline and all(w.poll() is None for w in workers), \
                [w.stderr.read().decode() for w in workers if w.poll() is not None]
            trials = _trials(out)
            finished_pids = {t.user_attrs["worker"]["pid"] for t in trials
                             if t.state.name == "COMPLETE" and t.user_attrs.get("trained")}
            training = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("trained")]
            if len(finished_pids) == 2 and training:
                break
            time.sleep(0.3)
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
            w.wait()
    before = {t.number: (t.state.name, t.params, t.values) for t in _trials(out) if t.state.name != "RUNNING"}
    assert sum(s == "COMPLETE" for s, _, _ in before.values()) >= 2

    resumed = subprocess.run(search_cli(faces, out, "--resume", trials=8, steps=30), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed: trials [" in resumed.stdout  # it says which trials it found abandoned
    trials = _trials(out)
    by_number = {t.number: t for t in trials}
    for number, (state, params, values) in before.items():  # every finished trial kept as it was
        t = by_number[number]
        assert (t.state.name, t.params, t.values) == (state, params, values)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    abandoned = [t for t in trials if t.user_attrs.get("abandoned")]
    assert abandoned and all(t.state.name == "FAIL" for t in abandoned)
    for t in abandoned:
        if t.user_attrs.get("trained"):  # its architecture ran again, once
            retries = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
            assert len(retries) == 1 and retries[0].params == t.params and retries[0].state.name != "FAIL"
    study, _ = load_search_study(None, out)
    counted = counted_trials(study)
    assert len(counted) == 8
    # no trial was trained by two workers, none trained outside the study: one writer per trial directory
    trained_dirs = {int(p.parent.name) for p in (out / "trials").glob("*/config.yaml")}
    counted_trained = {t.number for t in counted if t.user_attrs.get("same_as") is None}
    assert counted_trained <= trained_dirs
    assert trained_dirs - counted_trained <= {t.number for t in abandoned}
    for n in counted_trained:
        logged = [json.loads(l)["step"] for l in (out / "trials" / f"{n:04d}" / "metrics.jsonl").read_text().splitlines()
                  if "loss" in l]
        assert len(logged) == len(set(logged)), f"trial {n} logged a step twice"


def test_a_kill_after_any_journal_write_leaves_a_study_a_resume_recovers_and_reports(faces, tmp_path, monkeypatch):
    """A kill -9 stops a worker after any one of its journal writes (each Optuna call appends one line), so every
    prefix of a real search's journal is what some kill leaves. Each must open for a resume, have its running
    trials recovered as abandoned, and summarise with its finished trials as the whole run recorded them (CI
    once hit a prefix, a trial's spec without its cost, that the record check refused)."""
    from visrec.search import study as study_mod
    from visrec.search.study import open_search, recover_abandoned

    settings = face_settings(faces, tmp_path / "run", trials=3, steps=4)
    run_worker(settings, progress=False)
    lines = (tmp_path / "run" / "study.journal").read_bytes().splitlines(keepends=True)
    whole = {r.number: r for r in summarise(*load_search_study(None, tmp_path / "run")).rows}
    monkeypatch.setattr(study_mod, "_worker_alive", lambda worker: False)  # the cut journals' workers were killed
    monkeypatch.setattr(study_mod, "OWNER_GRACE_S", 0.0)
    space, cut = settings.space(), tmp_path / "cut"
    cut.mkdir()
    statuses = set()
    for k in range(1, len(lines) + 1):
        (cut / "study.journal").write_bytes(b"".join(lines[:k]))
        study, desc = open_search(face_settings(faces, cut, trials=3, steps=4), space, resume=True)
        recover_abandoned(study)
        for row in summarise(study, desc).rows:
            statuses.add(row.status)
            assert row.status not in ("running", "failed"), (k, row)
            if row.status in ("complete", "pruned", "repeat", "rejected"):
                assert (row.status, row.score, row.gflops, row.spec) == (
                    whole[row.number].status, whole[row.number].score, whole[row.number].gflops,
                    whole[row.number].spec), (k, row)
    assert {"complete", "abandoned", "waiting"} <= statuses  # kills inside training were among the cuts


def test_bad_search_inputs_are_clear_errors_and_write_nothing(faces, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no candidate can meet the budget: the least one has .* GFLOPs > 0.001"):
        run_worker(face_settings(faces, out, budget=resolve_budget(None, 0.001, None, None)), progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="a search needs a budget"):
        resolve_budget(None, None, None, None)
    secret = "postgresql://visrec:s3cret@127.0.0.1:1/study"
    with pytest.raises(ConfigError, match=r"cannot reach the study storage postgresql://visrec:\*\*\*@127.0.0.1:1/study") as err:
        run_worker(face_settings(faces, out, storage=secret), progress=False)
    assert "s3cret" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot reach the study storage sqlite:////nonexistent-dir/study.db"):
        run_worker(face_settings(faces, out, storage="sqlite:////nonexistent-dir/study.db"), progress=False)
    (tmp_path / "tiny").mkdir()
    write_face_dataset(tmp_path / "tiny" / "val", 3, 2, seed=5, format="folder")
    with pytest.raises(Exception, match="12 impostor pairs cannot resolve FPR = 0.01"):
        run_worker(face_settings(faces, out, val=tmp_path / "tiny" / "val", target_fpr=0.01), progress=False)
    with pytest.raises(ConfigError, match="--data .*: no such file"):
        run_worker(face_settings(faces, out, data=tmp_path / "missing"), progress=False)
    write_face_dataset(tmp_path / "few", 3, 2, seed=6)
    with pytest.raises(ConfigError, match="6 training items, fewer than one batch .64."):
        run_worker(face_settings(faces, out, data=tmp_path / "few"), progress=False)
    assert not (out / "study.journal").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(TINY_FACES), "stem": {"channels": []}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: stem.channels: an empty list of choices"):
        run_worker(face_settings(faces, out, space_file=bad), progress=False)


def test_a_latency_bound_is_measured_with_onnx_runtime_and_rejects_before_training(faces, tmp_path):
    import optuna

    from visrec.search.study import Objective

    settings = face_settings(faces, tmp_path / "run", budget=resolve_budget(None, 1.0, None, 1e-6))
    study = optuna.create_study(directions=["maximize", "minimize"])
    objective = Objective(settings, settings.space(), None, study)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match=r"ms/image > 1e-06 \(one ONNX Runtime thread, this machine\)"):
        objective(trial)
    assert trial.user_attrs["ms"] > 0 and "ms/image" in trial.user_attrs["rejected"]
    assert not trial.user_attrs.get("trained") and not (tmp_path / "run" / "trials").exists()


def test_a_candidate_over_the_build_cap_is_rejected_before_training_with_no_latency_bound(faces, tmp_path, monkeypatch):
    """Only FLOPs bound this search: a candidate with more parameters than visrec builds is rejected on its count
    (meta device), not built and trained (it was judged so only when a latency bound would time it)."""
    import optuna

    import visrec.search.study
    from visrec.search.study import Objective

    monkeypatch.setattr(visrec.search.study, "MAX_BUILD_PARAMS", 10)  # every candidate is over it
    settings = face_settings(faces, tmp_path / "run", budget=resolve_budget(None, 1.0, None, None))
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match=r"parameters > 10: too large to build"):
        Objective(settings, settings.space(), None, study)(trial)
    assert not trial.user_attrs.get("trained") and not (tmp_path / "run" / "trials").exists()


def test_a_study_killed_before_its_settings_were_recorded_is_taken_over(faces, tmp_path, monkeypatch):
    """A kill between creating the study and recording its settings left a study with neither: a fresh run said
    "already holds a search: pass --resume", and --resume said "not started by visrec search": a circle."""
    import optuna

    from visrec.search.study import STUDY_NAME, open_search, open_storage

    for resume in (False, True):
        out = tmp_path / f"run-{resume}"
        out.mkdir()
        optuna.create_study(study_name=STUDY_NAME, storage=open_storage(None, out)[0],
                            directions=["maximize", "minimize"])  # what the killed run wrote
        settings = face_settings(faces, out)
        study, _ = open_search(settings, settings.space(), resume=resume)
        assert study.user_attrs["settings"] == settings.fingerprint(settings.space())


def test_a_worker_killed_while_holding_the_journal_lock_leaves_no_lock_behind(faces, tmp_path, monkeypatch):
    """Optuna's journal lock is a symlink file: a kill -9 during a write left it, and every later writer (the
    resume) waited 30 s, then broke it by force (seen in CI: "Forcibly releasing the lock file"). The journal's
    lock is now a flock the kernel drops with its process; while its holder lives it excludes everyone."""
    import fcntl

    from optuna.study import StudyDirection

    from visrec.search.study import open_storage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    storage, desc = open_storage(None, Path("run"))
    assert os.path.isabs(desc)
    storage.create_new_study(directions=[StudyDirection.MAXIMIZE], study_name="x")
    journal = tmp_path / "run" / "study.journal"
    # a worker writing to the journal, killed in the middle of the write (its fsync never returns)
    holder = subprocess.Popen([sys.executable, "-c", """if True:
        import os, sys, time
        from optuna.study import StudyDirection
        from visrec.search.study import open_storage
        storage, _ = open_storage(None, "run")
        os.fsync = lambda fd: print("held", flush=True) or time.sleep(600)
        storage.create_new_study(directions=[StudyDirection.MAXIMIZE], study_name="killed")
        """], env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.PIPE, text=True)

    def free() -> bool:
        with open(journal, "rb+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
    try:
        assert holder.stdout.readline() == "held\n"
        assert not free()  # a live holder excludes every other writer
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(tmp_path / "run")) == ["study.journal"]  # no lock file left
    assert free()  # the kill released the lock: nothing to wait out
    storage, _ = open_storage(None, Path("run"))  # what a resume opens: it takes the lock to check the journal
    storage.create_new_study(directions=[StudyDirection.MAXIMIZE], study_name="y")
    assert sorted(s.study_name for s in storage.get_all_studies()) == ["killed", "x", "y"]


def test_the_cli_reports_a_bad_storage_as_an_error_naming_it(faces, tmp_path):
    res = subprocess.run(search_cli(faces, tmp_path / "run", "--storage", "sqlite:////nonexistent-dir/s.db"),
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         timeout=300)
    assert res.returncode == 2 and "cannot reach the study storage sqlite:////nonexistent-dir/s.db" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_users_run_config_sets_every_trials_training_and_a_bin_pair_file_can_score_it(tmp_path):
    import torch

    from visrec.data.synth import write_verification_pairs
    from visrec.models import build_backbone
    from visrec.search.proxy import FaceScorer, base_training, trial_config
    from visrec.search.space import SearchSpace

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"task": "faces", "output": "runs/x", "model": {"name": "mobilefacenet"},
                                   "optim": {"name": "adamw", "lr": 0.003}, "batch_size": 16,
                                   "schedule": {"epochs": 5, "warmup_steps": 50}}))
    spec = SearchSpace.default("faces").least()
    cfg = trial_config("faces", base_training("faces", run), spec, data=tmp_path / "train", steps=12,
                       evaluations=3, output=tmp_path / "t", seed=4)
    assert cfg.model.name == "searched" and cfg.model.kwargs["spec"] == spec and cfg.optim.lr == 0.003
    assert cfg.batch_size == 16 and cfg.schedule.max_steps == 12 and cfg.schedule.epochs is None
    assert cfg.schedule.warmup_steps == 3 and cfg.val_every == 4 and cfg.data["val"] == [] and cfg.seed == 4
    landmarks = tmp_path / "lm.yaml"
    landmarks.write_text(yaml.safe_dump({"task": "landmarks", "data": {"train": "x"}}))
    with pytest.raises(ConfigError, match="lm.yaml: task is 'landmarks', but this search is for faces"):
        base_training("faces", landmarks)

    pairs = write_verification_pairs(tmp_path / "val.bin", 20, 300, seed=3)
    scorer = FaceScorer(pairs, target_fpr=1e-2)
    net = build_backbone("searched", spec=spec).eval()
    value = scorer(net, torch.device("cpu"))
    assert scorer.score.name == "tpr@0.01" and 0.0 <= value <= 1.0
    with pytest.raises(Exception, match="impostor pairs cannot resolve FPR = 0.0001"):
        FaceScorer(pairs, target_fpr=1e-4)


def test_an_architecture_proposed_again_is_not_trained_again_nor_counted_and_a_converged_search_stops(faces, tmp_path):
    space = tmp_path / "two.yaml"  # two architectures in all
    space.write_text(TINY_FACES.replace("stem: {channels: [8, 16]", "stem: {channels: 8").replace(
        "expand: [1, 2]", "expand: 1").replace("channels: [8, 16], stride: 2", "channels: 8, stride: 2").replace(
        "block: [mbconv, fused_mbconv]", "block: mbconv").replace("channels: [16, 24]", "channels: 16").replace(
        "se: [false, true]", "se: false"))
    settings = face_settings(faces, tmp_path / "run", space_file=space, trials=5, steps=2, evaluations=1)
    assert settings.space().size == 2
    worker = run_worker(settings, progress=False)
    study, _ = load_search_study(None, tmp_path / "run")
    trained = [t for t in study.trials if t.user_attrs.get("trained")]
    repeats = [t for t in study.trials if t.user_attrs.get("same_as") is not None]
    assert worker.converged and worker.ran == 2 and len(counted_trials(study)) == 2 and len(trained) == 2
    assert len(repeats) >= 50 and len(list((tmp_path / "run" / "trials").iterdir())) == 2
    by_number = {t.number: t for t in trained}
    for t in repeats:  # each repeat carries its original's result
        assert t.params == by_number[t.user_attrs["same_as"]].params
        assert t.values == by_number[t.user_attrs["same_as"]].values


def test_a_database_storage_url_holds_the_study_as_the_journal_does(faces, tmp_path):
    """Optuna's RDB storage (the path several machines share through PostgreSQL/MySQL), here on SQLite: the
    study, its settings and its trials live in the database, and a second worker joins it."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    settings = face_settings(faces, tmp_path / "run", storage=url, trials=2, steps=2, evaluations=1)
    run_worker(settings, progress=False)
    study, desc = load_search_study(url, tmp_path / "run")
    assert desc == url and len(counted_trials(study)) == 2 and not (tmp_path / "run" / "study.journal").exists()
    assert study.user_attrs["settings"]["steps"] == 2
    more = face_settings(faces, tmp_path / "run", storage=url, trials=3, steps=2, evaluations=1)
    with pytest.raises(ConfigError, match="already holds a search"):
        run_worker(more, progress=False)
    run_worker(more, resume=True, progress=False)
    assert len(counted_trials(load_search_study(url, tmp_path / "run")[0])) == 3


def test_a_trial_left_with_no_owner_by_a_kill_is_recovered_after_the_grace(monkeypatch):
    """A kill between Optuna creating a trial and the worker recording itself on it left a RUNNING trial with no
    owner that no resume ever finished (seen once in CI). A resume waits until such a trial is OWNER_GRACE_S old,
    then marks it FAIL (abandoned); a trial a live worker owns stays RUNNING."""
    import optuna

    from visrec.search import study as study_mod

    monkeypatch.setattr(study_mod, "OWNER_GRACE_S", 0.5)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    ownerless = study.ask()
    owned = study.ask()
    owned.set_user_attr("worker", study_mod.this_worker())  # this process: alive
    t0 = time.monotonic()
    assert study_mod.recover_abandoned(study) == [ownerless.number]
    assert time.monotonic() - t0 >= 0.3  # it waited for the young ownerless trial to come of age
    states = {t.number: (t.state.name, t.user_attrs.get("abandoned", "")) for t in study.get_trials()}
    assert states[ownerless.number][0] == "FAIL" and "between creating the trial" in states[ownerless.number][1]
    assert states[owned.number] == ("RUNNING", "")
