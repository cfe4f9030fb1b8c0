"""Images per second of inference on a CPU: the network run on the caller's whole batch at once (what a loop
over ``model(x[s:s + 256])`` does, the usual way to embed a data set) against visrec's inference paths, which
split each batch into calls of ``visrec.models.embed.forward_batch`` images (``CPU_FORWARD_BATCH`` on a CPU).

Same weights, same random input, eval mode, no grad; the median of ``--repeats`` timed passes over ``--images``
images after one untimed pass. The ratio is visrec's rate / the whole-batch rate (> 1: visrec is faster).

    python benchmarks/forward_batch.py                          # every network below, this machine's threads
    python benchmarks/forward_batch.py --threads 1 --only mobilefacenet pfld
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from visrec.models import build_backbone
from visrec.models.embed import forward_batch

# (label, registry config, input side in px): the networks visrec embeds, predicts or describes with
CASES = [
    ("mobilefacenet", {"name": "mobilefacenet", "embedding_size": 512}, 112),
    ("mobilefacenet scale 1", {"name": "mobilefacenet", "embedding_size": 128, "scale": 1}, 112),
    ("vargfacenet", {"name": "vargfacenet", "embedding_size": 512}, 112),
    ("effnet_face", {"name": "effnet_face", "embedding_size": 512}, 112),
    ("iresnet50", {"name": "iresnet50", "embedding_size": 512}, 112),
    ("pfld", {"name": "pfld", "num_points": 106}, 112),
    ("heatmap_lite", {"name": "heatmap_lite"}, 112),
    ("product resnet18", {"name": "product", "backbone": "resnet18", "dim": 128}, 224),
    ("product mobilenet_v3_small", {"name": "product", "backbone": "mobilenet_v3_small", "pooling": "mac",
                                    "source": "torchvision"}, 224),
]


@torch.no_grad()
def images_per_second(net: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int) -> float:
    """Median rate of passes over ``x`` in calls of ``batch`` images."""
    def one_pass():
        for s in range(0, len(x), batch):
            net(x[s:s + batch])

    one_pass()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--batch", type=int, default=256, help="the caller's batch (visrec's default for embedding)")
    ap.add_argument("--images", type=int, default=256, help="images per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="labels' first words, e.g. mobilefacenet pfld")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.only or c[0].split()[0] in args.only]
    if not cases:
        raise SystemExit(f"--only {args.only}: no such network among {[c[0] for c in CASES]}")
    visrec_batch = forward_batch(args.batch, "cpu")
    table = Table(title=f"CPU inference, {torch.get_num_threads()} threads: calls of {args.batch} images vs "
                        f"visrec's {visrec_batch}")
    for col in ("network", "px", f"batch {args.batch} img/s", f"visrec ({visrec_batch}) img/s", "visrec / whole batch"):
        table.add_column(col)
    for label, config, side in cases:
        torch.manual_seed(0)
        net = build_backbone(**config).eval()
        x = torch.randn(args.images, 3, side, side)
        whole = images_per_second(net, x, args.batch, args.repeats)
        ours = images_per_second(net, x, visrec_batch, args.repeats)
        table.add_row(label, str(side), f"{whole:.1f}", f"{ours:.1f}", f"{ours / whole:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
