"""Bounded load test of the service on loopback: N concurrent clients for T seconds against one route.

Starts ``visrec serve`` in a subprocess, then N threads each send requests back to back for T seconds; prints
requests/s and p50/p95/p99 latency (client-side, the full HTTP round trip).

- ``--route identify`` (default): aligned 112x112 uploads, a random-weight MobileFaceNet 512-d, a gallery of
  ``--gallery`` identities: enrolled over HTTP, or with ``--prefill`` written straight into the gallery before
  the service starts (random unit templates under the model's name: what 100,000 identities need).
  ``--backend faiss-file`` is the default gallery (durable FAISS), ``faiss`` in memory, ``milvus`` Milvus Lite.
- ``--route landmarks``: ``POST /v1/landmarks`` with a box on a 256x256 photo, a random-weight landmark model
  (``--landmarks pfld:1.0``, name:width) served by ``--runtime`` (torch, or onnx: exported beside it first).

``--threads`` sets the service's intra-op threads (torch, FAISS, ONNX Runtime per request worker; default the
service's own choice: cores / max_concurrent).

    python benchmarks/serve_load.py --clients 8 --seconds 20 --gallery 100000 --prefill --backend faiss-file
    python benchmarks/serve_load.py --route landmarks --landmarks pfld:1.0 --runtime onnx --clients 1
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def prefill(tmp: Path, backend: str, n: int, model_name: str, dim: int) -> str:
    """Write ``n`` random identities into the gallery the service will open; returns its config."""
    from visrec.index.gallery import open_gallery

    rng = np.random.default_rng(0)
    if backend == "milvus":
        g, cfg = open_gallery("milvus", uri=str(tmp / "g.db"), model_name=model_name, dim=dim), \
            f"{{backend: milvus, uri: {tmp / 'g.db'}}}"
    elif backend == "faiss-file":
        g, cfg = open_gallery("faiss", path=tmp / "g.sqlite", model_name=model_name, dim=dim), \
            f"{{backend: faiss, path: {tmp / 'g.sqlite'}}}"
    else:
        raise SystemExit("--prefill needs a gallery that outlives this process: --backend faiss-file or milvus")
    for start in range(0, n, 5000):
        x = rng.standard_normal((min(5000, n - start), dim), dtype=np.float32)
        g.enroll_many([(f"id{start + i:07d}", x[i:i + 1]) for i in range(len(x))])
    g.close()
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--route", default="identify", choices=["identify", "landmarks"])
    ap.add_argument("--clients", type=int, default=8, choices=range(1, 65), metavar="1..64")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--gallery", type=int, default=1000, help="identities in the gallery before the test")
    ap.add_argument("--backend", default="faiss-file", choices=["milvus", "faiss", "faiss-file"])
    ap.add_argument("--prefill", action="store_true", help="write the gallery directly instead of over HTTP")
    ap.add_argument("--threads", type=int, default=None, help="the service's intra-op threads")
    ap.add_argument("--landmarks", default="pfld:1.0", help="landmark model name:width for --route landmarks")
    ap.add_argument("--runtime", default="torch", choices=["torch", "onnx"], help="landmark model runtime")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds to wait before timing (default 15 for Milvus Lite, which seals and indexes "
                         "freshly written segments in the background, else 0)")
    a = ap.parse_args()
    if not 1 <= a.seconds <= 600:
        raise SystemExit("--seconds must be within 1..600 (a bounded test)")
    settle = a.settle if a.settle is not None else (15.0 if a.backend == "milvus" and a.route == "identify" else 0.0)
    import httpx
    import torch

    from visrec.data.images import encode_jpeg
    from visrec.models import build_backbone
    from visrec.models.contract import contract_from_config
    from visrec.train.checkpoint import atomic_save

    tmp = Path(tempfile.mkdtemp(prefix="visrec-load-"))
    torch.manual_seed(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = f"port: {port}\n" + (f"threads: {a.threads}\n" if a.threads else "")
    rng = np.random.default_rng(0)
    if a.route == "identify":
        config = {"name": "mobilefacenet", "embedding_size": 512}
        net = build_backbone(**config).eval()
        atomic_save({"model_config": config, "backbone": net.state_dict(),
                     "contract": contract_from_config(config, embedding_dim=512).to_dict()}, tmp / "m" / "model.pt")
        if a.prefill:
            from visrec.models import load_model

            gallery = prefill(tmp, a.backend, a.gallery, load_model(tmp / "m").name, 512)
        else:
            gallery = {"milvus": f"{{backend: milvus, uri: {tmp / 'g.db'}}}", "faiss": "{backend: faiss}",
                       "faiss-file": f"{{backend: faiss, path: {tmp / 'g.sqlite'}}}"}[a.backend]
        (tmp / "serve.yaml").write_text(head + f"faces: {{model: {tmp / 'm'}, aligned: true, runtime: torch, "
                                               f"gallery: {gallery}}}\n")
        imgs = [encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(32)]
        path, data = "/v1/faces/identify", {}
    else:
        name, width = a.landmarks.split(":")
        config = {"name": name, "num_points": 106, "width_mult": float(width)}
        net = build_backbone(**config).eval()
        atomic_save({"model_config": config, "backbone": net.state_dict(),
                     "contract": contract_from_config(config).to_dict()}, tmp / "lm" / "model.pt")
        if a.runtime == "onnx":
            from visrec.export import export_checkpoint

            export_checkpoint(tmp / "lm", tmp / "lm" / "model.onnx")
        (tmp / "serve.yaml").write_text(head + f"landmarks: {{model: {tmp / 'lm'}, runtime: {a.runtime}}}\n")
        imgs = [encode_jpeg(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(32)]
        path, data = "/v1/landmarks", {"box": "40,40,200,200"}
    proc = subprocess.Popen([sys.executable, "-m", "visrec.cli", "serve", "--config", str(tmp / "serve.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        runtimes = httpx.get(url + "/healthz").json()["runtimes"]
        if a.route == "identify" and not a.prefill:
            with httpx.Client(timeout=60) as c:
                for i in range(a.gallery):
                    img = encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
                    c.post(url + "/v1/faces/enroll", data={"identity": f"id{i:06d}"},
                           files={"image": img}).raise_for_status()
        time.sleep(settle)
        latencies, errors = [], []
        end = time.perf_counter() + a.seconds

        def client(k):
            with httpx.Client(timeout=60) as c:
                j = k
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    r = c.post(url + path, files={"image": imgs[j % len(imgs)]}, data=data)
                    (latencies if r.status_code == 200 else errors).append(time.perf_counter() - t)
                    j += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        lat = np.array(latencies) * 1000
        what = (f"identify, gallery {a.gallery:,} ({a.backend}{', prefilled' if a.prefill else ''})"
                if a.route == "identify" else f"landmarks {a.landmarks}")
        print(f"{what}, {a.clients} clients x {a.seconds:g} s, service threads {a.threads or 'default'}, "
              f"runtimes {runtimes}: {len(lat) / wall:.1f} requests/s, p50 {np.percentile(lat, 50):.1f} ms, "
              f"p95 {np.percentile(lat, 95):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, errors {len(errors)}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


if __name__ == "__main__":
    main()
