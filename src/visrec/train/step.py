"""One optimizer step, run eagerly or replayed from a CUDA graph (``train.cuda_graph``).

Why a graph: a MobileFaceNet step at batch 128 is several hundred small kernels, and on an H100 the host
takes longer to launch them than the GPU takes to run them. Captured once (forward, margin + PartialFC,
backward, clipping, optimizer, loss scaler) and replayed, the whole step costs one launch. What capture
needs, and what this module arranges:

- static shapes and no host synchronisation inside the step: the task says whether its step qualifies
  (``Task.capture_blocker``), a run under DDP or on a CPU does not (:func:`capture_blocker`);
- inputs at fixed addresses: each batch is copied into buffers captured with the graph;
- an optimizer that reads the learning rate from device memory: the schedule writes a tensor the graph
  reads (a float would be baked into the captured kernels), and the fused optimizer kernels take the loss
  scaler's ``found_inf`` on the device, so ``GradScaler.step`` never asks the host whether to skip;
- a few eager warm-up steps first (on a side stream, as the CUDA graph documentation prescribes): they
  create the optimizer state and let cuDNN pick its kernels. They are real training steps.

Replaying the graph runs the very kernels an eager step runs, so the numbers are those of an eager run with
the same (fused) optimizer. A run that cannot capture says why in one line and runs eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from visrec.errors import ConfigError

WARMUP_STEPS = 3
CAPTURE_ERROR_MODE = "thread_local"  # see CudaGraph.capture


def capture_blocker(device: torch.device, distributed: bool, task_blocker: str | None) -> str | None:
    """Why this run's step cannot be captured in a CUDA graph, or None when it can."""
    if device.type != "cuda":
        return f"{device.type} run: CUDA graphs need a CUDA device"
    if distributed:
        return ("DDP: its gradient buckets are all-reduced from autograd hooks as they fill, which is not "
                "captured here")
    return task_blocker


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[nn.Parameter], grad_clip: float | None) -> None:
    """Backward + (unscale, clip) + step, as every task trains. Nothing here reads a value back to the host
    (with a fused optimizer the scaler hands over its inf check as a device tensor), so it can be captured."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def lr_as_tensors(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's learning rate as a one-element tensor on ``device``: the LR schedule then fills it in
    place and a captured optimizer step reads the current value. Adam-style groups are marked capturable
    (their step counters already live on the device with the fused kernels)."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if "capturable" in group:
            group["capturable"] = True


def plain_lr(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or LR scheduler's ``state_dict`` with tensor learning rates as floats: a checkpoint
    written by a graphed run then resumes anywhere (on a CPU too) and reads like one written eagerly. The
    dicts ``state_dict`` returns are fresh copies: the live optimizer keeps its tensors."""
    for group in state.get("param_groups", ()):
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    if "_last_lr" in state:
        state["_last_lr"] = [float(v) if isinstance(v, torch.Tensor) else v for v in state["_last_lr"]]
    return state


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (list, tuple)):
        return [t for b in batch for t in _tensors(b)]
    if isinstance(batch, dict):
        return [t for k in sorted(batch) for t in _tensors(batch[k])]
    return []


def _signature(batch: Any) -> list[tuple]:
    return [(tuple(t.shape), t.dtype, t.device) for t in _tensors(batch)]


def _clone(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _clone(v) for k, v in batch.items()}
    return batch


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls :class:`StepRunner` makes."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def warmup_stream(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], Any]) -> Any:
        # thread_local: the DataLoader's pin-memory thread keeps allocating pinned host memory while this
        # thread captures; the default ("global") mode turns those calls into a failed capture and an error
        # raised in the loader. Only this thread's calls need to stay out of the graph.
        with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_ERROR_MODE):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class StepRunner:
    """Runs ``task.training_step`` + :func:`optimizer_step` on a batch already on the device.

    ``graph=None``: every step eager. Otherwise (a :class:`CudaGraph`) the first ``warmup`` calls run eagerly,
    the next captures the step once and every call from then on copies its batch into the captured buffers
    and replays. A batch of another shape (none arrives from the Trainer's sampler, which drops the tail)
    runs eagerly. Returns the step's loss tensor (a captured buffer in graph mode: read it before the next
    call)."""

    def __init__(self, training_step: Callable[[Any], torch.Tensor], opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, clip_params: list[nn.Parameter], grad_clip: float | None,
                 device: torch.device, amp_dtype: torch.dtype | None, graph=None, warmup: int = WARMUP_STEPS,
                 on_fallback: Callable[[str], None] | None = None):
        self.training_step, self.opt, self.scaler = training_step, opt, scaler
        self.clip_params, self.grad_clip = clip_params, grad_clip
        self.device, self.amp_dtype = device, amp_dtype
        self.graph, self.warmup = graph, warmup
        self.on_fallback = on_fallback
        self.calls, self.replays = 0, 0
        self._static_batch = self._static_loss = self._signature = None
        if graph is not None:
            lr_as_tensors(opt, device)

    @property
    def mode(self) -> str:
        return "eager" if self.graph is None else "cuda_graph"

    def _step(self, batch: Any, cache: bool = True) -> torch.Tensor:
        # autocast's weight-cast cache must be off inside a capture (its cached copies would be freed)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=cache):
            loss = self.training_step(batch)
        optimizer_step(loss, self.opt, self.scaler, self.clip_params, self.grad_clip)
        return loss

    def __call__(self, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.graph is None:
            return self._step(batch)
        if self.calls <= self.warmup:
            with self.graph.warmup_stream():
                return self._step(batch)
        if self._static_batch is None:
            return self._capture(batch)
        if _signature(batch) != self._signature:
            return self._step(batch)
        for dst, src in zip(_tensors(self._static_batch), _tensors(batch)):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self._static_loss

    def _capture(self, batch: Any) -> torch.Tensor:
        static = _clone(batch)
        self.opt.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's memory pool
        try:
            loss = self.graph.capture(lambda: self._step(static, cache=False))
        except Exception as exc:  # noqa: BLE001 - any capture failure is reported and the run goes on eagerly
            reason = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            self._abandon_capture()
            if self.on_fallback is None:
                raise ConfigError(f"train.cuda_graph: {reason}") from exc
            self.on_fallback(reason)
            return self._step(batch)
        self._static_batch, self._static_loss, self._signature = static, loss, _signature(batch)
        # capturing records the kernels without running them: run this batch's step now
        self.graph.replay()
        self.replays += 1
        return loss

    def _abandon_capture(self) -> None:
        """Leave the optimizer and the loss scaler as an eager step expects them after a failed capture."""
        self.graph = None
        self.opt.zero_grad(set_to_none=True)
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if hasattr(states, "clear"):
            states.clear()  # an unscale_ recorded during the failed capture would block the next one
