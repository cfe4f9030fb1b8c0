"""Files written whole or not at all (``visrec._files.replacing``): a failure leaves the earlier file, two writers of
one file never share a temporary name, and what a killed writer left beside a file is removed by the next writer
of that file, whichever writer it is, while a running process's and another file's temporary files stay."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from visrec._files import replacing

# no process has this id (Linux caps pids at 2^22), so a temporary file carrying it was left by a killed run
DEAD = 4194305


def dead_temp(target: Path, suffix: str = "") -> Path:
    left = target.with_name(f".{target.name}.{DEAD}.0badc0de.tmp{suffix}")
    left.write_bytes(b"half a file")
    return left


def test_a_block_that_fails_leaves_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("earlier")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_two_writers_at_once_get_their_own_names_and_the_last_rename_wins(tmp_path):
    target = tmp_path / "report.html"
    with replacing(target) as first, replacing(target) as second:
        assert first != second
        first.write_text("one")
        second.write_text("two")
    assert target.read_text() == "one"  # the outer block ends last: its rename comes last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_durable_keeps_the_replaced_files_permission_bits(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    target.chmod(0o440)
    with replacing(target, durable=True, keep_mode=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o440


def test_only_a_dead_writers_temporary_files_of_this_very_file_are_removed(tmp_path):
    target = tmp_path / "m.onnx"
    dead = dead_temp(target)
    kept = [tmp_path / f".m.onnx.{os.getpid()}.0badc0de.tmp",  # a running process's (this one's)
            tmp_path / f".m.onnx.5.{DEAD}.0badc0de.tmp",  # a dead writer's of another file, "m.onnx.5"
            tmp_path / ".m.onnx.notapid.tmp", tmp_path / f".m.onnx.{DEAD}.0badc0de.tmp.npz"]  # another suffix
    for path in kept:
        path.write_bytes(b"x")
    with replacing(target) as tmp:
        tmp.write_bytes(b"model")
    assert not dead.exists()
    assert all(p.exists() for p in kept)


def _write_bytes(target: Path) -> None:
    from visrec.data.text import write_bytes_atomic

    write_bytes_atomic(target, b"data")


def _torch_save(target: Path) -> None:
    import torch

    from visrec._torchfile import atomic_save, read_torch_file

    atomic_save({"w": torch.ones(2)}, target)
    assert read_torch_file(target)["w"].sum() == 2


def _verification_bin(target: Path) -> None:
    from visrec.data.verification import read_verification_bin, write_verification_bin

    img = np.zeros((112, 112, 3), np.uint8)
    write_verification_bin(target, [img] * 4, [True, False])
    assert list(read_verification_bin(target)[1]) == [True, False]


def _faiss_index(target: Path) -> None:
    pytest.importorskip("faiss", reason="visrec[index] (faiss-cpu) is not installed")
    from visrec.index.faiss_index import FaissIndex

    FaissIndex(4).build(np.eye(4, dtype=np.float32)).save(target)
    assert FaissIndex.load(target).search(np.eye(4, dtype=np.float32), 1)[1].ravel().tolist() == [0, 1, 2, 3]


def _submission_csv(target: Path) -> None:
    from visrec.data.products import write_ground_truth

    write_ground_truth(target, {"q1": ["c1", "c2"]})


WRITERS = {"write_bytes_atomic": (_write_bytes, "data.bin"), "atomic_save": (_torch_save, "model.pt"),
           "write_verification_bin": (_verification_bin, "val.bin"), "FaissIndex.save": (_faiss_index, "index.faiss"),
           "products csv": (_submission_csv, "val.csv")}


@pytest.mark.parametrize("name", WRITERS)
def test_each_writer_clears_a_killed_writers_temporary_file(tmp_path, name):
    write, filename = WRITERS[name]
    target = tmp_path / filename
    left = dead_temp(target)
    write(target)
    assert target.exists() and not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]


def test_a_recordio_set_is_three_files_renamed_in_and_a_killed_writers_are_cleared(tmp_path):
    from visrec.data.recordio import RecordIOReader, RecordIOWriter

    left = [dead_temp(tmp_path / name) for name in ("train.rec", "train.idx", "property")]
    with RecordIOWriter(tmp_path) as w:
        for label in (0, 0, 1):
            w.add(np.full((112, 112, 3), 40 * label, np.uint8), label)
    assert not any(p.exists() for p in left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]
    assert len(RecordIOReader(tmp_path)) == 3


def test_a_recordio_writer_holds_numbers_not_images_and_leaves_no_spill(tmp_path):
    """The writer kept every JPEG in a list until close: `data prepare faces --format recordio` of 500,000
    photos needed gigabytes of memory. The bytes now go to a nameless spill file as they arrive (tracemalloc:
    the peak stays under a tenth of the 64 MB added, in any label order), the set is the one the list made
    (records grouped by identity, arrival order within one), and a writer that fails leaves nothing behind."""
    import tracemalloc

    from visrec.data.recordio import RecordIOReader, RecordIOWriter

    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(40), 25))  # 1,000 images, identities interleaved

    def payload(k: int) -> bytes:  # made as it is added, as a reader hands each photo's bytes over
        return bytes([k % 251]) * 64_000

    tracemalloc.start()
    with RecordIOWriter(tmp_path / "set") as w:
        for k, label in enumerate(labels):
            w.add(payload(k), int(label))
            assert sorted(p.name for p in (tmp_path / "set").iterdir()) == []  # the spill has no name
        added = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert added < 6.4e6, f"{added:,} bytes held while adding 64 MB"
    r = RecordIOReader(tmp_path / "set")
    order = np.argsort(labels, kind="stable")
    assert len(r) == len(labels) and r.num_classes == 40
    assert [int(r.labels[i]) for i in range(len(r))] == sorted(labels.tolist())
    assert all(r.image_bytes(i) == payload(j) for i, j in zip(range(0, len(r), 97), order[::97]))
    with pytest.raises(RuntimeError, match="stop"):
        with RecordIOWriter(tmp_path / "failed") as w:
            w.add(payload(0), 0)
            raise RuntimeError("stop")
    assert list((tmp_path / "failed").iterdir()) == []


def test_a_killed_enrollments_staged_thumbnail_is_removed_at_the_next_one(tmp_path):
    from visrec.serve.thumbnails import Thumbnails

    thumbs = Thumbnails(tmp_path / "thumbs")
    crop = np.zeros((8, 8, 3), np.uint8)
    staged = thumbs.stage("alice", ["t1"], [crop])
    folder = staged[0][0].parent
    killed = folder / f".{DEAD}.t0.tmp"
    os.replace(staged[0][0], killed)  # as a process killed between staging and publishing leaves it
    running = folder / f".{os.getpid()}.t9.tmp"
    running.write_bytes(b"x")
    thumbs.publish(thumbs.stage("alice", ["t2"], [crop]))
    assert not killed.exists() and running.exists() and (folder / "t2.jpg").exists()


def test_a_torch_file_saved_twice_is_the_same_bytes(tmp_path):
    """Catalogue manifests and exports carry the digests of torch files (a descriptor, a chain): saving the same
    object again, in another process or under another temporary name, must give the same file."""
    import subprocess
    import sys

    import torch

    from visrec._torchfile import atomic_save

    obj = {"w": torch.arange(6.0).view(2, 3), "name": "descriptor"}
    atomic_save(obj, tmp_path / "a.pt")
    atomic_save(obj, tmp_path / "a.pt")  # over itself: another temporary name
    first = (tmp_path / "a.pt").read_bytes()
    code = ("import sys, torch\nfrom visrec._torchfile import atomic_save\n"
            "atomic_save({'w': torch.arange(6.0).view(2, 3), 'name': 'descriptor'}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b" / "a.pt")], check=True, timeout=120)
    assert (tmp_path / "b" / "a.pt").read_bytes() == first


@pytest.mark.parametrize("mix", ["rec of the first write, idx of the second", "rec of the second, idx of the first"])
def test_a_rec_and_idx_of_two_writes_are_refused_saying_to_write_the_set_again(tmp_path, mix):
    """A kill between the writer's renames (or a copy of one file without the other) leaves a .rec and .idx of
    different writes: refused, naming the record, and the message says what to do."""
    import shutil

    from visrec.data.recordio import RecordIOReader, RecordIOWriter
    from visrec.errors import DataError

    for name, n in (("first", 6), ("second", 9)):
        with RecordIOWriter(tmp_path / name) as w:
            for i in range(n):
                w.add(np.random.default_rng(i).integers(0, 255, (112, 112, 3), dtype=np.uint8), i % 3)
    rec, idx = ("first", "second") if mix.startswith("rec of the first") else ("second", "first")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tmp_path / rec / "train.rec", mixed)
    shutil.copy(tmp_path / idx / "train.idx", mixed)
    shutil.copy(tmp_path / rec / "property", mixed)
    with pytest.raises(DataError, match=r"train\.rec, record \d+: .*write the set again"):
        reader = RecordIOReader(mixed)
        for i in range(len(reader)):
            reader.read_record(i + 1)
