"""Images/s of one face-training step (backbone + PartialFC margin softmax + SGD), synthetic tensors or a
real RecordIO file.

visrec's step is the Trainer's own: FaceTask modules, the fused optimizer on CUDA, and ``StepRunner`` (the
whole step captured in a CUDA graph where the run allows it, ``--cuda-graph``). ``--input recordio`` also
times the real input path in the same run: JPEG bytes read from a ``.rec`` file by DataLoader workers,
decoded as the Trainer decodes them (``--decode``: batched on the training device, or per image in the
workers), flipped on the device, prefetched one step ahead; the table gives its rate as a share of the
synthetic-tensor rate (the goal for mbf at batch 512: at least 90%), and a third row times the input path
alone (no step), its ceiling. The ``.rec`` file is ``--rec`` or one written here by ``visrec.data.synth``
(``--images``).

With ``--arcface-torch PATH`` (a local checkout of InsightFace's ``recognition/arcface_torch``, never copied
into this repo) the same settings are timed on its backbone + CombinedMarginLoss + PartialFC_V2 in the same
run, its training step as its train_v2.py does it (DDP on one process, fp16 autocast + GradScaler, clip 5),
and the ratio is printed.

    python benchmarks/train_throughput.py --backbone mbf --batch 512 --input recordio --workers 8 \
        --arcface-torch third_party/insightface/recognition/arcface_torch
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
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


class Forever:
    """A batch sampler over epoch after epoch of the Trainer's sampler (one DataLoader, workers kept)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        for epoch in itertools.count():
            self.sampler.set_position(epoch, 0)
            yield from self.sampler


def visrec_step(args, device, data: str | None, input_only: bool = False):
    """One step of visrec's Trainer: on fixed tensors (``data`` None) or on batches of the RecordIO ``data``.
    ``input_only``: the "step" only takes the next batch from the input path (read, decode, flip on the
    device), which is then that path's own ceiling. Returns (step function, input, how the step runs)."""
    from torch.utils.data import DataLoader

    from visrec.config import parse_config
    from visrec.distributed import RunContext, resolve_amp
    from visrec.train.faces_task import FaceTask
    from visrec.train.prefetch import prefetch
    from visrec.train.step import CudaGraph, StepRunner, capture_blocker
    from visrec.train.trainer import EpochBatchSampler, build_optimizer

    cfg = parse_config({"model": {"name": args.backbone, "embedding_size": 512}, "batch_size": args.batch,
                        "schedule": {"max_steps": 1},
                        "data": {"train": data or "unused", "flip": data is not None, "decode": args.decode},
                        "loss": {"name": "arcface", "s": 64.0, "m": 0.5, "sample_rate": args.sample_rate},
                        "optim": {"lr": 0.1}, "amp": args.amp, "compile": args.compile,
                        "cuda_graph": args.cuda_graph, "num_workers": args.workers,
                        "channels_last": args.channels_last == "on"})
    amp = resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # as the Trainer does outside deterministic mode
    task = FaceTask(cfg, RunContext(device=device, amp_dtype=amp))
    modules = {k: m.to(device) for k, m in task.build_modules(args.classes).items()}
    run = dict(modules)
    if cfg.channels_last:
        modules["backbone"].to(memory_format=torch.channels_last)
    if args.compile:
        run["backbone"] = torch.compile(modules["backbone"])
    params = [p for m in modules.values() for p in m.parameters()]
    opt = build_optimizer(cfg, params, fused=device.type == "cuda")
    clip = list(modules["backbone"].parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    reason = "cuda_graph: off" if args.cuda_graph == "off" else capture_blocker(device, False,
                                                                               task.capture_blocker())
    runner = StepRunner(lambda batch: task.training_step(run, batch), opt, scaler, clip, cfg.optim.grad_clip,
                        device, amp, graph=None if reason else CudaGraph(),
                        on_fallback=lambda why: print(f"visrec: steps run eagerly ({why})", file=sys.stderr))
    if data is None:
        images = torch.randn(args.batch, 3, 112, 112, device=device)
        labels = torch.randint(0, args.classes, (args.batch,), device=device)

        def step():
            runner((images, labels))
    else:
        dataset = task.train_dataset()
        sampler = EpochBatchSampler(len(dataset), args.batch, 0, 1, seed=0)
        loader = DataLoader(dataset, batch_sampler=Forever(sampler), num_workers=args.workers,
                            collate_fn=task.collate_fn, pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0)
        batches = prefetch(loader, task.to_device, device)

        def step():
            batch = task.augment(next(batches))
            if not input_only:
                runner(batch)

    source = f"RecordIO, decode {'batched' if task.collate_fn is not None else 'in workers'}" if data else "tensors"
    if input_only:
        return step, source, "none: the input path alone"
    return step, source, f"eager ({reason})" if reason else "cuda graph"


def synthetic_rec(images: int, directory: str) -> str:
    from visrec.data.synth import write_face_dataset

    identities = max(1, images // 20)
    return str(write_face_dataset(os.path.join(directory, "train"), identities, 20, format="recordio", seed=0))


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
    ap.add_argument("--warmup", type=int, default=6, help="untimed steps first (the CUDA graph is captured "
                                                          "on the fourth)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--channels-last", default="on", choices=["on", "off"],
                    help="visrec's backbone in NHWC (train.channels_last; off: NCHW, as arcface_torch runs)")
    ap.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--input", default="tensors", choices=["tensors", "recordio"],
                    help="recordio: also time the real input path from a .rec file, in the same run")
    ap.add_argument("--rec", default=None, help="RecordIO dir (train.rec/.idx); default: a synthetic one")
    ap.add_argument("--images", type=int, default=4096, help="images in the synthetic .rec")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    ap.add_argument("--decode", default="auto", choices=["auto", "workers", "batched"])
    ap.add_argument("--arcface-torch", default=None, help="path to a local arcface_torch checkout")
    args = ap.parse_args()
    device = torch.device(args.device)
    console = Console()
    rows = []
    step, source, mode = visrec_step(args, device, None)
    rows.append(("visrec", source, mode, timed(step, args.steps, args.warmup, args.batch, device)))
    synthetic = rows[0][3]
    real = None
    if args.input == "recordio":
        with tempfile.TemporaryDirectory(prefix="visrec-rec-") as tmp:
            rec = args.rec
            if rec is None:
                t0 = time.perf_counter()
                rec = synthetic_rec(args.images, tmp)
                console.print(f"wrote a synthetic .rec of {args.images} images in {time.perf_counter() - t0:.1f} s")
            step, source, mode = visrec_step(args, device, rec)
            real = timed(step, args.steps, args.warmup, args.batch, device)
            rows.append(("visrec", f"{source}, {args.workers} workers", mode, real))
            # what the input path delivers with no step to feed: below the step's rate, it is the bound
            step, source, mode = visrec_step(args, device, rec, input_only=True)
            rows.append(("visrec", f"{source}, {args.workers} workers", mode,
                         timed(step, args.steps, args.warmup, args.batch, device)))
    base = None
    if args.arcface_torch and device.type != "cuda":
        console.print("arcface_torch is not timed on CPU: its PartialFC_V2 allocates with .cuda() unconditionally")
    elif args.arcface_torch:
        base = timed(arcface_torch_step(args, device, args.arcface_torch), args.steps, args.warmup, args.batch,
                     device)
        rows.append(("arcface_torch", "tensors", "eager, DDP on one process", base))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    table = Table(title=f"train step throughput: {args.backbone}, batch {args.batch}, {args.classes} classes, "
                        f"sample rate {args.sample_rate}, {name}, amp={args.amp}, compile={args.compile}, "
                        f"channels_last={args.channels_last}")
    table.add_column("implementation")
    table.add_column("input")
    table.add_column("step")
    table.add_column("images/s", justify="right")
    table.add_column("vs arcface_torch", justify="right")
    table.add_column("vs visrec tensors", justify="right")
    for impl, source, mode, rate in rows:
        table.add_row(impl, source, mode, f"{rate:,.1f}", f"{rate / base:.2f}x" if base else "-",
                      f"{rate / synthetic:.0%}" if impl == "visrec" else "-")
    console.print(table)
    if real is not None:
        goal = " (the goal here: >= 90%)" if ARCFACE_NAMES.get(args.backbone) == "mbf" and args.batch == 512 else ""
        console.print(f"real input path / synthetic tensors: {real / synthetic:.1%}{goal}")


if __name__ == "__main__":
    main()
