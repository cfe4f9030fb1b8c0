"""Seconds per training step of registered backbones with NCHW weights and activations against NHWC
(``channels_last``, the Trainer's default on every device), on this machine's device; with ``--inference``,
images per second of forward calls in eval mode without grad (NHWC weights: what visrec's inference paths run,
``visrec.models.embed.for_inference``).

One step: forward, the mean square of the output (a stand-in loss: the backbone is what changes layout),
backward, SGD. One inference call: ``forward_batch`` images (what visrec's inference paths hand the network
at a time on this device: 8 on a CPU). The same seed, batch and weights for both layouts; the median of
``--steps`` timed steps after ``--warmup`` untimed ones. The ratio is NCHW time / NHWC time (> 1: NHWC is faster).

    python benchmarks/memory_format.py                      # CPU, every backbone below, this machine's threads
    python benchmarks/memory_format.py --only mobilefacenet pfld --threads 2
    python benchmarks/memory_format.py --inference --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from visrec.models import build_backbone

# (label, registry config, input side in px, batch): the configs the README, demo and tests train on a CPU
CASES = [
    ("mobilefacenet", {"name": "mobilefacenet", "embedding_size": 512}, 112, 64),
    ("mobilefacenet scale 1", {"name": "mobilefacenet", "embedding_size": 128, "scale": 1}, 112, 32),
    ("effnet_face", {"name": "effnet_face", "embedding_size": 128}, 112, 16),
    ("vargfacenet", {"name": "vargfacenet", "embedding_size": 128}, 112, 16),
    ("iresnet18", {"name": "iresnet18", "embedding_size": 128}, 112, 32),
    ("pfld 0.25", {"name": "pfld", "num_points": 106, "width_mult": 0.25}, 112, 32),
    ("heatmap_lite 0.5", {"name": "heatmap_lite", "width_mult": 0.5}, 112, 32),
    ("product resnet18", {"name": "product", "backbone": "resnet18", "dim": 128}, 64, 32),
]
# and for --inference, the networks that embed data sets and serve: an iresnet50 face model, the products
# index's default descriptor at its default size
INFERENCE_CASES = CASES + [
    ("iresnet50", {"name": "iresnet50", "embedding_size": 512}, 112, 8),
    ("product resnet50", {"name": "product", "backbone": "resnet50"}, 224, 8),
]


def median_seconds(run, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``run()`` over ``steps`` timed calls after ``warmup`` untimed ones (CUDA synchronised)."""
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_seconds(config: dict, side: int, batch: int, channels_last: bool, device: torch.device,
                 steps: int, warmup: int) -> float:
    """Median seconds of one forward + backward + SGD step."""
    torch.manual_seed(0)
    net = build_backbone(**config).to(device).train()
    if channels_last:
        net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, side, side, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step():
        out = net(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_seconds(step, device, steps, warmup)


@torch.no_grad()
def call_seconds(config: dict, side: int, channels_last: bool, device: torch.device, steps: int,
                 warmup: int) -> tuple[float, int]:
    """(median seconds of one eval-mode forward call without grad, images per call: ``forward_batch``'s); NHWC
    through ``for_inference``, as visrec's inference paths put a loaded network."""
    from visrec.models.embed import for_inference, forward_batch

    torch.manual_seed(0)
    net = build_backbone(**config)
    net = for_inference(net, device) if channels_last else net.eval().to(device)
    batch = forward_batch(256, device)
    x = torch.randn(batch, 3, side, side, device=device)
    return median_seconds(lambda: net(x), device, steps, warmup), batch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="labels' first words, e.g. mobilefacenet pfld")
    ap.add_argument("--inference", action="store_true", help="time eval-mode forward calls instead of steps")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    every = INFERENCE_CASES if args.inference else CASES
    cases = [c for c in every if not args.only or c[0].split()[0] in args.only]
    if not cases:
        raise SystemExit(f"--only {args.only}: no such backbone among {[c[0] for c in every]}")
    if args.inference:
        table = Table(title=f"one inference call, NCHW vs NHWC weights ({device}, {torch.get_num_threads()} threads)")
        for col in ("backbone", "images x px", "NCHW images/s", "NHWC images/s", "NCHW / NHWC time"):
            table.add_column(col)
        for label, config, side, _ in cases:
            nchw, n = call_seconds(config, side, False, device, args.steps, args.warmup)
            nhwc, _ = call_seconds(config, side, True, device, args.steps, args.warmup)
            table.add_row(label, f"{n} x {side}", f"{n / nchw:.1f}", f"{n / nhwc:.1f}", f"{nchw / nhwc:.2f}x")
        Console().print(table)
        return
    table = Table(title=f"one training step, NCHW vs NHWC ({device}, {torch.get_num_threads()} threads)")
    for col in ("backbone", "batch x px", "NCHW s/step", "NHWC s/step", "NCHW / NHWC"):
        table.add_column(col)
    for label, config, side, batch in cases:
        nchw = step_seconds(config, side, batch, False, device, args.steps, args.warmup)
        nhwc = step_seconds(config, side, batch, True, device, args.steps, args.warmup)
        table.add_row(label, f"{batch} x {side}", f"{nchw:.3f}", f"{nhwc:.3f}", f"{nchw / nhwc:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
