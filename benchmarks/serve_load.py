"""Bounded load test of ``POST /v1/faces/identify`` on loopback: N concurrent clients for T seconds.

Starts ``visrec serve`` in a subprocess (aligned 112x112 uploads, a random-weight MobileFaceNet, a gallery of
G identities in Milvus Lite or FAISS), then N threads each send identify requests back to back for T
seconds. Prints requests/s and p50/p95/p99 latency (client-side, full HTTP round trip).

    python benchmarks/serve_load.py --clients 8 --seconds 20 --gallery 1000 --backend milvus
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8, choices=range(1, 65), metavar="1..64")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--gallery", type=int, default=1000, help="identities enrolled before the test")
    ap.add_argument("--backend", default="milvus", choices=["milvus", "faiss"])
    ap.add_argument("--settle", type=float, default=15.0,
                    help="seconds to wait after enrolling: Milvus Lite seals and indexes the freshly written "
                         "segments in the background, which would otherwise be timed as identify latency")
    a = ap.parse_args()
    if not 1 <= a.seconds <= 600:
        raise SystemExit("--seconds must be within 1..600 (a bounded test)")
    import httpx
    import torch

    from visrec.data.images import encode_jpeg
    from visrec.models import build_backbone
    from visrec.train.checkpoint import atomic_save

    tmp = Path(tempfile.mkdtemp(prefix="visrec-load-"))
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", embedding_size=512).eval()
    atomic_save({"model_config": {"name": "mobilefacenet", "embedding_size": 512}, "backbone": net.state_dict()},
                tmp / "m" / "model.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gallery = f"{{backend: milvus, uri: {tmp / 'g.db'}}}" if a.backend == "milvus" else "{backend: faiss}"
    (tmp / "serve.yaml").write_text(f"port: {port}\nfaces: {{model: {tmp / 'm'}, aligned: true, gallery: {gallery}}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "visrec.cli", "serve", "--config", str(tmp / "serve.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        rng = np.random.default_rng(0)
        imgs = [encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(32)]
        with httpx.Client(timeout=60) as c:
            for i in range(a.gallery):
                img = encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
                c.post(url + "/v1/faces/enroll", data={"identity": f"id{i:06d}"}, files={"image": img}).raise_for_status()
        time.sleep(a.settle)
        latencies, errors = [], []
        end = time.perf_counter() + a.seconds

        def client(k):
            with httpx.Client(timeout=60) as c:
                j = k
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    r = c.post(url + "/v1/faces/identify", files={"image": imgs[j % len(imgs)]})
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
        print(f"identify, {a.clients} clients x {a.seconds:g} s, gallery {a.gallery} ({a.backend}, settle "
              f"{a.settle:g} s), CPU threads "
              f"{torch.get_num_threads()}: {len(lat) / wall:.1f} requests/s, p50 {np.percentile(lat, 50):.1f} ms, "
              f"p95 {np.percentile(lat, 95):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, errors {len(errors)}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


if __name__ == "__main__":
    main()
