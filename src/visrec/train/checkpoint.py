"""Checkpoints that resume exactly, and the exported-model file other commands load.

Files in a run's output directory:
  ``last.rank{r}.pt``  everything rank r needs to continue: every module's state (PartialFC holds only
                        this rank's class shard), optimizer, scheduler, grad scaler, RNG states (python,
                        numpy, torch CPU, CUDA), the data position (epoch, step in epoch, global step), the
                        number of processes that wrote it ("world_size", "rank") and the class sharding of
                        every sharded module ("sharding": {module: {"class_start", "num_local",
                        "num_classes"}}). A run resumes only under the world size that wrote it
                        (:func:`check_resume`): the shards and the data order depend on it.
  ``metrics.jsonl``     one JSON row per logged step; on every start the rows after the step the run starts
                        from are dropped (:func:`truncate_log`), so no step is ever logged twice.
  ``model.pt``          {"model_config": {"name", **kwargs}, "backbone": state_dict, "contract": the model's
                        contract (``visrec.models.contract.ModelContract.to_dict()``), "step", "metrics"}
                        — what ``visrec budget/export/eval/serve`` load via ``visrec.models.load_model``.
                        The rank files hold the same "model_config", "backbone" and "contract" entries.
  ``backbone.pth``      the bare backbone state_dict, as arcface_torch saves it.
Every file is written to a temporary name and renamed, so a crash mid-write leaves the previous file.
Every file is read with ``weights_only=True`` (:func:`visrec._torchfile.read_torch_file`): they hold plain
data only (tensors, dicts, lists, tuples, strings, numbers), so a downloaded file cannot run code on load.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visrec._files import replacing, writing_into
from visrec._structured import loads_json
from visrec._torchfile import atomic_save, read_torch_file  # noqa: F401 (atomic_save: re-exported)
from visrec.errors import ConfigError, DataError
from visrec.models.model_file import weights_mismatch


def rng_state() -> dict[str, Any]:
    """Every RNG state as plain data (tuples, ints, floats, strings, tensors), so that the resume file
    loads with ``weights_only=True``: numpy's ``get_state()`` holds an ndarray, stored here as a tensor."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: a resume file of visrec before the plain layout
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_path(output: Path, rank: int) -> Path:
    return Path(output) / f"last.rank{rank}.pt"


def load_rank_state(output: Path, rank: int) -> dict[str, Any] | None:
    path = rank_path(output, rank)
    if not path.exists():
        return None
    return read_torch_file(path)  # weights_only; a torn, foreign or code-carrying file: DataError naming it


def resume_state(output: Path, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's resume state (None: no checkpoint yet), after :func:`check_resume` found the checkpoint
    resumable under ``world_size`` processes."""
    state = load_rank_state(output, rank)
    check_resume(output, rank, world_size, state)
    return state


def rank_files(output: Path) -> dict[int, Path]:
    """The per-rank resume files present in ``output``, by rank."""
    found = {}
    for path in Path(output).glob("last.rank*.pt"):
        m = re.fullmatch(r"last\.rank(\d+)\.pt", path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def sharding(modules: dict) -> dict[str, dict[str, int]]:
    """The class sharding of every module that holds a rank-local shard (a ``sharding`` attribute, as
    PartialFC has): {module name: {"class_start", "num_local", "num_classes"}}."""
    return {name: dict(m.sharding) for name, m in modules.items() if isinstance(getattr(m, "sharding", None), dict)}


def _shards_ok(shards) -> bool:
    """Whether a resume file's ``sharding`` entry is absent or {module: {class_start, num_local, num_classes}}."""
    keys = {"class_start", "num_local", "num_classes"}
    return shards is None or isinstance(shards, dict) and all(
        isinstance(s, dict) and keys <= set(s) and all(type(s[k]) is int for k in keys) for s in shards.values())


def _describe_shards(shards: dict) -> str:
    return "; ".join(f"{name}: classes {s['class_start']}..{s['class_start'] + s['num_local'] - 1} of "
                     f"{s['num_classes']}" for name, s in shards.items())


# What a resume may change: how long the run goes on, how often it logs, saves and validates, what it validates
# on, where its data now lies (a data set moved to another disk or machine) and how this machine runs the step.
# Anything else (seed, batch_size, model, loss, optim, the schedule's shape, the data's own options) the resume
# file decides: the optimizer and scheduler states hold the recorded lr, momentum and decay, the data position
# comes from the global step and batch size, the order from the seed. A change there would be recorded as if
# used and not be (or make another run), so it is refused.
RESUMABLE = {"output", "schedule.max_steps", "schedule.epochs", "log_every", "checkpoint_every", "val_every",
             "num_workers", "device", "amp", "compile", "channels_last", "cuda_graph", "deterministic", "init",
             "index", "data.train", "data.val", "data.val_flip_test", "data.val_target", "data.decode",
             "data.catalogue", "data.labels", "data.videos"}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def check_same_run(state: dict[str, Any], cfg, path: Path) -> None:
    """Refuse (``ConfigError`` naming each setting, its recorded and its new value) a resume whose config
    changes what the resume file decides (:data:`RESUMABLE` lists what may change). The recorded config is
    the one saved with the state; a setting either side lacks (a file written by another version) is not
    compared. Nothing is compared for a state without a recorded config."""
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        return
    now = _flat(cfg.model_dump(mode="json"))
    before = _flat(recorded)
    changed = [key for key in sorted(now.keys() & before.keys())
               if now[key] != before[key] and not any(key == r or key.startswith(r + ".") for r in RESUMABLE)]
    if changed:
        shown = "; ".join(f"{k}: {json.dumps(before[k])} in the resume file, {json.dumps(now[k])} now"
                          for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(f"{path}: --resume continues the run this file records, and these settings differ from "
                          f"it: {shown}{more}. The resume file decides them (its optimizer, schedule and data "
                          f"order): set them as recorded, or start a new run in another output folder")


def check_resume(output: Path, rank: int, world_size: int, state: dict[str, Any] | None) -> None:
    """Refuse (ConfigError naming both world sizes and what to do) to resume ``output`` under a number of
    processes other than the one that wrote it. Every rank reaches the same verdict from the same files:
    the world size recorded in the checkpoints (in the rank files' count for files written before it was
    recorded). PartialFC's class centres are split per process and each process's data share and RNG
    state are its own, so another world size cannot continue the same run; it refuses rather than let
    new ranks start from step 0 beside ranks that resume."""
    files = rank_files(output)
    if not files:
        return
    source = rank_path(output, rank)
    if state is None:  # this rank has no file while others do: read what rank 0 (or the lowest) recorded
        source = next(iter(files.values()))
        state = read_torch_file(source)
    if not isinstance(state, dict):
        raise DataError("is not a resume file (a mapping of states)", path=source)
    saved = state.get("world_size")
    if saved is not None and (type(saved) is not int or not 0 < saved <= 1 << 20):
        raise DataError(f"world_size {saved!r} is not a number of processes", path=source, field="world_size")
    if not _shards_ok(state.get("sharding")):
        raise DataError("'sharding' is not {module: {class_start, num_local, num_classes}}", path=source,
                        field="sharding")
    saved = saved if saved is not None else len(files)
    step = state.get("global_step", "?")
    if saved == world_size and set(files) == set(range(world_size)):
        return
    shards = _describe_shards(state.get("sharding") or {})
    launcher = "visrec train --config CONFIG --resume" if saved == 1 else \
        f"torchrun --nproc_per_node={saved} -m visrec.cli train --config CONFIG --resume"

    if saved == world_size:  # the right world size, but a rank's file is missing or a stray one is there
        missing = sorted(set(range(world_size)) - set(files))
        extra = sorted(set(files) - set(range(world_size)))
        problem = (f"lacks the file of rank(s) {missing}; a run resumes only with every rank's file" if missing else
                   f"also holds files of rank(s) {extra} beyond its {saved} processes; move them away")
        raise ConfigError(f"{output}: checkpoint of {saved} processes (step {step}) {problem}")
    raise ConfigError(
        f"{output} was checkpointed by {saved} process{'es' if saved != 1 else ''} at step {step} "
        f"(files for ranks {sorted(files)}{'; ' + shards + ' on rank 0' if shards else ''}); this run has "
        f"{world_size}. The class centres are sharded per process and the data order depends on the number of "
        f"processes, so a checkpoint resumes only under the world size that wrote it: run `{launcher}`, or "
        f"start a new run from its weights with `visrec finetune --config CONFIG --model {output}` under {world_size} "
        f"process{'es' if world_size != 1 else ''} (the backbone carries over; the class centres start fresh).")


def thread_count_notice(state: dict[str, Any], device: torch.device, deterministic: bool) -> str | None:
    """The one-line notice a deterministic CPU resume prints when this process runs another number of
    intra-op threads than the one that wrote the checkpoint (``cpu_threads``), else None. CPU kernels split
    their reductions by thread, so the same run under 1 and 2 threads differs in the last bits after one
    step and visibly after a dozen: bit-exact resume holds for the same thread count only. A file without
    the field (written before it was recorded) or with a value that is not a small positive int says
    nothing."""
    saved = state.get("cpu_threads")
    if not deterministic or device.type != "cpu" or type(saved) is not int or not 0 < saved <= 4096:
        return None
    now = torch.get_num_threads()
    if saved == now:
        return None
    return (f"--resume: the checkpoint was written with {saved} CPU thread{'s' if saved != 1 else ''}, this "
            f"process runs {now}; the resumed weights will not equal an uninterrupted run's bit for bit "
            f"(set OMP_NUM_THREADS={saved} for that)")


def check_sharding(saved: dict[str, Any] | None, current: dict[str, dict[str, int]], path: Path) -> None:
    """ConfigError when a resumed module's class shard differs from the one checkpointed (e.g. the training
    set now has another number of identities), naming the module and both shards."""
    if not saved:
        return

    for name, now in current.items():
        was = saved.get(name)
        if was is not None and dict(was) != now:
            raise ConfigError(f"{path}: {name} was checkpointed with {_describe_shards({name: was})}, this run "
                              f"builds {_describe_shards({name: now})}; the training data or world size changed")


def restore(state: dict[str, Any], modules: dict, opt, scheduler, scaler, path: Path) -> int:
    """Load a resume file's states into this run's ``modules``, optimizer, scheduler and grad scaler, set the
    RNG states, and return the global step to continue from. The file may be another run's or a hand-edited
    one, so its layout is checked first and every module's weights against the module this config builds
    (names and shapes: :func:`visrec.models.model_file.weights_mismatch`), as are the optimizer's per-parameter
    tensors: a ``DataError`` naming ``path`` and what differs; a changed class shard is a ``ConfigError``
    (:func:`check_sharding`)."""
    check_sharding(state.get("sharding"), sharding(modules), path)
    saved = state.get("modules")
    if not isinstance(saved, dict) or set(saved) != set(modules):
        have = sorted(map(str, saved)) if isinstance(saved, dict) else "none"
        raise DataError(f"holds the modules {have} where this run builds {sorted(modules)}: not a resume file of "
                        "this run's task", path=path, field="modules")
    for name, module in modules.items():
        weights = saved[name]
        if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in weights.items()):
            raise DataError(f"the {name}'s state is not a state dict (name -> tensor)", path=path, field="modules")
        own = module.state_dict()
        shape = next((k for k in own if k in weights and weights[k].shape != own[k].shape), None)
        if shape is not None:
            raise DataError(f"this checkpoint's {name} has {shape} of shape {tuple(weights[shape].shape)} where the "
                            f"config builds {tuple(own[shape].shape)} (a changed model/loss option or another "
                            f"run's file): {weights_mismatch(own, weights)}", path=path, field="modules")
        problem = weights_mismatch(own, weights)
        if problem:
            raise DataError(f"this checkpoint's {name} {problem}", path=path, field="modules")
    step = state.get("global_step")
    if type(step) is not int or not 0 <= step < 1 << 62:
        raise DataError(f"global_step {step!r} is not a step number", path=path, field="global_step")
    for name, module in modules.items():
        module.load_state_dict(saved[name])
    for key, target in (("optimizer", opt), ("scheduler", scheduler), ("scaler", scaler), ("rng", None)):
        try:
            if not isinstance(state.get(key), dict):
                raise TypeError("missing or not a mapping")
            target.load_state_dict(state[key]) if target is not None else set_rng_state(state[key])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
            raise DataError(f"its {key} state does not fit this run: {type(exc).__name__}: {str(exc)[:200]}",
                            path=path, field=key) from None
    for group in opt.param_groups:  # another optimizer's groups (optim.name changed) lack this one's settings
        missing = sorted(set(opt.defaults) - set(group))
        if missing:
            raise DataError(f"its optimizer state has no {', '.join(map(repr, missing))}: saved by another optimizer "
                            f"than this run's {type(opt).__name__} (was optim.name changed?)", path=path,
                            field="optimizer")
    for param, buffers in opt.state.items():  # momentum / Adam moments: one value per weight
        for key, value in buffers.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise DataError(f"its optimizer's {key!r} has shape {tuple(value.shape)} for a weight of shape "
                                f"{tuple(param.shape)}", path=path, field="optimizer")
    return step


class MetricsLog:
    """``metrics.jsonl`` open for appending: :meth:`append` writes one JSON row and flushes it; a write the system
    refuses (a full disk) is a ``StorageError`` naming the file, not the system's error naming none."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        with writing_into(self.path):
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a row that could not be written has been reported already
            self._fh.close()


# The longest metrics-log line read: a row visrec writes is a few hundred bytes (a few KB with many validation
# sets); a longer line was not written by a run, and is refused before it is held.
MAX_LOG_LINE_BYTES = 1 << 20


def _log_rows(path: Path):
    """Each line of the metrics log with its row: a JSON object, or None for a line that is not one (the log is
    a record, not an input: such lines are passed over, never an error). A line longer than
    :data:`MAX_LOG_LINE_BYTES` is a ``DataError`` naming the file and the line, read no further."""
    with open(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_LOG_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LOG_LINE_BYTES:
                raise DataError(f"a line of more than {MAX_LOG_LINE_BYTES:,} bytes: no run logs one; remove it "
                                "(or the file) to go on", path=path, record=f"line {lineno}")
            line = raw.decode("utf-8", errors="surrogateescape")
            try:
                row = loads_json(line)
            except ValueError:
                row = None
            yield line, row if isinstance(row, dict) else None


def _after(row: dict | None, step: int) -> bool:
    """Whether ``row`` logs a step after ``step``."""
    row_step = row.get("step") if row is not None else None
    return isinstance(row_step, (int, float)) and row_step > step


def rows_after(path: Path, step: int) -> int:
    """How many rows of the metrics log :func:`truncate_log` would drop for a run starting at ``step``."""
    path = Path(path)
    return sum(_after(row, step) for _, row in _log_rows(path)) if path.is_file() else 0


def truncate_log(path: Path, step: int) -> int:
    """Drop the rows of the metrics log whose "step" is after ``step`` (the step the run starts from), so a
    resumed (or restarted) run never logs a step twice. The file is rewritten to a temporary name, fsynced
    and renamed over the original: a crash mid-rewrite leaves the old file whole. Lines that are not JSON
    objects with a step are kept as they are, a torn last line closed with a line break. Returns the number of
    rows dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    dropped, torn = 0, False
    for line, row in _log_rows(path):  # one pass to decide, a second to write: never the whole log in memory
        dropped += _after(row, step)
        torn = not line.endswith("\n")
    # a last line a kill tore is closed too: the next row appended would otherwise be glued onto it, and lost
    if dropped or torn:
        with replacing(path, durable=True) as tmp:
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
                for line, row in _log_rows(path):
                    if not _after(row, step):
                        fh.write(line if line.endswith("\n") else line + "\n")
    return dropped


def logged_at(path: Path, step: int) -> tuple[dict[str, float] | None, float]:
    """What the metrics log holds for a run that ended at ``step``: (the validation metrics logged at that
    step, or None when no such row is there; the last logged training loss, or NaN). A resumed run that
    had already finished answers from these instead of running its validation again. Rows that are not
    JSON objects, or whose fields have other types, are passed over: the log is a record, not an input."""
    metrics, loss = None, float("nan")
    path = Path(path)
    if not path.exists():
        return metrics, loss
    for _, row in _log_rows(path):
        if row is None:
            continue
        if isinstance(row.get("loss"), (int, float)):
            loss = float(row["loss"])
        val = row.get("val")
        if row.get("step") == step and isinstance(val, dict) and all(isinstance(v, (int, float)) for v in val.values()):
            metrics = {str(k): float(v) for k, v in val.items()}
    return metrics, loss


# Model-file reading lives with the models (visrec.models.loading); training code keeps these names.
from visrec.models.model_file import init_backbone, load_backbone, read_model_file as _read_torch_file  # noqa: E402,F401
