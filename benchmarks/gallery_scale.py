"""Face galleries at scale: bulk enrollment, single enrollments as the gallery grows, recall against exact
search, and search latency at concurrency 1 and 8, for FAISS (in memory) and a standalone Milvus server side
by side, each with its exact and approximate indexes.

Data: ``--identities`` synthetic identities, one 512-d unit template each, drawn around ``identities / 100``
cluster centres (so near neighbours exist, as faces of similar people do); probes are enrolled templates
plus noise (cosine ~0.8 to their own template). Recall@k is the share of the exact top-k (FAISS ``knn`` over
every template, in the same run) that the gallery returns, per probe, averaged. Latency is one probe per
``Gallery.search`` call (top-10), measured by the caller; concurrency 8 runs 8 threads on one gallery.

    python benchmarks/gallery_scale.py --identities 100000 --kinds faiss:Flat faiss-file:Flat faiss:HNSW32 \\
        "faiss:IVF1024,Flat" milvus:FLAT milvus:IVF_FLAT milvus:HNSW

``faiss-raw:IndexFlatIP`` is the peer of ``faiss:Flat``: a bare FAISS ``IndexFlatIP`` over the same rows,
searched the same way, so the gallery's own cost shows as a ratio in the same run.

The Milvus server is the ``milvus`` package's standalone Milvus 2.3 (visrec[dev]), started on free loopback
ports for the run and stopped after it (its data in a temporary folder). Memory: FAISS kinds report this
process's resident-set growth (Milvus Lite's too: it runs its own process, not counted); Milvus kinds the
server process's resident set after loading. A million identities on a small server want its segments sealed
at full size and no automatic compaction (docs/gallery.md):

    python benchmarks/gallery_scale.py --identities 1000000 --kinds milvus:IVF_FLAT --sweep nprobe=64 \
        --milvus-set dataCoord.segment.sealProportion=1 dataCoord.compaction.enableAutoCompaction=false
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' Milvus server helper

# build and search parameters per approximate kind (what docs/gallery.md recommends at these sizes)
MILVUS = {"FLAT": ({}, {}), "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 32}),
          "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 64}), "IVF_PQ": ({"nlist": 1024, "m": 64}, {"nprobe": 32})}
FAISS_SEARCH = {"HNSW": {"efSearch": 64}, "IVF": {"nprobe": 32}}


def rss_mb(pid: str | int = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def synthetic(n: int, dim: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.9 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    who = rng.choice(n, queries, replace=False)
    q = x[who] + 0.045 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def open_kind(kind: str, server, collection: str, nlist: int | None = None):
    from visrec.index.gallery import open_gallery

    backend, index = kind.split(":", 1)
    if backend == "faiss-raw":
        return RawFlat()
    if backend in ("faiss", "faiss-file"):  # faiss-file: durable, its SQLite file in a temporary folder
        params = next((v for k, v in FAISS_SEARCH.items() if index.startswith(k) or f",{k}" in index), {})
        path = Path(tempfile.mkdtemp(prefix="visrec-gallery-")) / "g.sqlite" if backend == "faiss-file" else None
        return open_gallery("faiss", model_name="bench", index=index, search_params=params, path=path)
    build, search = MILVUS[index]
    if "nlist" in build and nlist:
        build = {**build, "nlist": nlist}
    # milvus-lite: a Milvus Lite file in a temporary folder; milvus: the standalone server
    uri = str(Path(tempfile.mkdtemp(prefix="visrec-lite-")) / "g.db") if backend == "milvus-lite" else server.uri
    return open_gallery("milvus", uri=uri, collection=collection, model_name="bench", index=index,
                        index_params=build, search_params=search)


class RawFlat:
    """The peer of ``faiss:Flat``: a bare ``faiss.IndexFlatIP`` over the same rows, searched the same way (one
    probe per call, top-10), for the gallery's overhead over FAISS itself."""

    def __init__(self):
        import faiss

        from visrec.index.gallery.faiss import _apply_search_threads

        self.index, self.names = None, []
        self._threads = lambda: _apply_search_threads(faiss)

    def enroll_many(self, items):
        import faiss

        x = np.concatenate([np.asarray(v, np.float32) for _, v in items])
        x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit rows, as the gallery stores them
        if self.index is None:
            self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)
        self.names += [name for name, _ in items]

    def enroll(self, name, v):
        self.enroll_many([(name, v)])

    def search(self, q, k):
        self._threads()  # the same per-thread OpenMP setting as the gallery's searches
        _, found = self.index.search(q, k)
        return [[RawMatch(self.names[i]) for i in row if i >= 0] for row in found]

    def close(self):
        pass


class RawMatch:
    def __init__(self, identity):
        self.identity = identity


def wait_indexed(g) -> None:
    """Milvus: seal what was written and wait until the index covers every template row (searches before that
    scan the unindexed rows exactly, which is not the index being measured; max fusion searches the templates
    only, so the identities' centroid index is not waited for)."""
    if not hasattr(g, "client"):
        return
    for name in (g.t_name,):
        g.client._client.flush(name)
        while True:  # Milvus 2.3 keeps pending_index_rows up while it compacts: rows covered is the test
            info = g.client._client.describe_index(name, "vector")
            if info.get("indexed_rows", 0) >= info.get("total_rows", 0):
                break
            time.sleep(1)


def latencies(g, q: np.ndarray, threads: int, per_thread: int) -> np.ndarray:
    out, lock = [], threading.Lock()

    def run(offset):
        mine = []
        for i in range(per_thread):
            p = q[(offset + i) % len(q)][None]
            t = time.perf_counter()
            g.search(p, 10)
            mine.append(time.perf_counter() - t)
        with lock:
            out.extend(mine)

    workers = [threading.Thread(target=run, args=(k * per_thread,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return np.asarray(out) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--kinds", nargs="+", default=["faiss:Flat", "faiss:HNSW32", "faiss:IVF1024,Flat", "milvus:FLAT",
                                                    "milvus:IVF_FLAT", "milvus:HNSW"])
    ap.add_argument("--batch", type=int, default=5000, help="identities per enroll_many call while filling")
    ap.add_argument("--single", type=int, default=100, help="single enrollments timed after filling")
    ap.add_argument("--searches", type=int, default=200, help="timed searches per thread")
    ap.add_argument("--faiss-threads", type=int, default=1, help="FAISS OpenMP threads (one per request worker)")
    ap.add_argument("--milvus-nlist", type=int, default=None,
                    help="nlist of the Milvus IVF kinds (default 1024; FAISS takes it in the factory string)")
    ap.add_argument("--attach", default=None, help="a Milvus server URI whose bench_* collections an earlier run "
                                                   "filled: measure them without filling again (no build time)")
    ap.add_argument("--attach-pid", default=None, help="that server's process id (for its memory)")
    ap.add_argument("--milvus-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="milvus.yaml settings of the server started for the run, e.g. "
                         "dataCoord.segment.sealProportion=1 dataCoord.compaction.enableAutoCompaction=false")
    ap.add_argument("--probe-batch", type=int, default=100,
                    help="probes per search call when measuring recall (a server answers each call in its timeout)")
    ap.add_argument("--sweep", nargs="*", default=[], help="search settings tried on each approximate index after "
                                                           "the default one, e.g. nprobe=128 efSearch=256 ef=128")
    args = ap.parse_args()

    import faiss

    from visrec.index.gallery.faiss import set_search_threads

    faiss.omp_set_num_threads(args.faiss_threads)
    set_search_threads(args.faiss_threads)  # per searching thread, as the service sets it per request worker
    import torch

    torch.set_num_threads(args.faiss_threads)  # batched exact searches are a torch product, as in the service
    server, server_root = None, None
    if args.attach:
        class Attached:  # the server an earlier run started and filled
            uri, pid = args.attach, int(args.attach_pid) if args.attach_pid else "self"

            def stop(self):
                pass

        server = Attached()
    elif any(k.startswith("milvus:") for k in args.kinds):
        from milvus_server import MilvusServer

        settings = dict(s.split("=", 1) for s in args.milvus_set)
        server_root = Path(tempfile.mkdtemp(prefix="visrec-milvus-"))
        server = MilvusServer(server_root, settings).start()
    rows = []
    try:
        for n in args.identities:
            x, q = synthetic(n, args.dim, args.queries)
            faiss.omp_set_num_threads(2)
            _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
            faiss.omp_set_num_threads(args.faiss_threads)
            for kind in args.kinds:
                rss0 = rss_mb()
                g = open_kind(kind, server, f"bench_{n}_{kind.split(':')[1].replace(',', '_')}", args.milvus_nlist)
                t = time.perf_counter()
                if not args.attach:
                    for start in range(0, n, args.batch):
                        g.enroll_many([(f"p{i}", x[i:i + 1]) for i in range(start, min(n, start + args.batch))])
                wait_indexed(g)
                build = time.perf_counter() - t if not args.attach else float("nan")
                single = []
                extra = np.random.default_rng(1).standard_normal((args.single, args.dim), dtype=np.float32)
                for i, v in enumerate(extra):
                    t = time.perf_counter()
                    g.enroll(f"extra{i}", v[None])
                    single.append((time.perf_counter() - t) * 1000)
                mem = rss_mb(server.pid) if kind.startswith("milvus:") else rss_mb() - rss0
                folder = g._file.path.parent if getattr(g, "_file", None) is not None else None
                for setting in [None] + [s for s in args.sweep if "Flat" != kind.split(":")[1] and s.split("=")[0] in
                                         str(getattr(g, "search_params", ""))]:
                    label = kind if not (args.milvus_nlist and kind.startswith("milvus") and "IVF" in kind) \
                        else f"{kind} nlist={args.milvus_nlist}"
                    if setting is not None:  # the same index searched with another nprobe / efSearch / ef
                        name, value = setting.split("=")
                        g.search_params[name] = int(value)
                        for ann in getattr(g, "_ann", {}).values():
                            ann.search_params[name] = int(value)
                        label = f"{label} {setting}"
                    found = [row for i in range(0, len(q), args.probe_batch)
                             for row in g.search(q[i:i + args.probe_batch], 10)]
                    names = [[int(m.identity[1:]) for m in row if m.identity.startswith("p")] for row in found]
                    r1 = float(np.mean([bool(f) and f[0] == t[0] for f, t in zip(names, truth)]))
                    r10 = float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(names, truth)]))
                    lat1 = latencies(g, q, 1, args.searches)
                    lat8 = latencies(g, q, 8, args.searches // 4)
                    row = {"n": n, "kind": label, "build_s": build, "enroll_rate": n / build,
                           "single_p50": np.percentile(single, 50), "single_p99": np.percentile(single, 99),
                           "r1": r1, "r10": r10, "p50_1": np.percentile(lat1, 50), "p99_1": np.percentile(lat1, 99),
                           "p50_8": np.percentile(lat8, 50), "p99_8": np.percentile(lat8, 99), "mem_mb": mem}
                    rows.append(row)
                    print(f"{n:>9,} {label:<20} build {build:7.1f} s ({n / build:8.0f}/s)  enroll p50/p99 "
                          f"{row['single_p50']:6.1f}/{row['single_p99']:6.1f} ms  recall@1 {r1:.4f} @10 {r10:.4f}  "
                          f"search c1 {row['p50_1']:6.1f}/{row['p99_1']:6.1f} ms  c8 {row['p50_8']:6.1f}/"
                          f"{row['p99_8']:6.1f} ms  mem {mem:7.0f} MB", flush=True)
                if kind.startswith("milvus:") and not args.attach:
                    for name in (g.t_name, g.i_name, g.info_name):
                        g.client._client.drop_collection(name)
                elif kind.startswith("milvus-lite:"):
                    folder = Path(g.uri).parent
                g.close()
                del g
                if folder is not None:
                    shutil.rmtree(folder)
    finally:
        if server is not None:
            server.stop()
        if server_root is not None:  # the server's data (gigabytes at a million identities)
            shutil.rmtree(server_root, ignore_errors=True)
    print("\n| identities | gallery (index) | bulk enroll | single enroll p50 / p99 | recall@1 | recall@10 | "
          "search p50 / p99, 1 client | p50 / p99, 8 clients | memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['kind']} | {r['build_s']:.0f} s ({r['enroll_rate']:,.0f}/s) | "
              f"{r['single_p50']:.1f} / {r['single_p99']:.1f} ms | {r['r1']:.4f} | {r['r10']:.4f} | "
              f"{r['p50_1']:.1f} / {r['p99_1']:.1f} ms | {r['p50_8']:.1f} / {r['p99_8']:.1f} ms | "
              f"{r['mem_mb']:,.0f} MB |")

    for r in rows:  # the gallery's overhead over bare FAISS, same run
        peer = next((p for p in rows if p["n"] == r["n"] and p["kind"].startswith("faiss-raw:")), None)
        if peer is not None and r["kind"] in ("faiss:Flat", "faiss-file:Flat"):
            print(f"{r['n']:,} {r['kind']} / {peer['kind']}: search p50 {r['p50_1'] / peer['p50_1']:.2f}x, "
                  f"p99 {r['p99_1'] / peer['p99_1']:.2f}x at 1 client; p50 {r['p50_8'] / peer['p50_8']:.2f}x, "
                  f"p99 {r['p99_8'] / peer['p99_8']:.2f}x at 8")


if __name__ == "__main__":
    main()
