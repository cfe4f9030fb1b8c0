"""Batches onto the training device one step ahead, so the copy (or the GPU decode) overlaps the step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def _record(batch: Any, stream) -> None:
    """Tell the caching allocator that ``stream`` (the step's) uses tensors made on the side stream, so their
    memory is not reused before the step that reads them has run."""
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            _record(b, stream)
    elif isinstance(batch, dict):
        for b in batch.values():
            _record(b, stream)


def prefetch(batches: Iterable[Any], to_device: Callable[[Any], Any], device: torch.device) -> Iterator[Any]:
    """Yield ``to_device(batch)`` for each batch. On CUDA, batch k+1 is prepared on a side stream right after
    batch k is handed out: while the host waits for the DataLoader and launches the copy or decode, the GPU
    still runs step k (its kernels were queued asynchronously). Elsewhere each batch is prepared when asked.
    ``to_device`` must not draw random numbers (the order of draws would then depend on the prefetch)."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch)
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    it = iter(batches)

    def load():
        try:
            batch = next(it)
        except StopIteration:
            return None, False
        with torch.cuda.stream(side):
            return to_device(batch), True

    nxt, more = load()
    while more:
        main.wait_stream(side)
        current = nxt
        _record(current, main)
        nxt, more = load()
        yield current
