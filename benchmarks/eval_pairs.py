"""Pairs/s and peak memory of exact TPR@FPR: visrec vs two peers on the same data.

- ``numpy``: the simple fair peer: one float32 matmul of all N x N scores (numpy's OpenBLAS), the lower
  triangle and genuine pairs set to -inf in place, then an in-place ``partition`` for the (K+1)-th largest
  impostor score. Its process runs without ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE``, which this project's
  machines set and which slow numpy's OpenBLAS (not torch's BLAS) about twofold.
- ``sklearn``: every pair's score into ``sklearn.metrics.roc_curve``.

Each measurement runs in its own subprocess so peak RSS (ru_maxrss) belongs to that method alone, with
``--threads`` BLAS / torch threads.

    python benchmarks/eval_pairs.py --sizes 10000 20000 --alone 200000 [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np


def make(n: int, dim: int = 512, ids: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = ids or max(2, n // 20)
    labels = rng.integers(0, ids, n)
    centres = rng.standard_normal((ids, dim)).astype(np.float32)
    return (centres[labels] + 1.5 * rng.standard_normal((n, dim)).astype(np.float32)), labels


def run_visrec(n, target, device, threads, kernel="auto", block=None):
    import torch

    from visrec.evaluate import tpr_at_fpr

    torch.set_num_threads(threads)
    emb, labels = make(n)
    t0 = time.perf_counter()
    r = tpr_at_fpr(emb, labels, [target], device=device, block_size=block, kernel=kernel)[target]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, r.tpr, r.false_accepts


def run_matmul(n, device, threads, block=8192):
    """The product alone: every block i <= j of the bfloat16 products the scan makes, nothing filtered or
    kept (the rate the fused scan is held against)."""
    import torch

    torch.set_num_threads(threads)
    emb, _ = make(n)
    x = torch.nn.functional.normalize(torch.from_numpy(emb), dim=1).to(device).to(torch.bfloat16)
    out = torch.empty(block, block, dtype=torch.bfloat16, device=device)
    t0 = time.perf_counter()
    for r0 in range(0, n, block):
        for c0 in range(r0, n, block):
            a, b = x[r0:r0 + block], x[c0:c0 + block]
            torch.mm(a, b.T, out=out[:len(a), :len(b)])
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, float("nan"), None


def run_sklearn(n, target):
    from sklearn.metrics import roc_curve

    emb, labels = make(n)
    t0 = time.perf_counter()
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    i, j = np.triu_indices(n, 1)
    scores = np.einsum("ij,ij->i", e[i], e[j]) if n <= 3000 else (e @ e.T)[i, j]
    same = labels[i] == labels[j]
    fpr, tpr, thr = roc_curve(same, scores)
    ok = fpr <= target
    tpr_at = tpr[ok].max()
    return time.perf_counter() - t0, float(tpr_at), None


def run_numpy(n, target):
    """The simple peer: all N x N float32 scores, then a partition of the impostors (module docstring)."""
    emb, labels = make(n)
    t0 = time.perf_counter()
    order = np.argsort(labels, kind="stable")
    e = emb[order] / np.linalg.norm(emb[order], axis=1, keepdims=True)
    labels = labels[order]
    s = e @ e.T
    bounds = np.flatnonzero(np.diff(labels)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, n]
    genuine = np.concatenate([s[a:b, a:b][np.triu_indices(b - a, 1)] for a, b in zip(starts, ends)])
    for a, b in zip(starts, ends):
        s[a:b, a:b] = -np.inf  # genuine pairs and i == j
    for r in range(0, n, 1024):  # the lower triangle, a band of rows at a time
        rows = np.arange(r, min(n, r + 1024))[:, None]
        s[r:r + 1024][np.arange(n)[None, :] < rows] = -np.inf
    impostors = n * (n - 1) // 2 - len(genuine)
    k = math.floor(target * impostors)
    flat = s.reshape(-1)
    flat.partition(flat.size - 1 - k)  # in place: the (k+1)-th largest lands at its sorted position
    threshold = np.nextafter(flat[flat.size - 1 - k], np.float32(np.inf))
    tpr = float((genuine >= threshold).mean())
    return time.perf_counter() - t0, tpr, None


def child(method, n, target, device, threads, block):
    if method.startswith("visrec"):  # visrec or visrec-<kernel>
        secs, tpr, fa = run_visrec(n, target, device, threads, (method.split("-") + ["auto"])[1], block)
    elif method == "matmul":
        secs, tpr, fa = run_matmul(n, device, threads)
    elif method == "numpy":
        secs, tpr, fa = run_numpy(n, target)
    else:
        secs, tpr, fa = run_sklearn(n, target)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"secs": secs, "tpr": tpr, "false_accepts": fa, "peak_bytes": peak}))


def measure(method, n, target, device, threads, block=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    if method == "numpy":  # the peer's fair BLAS settings (module docstring)
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    out = subprocess.run([sys.executable, __file__, "--child", method, str(n), str(target), device, str(threads),
                          str(block or 0)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[10000, 20000])
    ap.add_argument("--alone", type=int, nargs="*", default=[200000])
    ap.add_argument("--target", type=float, default=1e-6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peers", nargs="*", default=["numpy", "sklearn"], choices=["numpy", "sklearn"])
    ap.add_argument("--kernels", nargs="*", default=["auto"], choices=["auto", "torch", "triton"],
                    help="visrec's scan, one row each (cuda: add 'torch' to see the fused kernel's gain)")
    ap.add_argument("--matmul", action="store_true", help="also time the bf16 product alone over the same "
                                                          "pairs (every N; the ratio shows what the scan adds)")
    ap.add_argument("--block", type=int, default=0, help="visrec's block_size (0: tpr_at_fpr's default for the "
                                                          "device, visrec.evaluate.verification.default_block_size)")
    ap.add_argument("--child", nargs=6, default=None)
    args = ap.parse_args()
    if args.child:
        m, n, t, d, threads, block = args.child
        child(m, int(n), float(t), d, int(threads), int(block) or None)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"exact TPR@FPR={args.target:g}, 512-d, device {args.device}, {args.threads} thread(s), "
                        f"block {args.block or 'default'}")
    for col in ("N", "pairs", "method", "seconds", "pairs/s", "peak RSS GB", "TPR", "false accepts",
                "visrec's speed-up"):
        table.add_column(col)
    names = {"numpy": "numpy matmul + partition", "sklearn": "sklearn roc_curve"}
    for n in args.sizes + args.alone:
        pairs = n * (n - 1) // 2
        rows = [(f"visrec ({k} scan)" if len(args.kernels) > 1 else "visrec",
                 measure("visrec" if k == "auto" else f"visrec-{k}", n, args.target, args.device, args.threads,
                         args.block))
                for k in args.kernels]
        v = rows[0][1]
        if args.matmul:
            rows.append(("bf16 product alone", measure("matmul", n, args.target, args.device, args.threads)))
        if n in args.sizes:
            rows += [(names[p], measure(p, n, args.target, "cpu", args.threads)) for p in args.peers]
        for name, r in rows:
            speed = r["secs"] / v["secs"] if r is not v else None
            # TPR is None where the target is below 1 / (impostor pairs): no threshold reaches it
            tpr = "-" if r["tpr"] is None or math.isnan(r["tpr"]) else f"{r['tpr']:.6f}"
            fa = "-" if r.get("false_accepts") is None else f"{r['false_accepts']:,}"
            table.add_row(f"{n:,}", f"{pairs:.3g}", name, f"{r['secs']:.2f}", f"{pairs / r['secs']:.3g}",
                          f"{r['peak_bytes'] / 1e9:.2f}", tpr, fa, f"{speed:.2f}x" if speed else "-")
            print(f"{n} {name}: {pairs / r['secs'] / 1e9:.3f} Gpairs/s")  # plain lines for a log
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
