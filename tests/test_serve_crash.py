"""Kill -9 the server during a stream of enrollments, restart it: every acknowledged enrollment is there once."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
pytest.importorskip("pymilvus", reason="the Milvus gallery needs visrec[serve]")
import httpx  # noqa: E402

from conftest import free_port, wait_healthy  # noqa: E402
from visrec.data.images import encode_jpeg  # noqa: E402


def start(config, log):
    return subprocess.Popen([sys.executable, "-m", "visrec.cli", "serve", "--config", str(config), "--aligned"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def serve(tmp_path, model, gallery: str):
    """``visrec serve`` in its own process group with ``gallery`` (YAML flow mapping): (url, config, log, proc)."""
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"host: 127.0.0.1\nport: {port}\nfaces:\n  model: {model}\n  gallery: {{{gallery}}}\n")
    log = open(tmp_path / "server.log", "wb")
    return f"http://127.0.0.1:{port}", cfg, log, start(cfg, log)


def enroll_stream(url, acked: list, refused: dict, stop: threading.Event, seed: int, timeout: float):
    """Enroll p0000, p0001, ... one random photo each until ``stop``; acknowledged names go to ``acked``, refused
    ones to ``refused`` (status, error); ends when the server itself dies mid-request (never acknowledged)."""
    rng = np.random.default_rng(seed)
    i = 0
    with httpx.Client(timeout=timeout) as client:
        while not stop.is_set():
            img = encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
            try:
                r = client.post(url + "/v1/faces/enroll", data={"identity": f"p{i:04d}"}, files={"image": img})
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                acked.append(f"p{i:04d}")
            else:
                refused[f"p{i:04d}"] = (r.status_code, r.json().get("error", "")[:200])
            i += 1


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)


def stop_service(proc, log):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()


def each_acknowledged_once(url, acked: list, refused: dict) -> None:
    """What the service lists now: every acknowledged name once, with one template; no refused name."""
    got = {r["identity"]: r["templates"] for r in httpx.get(url + "/v1/faces", timeout=60).json()["identities"]}
    assert not [a for a in acked if a not in got], f"acknowledged but lost: {[a for a in acked if a not in got]}"
    assert not [r for r in refused if r in got], f"refused but enrolled: {[(r, refused[r]) for r in refused if r in got]}"
    assert all(n == 1 for n in got.values()), f"duplicates: {got}"


@pytest.mark.slow
@pytest.mark.parametrize("gallery", ["backend: milvus, uri: {dir}/gallery.db", "backend: faiss, path: {dir}/gallery.sqlite"])
def test_kill_9_during_enrollment_keeps_every_acknowledged_one(tmp_path, tiny_face_model, gallery):
    url, cfg, log, proc = serve(tmp_path, tiny_face_model, gallery.format(dir=tmp_path))
    acked, refused, stop = [], {}, threading.Event()
    try:
        wait_healthy(url, proc)
        t = threading.Thread(target=enroll_stream, args=(url, acked, refused, stop, 0, 30))
        t.start()
        wait_for(lambda: len(acked) >= 12, 120)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole service, mid-stream
        proc.wait()
        stop.set()
        t.join()
        assert len(acked) >= 12 and not refused, (tmp_path / "server.log").read_text()[-2000:]
        proc = start(cfg, log)
        wait_healthy(url, proc)
        each_acknowledged_once(url, acked, refused)
        r = httpx.post(url + "/v1/faces/enroll", data={"identity": "after"},
                       files={"image": encode_jpeg(np.zeros((112, 112, 3), np.uint8))}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        stop_service(proc, log)


@pytest.mark.slow
def test_kill_9_of_the_milvus_server_during_enrollment_loses_nothing_acknowledged(tmp_path, tiny_face_model,
                                                                                  milvus_server):
    """The gallery's Milvus *server* dies mid-stream and comes back: every enrollment the service acknowledged
    is there once, none it refused appears, and the service serves again without a restart of its own. The
    session's server is the one killed (one Milvus at a time on a 2-core machine); it is running again after."""
    milvus = milvus_server
    url, cfg, log, proc = serve(tmp_path, tiny_face_model, f"backend: milvus, uri: '{milvus.uri}', collection: crash")
    acked, refused, stop = [], {}, threading.Event()
    try:
        wait_healthy(url, proc)
        t = threading.Thread(target=enroll_stream, args=(url, acked, refused, stop, 1, 120))
        t.start()
        wait_for(lambda: len(acked) >= 8, 120)
        milvus.kill()  # the gallery's server, mid-stream; the service lives on
        killed_at = len(acked) + len(refused)
        wait_for(lambda: len(acked) + len(refused) >= killed_at + 3, 60)  # requests meet the dead server
        milvus.start()
        before = len(acked)
        print(f"killed at {killed_at}, restarted with {before} acknowledged and {len(refused)} refused")
        wait_for(lambda: len(acked) >= before + 5, 180)  # and succeed again once it is back
        stop.set()
        t.join(timeout=180)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        assert len(acked) >= before + 5, f"no enrollment succeeded after the restart; refused: {refused}"
        assert refused and all(code == 503 for code, _ in refused.values()), refused
        each_acknowledged_once(url, acked, refused)
        probe = httpx.post(url + "/v1/faces/identify", files={"image": encode_jpeg(np.zeros((112, 112, 3), np.uint8))},
                           timeout=60)
        assert probe.status_code == 200, probe.text
    finally:
        stop.set()
        stop_service(proc, log)
        if milvus.pid is None:  # killed and not restarted: the session's other tests need it back
            milvus.start()
