"""A disk that refuses a write (full, a quota, a file size limit, read-only, failing) is the system's fault, not the
input's: every command says which file and why in one line and exits 3, the service answers 507 (no room) or 503
in its JSON shape, and what was written whole before (a checkpoint, an earlier export) is still there.

Before, a full disk ended `visrec data synth`, `export`, `train` and the demo in bare tracebacks (torch.save's own
"unexpected pos 704 vs 598" for a checkpoint), and an enrollment or an erasure on the service in a plain-text 500.
The failures here are real ones: a file size limit (RLIMIT_FSIZE, "File too large") in a child process, and SQLite's
own page limit ("database or disk is full")."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from visrec._files import replacing, writing_into
from visrec.errors import DataError, StorageError


# Sets the limit in the child itself (a pre-exec hook is unsafe in a parent with threads, as a pytest-xdist worker
# is), then runs `-c SCRIPT ARGS...` or `-m MODULE ARGS...` as Python would. No file the child writes may grow past
# the limit: Python ignores SIGXFSZ, so a write past it is an OSError EFBIG, as a full disk's is ENOSPC.
LIMITED = textwrap.dedent("""
    import resource, runpy, sys
    limit, mode, target, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    if mode == "-c":
        sys.argv = ["-c", *args]
        exec(compile(target, "<script>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
""")


def run_limited(args: list[str], max_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` (``-c SCRIPT ...`` or ``-m MODULE ...``) under the file size limit ``max_bytes``."""
    # wide enough that Rich never folds a long path inside its error line
    return subprocess.run([sys.executable, "-c", LIMITED, str(max_bytes), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, COLUMNS="1000"))


def test_replacing_names_the_file_a_refused_write_was_for_and_keeps_the_one_there(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"earlier")
    with pytest.raises(StorageError) as caught:
        with replacing(target) as tmp:
            tmp.write_bytes(b"part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a buffered write's error names no file
    err = caught.value
    assert err.path == str(target) and err.no_space and err.reason == os.strerror(errno.ENOSPC)
    assert str(err) == f"{target}: cannot write: No space left on device; make room (disk space, quota or file " \
                       "size limit) and run it again"
    assert target.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    # an error naming another file (one the block was reading) is that file's, not a write of this one
    with pytest.raises(FileNotFoundError):
        with replacing(target):
            (tmp_path / "missing.txt").read_bytes()
    # a writer that replaces the temporary file in turn (a nested block) names the file it becomes
    with pytest.raises(StorageError) as caught:
        with replacing(target) as outer, replacing(outer):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert caught.value.path == str(target) and not caught.value.no_space and "make room" not in str(caught.value)
    assert target.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_writing_into_names_the_output_for_what_the_system_did_not_name(tmp_path):
    stage = tmp_path / "out" / ".stage"
    cases = [(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path / "out")),  # no file named
             (OSError(errno.EDQUOT, "Disk quota exceeded", str(stage / "a.png")), str(tmp_path / "out")),  # staged
             (OSError(errno.EFBIG, "File too large", str(tmp_path / "elsewhere")), str(tmp_path / "elsewhere")),
             (StorageError("No space left on device", path=stage / "b.npy"), str(tmp_path / "out"))]
    for raised, named in cases:
        with pytest.raises(StorageError) as caught:
            with writing_into(tmp_path / "out", stage):
                raise raised
        assert caught.value.path == named and caught.value.no_space, (raised, caught.value)
    with pytest.raises(FileNotFoundError):  # an input that is missing stays what it is
        with writing_into(tmp_path / "out", stage):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "input.jpg"))
    # a library that says why only in its message (FAISS): the system's words still mark a full disk
    assert StorageError("No space left on device").no_space and not StorageError("database is locked").no_space


LIBRARY_WRITERS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from visrec.errors import StorageError
    out, results = Path(sys.argv[1]), {}

    def attempt(name, write):
        try:
            write()
            results[name] = None
        except StorageError as exc:
            results[name] = [exc.path, exc.reason, exc.no_space]

    from visrec._torchfile import atomic_save
    attempt("torch", lambda: atomic_save({"w": torch.zeros(200_000)}, out / "keep.pt"))
    from visrec.index.faiss_index import FaissIndex
    vectors = np.random.default_rng(0).standard_normal((400, 512)).astype(np.float32)
    attempt("faiss", lambda: FaissIndex(512, "Flat").build(vectors).save(out / "index.faiss"))
    from visrec.data.synth import write_face_dataset
    attempt("recordio", lambda: write_face_dataset(out / "faces", 8, 12, format="recordio", seed=0))
    from visrec.train.checkpoint import MetricsLog
    attempt("metrics", lambda: MetricsLog(out / "metrics.jsonl").append({"step": 1, "note": "x" * 300_000}))
    from visrec.search.study import open_storage
    journal, _ = open_storage(str(out / "study.journal"), out)
    attempt("journal", lambda: journal.create_new_study([], study_name="x" * 300_000))
    from visrec.data.synth import write_synthetic_jd
    attempt("landmarks", lambda: write_synthetic_jd(out / "jd", 2))  # small files: nothing refused
    print(json.dumps(results))
""")


def test_each_library_writer_names_the_file_the_system_refused(tmp_path):
    """torch.save reported a refused write as "unexpected pos 704 vs 598", FAISS inside its own RuntimeError, the
    RecordIO writer's nameless spill file, the metrics log and a search's journal by no file at all."""
    import torch

    torch.save({"w": torch.ones(3)}, tmp_path / "keep.pt")
    earlier = (tmp_path / "keep.pt").read_bytes()
    done = run_limited(["-c", LIBRARY_WRITERS, str(tmp_path)], 256 * 1024, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    too_large = os.strerror(errno.EFBIG)
    assert results == {"torch": [str(tmp_path / "keep.pt"), too_large, True],
                       "faiss": [str(tmp_path / "index.faiss"), too_large, True],
                       "recordio": [str(tmp_path / "faces" / "train.rec"), too_large, True],
                       "metrics": [str(tmp_path / "metrics.jsonl"), too_large, True],
                       "journal": [str(tmp_path / "study.journal"), too_large, True],
                       "landmarks": None}
    assert (tmp_path / "keep.pt").read_bytes() == earlier  # replaced only by a complete file
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


def test_a_command_on_a_full_disk_names_the_file_and_exits_3(tmp_path):
    done = run_limited(["-m", "visrec.cli", "data", "synth", "faces", "--out", "s",
                        "--identities", "8", "--per-identity", "12", "--pairs", "20"], 128 * 1024, tmp_path)
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: s/train/train.rec: cannot write: File too large; make room" in " ".join(done.stderr.split())


def test_run_app_exit_codes_for_storage_and_other_system_errors(monkeypatch, capsys):
    from conftest import cli_status

    import visrec.demo

    def refuse(error):
        def run_demo(*args, **kwargs):
            raise error
        monkeypatch.setattr(visrec.demo, "run_demo", run_demo)

    refuse(StorageError("No space left on device", path="demo-out/x", errno=errno.ENOSPC))
    code, err = cli_status(["demo"], monkeypatch, capsys)
    assert code == 3 and err.startswith("error: demo-out/x: cannot write: No space left on device; make room")
    refuse(OSError(errno.ENOENT, "No such file or directory", "/proc/x"))  # one no layer named
    code, err = cli_status(["demo"], monkeypatch, capsys)
    assert (code, err.strip()) == (3, "error: /proc/x: No such file or directory")
    refuse(OSError(errno.EDQUOT, "Disk quota exceeded"))
    code, err = cli_status(["demo"], monkeypatch, capsys)
    assert code == 3 and err.startswith("error: cannot write: Disk quota exceeded; make room")
    refuse(MemoryError())  # the system's refusal of memory: an error line, not a traceback
    code, err = cli_status(["demo"], monkeypatch, capsys)
    assert code == 3 and err.startswith("error: out of memory:") and "Traceback" not in err
    refuse(DataError("bad record", path="x.rec"))  # the input's fault: 2, as before
    assert cli_status(["demo"], monkeypatch, capsys)[0] == 2


def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_resumes_from_it(tmp_path):
    import torch
    import yaml
    from conftest import small_face_rec

    from visrec.config import parse_config
    from visrec.train.trainer import train

    class Factory:  # small_face_rec takes a tmp_path_factory
        def mktemp(self, name):
            path = tmp_path / name
            path.mkdir()
            return path

    data = small_face_rec(Factory(), 6, 4, seed=1)
    raw = {"task": "faces", "output": str(tmp_path / "run"), "device": "cpu", "seed": 7, "batch_size": 6,
           "model": {"name": "mobilefacenet", "embedding_size": 64, "scale": 1, "blocks": [1, 1, 1, 1]},
           "data": {"train": str(data)}, "loss": {"name": "arcface", "s": 16.0, "m": 0.3},
           "optim": {"name": "sgd", "lr": 0.05}, "schedule": {"max_steps": 2, "warmup_steps": 1},
           "checkpoint_every": 2, "log_every": 1}
    train(parse_config(raw), progress=False)
    resume_file = tmp_path / "run" / "last.rank0.pt"
    earlier = resume_file.read_bytes()
    raw["schedule"]["max_steps"] = 4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    done = run_limited(["-m", "visrec.cli", "train", "--config", "run.yaml", "--resume",
                        "--no-progress"], len(earlier) // 2, tmp_path)
    message = " ".join(done.stderr.split())
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: {resume_file}: cannot write: File too large; once there is room, --resume continues from the " \
           "last checkpoint written whole" in message
    assert resume_file.read_bytes() == earlier
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    train(parse_config(raw), resume=True, progress=False)
    assert torch.load(resume_file, weights_only=True)["global_step"] == 4


# -- the service ---------------------------------------------------------------------------------------------------

def test_the_service_answers_507_on_a_full_gallery_and_serves_searches(tmp_path, tiny_face_model):
    pytest.importorskip("faiss")
    from fastapi.testclient import TestClient

    from visrec.data.images import encode_jpeg
    from visrec.data.synth import render_face
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    def photo(i: int) -> bytes:
        return encode_jpeg(render_face(i, np.random.default_rng(i), difficulty=0.1)[0])

    faces = {"model": str(tiny_face_model), "aligned": True,
             "gallery": {"backend": "faiss", "path": str(tmp_path / "g.db")}}
    app = create_app(ServeConfig(faces=faces))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/v1/faces/enroll", data={"identity": "ann"}, files=[("image", photo(1))]).status_code == 200
    db = next(iter(app.state.visrec.state["galleries"].values()))._file.db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full" once these fill
    enrolled = ["ann"]
    for i in range(200):
        r = client.post("/v1/faces/enroll", data={"identity": f"p{i}"}, files=[("image", photo(10 + i))])
        if r.status_code != 200:
            break
        enrolled.append(f"p{i}")
    assert r.status_code == 507, r.text
    answer = r.json()["error"]
    assert "disk is full" in answer and "database or disk is full" in answer and str(tmp_path) not in answer
    names = [row["identity"] for row in client.get("/v1/faces").json()["identities"]]
    assert sorted(names) == sorted(enrolled)  # the refused enrollment was undone whole
    assert client.post("/v1/faces/identify", files={"image": photo(1)}).status_code == 200
    db.execute(f"PRAGMA max_page_count = {1 << 30}")  # room again: the same request succeeds
    again = client.post("/v1/faces/enroll", data={"identity": f"p{i}"}, files=[("image", photo(10 + i))])
    assert again.status_code == 200 and len(client.get("/v1/faces").json()["identities"]) == len(enrolled) + 1


def test_an_error_of_the_servers_storage_is_a_503_in_the_services_shape(tmp_path, tiny_face_model, monkeypatch):
    pytest.importorskip("faiss")
    from fastapi.testclient import TestClient

    from visrec.data.images import encode_jpeg
    from visrec.data.synth import render_face
    from visrec.serve import thumbnails
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    faces = {"model": str(tiny_face_model), "aligned": True,
             "gallery": {"backend": "faiss", "thumbnails": str(tmp_path / "thumbs")}}
    client = TestClient(create_app(ServeConfig(faces=faces)), raise_server_exceptions=False)
    image = encode_jpeg(render_face(1, np.random.default_rng(1), difficulty=0.1)[0])

    def failing(self, identity, template_ids, crops):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "thumbs" / "x.jpg"))

    monkeypatch.setattr(thumbnails.Thumbnails, "stage", failing)
    r = client.post("/v1/faces/enroll", data={"identity": "ann"}, files=[("image", image)])
    assert r.status_code == 503 and "Input/output error" in r.json()["error"], r.text
    assert str(tmp_path) not in r.text and client.get("/v1/faces").json()["identities"] == []


def test_a_milvus_server_out_of_disk_is_a_storage_error_not_one_that_did_not_answer():
    """Milvus Lite on a full disk (reproduced on a 3 MB tmpfs) passes the system's words on in its exception: an
    enrollment was 'did not answer (upsert)', a 503 with a retry that could never succeed."""
    pytest.importorskip("pymilvus")
    from pymilvus.exceptions import MilvusException

    from visrec.index.gallery import GalleryUnavailableError
    from visrec.index.gallery.milvus import _Client

    class Server:
        def __init__(self, message):
            self.message = message

        def upsert(self, *args, **kwargs):
            raise MilvusException(code=1, message=self.message)

    client = _Client(Server("[Errno 28] No space left on device"), "gallery.db", "Session", 5.0)
    with pytest.raises(StorageError) as caught:
        client.upsert("g_templates", [])
    assert caught.value.no_space and caught.value.path == "gallery.db" and "No space left" in str(caught.value)
    client = _Client(Server("server is shutting down"), "gallery.db", "Session", 5.0)
    with pytest.raises(GalleryUnavailableError, match="did not answer \\(upsert\\)"):
        client.upsert("g_templates", [])


def test_opening_a_gallery_file_that_it_already_describes_writes_nothing(tmp_path):
    """An open wrote the gallery's info record every time, so a service on a full disk could not even start to
    answer searches."""
    pytest.importorskip("faiss")
    from visrec.index.gallery import open_gallery

    g = open_gallery("faiss", path=tmp_path / "g.db", model_name="m", dim=4)
    g.enroll("ann", np.eye(4, dtype=np.float32)[:1])
    g.close()
    again = open_gallery("faiss", path=tmp_path / "g.db", model_name="m", dim=4)
    assert again._file.db.total_changes == 0 and again.count() == 1
    again.close()


def test_a_read_only_file_system_is_named_as_such(tmp_path, monkeypatch):
    """Checked up front, a folder on a read-only file system was 'permission denied'; a FAISS gallery file there
    ended in a bare OSError from its lock file."""
    pytest.importorskip("faiss")
    from types import SimpleNamespace

    from visrec.data.text import check_output
    from visrec.index.gallery import open_gallery, store

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(os, "statvfs", lambda folder: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(DataError, match=r"cannot write into .* \(a read-only file system\)"):
        check_output(tmp_path / "out", kind="dir")
    monkeypatch.setattr(os, "statvfs", lambda folder: SimpleNamespace(f_flag=0))
    with pytest.raises(DataError, match=r"\(permission denied\)"):
        check_output(tmp_path / "out", kind="dir")
    monkeypatch.undo()

    def read_only(path, *args, **kwargs):  # what open() of the lock file raises on a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(store, "open", read_only, raising=False)
    with pytest.raises(StorageError) as caught:
        open_gallery("faiss", path=tmp_path / "g.db", model_name="m", dim=4)
    assert caught.value.path == str(tmp_path / "g.db.lock") and "Read-only file system" in str(caught.value)
