"""``data.skip_bad``: the training records a task skipped, counted across resumes (kept in the resume file as
plain tensors and strings, ``weights_only``-loadable), reported once at the end of a run: one stderr line and one
``metrics.jsonl`` row."""

from __future__ import annotations

import sys

import torch

MAX_EXAMPLES = 5  # 'where: why' lines kept


def skipped_from(state: dict | None) -> dict:
    saved = state.get("skipped") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        return {"items": set(), "examples": []}
    items = saved.get("items")
    items = set(items.tolist()) if isinstance(items, torch.Tensor) else set()
    examples = [str(e) for e in saved.get("examples", []) if isinstance(e, str)]
    return {"items": items, "examples": examples}


def merge_skipped(prior: dict, now: dict | None) -> dict:
    """{"count", "items" (dataset indices skipped when read), "listed" (skipped when the data set was
    indexed: not images, empty identities), "examples" (a few 'where: why' lines)} of the run so far."""
    now = now or {}
    items = set(prior["items"]) | set(now.get("items", ()))
    listed = int(now.get("listed", 0))
    examples = list(dict.fromkeys([*prior["examples"], *now.get("examples", [])]))[:MAX_EXAMPLES]
    return {"count": len(items) + listed, "items": items, "listed": listed, "examples": examples}


def plain_skipped(skipped: dict) -> dict:
    """The checkpoint's form (plain data, ``weights_only``-loadable)."""
    return {"items": torch.tensor(sorted(skipped["items"]), dtype=torch.int64), "examples": skipped["examples"]}


def report_skipped(skipped: dict, ctx, log_file, step: int) -> None:
    """One stderr line and one metrics.jsonl row saying how many records data.skip_bad skipped (none: silent);
    ``ctx``: the run's :class:`visrec.train.task.RunContext` (only the main process reports)."""
    if not ctx.is_main or not skipped["count"]:
        return
    read = len(skipped["items"])
    print(f"train: data.skip_bad skipped {skipped['count']} unreadable training record"
          f"{'s' if skipped['count'] != 1 else ''} ({skipped['listed']} when indexing the data set, {read} when "
          f"reading it); first: {'; '.join(skipped['examples'][:3])}", file=sys.stderr, flush=True)
    if log_file:
        log_file.append({"step": step, "skipped": {"count": skipped["count"], "when_indexing": skipped["listed"],
                                                   "when_reading": read, "examples": skipped["examples"]}})
