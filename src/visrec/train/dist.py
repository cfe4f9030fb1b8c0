"""Process set-up. A process group exists only under torchrun with WORLD_SIZE > 1: a single process
never initialises one (arcface_torch forces one even on one GPU; we do not)."""

from __future__ import annotations

import os

import torch

from visrec.errors import ConfigError
from visrec.train.task import RunContext


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
    return RunContext(device=device, rank=rank, world_size=world_size, local_rank=local_rank,
                      amp_dtype=resolve_amp(amp, device))


def barrier(ctx: RunContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def teardown(ctx: RunContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
