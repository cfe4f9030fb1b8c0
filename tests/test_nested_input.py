"""JSON and YAML from outside are parsed within bounds (``visrec._structured``).

A hostile run found: ``[[[...]]]`` fifty thousand deep in a catalogue manifest, a gallery export, a gallery
file, a prepare journal or a config ended the command in a bare ``RecursionError``; ten lines of nested YAML
aliases made ``visrec train --config`` hang (10^9 values built from a few kilobytes); ``a: &a [*a]`` made a
list that contains itself. Every reader now answers with its own error naming the file (and record), and the
files that describe other files are refused from their size before they are read.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from visrec._structured import MAX_CONFIG_FILE_BYTES, MAX_METADATA_FILE_BYTES, MAX_NESTING, MAX_YAML_VALUES
from visrec.errors import ConfigError, DataError, VisrecError

ROOT = Path(__file__).resolve().parents[1]
# past Python's recursion limit (the parser's own failure) and one level past visrec's bound (visrec's check)
VERY_DEEP = "[" * 50_000 + "]" * 50_000
ONE_TOO_DEEP = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
DEPTHS = {"50,000 levels": VERY_DEEP, f"{MAX_NESTING + 1} levels": ONE_TOO_DEEP}


@pytest.fixture
def alarm():
    """``alarm(seconds)``: a reader still running after that long fails instead of hanging the suite."""
    def hung(signum, frame):
        raise TimeoutError("the reader did not return")

    previous = signal.signal(signal.SIGALRM, hung)
    yield signal.alarm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _unit(n=1, dim=16):
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _gallery_file(tmp: Path, deep: str) -> tuple[Path, callable]:
    from visrec.index.gallery import open_gallery

    path = tmp / "g.sqlite"
    g = open_gallery("faiss", path=path, model_name="m")
    g.enroll("ann", _unit())
    g.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE people SET metadata = ?", ('{"k": ' + deep + "}",))
    db.commit()
    db.close()
    return path, lambda: open_gallery("faiss", path=path)


def _gallery_export(tmp: Path, deep: str, field: str) -> tuple[Path, callable]:
    from visrec.index.gallery import open_gallery

    g = open_gallery("faiss", model_name="m")
    g.enroll("ann", _unit(), metadata={"k": 1})
    path = g.export(tmp / "e.npz")
    members = dict(np.load(path))
    members[field] = np.array(deep if field == "info" else '{"ann": ' + deep + "}")
    np.savez(path, **members)
    return path, lambda: open_gallery("faiss", model_name="m").import_(path)


def _catalogue(tmp: Path, deep: str):
    from visrec.index.catalogue import MANIFEST, CatalogueIndex

    (tmp / MANIFEST).write_text('{"options": ' + deep + "}")
    return tmp / MANIFEST, lambda: CatalogueIndex(tmp)


def _sidecar(tmp: Path, deep: str):
    from visrec.train.distill_task import load_teacher_features

    np.save(tmp / "teacher.npy", np.zeros((1, 4), np.float32))
    (tmp / "teacher.json").write_text('{"num_items": ' + deep + "}")
    return tmp / "teacher.json", lambda: load_teacher_features(tmp / "teacher.npy", model_config={}, num_items=1,
                                                                flip_average=True)


def _prepare_journal(tmp: Path, deep: str):
    from visrec.data.prepare import JOURNAL, Journal

    (tmp / JOURNAL).write_text('{"settings": ' + deep + "}\n")
    return tmp / JOURNAL, lambda: Journal(tmp, {})


def _search_journal(tmp: Path, deep: str):
    pytest.importorskip("optuna")
    from visrec.search.study import open_storage

    path = tmp / "study.journal"
    path.write_text('{"op_code": 0, "x": ' + deep + "}\n")
    return path, lambda: open_storage(str(path), tmp)


def _contract(tmp: Path, deep: str):
    from visrec.models.contract import ModelContract

    return tmp / "model.onnx", lambda: ModelContract.from_json('{"dim": ' + deep + "}", path=tmp / "model.onnx")


def _fixtures(tmp: Path, deep: str):
    from visrec.data.fixtures import MANIFEST, load_fixture_manifest

    (tmp / MANIFEST).write_text('{"files": ' + deep + "}")
    return tmp / MANIFEST, lambda: load_fixture_manifest(tmp)


READERS = {  # name: (make(tmp, deep) -> (the file the error must name, the call), the error, what it must say)
    "FAISS gallery file": (_gallery_file, DataError, "table 'people' row 0: metadata is not JSON"),
    "gallery export metadata": (lambda t, d: _gallery_export(t, d, "metadata"), DataError, "field 'metadata'"),
    "gallery export info": (lambda t, d: _gallery_export(t, d, "info"), DataError, "field 'info'"),
    "catalogue manifest": (_catalogue, DataError, "not a readable catalogue index manifest"),
    "teacher-features sidecar": (_sidecar, DataError, "not a teacher-features sidecar"),
    "prepare journal": (_prepare_journal, DataError, "line 1: not a JSON line"),
    "search journal": (_search_journal, DataError, "line 1 is not an Optuna journal entry"),
    "model contract": (_contract, DataError, "model contract is not JSON"),
    "real-face fixtures manifest": (_fixtures, VisrecError, "is not a fixture manifest"),
}


@pytest.mark.parametrize("depth", DEPTHS)
def test_json_nested_too_deep_is_each_readers_own_error_naming_the_file(tmp_path, depth):
    for name, (make, error, says) in READERS.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        path, read = make(folder, DEPTHS[depth])
        with pytest.raises(error) as caught:
            read()
        message = str(caught.value)
        assert not isinstance(caught.value, RecursionError)
        assert str(path) in message and says in message, (name, message)
        if name != "search journal":  # the journal names the line; what is wrong with it is the reader's rule
            # (an export's metadata field holds each identity's metadata one level down: 101)
            assert re.search(rf"nested more than {MAX_NESTING}|{MAX_NESTING + 1} levels deep", message), (name, message)


def test_a_request_nested_too_deep_is_a_400_saying_so():
    """A body holds identity metadata one level down, so it may nest one level more than metadata may."""
    from visrec.faces.images import InputError
    from visrec.serve.requests import parse_json

    for deep in DEPTHS.values():  # inside an object: 102 levels and more
        with pytest.raises(InputError, match=f"body is nested more than {MAX_NESTING + 1} levels deep") as caught:
            parse_json('{"metadata": {"k": ' + deep + "}}", "body")
        assert caught.value.status == 400
    deepest = "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)  # {"metadata": {"k": ...}}: 101 levels in all
    assert parse_json('{"metadata": {"k": ' + deepest + "}}", "body")["metadata"]["k"]


def test_records_nested_too_deep_are_passed_over_where_a_log_is_a_record(tmp_path):
    """The metrics log is a record, not an input: a deep line is passed over as any other line that is not a
    JSON object, and kept (before: a RecursionError ended the resume)."""
    from visrec.train.checkpoint import logged_at, truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.5}\n' + VERY_DEEP + "\n" + ONE_TOO_DEEP + '\n{"step": 3, "loss": 1.0}\n')
    assert truncate_log(log, 2) == 1
    assert log.read_text().splitlines()[1:3] == [VERY_DEEP, ONE_TOO_DEEP]
    assert logged_at(log, 1) == (None, 2.5)


def test_identity_metadata_nested_deeper_than_a_reader_takes_is_refused_when_written(tmp_path):
    """What a gallery stores must read back: metadata 100 levels deep round-trips through the gallery file and
    an export; 101 levels (and a dict that contains itself) is a DataError at enroll, before any write."""
    from visrec.index.gallery import open_gallery

    def nested(levels):  # {"k": [[...]]}: the object is level 1
        value = []
        for _ in range(levels - 2):
            value = [value]
        return {"k": value}

    path = tmp_path / "g.sqlite"
    g = open_gallery("faiss", path=path, model_name="m")
    g.enroll("deep", _unit(), metadata=nested(MAX_NESTING))
    loop = {}
    loop["self"] = loop
    for bad in (nested(MAX_NESTING + 1), loop):
        with pytest.raises(DataError, match=f"metadata for 'ann' is nested more than {MAX_NESTING} levels deep"):
            g.enroll("ann", _unit(), metadata=bad)
    exported = g.export(tmp_path / "e.npz")
    g.close()
    g = open_gallery("faiss", path=path)
    assert [r["identity"] for r in g.list()] == ["deep"] and g.list()[0]["metadata"] == nested(MAX_NESTING)
    assert open_gallery("faiss", model_name="m").import_(exported) == 1


def test_a_milvus_lite_gallery_row_nested_too_deep_is_a_data_error(tmp_path):
    """A Milvus gallery's rows are read back as JSON visrec wrote, but another client of the database may have
    written them: a deep info record or identity metadata is a DataError saying which, not a RecursionError."""
    pytest.importorskip("pymilvus")
    from visrec.index.gallery import MilvusGallery

    g = MilvusGallery(uri=tmp_path / "g.db", model_name="m", dim=16)
    g.enroll("ann", _unit())
    too_deep = {"k": []}
    for _ in range(MAX_NESTING):
        too_deep = {"k": too_deep}
    g._upsert_identities([("ann", 1, _unit()[0], too_deep)])  # past enroll's check, as another client could
    with pytest.raises(DataError, match=f"Milvus gallery: the metadata of 'ann' is not JSON .*nested more than "
                                        f"{MAX_NESTING} levels deep"):
        g.list()
    g._put_info({"info": "[" * 20_000 + "]" * 20_000})  # 40,000 characters: under Milvus's 65,535 a value
    g.close()
    with pytest.raises(DataError, match=f"Milvus gallery: the info record is not JSON .*nested more than "
                                        f"{MAX_NESTING} levels deep"):
        MilvusGallery(uri=tmp_path / "g.db")
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "g.db"))
    client.upsert(g.info_name, [{"key": "info", "value": "[1]", "vector": [0.0, 0.0]}])
    client.close()
    with pytest.raises(DataError, match="Milvus gallery: the info record is a JSON list, not a JSON object"):
        MilvusGallery(uri=tmp_path / "g.db")


# --- YAML --------------------------------------------------------------------------------------------------
BOMB = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + BOMB  # 10^9 values once expanded, 10 lines
YAML_CASES = {
    "alias bomb": (BOMB, f"more than {MAX_YAML_VALUES:,} values once its aliases are expanded"),
    "self-reference": ("model: &a [*a]\n", "a YAML alias inside the node it names"),
    "50,000 levels": ("model: " + VERY_DEEP + "\n", f"YAML nested more than {MAX_NESTING} levels deep"),
    f"{MAX_NESTING + 1} levels": ("model: " + ONE_TOO_DEEP + "\n",
                                  f"YAML nested more than {MAX_NESTING} levels deep"),
}


def _yaml_readers():
    from visrec.config import load_config, read_yaml_mapping
    from visrec.protocols import load_protocol

    return {"run config": load_config, "serve config": read_yaml_mapping, "protocol": load_protocol}


@pytest.mark.parametrize("case", YAML_CASES)
def test_yaml_that_expands_contains_itself_or_nests_too_deep_is_a_config_error(tmp_path, alarm, case):
    from visrec.config import parse_override

    text, says = YAML_CASES[case]
    for name, read in _yaml_readers().items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        alarm(20)
        with pytest.raises(ConfigError) as caught:
            read(path)
        alarm(0)
        assert str(path) in str(caught.value) and says in str(caught.value), (name, str(caught.value))
    if case != "alias bomb":  # one line: what a --set value can hold
        value = text.split(": ", 1)[1].strip()
        with pytest.raises(ConfigError, match=says):
            parse_override(f"model.extra={value}")


def test_a_bomb_over_the_command_line_fails_fast_naming_the_file(tmp_path):
    """The command that hung: `visrec train --config bomb.yaml`."""
    import subprocess
    import sys

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bomb.yaml" in done.stderr and "once its aliases are expanded" in done.stderr
    assert "Traceback" not in done.stderr


def test_yaml_anchors_and_merge_keys_within_the_bounds_still_load(tmp_path):
    """Anchors, aliases and merge keys are a fair way to write a config: within the bounds they load as the
    same config written out."""
    from visrec._structured import StructureError
    from visrec.config import load_config, safe_load

    plain = (ROOT / "configs/faces/synthetic-mbf.yaml").read_text()
    assert "checkpoint_every: 100\nval_every: 200\n" in plain
    anchored = tmp_path / "anchored.yaml"
    anchored.write_text(plain.replace("checkpoint_every: 100\nval_every: 200\n",
                                      "checkpoint_every: &every 150\nval_every: *every\n"))
    cfg = load_config(anchored)
    assert cfg.checkpoint_every == cfg.val_every == 150
    merged = safe_load("base: &base {lr: 0.1, momentum: 0.9}\noptim:\n  <<: *base\n  lr: 0.05\n")
    assert merged["optim"] == {"lr": 0.05, "momentum": 0.9}
    # 1,001 values used 90 times: 91,095 values in all, under the bound; 100 uses (100,104) are over it
    wide = "v: &v [" + ", ".join(["1"] * 1000) + "]\nw: [" + ", ".join(["*v"] * 90) + "]\n"
    assert len(safe_load(wide)["w"]) == 90
    with pytest.raises(StructureError, match=f"more than {MAX_YAML_VALUES:,} values"):
        safe_load(wide.replace(", ".join(["*v"] * 90), ", ".join(["*v"] * 100)))


# --- whole files refused from their size ---------------------------------------------------------------------
def test_files_that_describe_other_files_are_refused_from_their_size(tmp_path):
    """A multi-gigabyte manifest or sidecar was read whole; now its size is checked first (a sparse file: no
    byte of it is read)."""
    from visrec.config import load_config
    from visrec.index.catalogue import MANIFEST, CatalogueIndex
    from visrec.protocols import load_protocol
    from visrec.train.distill_task import load_teacher_features

    def sparse(path: Path, size: int) -> Path:
        with open(path, "wb") as fh:
            fh.truncate(size)
        return path

    (tmp_path / "index").mkdir()
    sparse(tmp_path / "index" / MANIFEST, MAX_METADATA_FILE_BYTES + 1)
    np.save(tmp_path / "t.npy", np.zeros((1, 4), np.float32))
    sparse(tmp_path / "t.json", 4 << 30)
    cases = [
        (lambda: CatalogueIndex(tmp_path / "index"), tmp_path / "index" / MANIFEST, MAX_METADATA_FILE_BYTES),
        (lambda: load_teacher_features(tmp_path / "t.npy", model_config={}, num_items=1, flip_average=True),
         tmp_path / "t.json", MAX_METADATA_FILE_BYTES),
        (lambda: load_config(sparse(tmp_path / "c.yaml", MAX_CONFIG_FILE_BYTES + 1)), tmp_path / "c.yaml",
         MAX_CONFIG_FILE_BYTES),
        (lambda: load_protocol(str(sparse(tmp_path / "p.yaml", MAX_CONFIG_FILE_BYTES + 1))), tmp_path / "p.yaml",
         MAX_CONFIG_FILE_BYTES),
    ]
    for read, path, limit in cases:
        with pytest.raises(DataError) as caught:
            read()
        assert str(path) in str(caught.value) and f"more than the {limit:,}" in str(caught.value), str(caught.value)
