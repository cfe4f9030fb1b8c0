"""No torch file ever runs code: a ``.pt`` whose pickle calls ``os.system`` is planted at every command that
reads model, resume, teacher, pretrained or index files; the payload never runs and the user gets a
``DataError`` naming the file and the refused global. visrec's own files (model.pt, last.rank0.pt,
backbone.pth) need no global at all, resume works, and old resume files (numpy RNG state as an ndarray)
still resume."""

import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli

from visrec.errors import DataError

GLOBAL = f"{os.system.__module__}.system"  # posix.system on Linux: what the payload's pickle names


class Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD-RAN"
    yield path
    assert not path.exists(), "the pickle payload ran"


def plant(path: Path, marker: Path, kind: str = "checkpoint", fmt: str = "zip") -> Path:
    """A malicious torch file at ``path``: a visrec checkpoint, a resume file or a bare state dict whose
    pickle runs the payload; ``fmt`` zip (torch.save), legacy (old torch format) or pickle (plain)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    evil = Evil(marker)
    obj = {"checkpoint": {"model_config": {"name": "mobilefacenet", "x": evil}, "backbone": {}},
           "resume": {"modules": {"head": {"weight": torch.zeros(2, 2)}}, "rng": evil, "global_step": 1},
           "state_dict": {"conv.weight": torch.zeros(1), "bias": evil}}[kind]
    if fmt == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def visrec(args, monkeypatch, capsys) -> tuple[int, str]:
    """The real ``visrec`` entry point in this process: (exit code, stdout + stderr)."""
    code, out, err = run_cli(args, monkeypatch, capsys)
    return code, f"{out} {err}"


def assert_refused(code: int, output: str, path: Path):
    assert code == 2, output  # main() prints a VisrecError and exits 2: no traceback
    assert "Traceback" not in output, output
    assert f"error: {path}: refused to load" in output, output
    assert GLOBAL in output and "weights_only=True" in output, output


# --- the guard is real ------------------------------------------------------------------------------------
def test_the_planted_file_really_runs_code_when_fully_unpickled(tmp_path):
    path = plant(tmp_path / "model.pt", tmp_path / "ran")
    torch.load(path, weights_only=False)  # what visrec used to do
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_the_reader_refuses_every_format_and_names_the_global(tmp_path, marker, fmt):
    from visrec._torchfile import read_torch_file

    path = plant(tmp_path / "x.pt", marker, fmt=fmt)
    with pytest.raises(DataError) as err:
        read_torch_file(path)
    assert str(path) in str(err.value) and GLOBAL in str(err.value) and "weights_only=True" in str(err.value)
    # a whole pickled module (torch.save(model)) is refused too, by its class
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(DataError, match="torch.nn.modules.linear.Linear"):
        read_torch_file(tmp_path / "module.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(DataError, match="not a (readable )?torch file"):
        read_torch_file(tmp_path / "text.pt")


# --- every entry point -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from visrec.data.synth import write_face_dataset

    root = tmp_path_factory.mktemp("faces") / "train"
    write_face_dataset(root, 6, 6, format="recordio", seed=3, difficulty=0.2)
    return root


def run_config(data: Path, out: Path, **over) -> dict:
    raw = {"task": "faces", "output": str(out), "device": "cpu", "seed": 7, "deterministic": True,
           "batch_size": 6, "model": {"name": "mobilefacenet", "embedding_size": 64},
           "data": {"train": str(data), "flip": True},
           "loss": {"name": "arcface", "s": 16.0, "m": 0.3, "sample_rate": 0.5},
           "optim": {"name": "sgd", "lr": 0.05}, "schedule": {"max_steps": 2, "warmup_steps": 1},
           "checkpoint_every": 1, "log_every": 1}
    raw.update(over)
    return raw


def write_yaml(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_budget_export_eval_landmarks_commands(tmp_path, marker, monkeypatch, capsys):
    evil = plant(tmp_path / "run" / "model.pt", marker)
    assert_refused(*visrec(["budget", "check", evil, "-p", "deepglint-light"], monkeypatch, capsys), evil)
    assert_refused(*visrec(["export", tmp_path / "run", "--out", tmp_path / "m.onnx"], monkeypatch, capsys), evil)
    assert not (tmp_path / "m.onnx").exists()
    from visrec.data.images import encode_jpeg
    from visrec.data.synth import write_synthetic_jd
    from visrec.data.synth import render_face
    from visrec.data.verification import write_verification_bin

    # a readable pairs file (10 pairs: one per fold): eval faces reads its data before it loads the model
    faces = [render_face(i % 2, np.random.default_rng(i))[0] for i in range(20)]
    pairs = write_verification_bin(tmp_path / "pairs.bin", faces, [False] * 10)
    assert_refused(*visrec(["eval", "faces", evil, "--data", pairs, "--out", tmp_path / "eval"], monkeypatch, capsys),
                   evil)

    jd = write_synthetic_jd(tmp_path / "jd", 2, seed=1)
    assert_refused(*visrec(["eval", "landmarks", evil, "--data", jd, "--out", tmp_path / "lm"],
                           monkeypatch, capsys), evil)
    image = tmp_path / "face.jpg"
    image.write_bytes(encode_jpeg(render_face(0, np.random.default_rng(0))[0]))
    assert_refused(*visrec(["landmarks", image, "--model", evil, "--out", tmp_path / "lm.png"], monkeypatch, capsys),
                   evil)


def test_serve_and_gallery_commands(tmp_path, marker, monkeypatch, capsys):
    pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
    evil = plant(tmp_path / "model.pt", marker)
    faces = {"model": str(evil), "aligned": True, "gallery": {"backend": "faiss"}}
    # port 0: the service takes its address before it loads a model, and a fixed port may be in use
    cfg = write_yaml({"port": 0, "faces": faces}, tmp_path / "serve.yaml")
    assert_refused(*visrec(["serve", "--config", cfg], monkeypatch, capsys), evil)
    assert_refused(*visrec(["gallery", "list", "--config", cfg], monkeypatch, capsys), evil)
    cfg = write_yaml({"port": 0, "landmarks": {"model": str(evil)}}, tmp_path / "serve-lm.yaml")
    assert_refused(*visrec(["serve", "--config", cfg], monkeypatch, capsys), evil)
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text('{"options": {}, "catalogue": "catalogue", "count": 0}')
    descriptor = plant(index / "descriptor.pt", marker)
    cfg = write_yaml({"port": 0, "products": {"index": str(index)}}, tmp_path / "serve-products.yaml")
    assert_refused(*visrec(["serve", "--config", cfg], monkeypatch, capsys), descriptor)


def test_products_commands_and_index_files(tmp_path, marker, monkeypatch, capsys):
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text('{"options": {}, "catalogue": "catalogue", "count": 0}')
    descriptor = plant(index / "descriptor.pt", marker)
    query = tmp_path / "q.jpg"
    query.write_bytes(b"not read: the index opens first")
    assert_refused(*visrec(["products", "search", query, "--index", index], monkeypatch, capsys), descriptor)
    (tmp_path / "catalogue").mkdir()
    evil = plant(tmp_path / "descriptor-run" / "model.pt", marker)
    assert_refused(*visrec(["products", "index", tmp_path / "catalogue", "--out", tmp_path / "out",
                            "--model", evil], monkeypatch, capsys), evil)
    # library level: the post-processing chain's chain.pt and a descriptor's own weights= file
    from visrec.index.postprocess import Chain
    from visrec.models.products import _load_weights

    chain = plant(index / "chain.pt", marker, "state_dict")
    with pytest.raises(DataError, match=GLOBAL) as err:
        Chain.from_config([]).load(chain)
    assert str(chain) in str(err.value)
    weights = plant(tmp_path / "resnet.pth", marker, "state_dict", fmt="legacy")
    with pytest.raises(DataError, match=GLOBAL) as err:
        _load_weights(torch.nn.Linear(1, 1), weights)
    assert str(weights) in str(err.value)


def test_train_resume_finetune_and_teacher(faces, tiny_face_model, tmp_path, marker, monkeypatch, capsys):
    # train --resume: the output directory's last.rank0.pt
    resume = plant(tmp_path / "run" / "last.rank0.pt", marker, "resume")
    cfg = write_yaml(run_config(faces, tmp_path / "run"), tmp_path / "run.yaml")
    assert_refused(*visrec(["train", "--config", cfg, "--resume", "--no-progress"], monkeypatch, capsys), resume)
    # finetune --from: a downloaded backbone.pth (bare state dict), as a plain pickle
    pth = plant(tmp_path / "backbone.pth", marker, "state_dict", fmt="pickle")
    cfg = write_yaml(run_config(faces, tmp_path / "ft"), tmp_path / "ft.yaml")
    assert_refused(*visrec(["finetune", "--config", cfg, "--model", pth, "--no-progress"], monkeypatch, capsys), pth)
    # distillation teachers: a run dir whose model.pt is fine but whose rank file (the class centres) is not,
    # and a registry teacher with a weights file
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_face_model, teacher)
    rank = plant(teacher / "last.rank0.pt", marker, "resume")
    for spec, bad in ((str(teacher), rank), ({"name": "mobilefacenet", "embedding_size": 64, "weights": str(pth)}, pth)):
        raw = run_config(faces, tmp_path / "kd", task="faces_kd")
        raw["loss"] = {**raw["loss"], "distill": {"teacher": spec, "feature": 1.0}}
        cfg = write_yaml(raw, tmp_path / "kd.yaml")
        assert_refused(*visrec(["train", "--config", cfg, "--no-progress"], monkeypatch, capsys), bad)


def test_the_installed_visrec_script_refuses_with_exit_2(tmp_path, marker):
    """The console script itself, in a fresh process: exit 2, the message, no traceback."""
    import subprocess

    evil = plant(tmp_path / "model.pt", marker)
    script = Path(sys.executable).with_name("visrec")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "visrec.cli"]
    res = subprocess.run([*cmd, "export", str(evil), "--out", str(tmp_path / "m.onnx")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "2000"})
    assert_refused(res.returncode, res.stdout + res.stderr, evil)


def test_a_file_that_is_no_torch_file_at_all_says_so(tmp_path):
    """A run's config.yaml given as a model gave the unpickler's 'pop from empty list'."""
    from visrec._torchfile import read_torch_file

    for name, data in (("config.yaml", b"task: faces\noutput: runs/x\n"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"{name}: not a torch file: torch.save writes a zip archive") as err:
            read_torch_file(tmp_path / name)
        assert "pop from" not in str(err.value)


# --- visrec's own files load ---------------------------------------------------------------------------------
def test_own_files_need_no_global_and_resume(faces, tmp_path):
    from visrec.models import build_backbone
    from visrec.train.checkpoint import init_backbone, load_backbone
    from visrec.config import parse_config
    from visrec.train.trainer import train

    out = tmp_path / "run"
    cfg = parse_config(run_config(faces, out, schedule={"max_steps": 3, "warmup_steps": 1}))
    assert train(cfg, progress=False, stop_after_steps=1).global_step == 1
    for name in ("model.pt", "last.rank0.pt", "backbone.pth"):  # plain data: not even numpy's globals
        assert torch.serialization.get_unsafe_globals_in_checkpoint(out / name) == [], name
        torch.load(out / name, weights_only=True)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.global_step == 3 and not resumed.stopped_early
    model, spec = load_backbone(out)
    assert spec == {"name": "mobilefacenet", "embedding_size": 64}
    fresh = build_backbone(**spec)
    init_backbone(fresh, out / "backbone.pth", "mobilefacenet")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    # an old resume file (numpy's RNG state as get_state()'s tuple with an ndarray) still resumes, its numpy
    # state restored exactly
    from visrec._torchfile import read_torch_file
    from visrec.train.checkpoint import set_rng_state

    state = read_torch_file(out / "last.rank0.pt")
    np.random.seed(123)
    state["rng"]["numpy"] = np.random.get_state()
    expected = np.random.random(4)
    torch.save(state, out / "last.rank0.pt")
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(out / "last.rank0.pt")
    old = read_torch_file(out / "last.rank0.pt")
    np.random.seed(0)
    random.seed(0)
    set_rng_state(old["rng"])
    assert np.array_equal(np.random.random(4), expected)
    cfg = parse_config(run_config(faces, out, schedule={"max_steps": 4, "warmup_steps": 1}))
    assert train(cfg, resume=True, progress=False).global_step == 4


# --- sizes a torch file declares are bounded by the file ------------------------------------------------------
def _vm_peak_kib() -> int:
    """The process's peak virtual memory (VmPeak): torch allocates storages untouched, so RSS would not show
    a declared 8 GB storage, while the address space it reserved does."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmPeak:"))


def _legacy_file_declaring(path: Path, elements: int) -> Path:
    """An old-format torch file (``_use_new_zipfile_serialization=False``) of one float32 tensor of 70,001
    values whose pickle declares ``elements`` for its storage instead: the 4-byte count after the BININT
    opcode patched, as /tmp/probe-models/bigshape.py does. It holds 280 kB of floats."""
    import struct

    torch.save({"w": torch.zeros(70001)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    old = b"J" + struct.pack("<i", 70001)
    assert raw.count(old) == 2  # the storage's element count and the tensor's size
    at = raw.index(old)  # the storage's persistent id comes first
    path.write_bytes(raw[:at] + b"J" + struct.pack("<i", elements) + raw[at + 5:])
    return path


@pytest.mark.parametrize("elements", [2**31 - 1, 2**28])  # 8.6 GB and 1 GB of float32 declared in 280 kB
def test_an_old_format_file_declaring_a_huge_storage_is_refused_before_it_is_allocated(tmp_path, elements):
    from visrec._torchfile import read_torch_file

    path = _legacy_file_declaring(tmp_path / "big_legacy.pt", elements)
    assert path.stat().st_size < 300_000
    import tracemalloc

    before = _vm_peak_kib()
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            read_torch_file(path)
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _vm_peak_kib() - before < 512 * 1024, "an allocation the size of the declared storage was made"
    assert traced < 32 * 2**20
    assert str(path) in str(err.value) and "declare" in str(err.value), err.value
    assert f"{elements * 4 + 8:,}" in str(err.value)  # the bytes its storage needs, against those the file holds
    # the same file, unpatched, loads (an old-format file is not refused for being old)
    torch.save({"w": torch.arange(5.0), "i": torch.arange(3)[1:]}, tmp_path / "ok.pt",
               _use_new_zipfile_serialization=False)
    ok = read_torch_file(tmp_path / "ok.pt")
    assert ok["w"].tolist() == [0, 1, 2, 3, 4] and ok["i"].tolist() == [1, 2]


def test_a_length_inside_a_non_zip_file_never_sizes_a_read_beyond_the_file(tmp_path):
    """A pickle's 4-byte string length (BINUNICODE) of 4 GB in a 20-byte file: reading it must not make a
    4 GB buffer (BufferedReader.read(n) allocates n first); the refusal stays a DataError naming the file."""
    import io
    import pickletools
    import struct

    from visrec._torchfile import read_torch_file

    path = tmp_path / "long.pt"
    path.write_bytes(b"\x80\x02X" + struct.pack("<I", 2**32 - 1) + b"abc")
    before = _vm_peak_kib()
    with pytest.raises(DataError, match="long.pt"):
        read_torch_file(path)
    assert _vm_peak_kib() - before < 512 * 1024
    # in an old-format file, past the magic number: the storage scan reads it through the same bounded reader
    legacy = tmp_path / "legacy_long.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    raw = io.BytesIO(legacy.read_bytes())
    for _ in range(3):  # magic number, protocol, system info: the object's pickle starts after them
        list(pickletools.genops(raw))
    legacy.write_bytes(raw.getvalue()[:raw.tell()] + b"\x80\x02X" + struct.pack("<I", 2**32 - 1) + b"abc")
    before = _vm_peak_kib()
    with pytest.raises(DataError, match="legacy_long.pt.*old format.*cannot be read"):
        read_torch_file(legacy)
    assert _vm_peak_kib() - before < 512 * 1024


def test_a_file_replaced_by_atomic_save_keeps_its_permission_bits(tmp_path):
    """visrec models calibrate writes the threshold into model.pt in place: a read-only model came back 0644."""
    import stat

    import torch

    from visrec._torchfile import atomic_save

    path = tmp_path / "model.pt"
    atomic_save({"a": torch.zeros(1)}, path)
    path.chmod(0o444)
    atomic_save({"a": torch.ones(1)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444 and torch.load(path, weights_only=True)["a"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
