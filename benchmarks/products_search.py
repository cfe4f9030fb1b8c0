"""Catalogue search queries/s: visrec's CatalogueIndex search path vs raw FAISS, same vectors, same run;
and descriptor extraction images/s on CPU.

The visrec path is what ``visrec products search`` runs after the network: the post-processing chain's
query side (none configured here), the FAISS search, and the row -> catalogue id mapping. Raw FAISS is
``IndexFlatIP.search`` on the same index. Both are exact (Flat) unless --factory says otherwise.

    python benchmarks/products_search.py --catalogue 500000 --dims 512 2048 --queries 2000
    python benchmarks/products_search.py --extract 256 --backbone resnet50 --size 224
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def search_bench(n: int, d: int, queries: int, k: int, factory: str, repeats: int) -> tuple[float, float]:
    import faiss

    from visrec.index.faiss_index import FaissIndex
    from visrec.index.postprocess import Chain

    cat, q = unit(n, d, 0), unit(queries, d, 1)
    index = FaissIndex(d, factory).build(cat)
    ids = [f"id{i:07d}" for i in range(n)]
    chain = Chain([])

    def visrec_search():
        scores, rows = index.search(chain.queries(q), k)
        return [[ids[r] for r in row if r >= 0] for row in rows]

    def faiss_search():
        return index.index.search(q, k)

    assert faiss.omp_get_max_threads() >= 1
    best = {}
    for name, fn in (("faiss", faiss_search), ("visrec", visrec_search)) * repeats:
        t = time.perf_counter()
        fn()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
    return queries / best["visrec"], queries / best["faiss"]


def extract_bench(images: int, backbone: str, size: int, batch: int) -> float:
    import torch

    from visrec.index.catalogue import describe
    from visrec.models import build_backbone

    model = build_backbone("product", backbone=backbone).eval()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (300, 240, 3), dtype=np.uint8) for _ in range(batch)]
    describe(model, imgs[:2], size)  # warm-up
    t = time.perf_counter()
    done = 0
    while done < images:
        describe(model, imgs, size)
        done += batch
    return done / (time.perf_counter() - t), torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalogue", type=int, default=500_000)
    ap.add_argument("--dims", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extract", type=int, default=0, help="images for the extraction benchmark (0 = skip)")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    for d in a.dims:
        v, f = search_bench(a.catalogue, d, a.queries, a.k, a.factory, a.repeats)
        print(f"search {a.catalogue:,} x {d}-d {a.factory}, {a.queries} queries, k={a.k}: visrec {v:,.0f} q/s, "
              f"raw FAISS {f:,.0f} q/s, ratio {v / f:.3f}")
    if a.extract:
        ips, threads = extract_bench(a.extract, a.backbone, a.size, a.batch)
        print(f"extraction {a.backbone} at {a.size}px (pad + resize + forward), CPU {threads} threads: {ips:.1f} images/s")


if __name__ == "__main__":
    main()
