"""Process set-up (:class:`RunContext`, :func:`setup`). A process group exists only under torchrun with
WORLD_SIZE > 1: a single process never initialises one (arcface_torch forces one even on one GPU; we do not).

Also the few collectives the sharded runs above the trainer share (``visrec eval faces`` and ``visrec products
index`` under torchrun): each takes the process group explicitly (``group``; None = one process, nothing
exchanged), so a caller running on one rank only never waits for the others."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, TypeVar

import numpy as np
import torch

from visrec.errors import ConfigError, VisrecError

T = TypeVar("T")


@dataclass
class RunContext:
    """Where and how this process runs. ``rank``/``world_size`` are 0/1 without torchrun."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None  # None = full float32

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported ('auto'), fp16 on request, else float32."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# Set once this process has started a process group (under torchrun); :func:`end_process` then ends the process
# without interpreter finalization.
started_a_process_group = False


def end_process(status: int = 0) -> NoReturn:
    """End this process with ``status``, as the last statement of a program that ran visrec under torchrun (the
    ``visrec`` command ends this way). After a process group was started: standard output and error flushed, then
    ``os._exit`` without Python's finalization. The group's gloo worker threads outlive
    ``destroy_process_group`` (DistributedDataParallel keeps a reference to the group), and one may still be
    releasing the last collective's tensors when the interpreter finalizes; on Python 3.11 that thread is then
    killed while it takes the GIL and the finished rank aborts ("terminate called without an active
    exception", SIGABRT; 1 two-rank run in ~20). Without a process group: ``sys.exit(status)``. Files still open
    are not flushed by ``os._exit``: close them first (logging's handlers flush every record); ``atexit`` handlers
    do not run."""
    if started_a_process_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def setup(device_name: str = "auto", amp: str = "auto") -> RunContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            global started_a_process_group
            started_a_process_group = True
    return RunContext(device=device, rank=rank, world_size=world_size, local_rank=local_rank,
                      amp_dtype=resolve_amp(amp, device))


def teardown(ctx: RunContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def world_group(ctx: RunContext):
    """The process group of every rank (``torch.distributed.group.WORLD``) under torchrun, else None."""
    if not ctx.distributed:
        return None
    import torch.distributed as dist

    return dist.group.WORLD


def rank_and_size(group) -> tuple[int, int]:
    """(this rank, number of ranks) in ``group``; (0, 1) for None."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def one_process(command: str) -> None:
    """Refuse to run ``command`` as several torchrun processes: each would do all of the work and write the
    same files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise VisrecError(f"{command} runs in one process, but torchrun started {world} (WORLD_SIZE={world}); "
                          "start it without torchrun (visrec train, finetune, eval faces and products index run "
                          "across torchrun processes)")


def on_every_rank(what: str, fn: Callable[[], T], group) -> T:
    """``fn()`` on this rank, then an exchange of outcomes: when any rank failed, every rank raises (the failing
    rank its own exception, the others an error naming that rank and its message), so no rank is left waiting
    in a later collective for one that stopped. With ``group`` None: just ``fn()``."""
    if group is None:
        return fn()
    import torch.distributed as dist

    try:
        result, failure = fn(), None
    except Exception as exc:  # every rank must reach the exchange below, whatever went wrong here
        result, failure = None, exc
    outcomes: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(outcomes, None if failure is None else f"{type(failure).__name__}: {failure}",
                           group=group)
    if failure is not None:
        raise failure
    failed = [f"rank {r}: {message}" for r, message in enumerate(outcomes) if message is not None]
    if failed:
        raise VisrecError(f"{what} failed on " + "; ".join(failed))
    return result


def from_rank_zero(what: str, fn: Callable[[], T], group) -> T:
    """``fn()`` on rank 0 of ``group`` only; its (picklable) result, or its failure, reaches every rank."""
    if group is None:
        return fn()
    import torch.distributed as dist

    payload: list = [None]
    failure = None
    if dist.get_rank(group) == 0:
        try:
            payload = [("ok", fn())]
        except Exception as exc:  # the other ranks wait for this broadcast: tell them
            failure, payload = exc, [("error", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    if failure is not None:
        raise failure
    kind, value = payload[0]
    if kind == "error":
        raise VisrecError(f"{what} failed on rank 0: {value}")
    return value


def gather_objects(value, group) -> list:
    """Every rank's (picklable) ``value``, in rank order; ``[value]`` with ``group`` None."""
    if group is None:
        return [value]
    import torch.distributed as dist

    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, value, group=group)
    return every


def broadcast_module(module: torch.nn.Module, group) -> None:
    """Rank 0's parameters and buffers, copied into ``module`` on every rank of ``group`` (a randomly
    initialised layer would otherwise differ from rank to rank). The module must have the same structure on
    every rank: names and shapes are compared first."""
    if group is None:
        return
    import torch.distributed as dist

    state = module.state_dict()
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in state.items()]
    every = gather_objects(layout, group)
    if any(theirs != every[0] for theirs in every):
        bad = next(r for r, theirs in enumerate(every) if theirs != every[0])
        raise VisrecError(f"rank {bad} built a model with other parameters than rank 0: every rank must build the "
                          "same model")
    comm = _comm_device(group)
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in state.values():
            x = t.detach().to(comm).contiguous()
            dist.broadcast(x, src=src, group=group)
            t.copy_(x.to(t.device))


def _comm_device(group) -> torch.device:
    """NCCL exchanges CUDA tensors, gloo (and mixed backends) CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


def all_gather_rows(rows: np.ndarray, group) -> list[np.ndarray]:
    """Every rank's array, in rank order, bit for bit. Row counts may differ; the other dimensions and the dtype
    must agree (an array with no rows, of any shape, stands for none)."""
    if group is None:
        return [rows]
    import torch.distributed as dist

    rows = np.ascontiguousarray(rows)
    heads = gather_objects((rows.shape, rows.dtype.str), group)
    shaped = {(shape[1:], dtype) for shape, dtype in heads if shape[0] > 0}
    if len(shaped) > 1:
        raise VisrecError(f"ranks hold rows of different shapes or dtypes: {sorted(shaped)}")
    if not shaped:
        return [rows[:0] for _ in heads]
    tail, dtype = shaped.pop()
    most = max(shape[0] for shape, _ in heads)
    comm = _comm_device(group)
    padded = np.zeros((most, *tail), dtype=np.dtype(dtype))
    if rows.shape[0]:
        padded[:rows.shape[0]] = rows
    mine = torch.from_numpy(padded).to(comm)
    parts = [torch.empty_like(mine) for _ in heads]
    dist.all_gather(parts, mine, group=group)
    return [part.cpu().numpy()[:shape[0]] for part, (shape, _) in zip(parts, heads)]
