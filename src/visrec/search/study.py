"""The search: an Optuna study over a search space, every trial a candidate that meets the budget and is trained
briefly on the user's data, scored by the task's metric on held-out data.

The study is multi-objective — the task's metric (faces: TPR at a target FPR, maximised; landmarks: NME,
minimised) and the LFR GFLOPs (minimised) — so its Pareto front is the accuracy/compute trade-off inside the
budget; the *best* architecture is the complete trial with the best metric (fewer FLOPs break ties). Optuna's
TPE sampler (multi-objective) proposes the candidates.

A trial, in order (:class:`Objective`):

1. its spec is sampled (``trial.suggest_categorical`` per field of the space);
2. it is counted on the meta device (LFR FLOPs, float32 weights) and, with a latency bound, timed with ONNX
   Runtime on one thread; over the budget it ends as *rejected* (Optuna state PRUNED, user attribute
   ``rejected`` saying why) without a step of training, and does not count towards ``trials``;
3. a spec identical to one already trained is not trained again: the trial takes the earlier result
   (``same_as``) and does not count towards ``trials``; one that another live worker is training now is
   *skipped* (not counted either). When the sampler proposes only trained architectures for a long run of
   trials (50, or 5 x ``trials``), the worker stops: the search has converged;
4. it trains ``steps`` optimizer steps (:func:`visrec.search.proxy.trial_config`) and is scored every
   ``steps / evaluations`` steps. Optuna's pruners take no intermediate values in a multi-objective study, so
   the median rule of Optuna's ``MedianPruner`` is applied here to the metric alone: at an intermediate
   evaluation a trial worse than the median of the complete trials' scores at the same step (once
   ``prune_after`` of them exist) ends as *pruned* and counts as a trained trial.

Durability and scale-out: the study lives in Optuna storage — by default a journal file in the run directory
(``study.journal``; Optuna's append-only log, each write under a ``flock``, :class:`JournalLock`; safe for
several processes on one machine or a shared file system), or any Optuna storage URL (PostgreSQL/MySQL through
SQLAlchemy) for several machines.
Every finished trial is in the storage when it ends, so a worker killed with SIGKILL loses at most the trial
it was training (a kill in the middle of a write leaves a torn last line, cut off before the next write:
:func:`check_journal`). ``resume=True`` continues (or joins) the study: trials left RUNNING by a dead worker of this
machine (its process id no longer runs, by ``/proc`` start time) are marked FAIL with the attribute
``abandoned`` and their architecture is queued again; so is a RUNNING trial with no worker recorded
``OWNER_GRACE_S`` after its start (a kill between Optuna creating it and its worker claiming it). Workers of
other machines are not judged (a database storage's heartbeats would be the way); their RUNNING trials count as
running. ``trials`` counts trained trials (complete, pruned, failed by a non-finite loss) plus those still
running, across every worker, so N workers stop together; two workers that look at the count at the same
moment may overshoot it by one trial.

A study records the settings it was started with (task, space, steps, budget, data...) and refuses to
continue under others, naming the field; a study that already has its trials is finished, and a second search
on it is refused with the count (raise ``trials`` to go on).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch
import yaml

from visrec._files import check_regular_file, replacing, writing_into
from visrec._optional import require
from visrec._structured import loads_json
from visrec.budget import MAX_BUILD_PARAMS
from visrec.config import parse_config, read_yaml_mapping
from visrec.errors import ConfigError, DataError, shown
from visrec.models import build_backbone
from visrec.models.searched import check_spec
from visrec.protocols import load_protocol
from visrec.search.proxy import base_training, onnx_latency_ms, scorer_for, trial_config
from visrec.search.space import SearchSpace, candidate_cost, check_budget_reachable, over_budget
from visrec.train.checkpoint import rank_files
from visrec.train.task import TASKS, RunContext
from visrec.train.trainer import train

OWNER_GRACE_S = 10.0  # a trial with no worker recorded this long after its start was left by a killed worker

STUDY_NAME = "visrec-search"
JOURNAL = "study.journal"
TRAINED_STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class Budget:
    """The hard constraint: LFR GFLOPs at most ``max_gflops``, float32 weights under ``max_mb`` MB, and, when
    given, ``max_ms`` milliseconds per image at batch 1 on one ONNX Runtime thread of this machine."""

    max_gflops: float | None = None
    max_mb: float | None = None
    max_ms: float | None = None
    origin: str = "flags"
    protocol: str | None = None  # the protocol the limits came from, if any

    def describe(self) -> str:
        parts = []
        if self.max_gflops is not None:
            parts.append(f"<= {self.max_gflops:g} GFLOPs (LFR rule)")
        if self.max_mb is not None:
            parts.append(f"< {self.max_mb:g} MB of float32 weights")
        if self.max_ms is not None:
            parts.append(f"<= {self.max_ms:g} ms/image on one ONNX Runtime thread of this machine")
        return (", ".join(parts) or "no limit") + f" ({self.origin})"


def resolve_budget(protocol: str | None, max_gflops: float | None, max_mb: float | None,
                   max_ms: float | None) -> Budget:
    """A protocol's limits, each tightened by an explicit flag. A flag is a finite number > 0 (a NaN would
    compare false with every cost, cancel the protocol's limit and make the study's recorded budget unequal
    to itself, so that it could never be resumed)."""
    for flag, value in (("--max-gflops", max_gflops), ("--max-mb", max_mb), ("--max-ms", max_ms)):
        if value is not None and not (0 < value < float("inf")):
            raise ConfigError(f"{flag} {value}: a limit is a finite number > 0")
    b = Budget(max_gflops=max_gflops, max_mb=max_mb, max_ms=max_ms, origin="flags")
    if protocol is not None:
        p = load_protocol(protocol)
        b.protocol = str(protocol)
        b.origin = p.name + (" + flags" if (max_gflops or max_mb) else "")
        b.max_gflops, b.max_mb = _tighter(max_gflops, p.max_gflops), _tighter(max_mb, p.max_size_mb)
    if b.max_gflops is None and b.max_mb is None and b.max_ms is None:
        raise ConfigError("a search needs a budget: --protocol NAME, or --max-gflops / --max-mb / --max-ms")
    return b


def check_protocol_fits(protocol: str, task: str, space: SearchSpace) -> None:
    """A :class:`ConfigError` naming the protocol and the field unless it is one for this search: its task (a
    faces search serves a faces or faces-video protocol) and its input size (the space's square side), since
    the search counts each candidate at the space's size and the report checks the best at the protocol's."""
    p = load_protocol(protocol)
    if p.task != task and not (task == "faces" and p.task == "faces-video"):
        raise ConfigError(f"protocol {protocol}: task is {p.task!r}, but this search is for {task}")
    side = space.input_size
    if tuple(p.input_size) != (1, 3, side, side):
        raise ConfigError(f"protocol {protocol}: input_size is {list(p.input_size)}, but the space "
                          f"{space.path} searches networks of input_size {side} ([1, 3, {side}, {side}])")
    if task == "faces" and p.embedding_dim is not None and p.embedding_dim != 512:
        raise ConfigError(f"protocol {protocol}: embedding_dim is {p.embedding_dim}, but a search's face "
                          f"networks embed to 512")


def _tighter(a: float | None, b: float | None) -> float | None:
    """The smaller of two limits, either of which may be absent."""
    return b if a is None else a if b is None else min(a, b)


@dataclass
class SearchSettings:
    task: str  # faces | landmarks
    data: Path  # training data (faces: RecordIO dir, image folder or CSV; landmarks: JD-landmark dir)
    val: Path  # held-out data (faces: a face data set of other identities, or a .bin pair file; landmarks: JD dir)
    out: Path  # run directory: the study journal, trials/<number>/, report.html
    budget: Budget
    trials: int = 20
    steps: int = 100
    evaluations: int = 3
    space_file: Path | None = None  # None: the task's shipped space
    config: Path | None = None  # a run config whose training settings every trial uses
    target_fpr: float = 1e-2
    storage: str | None = None  # an Optuna storage URL or journal path; None: <out>/study.journal
    seed: int = 0
    prune: bool = True
    prune_after: int = 3
    device: str = "cpu"

    def space(self) -> SearchSpace:
        space = SearchSpace.from_file(self.space_file) if self.space_file else SearchSpace.default(self.task)
        if space.task != self.task:
            raise ConfigError(f"{space.path}: task is {space.task!r}, but this search is for {self.task}")
        return space

    def fingerprint(self, space: SearchSpace) -> dict:
        """What a study was started with; a resumed worker must match it field by field."""
        training = base_training(self.task, self.config)
        return {"task": self.task, "space": hashlib.sha256(space.text.encode()).hexdigest()[:16],
                "steps": self.steps, "evaluations": self.evaluations, "data": str(Path(self.data).resolve()),
                "val": str(Path(self.val).resolve()), "target_fpr": self.target_fpr if self.task == "faces" else None,
                "budget": asdict(self.budget), "training": json.loads(json.dumps(training, default=str)),
                "seed": self.seed}


# --- storage ---------------------------------------------------------------------------------------------

def _masked(url: str) -> str:
    """The URL with its password replaced, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def open_storage(storage: str | None, out: Path, *, write: bool = True):
    """(Optuna storage, its description). None: a journal file in ``out``; ``scheme://...``: Optuna's RDB
    storage (connected now, so an unreachable database is an error naming it before anything runs); anything
    else: a journal file at that path, checked first (:func:`check_journal`). ``write=False`` (report, export):
    the journal must exist, and nothing is created or changed."""
    optuna = require("optuna", "search")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None or "://" not in storage:
        path = (Path(storage) if storage else Path(out) / JOURNAL).absolute()
        named = f"--storage {path}" if storage else f"study storage {path}"
        if path.is_dir():
            raise ConfigError(f"{named}: a directory, not a journal file")
        if not path.parent.is_dir():
            raise ConfigError(f"{named}: its directory {path.parent} does not exist")
        check_regular_file(path)
        if not write and not path.exists():
            raise ConfigError(f"{named}: no such journal file (no search was run there)")
        check_journal(path, repair=write)
        backend = _CountingBackend(JournalFileBackend(str(path), lock_obj=JournalLock(path)), path)
        try:
            return JournalStorage(backend), str(path)
        except (ValueError, KeyError, TypeError, IndexError, AssertionError) as exc:  # entries Optuna cannot replay
            entry = backend.last or {}
            trial = f", trial_id {entry['trial_id']}" if "trial_id" in entry else ""
            why = ("an operation this Optuna does not know" if isinstance(exc, AssertionError)
                   else f"{type(exc).__name__}: {str(exc)[:200]}")
            raise DataError(f"line {backend.count} (op_code {entry.get('op_code')}{trial}) is an entry Optuna "
                            f"cannot replay: {why}", path=path) from None
    try:
        return optuna.storages.RDBStorage(storage), _masked(storage)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind: said with the URL
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot reach the study storage {_masked(storage)}: {reason}") from None


class JournalLock:
    """The journal's write lock: ``flock`` on the journal file itself, held only while an entry is appended.
    The kernel drops it when its process dies, so a worker killed mid-write leaves nothing behind (Optuna's own
    lock is a symlink file: after a kill -9 every later writer waited 30 s, then broke it by force). Linux
    NFS clients emulate ``flock`` with byte-range locks, so a journal on a shared file system stays safe."""

    def __init__(self, path: Path):
        self.path, self.fd = str(path), None

    def acquire(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR)  # for writing: an NFS exclusive lock needs a writable descriptor
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


class _CountingBackend:
    """A journal backend that hands Optuna its entries one at a time and keeps count, so an entry Optuna cannot
    replay is named by its line (every complete line of a checked journal is one entry)."""

    def __init__(self, backend, path: Path):
        self.backend, self.path, self.count, self.last = backend, path, 0, None

    def read_logs(self, log_number_from: int):
        for entry in self.backend.read_logs(log_number_from):
            self.count, self.last = log_number_from + 1, entry
            log_number_from += 1
            yield entry

    def append_logs(self, logs) -> None:
        with writing_into(self.path):  # a full disk: a StorageError naming the journal
            self.backend.append_logs(logs)


JOURNAL_ENTRY = b'{"op_code":'  # how Optuna's journal writes every entry begin
MAX_JOURNAL_LINE = 64 * 2**20  # bytes; an entry is a trial's attribute or the study's settings, a few kB


def check_journal(path: Path, *, repair: bool) -> None:
    """A :class:`DataError` naming the file and line unless every complete line of ``path`` is a JSON object
    with an ``op_code`` (an empty or absent file passes). A last line with no newline is a write cut short by
    a kill: Optuna skips it when reading but appends straight onto it, which would corrupt the journal for good;
    with ``repair`` it is cut off (under the journal's lock, so no live worker is writing it). Bytes that do
    not begin like a journal entry are refused, never cut: the file may be something else."""
    if not path.exists():
        return
    lock = JournalLock(path) if repair else None
    if lock is not None:
        lock.acquire()
    try:
        with open(path, "rb+" if repair else "rb") as f:
            number, end = 0, 0  # end: the byte offset just past the last complete line
            while line := f.readline(MAX_JOURNAL_LINE + 1):
                number += 1
                if not line.endswith(b"\n"):
                    if len(line) > MAX_JOURNAL_LINE:
                        raise DataError(f"line {number} is longer than {MAX_JOURNAL_LINE >> 20} MiB: not an "
                                        f"Optuna journal", path=path)
                    if not (line.startswith(JOURNAL_ENTRY) or JOURNAL_ENTRY.startswith(line)):
                        raise DataError(f"line {number} is not an Optuna journal entry (the file is not a "
                                        f"study journal; nothing was written to it)", path=path)
                    if repair:  # a torn last entry, never read by anyone: cut before a write lands on it
                        f.truncate(end)
                    break
                try:
                    entry = loads_json(line)
                except ValueError:  # not JSON, or nested too deep
                    entry = None
                if not isinstance(entry, dict) or not isinstance(entry.get("op_code"), int):
                    raise DataError(f"line {number} is not an Optuna journal entry (a JSON object with an "
                                    f"op_code): the file is not a study journal, or it is corrupt; nothing was "
                                    f"written to it", path=path)
                end += len(line)
    finally:
        if lock is not None:
            lock.release()


def _has_study(storage) -> bool:
    optuna = require("optuna", "search")
    return any(s.study_name == STUDY_NAME for s in optuna.study.get_all_study_summaries(storage,
                                                                                         include_best_trial=False))


def _sampler(seed: int):
    optuna = require("optuna", "search")
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def load_search_study(storage: str | None, out: Path):
    """The study of a finished or running search (for its report and export)."""
    optuna = require("optuna", "search")
    st, desc = open_storage(storage, Path(out), write=False)
    if not _has_study(st):
        raise ConfigError(f"no search study in {desc}")
    return optuna.load_study(study_name=STUDY_NAME, storage=st), desc


# --- workers ---------------------------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc``), or None where it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_worker() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def _worker_alive(worker: dict | None) -> bool:
    """False only when the worker ran on this machine and its process is gone (or its pid was reused)."""
    if not worker or worker.get("host") != socket.gethostname():
        return True
    start = _start_time(int(worker["pid"]))
    return start is not None and (worker.get("start") is None or start == worker["start"])


def counted_trials(study) -> list:
    """The trials that count towards ``trials``: trained and finished, or trained and still running."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if not attrs.get("trained") or attrs.get("abandoned"):
            continue
        if t.state.name in TRAINED_STATES or (t.state.name == "RUNNING" and _worker_alive(attrs.get("worker"))):
            out.append(t)
    return out


def recover_abandoned(study) -> list[int]:
    """Trials left RUNNING by a dead worker of this machine: marked FAIL (``abandoned``), their architecture
    queued again if it had passed the budget. Returns their numbers."""
    require("optuna", "search")
    from optuna.trial import TrialState

    recovered = []
    # A worker records itself on a trial in its very next call after creating it (_Objective.__call__); a kill
    # between the two leaves a RUNNING trial with no owner, which no later worker would ever finish. One with no
    # owner after OWNER_GRACE_S is such a trial: wait, once, until the youngest of them is that old.
    ownerless = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.user_attrs.get("worker") is None and t.datetime_start is not None]
    if ownerless:
        youngest = max(t.datetime_start for t in ownerless)
        time.sleep(max(0.0, OWNER_GRACE_S - (datetime.datetime.now() - youngest).total_seconds()))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker is None:
            age = (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0.0
            if age < OWNER_GRACE_S:  # created since the wait above: its worker is recording itself now
                continue
            why = "its worker stopped between creating the trial and recording itself on it"
        elif _worker_alive(worker):
            continue
        else:
            why = f"its worker (pid {worker['pid']} on {worker['host']}) stopped before the trial finished"
        study._storage.set_trial_user_attr(t._trial_id, "abandoned", why)
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:  # noqa: BLE001 - another worker finished or recovered it first
            continue
        recovered.append(t.number)
        if t.user_attrs.get("trained"):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return recovered


class _TrialObserver:
    """The trainer's hooks for one trial: progress, the held-out score at every evaluation, pruning."""

    def __init__(self, trial, study, scorer, settings: SearchSettings, device, bar):
        self.trial, self.study, self.scorer, self.settings, self.device, self.bar = (
            trial, study, scorer, settings, device, bar)
        self.scores: dict[int, float] = {}

    def on_step(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.step(step, total)

    def on_validate(self, step: int, backbone) -> dict[str, float]:
        optuna = require("optuna", "search")
        value = self.scorer(backbone, self.device)
        if value != value:  # NaN: a diverged candidate scores worst
            value = float("-inf") if self.scorer.score.direction == "maximize" else float("inf")
        self.scores[step] = value
        self.trial.set_user_attr(f"score@{step}", value)
        if self.settings.prune and step < self.settings.steps:
            finished = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            peers = [t.user_attrs[f"score@{step}"] for t in finished  # trained ones: a repeat is not a second vote
                     if t.user_attrs.get("trained") and f"score@{step}" in t.user_attrs]
            if len(peers) >= self.settings.prune_after:
                median = statistics.median(peers)
                if self.scorer.score.better(median, value):
                    self.trial.set_user_attr("pruned", f"{self.scorer.score.name} {value:.4f} at step {step} is "
                                                       f"worse than the median {median:.4f} of {len(peers)} "
                                                       f"complete trials")
                    raise optuna.TrialPruned(self.trial.user_attrs.get("pruned"))
        return {f"search/{self.scorer.score.name}": value}


class Objective:
    """One trial (module docstring)."""

    def __init__(self, settings: SearchSettings, space: SearchSpace, scorer, study, bar=None):
        self.s, self.space, self.scorer, self.study, self.bar = settings, space, scorer, study, bar
        self.training = base_training(settings.task, settings.config)
        data = self.training.get("data") or {}
        self.cost_kwargs = {"embedding_size": 512, "num_points": int(data.get("points", 106))}
        self.rejected_in_a_row = self.rejected = self.trained = self.repeats_in_a_row = 0

    def __call__(self, trial) -> tuple[float, float]:
        optuna = require("optuna", "search")

        trial.set_user_attr("worker", this_worker())  # first: a trial of a killed worker is recognised
        spec = self.space.sample(lambda name, options: trial.suggest_categorical(name, options))
        cost = candidate_cost(spec, **self.cost_kwargs)
        # the cost before the spec: each attribute is its own journal write, and a kill between them must not
        # leave an architecture without its cost (a resume then refused the journal)
        for key, value in (("gflops", cost.gflops), ("mb", cost.mb), ("params", cost.params)):
            trial.set_user_attr(key, value)
        trial.set_user_attr("spec", spec)
        budget = self.s.budget
        why = over_budget(cost, budget.max_gflops, budget.max_mb)
        if why is None and cost.params > MAX_BUILD_PARAMS:
            # counted on the meta device; timing and training would build it for real (no size limit stopped it)
            why = f"{cost.params:,} parameters > {MAX_BUILD_PARAMS:,}: too large to build"
        if why is None and budget.max_ms is not None:
            net = build_backbone("searched", spec=spec, **self.cost_kwargs)
            ms = onnx_latency_ms(net, int(spec.get("input_size", 112)))
            trial.set_user_attr("ms", ms)
            if ms > budget.max_ms:
                why = f"{ms:.2f} ms/image > {budget.max_ms:g} (one ONNX Runtime thread, this machine)"
        if why is not None:
            trial.set_user_attr("rejected", why)
            self.rejected_in_a_row += 1
            self.rejected += 1
            raise optuna.TrialPruned(f"over budget: {why}")
        self.rejected_in_a_row = 0
        running = self._running_elsewhere(trial)
        if running is not None:  # another worker trains this architecture now: not twice
            trial.set_user_attr("skipped", f"the same architecture as trial {running.number}, being trained by "
                                           f"another worker")
            raise optuna.TrialPruned(trial.user_attrs["skipped"])
        same = self._same_as(trial)
        if same is not None:  # the sampler proposed a trained architecture again: its result, not counted
            self.repeats_in_a_row += 1
            trial.set_user_attr("same_as", same.number)
            for key, value in same.user_attrs.items():
                if key.startswith("score"):
                    trial.set_user_attr(key, value)
            if same.state.name == "PRUNED":
                trial.set_user_attr("pruned", f"the same architecture as trial {same.number}, which was pruned")
                raise optuna.TrialPruned(trial.user_attrs["pruned"])
            return tuple(same.values)
        self.repeats_in_a_row = 0
        self.trained += 1
        trial.set_user_attr("trained", True)
        out = Path(self.s.out) / "trials" / f"{trial.number:04d}"
        cfg = trial_config(self.s.task, self.training, spec, data=self.s.data, steps=self.s.steps,
                           evaluations=self.s.evaluations, output=out, seed=self.s.seed, device=self.s.device)
        device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        observer = _TrialObserver(trial, self.study, self.scorer, self.s, device, self.bar)
        if self.bar is not None:
            self.bar.start_trial(trial.number, self.s.steps, cost.gflops)
        try:
            train(cfg, progress=False, observer=observer)
        except FloatingPointError as exc:
            trial.set_user_attr("failed", str(exc))
            raise
        finally:

            for path in rank_files(out).values():  # a finished trial's optimizer state: never resumed
                path.unlink(missing_ok=True)
        score = observer.scores[max(observer.scores)]
        trial.set_user_attr("score", score)
        return score, cost.gflops

    def _running_elsewhere(self, trial):
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number != trial.number and t.params == trial.params and t.user_attrs.get("trained") \
                    and _worker_alive(t.user_attrs.get("worker")):
                return t
        return None

    def _same_as(self, trial):
        """A trained trial (complete or pruned) of the same architecture, if any."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if t.number != trial.number and t.params == trial.params and t.user_attrs.get("trained"):
                return t
        return None


def _check_fingerprint(study, expected: dict, desc: str) -> None:
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        raise ConfigError(f"{desc}: the study {STUDY_NAME!r} was not started by visrec search (no settings "
                          f"recorded); choose another --out or --storage")
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise ConfigError(f"{desc}: the study was started with {key} = {json.dumps(recorded.get(key))}; this "
                              f"run asks {json.dumps(value)}. Resume with the same settings, or start another "
                              f"search in another --out")


def prepare(settings: SearchSettings):
    """Everything checked before anything is written: the space, the budget against the space's least
    candidate, the training settings (a trial config is built), the held-out data (read once) and the training
    data's presence. Returns (space, scorer)."""
    space = settings.space()
    budget = settings.budget
    if budget.protocol is not None:
        check_protocol_fits(budget.protocol, settings.task, space)
    training = base_training(settings.task, settings.config)
    points = int((training.get("data") or {}).get("points", 106))
    check_budget_reachable(space, budget.max_gflops, budget.max_mb, embedding_size=512, num_points=points)
    if settings.trials < 1 or settings.steps < 1 or settings.evaluations < 1:
        raise ConfigError("trials, steps and evaluations must each be at least 1")
    if not Path(settings.data).exists():
        raise ConfigError(f"--data {settings.data}: no such file or directory")
    cfg = trial_config(settings.task, training, space.least(), data=settings.data, steps=settings.steps,
                       evaluations=settings.evaluations, output=Path(settings.out) / "trials" / "0000",
                       seed=settings.seed, device=settings.device)

    # the training data is opened (and its size checked) once here, not found wanting in the first trial
    dataset = TASKS.get(cfg.task)(cfg, RunContext(device=torch.device("cpu")), "search").train_dataset()
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f"--data {settings.data}: {len(dataset)} training items, fewer than one batch "
                          f"({cfg.batch_size}); use more data or a smaller batch_size in --config")
    return space, scorer_for(settings.task, settings.val, target_fpr=settings.target_fpr, training=training)


def open_search(settings: SearchSettings, space: SearchSpace, *, resume: bool):
    """(study, storage description) — created, or loaded with ``resume`` after its settings are compared."""
    optuna = require("optuna", "search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(settings.out)
    if settings.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    storage, desc = open_storage(settings.storage, out)
    expected = settings.fingerprint(space)
    scorer_direction = "maximize" if settings.task == "faces" else "minimize"
    if _has_study(storage):
        # a worker joining (or resuming) a study seeds its sampler by the study's length, so two workers that
        # join the same study do not propose the same startup candidates
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        study.sampler = _sampler(settings.seed + 7919 * (1 + len(study.trials)))
        if "settings" not in study.user_attrs and not study.trials:
            # a search killed between creating its study and recording the settings: nothing else was written,
            # so this run takes the study over (with or without --resume) as the killed one would have
            study.set_user_attr("settings", expected)
            _check_fingerprint(study, expected, desc)
            return study, desc
        if not resume:
            raise ConfigError(f"{desc} already holds a search ({len(study.trials)} trials): pass --resume to continue "
                              f"it or to join it as another worker, or choose another --out")
        _check_fingerprint(study, expected, desc)
        return study, desc
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=_sampler(settings.seed),
                                load_if_exists=True,
                                directions=[scorer_direction, "minimize"])
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", expected)
    _check_fingerprint(study, expected, desc)
    return study, desc


@dataclass
class WorkerResult:
    storage: str
    ran: int  # trials this worker trained
    rejected: int
    recovered: list[int] = field(default_factory=list)
    converged: bool = False  # stopped early: the sampler kept proposing architectures already trained


def run_worker(settings: SearchSettings, *, resume: bool = False, progress: bool = True) -> WorkerResult:
    """Run trials until the study has ``settings.trials`` counted trials (module docstring)."""
    require("optuna", "search")  # the install hint comes before any data is read
    space, scorer = prepare(settings)
    study, desc = open_search(settings, space, resume=resume)
    recovered = recover_abandoned(study) if resume else []
    done = len(counted_trials(study))
    if done >= settings.trials:
        raise ConfigError(f"the search in {desc} is finished: {done} trials trained of --trials {settings.trials}; "
                          f"raise --trials to run more (nothing was changed)")
    bar = _Bar(settings.trials, done) if progress else None
    objective = Objective(settings, space, scorer, study, bar)
    cap = max(200, 20 * settings.trials)  # proposals over budget in a row before the space is called hopeless
    repeat_cap = max(50, 5 * settings.trials)  # trained architectures proposed again in a row: converged
    converged, counted = False, done
    try:
        while (counted := len(counted_trials(study))) < settings.trials:  # the journal is read once a round
            if bar is not None:
                bar.finished(counted, objective.rejected)
            study.optimize(objective, n_trials=1, catch=(FloatingPointError,), gc_after_trial=False)
            if objective.repeats_in_a_row >= repeat_cap:
                converged = True
                break
            if objective.rejected_in_a_row >= cap:
                raise ConfigError(f"{cap} candidates in a row were over the budget ({settings.budget.describe()}): "
                                  f"the space's choices are mostly too large; narrow them (the least candidate "
                                  f"fits, so the budget can be met)")
    finally:
        if bar is not None:
            bar.finished(counted, objective.rejected)
            bar.close()
    return WorkerResult(desc, objective.trained, objective.rejected, recovered, converged)


class _Bar:
    """Two Rich progress bars: the search's trials, and the steps of the trial being trained."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), transient=False)
        self.progress.start()
        self.trials = self.progress.add_task("trials", total=total, completed=done, note="")
        self.trial = None

    def start_trial(self, number: int, steps: int, gflops: float) -> None:
        if self.trial is not None:
            self.progress.remove_task(self.trial)
        self.trial = self.progress.add_task(f"trial {number}", total=steps, note=f"{gflops:.3f} GFLOPs")

    def step(self, step: int, total: int) -> None:
        if self.trial is not None:
            self.progress.update(self.trial, completed=step, total=total)

    def finished(self, counted: int, rejected: int) -> None:
        if self.trial is not None:
            self.progress.remove_task(self.trial)
            self.trial = None
        self.progress.update(self.trials, completed=counted, note=f"{rejected} rejected over budget")

    def close(self) -> None:
        self.progress.stop()


# --- results ---------------------------------------------------------------------------------------------

@dataclass
class TrialRow:
    number: int
    status: str  # complete | pruned | repeat | rejected | skipped | failed | abandoned | running | waiting
    score: float | None
    gflops: float | None
    mb: float | None
    ms: float | None
    note: str
    spec: dict | None
    same_as: int | None = None


@dataclass
class SearchResult:
    storage: str
    settings: dict
    score_name: str
    direction: str
    rows: list[TrialRow]
    best: TrialRow | None
    pareto: list[int]  # trial numbers on the Pareto front (metric vs GFLOPs)


def _row(t, desc: str, task: str) -> TrialRow:
    """One trial as the report shows it, its recorded figures checked (:func:`_checked`): the journal is a
    file like any other, and a NaN score must not become the best trial nor a bad spec an exported config."""
    a = t.user_attrs
    state = t.state.name
    if a.get("abandoned"):
        status, note = "abandoned", a["abandoned"]
    elif a.get("rejected"):
        status, note = "rejected", f"over budget: {a['rejected']}"
    elif a.get("skipped"):
        status, note = "skipped", a["skipped"]
    elif a.get("same_as") is not None:
        status, note = "repeat", ""
    elif state == "PRUNED":
        status, note = "pruned", a.get("pruned", "")
    elif state == "FAIL":
        status, note = "failed", a.get("failed", "")
    else:
        status, note = state.lower(), ""
    note = str(note)
    if a.get("same_as") is not None:
        note = (note + "; " if note else "") + f"same architecture as trial {a['same_as']}"
    if a.get("retry_of") is not None:
        note = (note + "; " if note else "") + f"retry of trial {a['retry_of']}"
    steps = sorted(int(k.split("@")[1]) for k in a if k.startswith("score@") and k.split("@")[1].isdigit())
    score = a.get("score", a.get(f"score@{steps[-1]}") if steps else None)
    row = TrialRow(t.number, status, score, a.get("gflops"), a.get("mb"), a.get("ms"), note, a.get("spec"),
                   a.get("same_as"))
    _checked(row, desc, task)
    return row


# Statuses a worker reaches only after recording the trial's cost (it decided on the budget). An abandoned,
# failed or running trial may have stopped, or be, between recording its spec and its cost.
COSTED = ("complete", "pruned", "repeat", "rejected", "skipped")


def _checked(row: TrialRow, desc: str, task: str) -> None:
    """A :class:`DataError` naming the storage, the trial and the field unless the row's figures are numbers in
    their range (a score is a TPR in [0, 1] or an NME >= 0; a diverged trial's is the worst infinity) and its
    spec passes the architecture check for the study's task."""
    def bad(name: str, why: str):
        raise DataError(why, path=desc, record=f"trial {row.number}", field=name)

    def real(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    for name in ("gflops", "mb", "ms"):
        value = getattr(row, name)
        if value is not None and not (real(value) and 0 <= value < float("inf")):
            bad(name, f"{shown(value)} is not a finite number >= 0")
    if row.score is not None:
        ok = real(row.score) and (row.score == float("-inf") or 0 <= row.score <= 1 if task == "faces"
                                  else row.score >= 0)
        if not ok:
            bad("score", f"{shown(row.score)} is not a {'TPR in [0, 1]' if task == 'faces' else 'NME >= 0'}")
    if row.same_as is not None and not (isinstance(row.same_as, int) and not isinstance(row.same_as, bool)
                                        and 0 <= row.same_as < row.number):
        bad("same_as", f"{shown(row.same_as)} is not an earlier trial's number")
    if row.spec is not None:
        if row.gflops is None and row.status in COSTED:
            bad("gflops", f"missing for a {row.status} trial with an architecture")
        try:
            spec = check_spec(row.spec, "spec")
        except ConfigError as exc:
            bad("spec", str(exc))
        if spec.task != task:
            bad("spec", f"its task is {spec.task!r}, the study's is {task!r}")


def summarise(study, desc: str) -> SearchResult:
    """The study's trials as rows, its best trial and Pareto front; a trial whose record is not what a search
    writes is a :class:`DataError` naming the storage and the trial (:func:`_checked`)."""
    settings = study.user_attrs.get("settings", {})
    direction = study.directions[0].name.lower()
    task = settings.get("task", "faces")
    if task not in ("faces", "landmarks") or (task == "faces" and not isinstance(settings.get("target_fpr"),
                                                                                  (int, float))):
        raise DataError("the study's recorded settings are not a search's (task, target_fpr)", path=desc,
                        field="settings")
    score_name = f"tpr@{settings.get('target_fpr'):g}" if task == "faces" else "nme"
    rows = [_row(t, desc, task) for t in study.get_trials(deepcopy=False)]
    complete = [r for r in rows if r.status == "complete" and r.score is not None]
    sign = -1 if direction == "maximize" else 1
    best = min(complete, key=lambda r: (sign * r.score, r.gflops)) if complete else None
    pareto = sorted(t.number for t in study.best_trials if t.user_attrs.get("trained")) if complete else []
    return SearchResult(desc, settings, score_name, direction, rows, best, pareto)


EXPORTABLE = ("complete", "pruned", "repeat")  # trained trials with a score; a failed one has none worth keeping


def export_spec(result: SearchResult, out: Path, trial: int | None, dest: Path, *, steps: int | None = None,
                output: str | None = None) -> Path:
    """Write the run config that trains the best (or the given) trial's architecture with the search's
    training settings: ``visrec train --config DEST``. The schedule is the trial's (``steps`` replaces its
    length); the held-out scoring of the search is not part of it."""
    rows = {r.number: r for r in result.rows}
    if trial is None:
        if result.best is None:
            raise ConfigError(f"{result.storage}: no complete trial yet, nothing to export")
        row = result.best
    elif trial not in rows:
        raise ConfigError(f"{result.storage}: no trial {trial} (trials 0-{len(rows) - 1})")
    else:
        row = rows[trial]
        if row.spec is None or row.status not in EXPORTABLE:
            raise ConfigError(f"trial {trial} is {row.status}: only a complete, pruned or repeated trial has a "
                              f"trained architecture to export")
    trained = row.number if row.same_as is None else row.same_as  # an identical architecture trained once
    source = Path(out) / "trials" / f"{trained:04d}" / "config.yaml"
    if not source.exists():
        raise ConfigError(f"{source}: the trial's run config is missing (was the run directory moved?)")
    raw = read_yaml_mapping(source)
    raw["model"] = {"name": "searched", "spec": row.spec}
    raw["output"] = output or f"runs/searched-trial{row.number}"
    if steps is not None:
        raw["schedule"] = {**raw.get("schedule", {}), "max_steps": int(steps)}
    raw.pop("val_every", None)
    raw["checkpoint_every"] = 200
    parse_config(raw, source=str(dest))  # what is written is a run config `visrec train` takes
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp:
        tmp.write_text(f"# architecture of search trial {row.number}, {row.status} ({result.score_name} "
                       f"{row.score}, {row.gflops:.4f} GFLOPs) from {result.storage}\n"
                       + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return dest
