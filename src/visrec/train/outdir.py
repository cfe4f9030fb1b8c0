"""What a run may find in its output folder, and the config record it writes there.

A run writes ``last.rank{r}.pt``, ``model.pt``, ``backbone.pth``, ``metrics.jsonl`` and ``config.yaml``
(:mod:`visrec.train.checkpoint`) and nothing else; files of other names (notes, reports, precomputed teacher
features) are never touched. A ``config.yaml`` that a ``--resume`` finds holding another config (the usual case
after fixing one; or a file the user wrote there) is renamed ``config.before-N.yaml`` (N = 1, 2, ...: a history
of the configs the run was resumed under), never overwritten. :func:`check_start` decides, before any work,
whether this run may write there:

* a fresh run (no ``--resume``) refuses a folder that holds any of those files from an earlier run (a run
  killed before its first checkpoint leaves a log and a config; another run's folder its model files), naming
  them: it would overwrite them. Two things lose nothing and pass: an empty ``metrics.jsonl`` and a
  ``config.yaml`` that already holds this run's very config (it is left as written, comments and all).
* ``--resume`` with a checkpoint continues it (``checkpoint.check_resume``); with no checkpoint it starts at
  step 0 and says so, replacing the rows of a log left by a run that stopped before its first checkpoint (no
  step is logged twice) — unless the folder holds ``model.pt``/``backbone.pth``: trained weights with nothing
  to resume them from (a finished search trial, whose checkpoints ``visrec search`` removes, or another run's
  folder) are refused rather than trained over.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from visrec._files import replacing
from visrec._structured import MAX_CONFIG_FILE_BYTES
from visrec.config import RunConfig, parse_config, safe_load
from visrec.data.text import read_text
from visrec.errors import ConfigError
from visrec.train import checkpoint as ckpt

MODEL_FILES = ("model.pt", "backbone.pth")


def check_start(out: Path, resume: bool, cfg: RunConfig) -> str | None:
    """ConfigError (naming the files and what to do) when this run may not write into ``out``; else the notice
    a ``--resume`` without a checkpoint prints (None otherwise). Reads only; creates nothing."""
    ranks = ckpt.rank_files(out)
    if not resume:
        if ranks:
            raise ConfigError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose "
                              f"another output directory (--set output=...)")
        found = [name for name in (*MODEL_FILES, "metrics.jsonl", "config.yaml") if _holds(out / name, cfg)]
        if any(name in MODEL_FILES for name in found):
            raise ConfigError(f"{out} already holds {', '.join(found)} of another run (with no checkpoint to resume), "
                              f"which a new run would overwrite: choose another output directory (--set output=...), "
                              f"or move them away first")
        if found:
            raise ConfigError(f"{out} already holds {', '.join(found)} of an earlier run (one stopped before its first "
                              f"checkpoint, or another run's files), which a new run would overwrite: pass --resume to "
                              f"run it again from step 0 (its log rows are replaced), or choose another output "
                              f"directory (--set output=...)")
        return None
    if ranks:
        return None
    kept = [name for name in MODEL_FILES if _exists(out / name)]
    if kept:
        raise ConfigError(f"--resume: {out} holds {', '.join(kept)} but no checkpoint (last.rank*.pt) to continue "
                          f"from (a finished run whose checkpoints were removed, as visrec search does a trial's, or "
                          f"another run's files); training from step 0 would overwrite them: move them away first, or "
                          f"choose another output directory (--set output=...)")
    rows = ckpt.rows_after(out / "metrics.jsonl", 0)  # what starting at step 0 replaces
    return (f"--resume: no checkpoint in {out} yet; starting from step 0"
            + (f"; the {rows} row{'s' if rows != 1 else ''} in its metrics.jsonl, logged by a run that stopped before "
               f"its first checkpoint, {'are' if rows != 1 else 'is'} replaced by this run's" if rows else ""))


def write_config(out: Path, cfg: RunConfig) -> Path | None:
    """``config.yaml``: the run's whole config, as YAML a later ``visrec train`` takes back (unknown keys are
    refused there); written to a temporary name and renamed. A file that already holds this config (the
    ``--config`` given may be this very file) is left as written; one holding anything else is first renamed
    ``config.before-N.yaml`` (the first free N), whose path is returned (None when nothing was renamed)."""
    path = out / "config.yaml"
    if _same_config(path, cfg):
        return None
    kept = None
    with replacing(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        if _exists(path):
            n = 1
            while _exists(out / f"config.before-{n}.yaml"):
                n += 1
            kept = out / f"config.before-{n}.yaml"
            os.rename(path, kept)  # the same folder: an atomic rename, never a copy that a crash could cut short
    return kept


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _holds(path: Path, cfg: RunConfig) -> bool:
    """Whether ``path`` holds something a fresh run would overwrite and lose."""
    if not _exists(path):
        return False
    if path.name == "metrics.jsonl" and path.is_file():
        return path.stat().st_size > 0
    if path.name == "config.yaml":
        return not _same_config(path, cfg)
    return True


def _same_config(path: Path, cfg: RunConfig) -> bool:
    try:
        text = read_text(path, MAX_CONFIG_FILE_BYTES)  # a regular file of bounded length
        return parse_config(safe_load(text), source=str(path)) == cfg
    except Exception:  # noqa: BLE001 - unreadable, not YAML, not a config, another one: not this run's record
        return False
