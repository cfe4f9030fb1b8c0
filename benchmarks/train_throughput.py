"""Images/s of one face-training step (backbone + PartialFC margin softmax + SGD), synthetic tensors.

visrec's step is built from the same pieces the Trainer uses (FaceTask modules, build_optimizer,
optimizer_step, autocast). With ``--arcface-torch PATH`` (a local checkout of InsightFace's
``recognition/arcface_torch``, never copied into this repo) the same settings are timed on its
backbone + CombinedMarginLoss + PartialFC_V2 in the same run, its training step as its train_v2.py
does it (DDP on one process, fp16 autocast + GradScaler, clip 5), and the ratio is printed.

    python benchmarks/train_throughput.py --backbone mbf --batch 128 --classes 93431 --device cuda \
        --compile --arcface-torch third_party/insightface/recognition/arcface_torch
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

ARCFACE_NAMES = {"mbf": "mbf", "mobilefacenet": "mbf", "r50": "r50", "iresnet50": "r50",
                 "r100": "r100", "iresnet100": "r100", "r18": "r18", "r34": "r34"}


def timed(step, steps: int, warmup: int, batch: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def visrec_step(args, device):
    from visrec.config import parse_config
    from visrec.train.faces_task import FaceTask
    from visrec.train.task import RunContext
    from visrec.train.dist import resolve_amp
    from visrec.train.trainer import build_optimizer, optimizer_step

    cfg = parse_config({"model": {"name": args.backbone, "embedding_size": 512}, "batch_size": args.batch,
                        "schedule": {"max_steps": 1}, "data": {"train": "unused", "flip": False},
                        "loss": {"name": "arcface", "s": 64.0, "m": 0.5, "sample_rate": args.sample_rate},
                        "optim": {"lr": 0.1}, "amp": args.amp, "compile": args.compile})
    amp = resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # as the Trainer does outside deterministic mode
    task = FaceTask(cfg, RunContext(device=device, amp_dtype=amp))
    modules = {k: m.to(device) for k, m in task.build_modules(args.classes).items()}
    run = dict(modules)
    if device.type == "cuda" and cfg.channels_last:
        modules["backbone"].to(memory_format=torch.channels_last)
    if args.compile:
        run["backbone"] = torch.compile(modules["backbone"])
    params = [p for m in modules.values() for p in m.parameters()]
    opt = build_optimizer(cfg, params)
    clip = list(modules["backbone"].parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    images = torch.randn(args.batch, 3, 112, 112, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = task.training_step(run, (images, labels))
        optimizer_step(loss, opt, scaler, clip, cfg.optim.grad_clip)

    return step


def arcface_torch_step(args, device, path):
    sys.path.insert(0, path)
    import torch.distributed as dist
    from backbones import get_model
    from losses import CombinedMarginLoss
    from partial_fc_v2 import PartialFC_V2

    if not dist.is_initialized():  # PartialFC_V2 requires a process group even on one device
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    fp16 = device.type == "cuda"
    backbone = get_model(ARCFACE_NAMES[args.backbone], dropout=0.0, fp16=fp16, num_features=512).to(device)
    ids = [device.index or 0] if device.type == "cuda" else None
    backbone = torch.nn.parallel.DistributedDataParallel(backbone, device_ids=ids)
    margin = CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)
    head = PartialFC_V2(margin, 512, args.classes, args.sample_rate, fp16).to(device)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    images = torch.randn(args.batch, 3, 112, 112, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        emb = backbone(images)
        loss = head(emb, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mbf")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=93431)
    ap.add_argument("--sample-rate", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--arcface-torch", default=None, help="path to a local arcface_torch checkout")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = [("visrec", timed(visrec_step(args, device), args.steps, args.warmup, args.batch, device))]
    if args.arcface_torch and device.type != "cuda":
        Console().print("arcface_torch is not timed on CPU: its PartialFC_V2 allocates with .cuda() unconditionally")
    elif args.arcface_torch:
        rows.append(("arcface_torch", timed(arcface_torch_step(args, device, args.arcface_torch),
                                            args.steps, args.warmup, args.batch, device)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    table = Table(title=f"train step throughput: {args.backbone}, batch {args.batch}, {args.classes} classes, "
                        f"sample rate {args.sample_rate}, {name}, amp={args.amp}, compile={args.compile}")
    table.add_column("implementation")
    table.add_column("images/s", justify="right")
    table.add_column("ratio vs arcface_torch", justify="right")
    base = rows[1][1] if len(rows) > 1 else None
    for impl, rate in rows:
        table.add_row(impl, f"{rate:,.1f}", f"{rate / base:.2f}x" if base else "-")
    Console().print(table)


if __name__ == "__main__":
    main()
