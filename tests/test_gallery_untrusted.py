"""Galleries under hostile input: names are data (never query text), writes are all-or-nothing across failures
and restarts, erased people stay erased, and exports are validated whole before anything is written."""

import io
import json
import unicodedata
import zipfile

import numpy as np
import pytest

pytest.importorskip("faiss", reason="galleries need visrec[index]")

from visrec.errors import DataError  # noqa: E402
from visrec.index.gallery import GalleryMismatchError, MAX_METADATA_CHARS, check_identity, open_gallery  # noqa: E402

HOSTILE = ["O'Brien", 'say "hi"', "back\\slash", "x','victim", "br]ack", "50%", "%", "a/b/c", "日本語",
           "emoji😀", "a\\'b", "zz'] or identity like '%' or identity in ['yy", 'x" or identity != "',
           "key == \"0\"", "?#&="]


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def milvus(open_milvus):
    return open_milvus


GALLERY_DIM = 16  # the conftest's `gallery` fixture (every backend) opens galleries of this size


def test_every_hostile_name_is_enrolled_found_and_erased_as_itself(gallery):
    rng = np.random.default_rng(0)
    vecs = unit(rng.normal(size=(len(HOSTILE) + 1, 16)))
    gallery.enroll("victim", vecs[-1:], metadata={"secret": "victim's"})
    for name, v in zip(HOSTILE, vecs):
        gallery.enroll(name, v[None], metadata={"who": name})
    listed = {r["identity"]: r for r in gallery.list()}
    assert set(listed) == set(HOSTILE) | {"victim"}
    for name, v in zip(HOSTILE, vecs):
        row = gallery.identity(name)
        assert row == {"identity": name, "templates": 1, "metadata": {"who": name}}
        assert gallery.search(v[None], 1)[0][0].identity == name
    for name in HOSTILE:
        assert gallery.remove(name) == 1
        assert gallery.identity(name) is None
    assert [r["identity"] for r in gallery.list()] == ["victim"]
    assert gallery.identity("victim")["metadata"] == {"secret": "victim's"} and gallery.count() == 1


def test_names_are_nfc_normalised_so_both_spellings_are_one_person(gallery):
    nfd = unicodedata.normalize("NFD", "Zoë Ångström")
    assert nfd != "Zoë Ångström" and check_identity(nfd) == "Zoë Ångström"
    gallery.enroll(nfd, unit(np.ones((1, 16))), hashes=["a"])
    gallery.enroll("Zoë Ångström", unit(np.arange(16)[None] + 1.0), hashes=["b"])
    assert gallery.list() == [{"identity": "Zoë Ångström", "templates": 2, "metadata": {}}]
    assert gallery.remove(nfd) == 2 and gallery.count() == 0


def test_metadata_is_checked_before_any_write(gallery):
    x = unit(np.ones((1, 16)))
    for bad in ({"big": "x" * MAX_METADATA_CHARS}, {"nan": float("nan")}, ["not", "an object"], {"f": object()}):
        with pytest.raises(DataError, match="metadata"):
            gallery.enroll("someone", x, metadata=bad)
    gallery.enroll("someone", x, metadata={"half": "x" * (MAX_METADATA_CHARS // 2)})
    with pytest.raises(DataError, match="above the limit"):  # the merged row would not fit
        gallery.enroll("someone", unit(np.arange(16)[None] + 1.0), metadata={"other": "y" * (MAX_METADATA_CHARS // 2)})
    assert gallery.count() == 1 and gallery.identity("someone")["templates"] == 1


def test_a_failed_identity_write_leaves_nothing_behind(gallery, monkeypatch):
    x = unit(np.random.default_rng(1).normal(size=(3, 16)))
    gallery.enroll("kept", x[:1])
    monkeypatch.setattr(type(gallery), "_upsert_identities", _boom)
    with pytest.raises(RuntimeError, match="injected"):
        gallery.enroll("rejected", x[1:2])
    with pytest.raises(RuntimeError, match="injected"):
        gallery.enroll("kept", x[2:3])  # a second template of an existing identity
    monkeypatch.undo()
    assert gallery.count() == 1 and [r["identity"] for r in gallery.list()] == ["kept"]
    assert [m.identity for m in gallery.search(x[1:3], 5)[0]] == ["kept"]
    assert gallery.identity("kept")["templates"] == 1


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def test_a_crash_between_templates_and_identity_row_is_rolled_back_on_open(tmp_path, monkeypatch, milvus):
    """The undo itself fails too (as when the process dies, or the server goes away): the pending templates are
    removed when the gallery is next opened, and, in a process that lives on, before its next operation."""
    from visrec.index.gallery import MilvusGallery

    def stored(g):  # what the store holds, read past the gallery's own repair
        return g.client.query(g.t_name, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]

    x = unit(np.random.default_rng(2).normal(size=(5, 16)))
    g = milvus(tmp_path, model_name="m")
    g.enroll("kept", x[:1])
    for reopen, rows in ((True, x[1:3]), (False, x[3:5])):
        with monkeypatch.context() as m:
            m.setattr(MilvusGallery, "_upsert_identities", _boom)
            m.setattr(MilvusGallery, "_rollback", _boom)
            for name, row in (("rejected", rows[:1]), ("kept", rows[1:])):
                with pytest.raises(RuntimeError, match="injected"):
                    g.enroll(name, row)
        # the last half-written template is in the store (the first was repaired before the next write)...
        assert stored(g) == 2
        if reopen:
            g.close()
            g = milvus(tmp_path)  # ...and gone after a restart, not promoted to identities
        assert g.count() == 1 and g.list() == [{"identity": "kept", "templates": 1, "metadata": {}}]
        assert stored(g) == 1
        assert [m.identity for m in g.search(x, 5)[1]] == ["kept"]
    g.close()


@pytest.mark.parametrize("collection", ["_info", "_templates", "_people"])
def test_a_kill_between_creating_a_collection_and_its_index_leaves_a_gallery_that_opens(tmp_path, monkeypatch,
                                                                                       milvus, collection):
    """Milvus creates a collection and its index in two requests; a process killed between them left a
    collection a server refuses to load ("index not found"), so the gallery never opened again."""
    from pymilvus import MilvusClient

    real = MilvusClient.create_index

    def killed(self, name, *args, **kwargs):
        if name.endswith(collection):
            raise KeyboardInterrupt("killed between create_collection and create_index")
        return real(self, name, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MilvusClient, "create_index", killed)
        with pytest.raises(KeyboardInterrupt):
            milvus(tmp_path, model_name="m", dim=16)
    g = milvus(tmp_path, model_name="m", dim=16)
    x = unit(np.random.default_rng(5).normal(size=(2, 16)))
    g.enroll("a", x[:1])
    assert g.count() == 1 and [m.identity for m in g.search(x[:1], 1)[0]] == ["a"]
    assert all(g.client.list_indexes(name) for name in (g.info_name, g.t_name, g.i_name))
    g.close()


def test_an_interrupted_erase_stays_erased(tmp_path, milvus):
    from visrec.index.gallery import identity_key

    x = unit(np.random.default_rng(3).normal(size=(2, 16)))
    g = milvus(tmp_path, model_name="m")
    g.enroll("erase me", x[:1])
    g.enroll("stay", x[1:])
    key = identity_key("erase me")
    g._put_info({f"erasing:{key}": ""})  # what remove() does: mark the erasure, then delete the row first...
    g.client.delete(g.i_name, ids=[key])  # ...and crash here, before the templates go
    assert g.count() == 2
    g.close()
    g = milvus(tmp_path)
    assert [r["identity"] for r in g.list()] == ["stay"] and g.count() == 1
    g.close()


def test_galleries_of_the_name_keyed_layout_are_upgraded_on_open(tmp_path):
    """A gallery written by visrec before identity keys: `<name>` and `<name>_identities` keyed by the name."""
    pytest.importorskip("pymilvus")
    from pymilvus import DataType, MilvusClient

    x = unit(np.random.default_rng(4).normal(size=(3, 16)))
    c = MilvusClient(uri=str(tmp_path / "g.db"))
    for name, key_field, fields in (("faces", "id", [("identity", 256), ("hash", 128)]),
                                    ("faces_identities", "identity", [("metadata", 65535)])):
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field(key_field, DataType.VARCHAR, is_primary=True, max_length=256)
        for f, n in fields:
            s.add_field(f, DataType.VARCHAR, max_length=n)
        if name == "faces_identities":
            s.add_field("templates", DataType.INT64)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=16)
        p = c.prepare_index_params()
        p.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        c.create_collection(name, schema=s, index_params=p, consistency_level="Strong")
    s = c.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    s.add_field("value", DataType.VARCHAR, max_length=65535)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    p = c.prepare_index_params()
    p.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
    c.create_collection("faces_info", schema=s, index_params=p, consistency_level="Strong")
    info = {"model_name": "m", "dim": 16, "fusion": "max", "threshold": 0.25, "target_fpr": 1e-3, "metric": "cosine"}
    c.upsert("faces_info", [{"key": "info", "value": json.dumps(info), "vector": [0.0, 0.0]}])
    c.upsert("faces", [{"id": f"t{i}", "identity": n, "hash": f"h{i}", "vector": x[i].tolist()}
                       for i, n in enumerate(["ann", "ann", "orphan"])])
    c.upsert("faces_identities", [{"identity": "ann", "templates": 2, "metadata": '{"k": 1}',
                                   "vector": x[:2].mean(0).tolist()}])
    c.close()
    g = open_gallery("milvus", uri=str(tmp_path / "g.db"), collection="faces")  # Milvus Lite: where these lived
    assert g.list() == [{"identity": "ann", "templates": 2, "metadata": {"k": 1}}]
    assert g.count() == 2 and g.threshold == pytest.approx(0.25)
    assert g.search(x[1:2], 1)[0][0].identity == "ann"
    assert not g.client.has_collection("faces") and not g.client.has_collection("faces_identities")
    g.close()


# --- gallery exports ---------------------------------------------------------------------------------------
def _export(tmp_path, n=4):
    g = open_gallery("faiss", model_name="m")
    x = unit(np.random.default_rng(5).normal(size=(n, 16)))
    for i in range(n):
        g.enroll(f"p{i}", x[i:i + 1], metadata={"i": i})
    g.set_threshold(0.3, 1e-3)
    return g.export(tmp_path / "g.npz")


def _rewrite(path, out, **changes):
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    for k, v in changes.items():
        data[k] = v(data[k]) if callable(v) else v
    np.savez(out, **data)
    return out


@pytest.mark.parametrize("field, change, message", [
    ("info", lambda v: np.array(str(v).replace("0.3", "NaN")), "not valid JSON"),
    ("info", lambda v: np.array(str(v).replace('"threshold": 0.3', '"threshold": 7.5')), "threshold"),
    ("info", lambda v: np.array(str(v).replace('"metric": "cosine"', '"metric": "manhattan"')), "metric"),
    ("info", lambda v: np.array(str(v).replace('"dim": 16', '"dim": -3')), "dim"),
    ("metadata", lambda v: np.array('{"p0": [1, 2]}'), "JSON object"),
    ("metadata", lambda v: np.array('{"p0": {"x": Infinity}}'), "not valid JSON"),
    ("identities", lambda v: np.array([*v[:-1], "bad\nname"]), "row 3"),
    ("identities", lambda v: np.array([*v[:-1], "p0\u200b"]), "row 3: .*invisible formatting character U\\+200B"),
    ("metadata", lambda v: np.array('{"a\\u202eb": {}}'), "invisible formatting character U\\+202E"),
    ("hashes", lambda v: np.array([*v[:-1], ""]), "hash"),
    ("vectors", lambda v: np.concatenate([v[:-1], np.full((1, 16), np.nan, np.float32)]), "NaN"),
    ("vectors", lambda v: v[:, :8], "dim 16"),
    ("identities", lambda v: v[:-1], "one per row"),
])
def test_a_bad_export_is_refused_whole(tmp_path, field, change, message):
    src = _export(tmp_path)
    bad = _rewrite(src, tmp_path / "bad.npz", **{field: change})
    g = open_gallery("faiss")
    g.enroll("already", unit(np.ones((1, 16))), model_name="m")
    with pytest.raises(DataError, match=message) as err:
        g.import_(bad)
    assert "bad.npz" in str(err.value)
    assert [r["identity"] for r in g.list()] == ["already"] and g.threshold is None


def test_an_export_declaring_a_huge_array_is_refused_without_allocating(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 512)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as zf:
        zf.writestr("vectors.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(DataError, match="declares"):
        open_gallery("faiss").import_(tmp_path / "bomb.npz")


def test_an_import_failing_half_way_is_undone(tmp_path, monkeypatch, milvus):
    src = _export(tmp_path, n=6)
    from visrec.index.gallery import base

    g = milvus(tmp_path / "m")
    calls = {"n": 0}
    real = type(g)._upsert_identities

    def fail_on_the_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(self, *a, **k)

    monkeypatch.setattr(base, "IMPORT_BATCH", 2)  # three batches of two: the second one fails
    monkeypatch.setattr(type(g), "_upsert_identities", fail_on_the_second)
    with pytest.raises(RuntimeError, match="injected"):
        g.import_(src)
    monkeypatch.undo()
    assert g.count() == 0 and g.list() == [] and g.threshold is None and g.info["model_name"] is None
    assert g.import_(src) == 6 and g.threshold == pytest.approx(0.3)
    g.close()


def test_a_stored_nan_threshold_is_cleared_and_none_can_be_set(tmp_path, milvus):
    g = milvus(tmp_path, model_name="m")
    g.enroll("a", unit(np.ones((1, 16))))
    g.info["threshold"] = float("nan")  # as an earlier version's import stored it
    g._write_info()
    g.close()
    g = milvus(tmp_path)
    assert g.threshold is None and g.search(unit(np.ones((1, 16))), 1)[0][0].identity == "a"
    for bad in (float("nan"), float("inf"), 1.5):
        with pytest.raises(DataError, match="threshold"):
            g.set_threshold(bad)
    g.close()


# --- the durable FAISS gallery (a SQLite file beside the in-memory index) ----------------------------------------
def test_a_durable_faiss_gallery_reopens_as_it_was_and_a_failed_write_leaves_no_trace(tmp_path, monkeypatch):
    from visrec.index.gallery import FaissGallery

    x = unit(np.random.default_rng(8).normal(size=(6, 16)))
    path = tmp_path / "g.sqlite"
    g = open_gallery("faiss", path=path, model_name="m", fusion="mean")
    g.enroll("ann", x[:2], metadata={"team": "red"})
    g.enroll_many([("bob", x[2:3]), ("cy", x[3:4])])
    g.remove("cy")
    g.set_threshold(0.25, 1e-3)
    before = (g.list(), g.count(), g.search(x, 3))
    monkeypatch.setattr(FaissGallery, "_upsert_identities", _boom)  # after the templates were written
    with pytest.raises(RuntimeError, match="injected"):
        g.enroll_many([("dee", x[4:5]), ("ann", x[5:6])])
    monkeypatch.undo()
    assert (g.list(), g.count(), g.search(x, 3)) == before
    g.close()
    again = open_gallery("faiss", path=path, fusion="mean")  # fusion is chosen when a gallery is opened
    assert (again.list(), again.count(), again.search(x, 3)) == before
    assert again.threshold == 0.25 and again.info["model_name"] == "m" and again.fusion == "mean"
    with pytest.raises(GalleryMismatchError):
        again.enroll("eve", x[:1], model_name="another")
    again.close()


def test_kill_9_of_a_process_writing_a_durable_faiss_gallery_keeps_every_acknowledged_write(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "g.sqlite"
    code = f"""
import numpy as np, sys
from visrec.index.gallery import open_gallery
g = open_gallery("faiss", path={str(path)!r}, model_name="m")
rng = np.random.default_rng(0)
i = 0
while True:
    g.enroll_many([(f"p{{i}}-{{k}}", rng.normal(size=(1, 16))) for k in range(50)])
    print(i, flush=True)  # acknowledged: the batch's transaction is committed
    i += 1
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acked = []
    t = time.time()
    while len(acked) < 20 and time.time() - t < 120:
        acked.append(int(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the next batch is being written
    proc.wait()
    acked += [int(line) for line in proc.stdout.read().split()]
    assert len(acked) >= 20, "the writer did not get going"
    g = open_gallery("faiss", path=path)
    names = {r["identity"] for r in g.list()}
    assert all(f"p{i}-{k}" in names for i in acked for k in range(50)), "acknowledged but lost"
    assert len(names) % 50 == 0 and len(names) <= 50 * (max(acked) + 2), "a batch was half written"
    assert g.count() == len(names) and all(r["templates"] == 1 for r in g.list())


@pytest.mark.parametrize("table, sql, message", [
    ("templates", "UPDATE templates SET vector = x'00' WHERE rowid = 1", "table 'templates' row 0: vector of 1 bytes"),
    ("people", "UPDATE people SET metadata = 'nope' WHERE rowid = 1", "table 'people' row 0: metadata is not JSON"),
    ("people", "UPDATE people SET identity = ' spaced ' WHERE rowid = 1", "table 'people' row 0"),
    ("info", "UPDATE info SET value = '[1]' WHERE key = 'info'", "info record is not a JSON object"),
    ("people", "DELETE FROM people WHERE rowid = 1", "who has no identity row"),
])
def test_a_tampered_gallery_file_is_refused_naming_the_row(tmp_path, table, sql, message):
    import sqlite3

    path = tmp_path / "g.sqlite"
    g = open_gallery("faiss", path=path, model_name="m")
    g.enroll("ann", unit(np.ones((1, 16))))
    g.close()
    db = sqlite3.connect(path)
    db.execute(sql)
    db.commit()
    db.close()
    with pytest.raises(DataError, match=message):
        open_gallery("faiss", path=path)
