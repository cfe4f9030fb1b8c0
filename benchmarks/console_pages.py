"""What the web console's gallery view costs on a large gallery: the paged identity list it asks for against
the whole list the earlier page fetched (its peer, in the same run), over HTTP through the service.

A durable FAISS gallery (the default backend) is filled with ``--identities`` synthetic identities (one 64-d
template each, written in batches with ``enroll_many``); the service is the real app in-process (FastAPI's
TestClient, no network). Timed, each ``--repeats`` times (median reported):

- ``GET /v1/galleries`` — what the console asks when it opens (sizes of each gallery);
- the first page, ``GET /v1/faces?limit=25&offset=0`` — right after a write, so the sorted names are rebuilt;
- a later page, ``offset=50000`` — names already sorted;
- a name search, ``q=id-0004`` (matches a few hundred names);
- the peer: ``GET /v1/faces`` with no paging parameters (every identity, as the earlier page fetched them).

    python benchmarks/console_pages.py --identities 100000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny model helper


def timed(fn, repeats: int, before=None) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from conftest import save_tiny_face_model
    from visrec.index.gallery import open_gallery
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    work = Path(tempfile.mkdtemp(prefix="console-pages-"))
    model = save_tiny_face_model(work / "model")
    path = work / "gallery.sqlite"
    t = time.perf_counter()
    g = open_gallery("faiss", path=path, model_name=None, dim=64)
    rng = np.random.default_rng(0)
    for start in range(0, args.identities, 5000):
        n = min(5000, args.identities - start)
        x = rng.normal(size=(n, 64)).astype(np.float32)
        g.enroll_many([(f"id-{start + i:07d}", x[i:i + 1]) for i in range(n)])
    g.close()
    print(f"filled {args.identities:,} identities in {time.perf_counter() - t:.1f} s")

    cfg = ServeConfig(faces={"model": str(model), "aligned": True, "gallery": {"backend": "faiss", "path": str(path)}})
    with TestClient(create_app(cfg)) as c:
        gallery = c.app.state.visrec.state["galleries"]["default"]
        # dropping the kept names is what any write does; the first page then sorts them again
        drop = lambda: setattr(gallery, "_names", None)  # noqa: E731
        rows = [
            ("GET /v1/galleries (names not yet sorted)", *timed(lambda: c.get("/v1/galleries"), args.repeats, drop)),
            ("first page, after a write", *timed(lambda: c.get("/v1/faces", params={"limit": 25}), args.repeats, drop)),
            ("page at offset 50,000", *timed(lambda: c.get("/v1/faces", params={"limit": 25, "offset": 50_000}),
                                             args.repeats)),
            ("name search q=id-0004", *timed(lambda: c.get("/v1/faces", params={"limit": 25, "q": "id-0004"}),
                                             args.repeats)),
            ("peer: every identity (no paging)", *timed(lambda: c.get("/v1/faces"), args.repeats)),
        ]
    print(f"\n{args.identities:,} identities, median of {args.repeats}:")
    print(f"{'request':45s} {'ms':>9s} {'bytes':>12s}")
    for name, ms, r in rows:
        assert r.status_code == 200, r.text
        print(f"{name:45s} {ms:9.1f} {len(r.content):12,d}")
    peer = rows[-1][1]
    print(f"\nfirst page after a write vs the peer: {peer / rows[1][1]:.1f}x faster; a later page: "
          f"{peer / rows[2][1]:.0f}x")


if __name__ == "__main__":
    main()
