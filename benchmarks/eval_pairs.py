"""Pairs/s and peak memory of exact TPR@FPR: visrec vs all pairs into sklearn's roc_curve, same data.

Each measurement runs in its own subprocess so peak RSS (ru_maxrss) belongs to that method alone.

    python benchmarks/eval_pairs.py --sizes 10000 20000 --alone 200000 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
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


def run_visrec(n, target, device):
    import torch

    from visrec.evaluate import tpr_at_fpr

    emb, labels = make(n)
    t0 = time.perf_counter()
    r = tpr_at_fpr(emb, labels, [target], device=device, block_size=8192 if device == "cuda" else 4096)[target]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, r.tpr, r.false_accepts


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


def child(method, n, target, device):
    if method == "visrec":
        secs, tpr, fa = run_visrec(n, target, device)
    else:
        secs, tpr, fa = run_sklearn(n, target)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"secs": secs, "tpr": tpr, "peak_bytes": peak}))


def measure(method, n, target, device):
    out = subprocess.run([sys.executable, __file__, "--child", method, str(n), str(target), device],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[10000, 20000])
    ap.add_argument("--alone", type=int, nargs="*", default=[200000])
    ap.add_argument("--target", type=float, default=1e-6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=4, default=None)
    args = ap.parse_args()
    if args.child:
        m, n, t, d = args.child
        child(m, int(n), float(t), d)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"exact TPR@FPR={args.target:g}, 512-d, device {args.device}")
    for col in ("N", "pairs", "method", "seconds", "pairs/s", "peak RSS GB", "TPR", "speed-up"):
        table.add_column(col)
    for n in args.sizes + args.alone:
        pairs = n * (n - 1) // 2
        v = measure("visrec", n, args.target, args.device)
        rows = [("visrec", v)]
        if n in args.sizes:
            rows.append(("sklearn roc_curve", measure("sklearn", n, args.target, "cpu")))
        for name, r in rows:
            speed = rows[1][1]["secs"] / r["secs"] if len(rows) > 1 else None
            table.add_row(f"{n:,}", f"{pairs:.3g}", name, f"{r['secs']:.2f}", f"{pairs / r['secs']:.3g}",
                          f"{r['peak_bytes'] / 1e9:.2f}", f"{r['tpr']:.6f}", f"{speed:.1f}x" if speed else "-")
    Console().print(table)


if __name__ == "__main__":
    main()
