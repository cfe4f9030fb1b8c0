"""``milvus``: a Milvus Lite file (``uri="gallery.db"``, embedded, offline) or a Milvus server or cluster
(``uri="http://host:19530"``), one code path through ``pymilvus.MilvusClient`` (imported lazily, when a
gallery is opened). The collections and the upgrade of older layouts: :class:`MilvusGallery`.

Reads use Milvus's ``Session`` consistency by default: this client always sees its own acknowledged writes
(what the gallery's checks need) without waiting for the server's time tick on every read, which under
``Strong`` costs about 200 ms per read on a standalone server. Several service processes writing one gallery
pass ``consistency="Strong"`` so that each sees the others' writes at once.

A server that goes away mid-call gives :class:`GalleryUnavailableError` (the service answers 503); the write
is undone, or, if the undo cannot reach the server either, repaired from its pending marks before the next
call. A server restarted with its collections released is reloaded on the first call that finds them so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from visrec._optional import require
from visrec._structured import loads_json
from visrec.errors import ConfigError, DataError, StorageError, VisrecError, shown
from visrec.index.gallery.base import (_MILVUS_TOPK, BACKENDS, MAX_HASH_CHARS, MAX_METADATA_CHARS, Gallery,
                                       GalleryUnavailableError, _score_from_raw, check_identity, identity_key)

log = logging.getLogger(__name__)
CONSISTENCY = ("Session", "Strong", "Bounded", "Eventually")
# Milvus vector index types a gallery may use, with the build and search parameters each takes (and bounds)
INDEXES = {"FLAT": ({}, {}),
           "IVF_FLAT": ({"nlist": (1, 65536)}, {"nprobe": (1, 65536)}),
           "IVF_SQ8": ({"nlist": (1, 65536)}, {"nprobe": (1, 65536)}),
           "IVF_PQ": ({"nlist": (1, 65536), "m": (1, 4096), "nbits": (1, 16)}, {"nprobe": (1, 65536)}),
           "HNSW": ({"M": (2, 2048), "efConstruction": (1, 65536)}, {"ef": (1, 65536)})}


def check_milvus_index(index: str, index_params: dict, search_params: dict) -> None:
    """A Milvus index type of :data:`INDEXES` with known parameters in bounds, or :class:`ConfigError`."""
    if index not in INDEXES:
        raise ConfigError(f"Milvus index {str(index)[:80]!r}: expected one of {', '.join(INDEXES)}")
    for what, given, known in (("index", index_params, INDEXES[index][0]), ("search", search_params, INDEXES[index][1])):
        for name, value in (given or {}).items():
            if name not in known:
                raise ConfigError(f"Milvus {index} {what} parameter {name!r}: expected one of "
                                  f"{', '.join(known) or 'none'}")
            lo, hi = known[name]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"Milvus {index} {what} parameter {name}={value!r}: an integer in {lo}..{hi}")
BATCH = 1000  # rows per upsert / ids per key lookup (a few MB per request at 512-d)
_RPC = {"get", "query", "search", "upsert", "delete", "has_collection", "load_collection", "create_collection",
        "drop_collection", "create_index", "list_indexes", "get_load_state"}


class _Client:
    """A ``MilvusClient`` whose calls end in a :class:`GalleryUnavailableError` naming the gallery when the
    server does not answer, time out after ``timeout`` seconds, read at the gallery's consistency level, and
    reload a collection a restarted server has not loaded yet (then retry once).

    The first read of a collection after a delete in it is ``Strong``: pymilvus's session timestamp follows
    inserts and upserts but not deletes, so a ``Session`` read right after a delete (measured on Milvus 2.3)
    still returns the deleted rows."""

    def __init__(self, client, uri: str, consistency: str, timeout: float):
        self._client, self._uri, self._consistency, self._timeout = client, uri, consistency, timeout
        self._deleted_in: set[str] = set()

    def __getattr__(self, name):
        fn = getattr(self._client, name)
        if name not in _RPC:
            return fn

        def call(*args, **kwargs):
            collection = args[0] if args else kwargs.get("collection_name")
            if name in ("get", "query", "search"):
                strong = collection in self._deleted_in
                self._deleted_in.discard(collection)
                kwargs.setdefault("consistency_level", "Strong" if strong else self._consistency)
            elif name == "delete":
                self._deleted_in.add(collection)
            kwargs.setdefault("timeout", self._timeout)
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises its own and gRPC's kinds; sorted below
                if "not loaded" in str(exc) and args and name != "load_collection":
                    try:
                        self._client.load_collection(args[0], timeout=self._timeout)
                        return fn(*args, **kwargs)
                    except Exception as again:  # noqa: BLE001
                        exc = again
                failure = _unavailable(exc, self._uri, name)
                if failure is exc:
                    raise
                raise failure from None

        return call


def _unavailable(exc: Exception, uri: str, call: str) -> Exception:
    """What a failed call raises: ``exc`` itself (visrec's own code), a :class:`StorageError` when the server
    says its disk is full (Milvus Lite passes the system's "[Errno 28] No space left on device" on: the service
    answers 507, not "did not answer"), else a :class:`GalleryUnavailableError` naming the gallery."""
    if not _is_backend_error(exc):
        return exc
    said = str(exc)
    for code in sorted(StorageError.NO_SPACE):
        if os.strerror(code) in said:
            return StorageError(os.strerror(code), path=uri, errno=code)
    return GalleryUnavailableError(f"the Milvus gallery at {uri} did not answer ({call}): {said[:300]}")


def _is_backend_error(exc: Exception) -> bool:
    """A failure of the server or the connection (pymilvus's exceptions, gRPC's), not of visrec's own code."""
    module = type(exc).__module__ or ""
    return module.startswith(("pymilvus", "grpc")) or isinstance(exc, (ConnectionError, TimeoutError))


@BACKENDS.register("milvus")
class MilvusGallery(Gallery):
    """Milvus Lite (a local ``.db`` file) or a Milvus cluster (``http(s)://host:19530``), via MilvusClient.

    Collections: ``<name>_templates`` (template id, identity key, identity, image hash, vector),
    ``<name>_people`` (identity key, identity, template count, metadata, centroid) and ``<name>_info`` (the
    info record, the layout version and pending marks). Rows are keyed and filtered by the hex
    :func:`identity_key`, never by a name. Galleries written by visrec before this layout (``<name>`` and
    ``<name>_identities``, keyed by the name itself) are copied into it on open, then the old collections are
    dropped; the layout record is written between the two, so a crash mid-way repeats the copy.
    """

    # MilvusClient calls are thread-safe and every read is ordered after this client's acknowledged writes
    # (Session consistency, Strong after a delete: _Client), so searches wait neither for each other nor for writes
    reads = "concurrent"
    max_template_hits = _MILVUS_TOPK  # the largest limit a Milvus search accepts
    names_reuse_s = 5.0  # other services may write the same collections: page()'s name list is re-read after 5 s
    LAYOUT = "3"  # 2 -> 3: pending marks name their templates in batches; erasures are marked

    def __init__(self, uri: str | Path = "gallery.db", collection: str = "visrec_faces", *, token: str = "",
                 consistency: str = "Session", timeout: float = 60.0, index: str | None = None,
                 index_params: dict | None = None, search_params: dict | None = None, **kwargs):
        pymilvus = require("pymilvus", "serve", "pymilvus milvus-lite")
        # Milvus Lite has no server-side session timestamp, so every query iterator warns that it falls back
        # to the client's (harmless for a single embedded client): keep that out of the user's log
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
        uri = str(uri)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$", collection):
            raise VisrecError(f"collection name {collection!r}: letters, digits and underscores only")
        if consistency not in CONSISTENCY:
            raise VisrecError(f"consistency {consistency!r}: expected one of {', '.join(CONSISTENCY)}")
        if index is not None:
            check_milvus_index(index, index_params or {}, search_params or {})
        elif "://" not in uri and not Path(uri).exists():  # a new Lite file: its index will be exact (FLAT)
            check_milvus_index("FLAT", index_params or {}, search_params or {})  # before the file is made
        if "://" not in uri:
            if Path(uri).exists() and not Path(uri).is_dir():
                raise DataError("a Milvus Lite gallery is a folder; this is a file, a pipe or a device", path=uri)
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            _check_not_open_elsewhere(Path(uri))
        try:
            client = pymilvus.MilvusClient(uri=_lite_folder(uri), token=token, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds; say which gallery failed
            raise GalleryUnavailableError(f"cannot open the Milvus gallery at {uri}: {str(exc)[:300]}") from None
        self.client = _Client(client, uri, consistency, timeout)
        self.uri, self.name = uri, collection
        self.t_name, self.i_name, self.info_name = f"{collection}_templates", f"{collection}_people", f"{collection}_info"
        self._legacy = (collection, f"{collection}_identities")
        self._dim = None
        super().__init__(**kwargs)
        self._index_spec(index, index_params or {})
        check_milvus_index(self.index["index"], self.index["params"], search_params or {})
        self.search_params = dict(search_params or {})
        layout = self._upgrade_layout()
        if self.info["dim"] is not None:
            self._ensure_collections(self.info["dim"])
            self._reconcile()
            if layout != self.LAYOUT:  # marks of older layouts did not cover erasures: look at every row once
                self._reconcile_by_scan()
        if layout != self.LAYOUT:
            self._put_info({"layout": self.LAYOUT})

    # collections are created on the first enrollment, when the dimension is known
    def _ensure_collections(self, dim: int) -> None:
        from pymilvus import DataType

        if self._dim == dim:
            return
        c = self.client
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        s.add_field("key", DataType.VARCHAR, max_length=64)
        s.add_field("identity", DataType.VARCHAR, max_length=1024)
        s.add_field("hash", DataType.VARCHAR, max_length=MAX_HASH_CHARS * 4)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        p = c.prepare_index_params()
        self._add_vector_index(p)
        self._create(self.t_name, s, p)
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
        s.add_field("identity", DataType.VARCHAR, max_length=1024)
        s.add_field("templates", DataType.INT64)
        s.add_field("metadata", DataType.VARCHAR, max_length=MAX_METADATA_CHARS)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        p = c.prepare_index_params()
        self._add_vector_index(p)
        self._create(self.i_name, s, p)
        self._load(self.t_name, self.i_name)
        self._dim = dim

    def _create(self, name: str, schema, index_params) -> None:
        """Create a collection, then its index: two requests (as MilvusClient makes them too), so a process
        killed between them leaves a collection with no index, which a server then refuses to load ("index
        not found"); the next open finds the index missing and creates it."""
        c = self.client
        if not c.has_collection(name):
            c.create_collection(name, schema=schema, consistency_level="Strong")
        if not c.list_indexes(name):
            c.create_index(name, index_params)

    def _load(self, *names: str) -> None:
        """Load collections, asked for together: a server brings each one up on its own periodic checks
        (about 2.5 s on a Milvus 2.3 standalone server), so two asked together take the time of one."""
        c = self.client
        for name in names:
            c.load_collection(name, _async=True)
        deadline = time.monotonic() + self.client._timeout
        for name in names:
            while str(c.get_load_state(name).get("state")) != "Loaded":
                if time.monotonic() > deadline:
                    raise GalleryUnavailableError(f"the Milvus gallery at {self.uri} did not load {name} within "
                                                  f"{self.client._timeout:g} s")
                time.sleep(0.05)

    def _index_spec(self, index: str | None, params: dict) -> None:
        """The vector index of this gallery's collections: recorded when the gallery is created; reopening
        without naming one keeps it, naming another is refused (the collections would need re-indexing)."""
        rows = self.client.get(self.info_name, ids=["index"], output_fields=["value"])
        stored = _stored(rows[0]["value"], dict, "the index record") if rows else None
        wanted = {"index": index, "params": dict(params)} if index is not None else None
        if stored is None:  # a new gallery takes the one named; one created before indexes were recorded is FLAT
            stored = {"index": "FLAT", "params": {}} if self.client.has_collection(self.t_name) or wanted is None \
                else wanted
            self._put_info({"index": json.dumps(stored, sort_keys=True)})
        if wanted is not None and wanted != stored:
            raise ConfigError(f"gallery {self.name} holds a {stored['index']} index {stored['params']}; it cannot "
                              f"change to {index} {dict(params)} (re-enroll into a new collection)")
        self.index = stored

    def _add_vector_index(self, params) -> None:
        params.add_index(field_name="vector", index_type=self.index["index"], metric_type=self._milvus_metric,
                         params=dict(self.index["params"]))

    @property
    def _milvus_metric(self) -> str:
        return "IP" if self.metric == "cosine" else "L2"

    def _ensure_info(self) -> None:
        from pymilvus import DataType

        c = self.client
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
        s.add_field("value", DataType.VARCHAR, max_length=65535)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field in every collection
        p = c.prepare_index_params()
        p.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        self._create(self.info_name, s, p)
        self._load(self.info_name)

    def _put_info(self, rows: dict[str, str]) -> None:
        self.client.upsert(self.info_name, [{"key": k, "value": v, "vector": [0.0, 0.0]} for k, v in rows.items()])

    def _upgrade_layout(self) -> str | None:
        """Copy a gallery of the name-keyed layout into this one (class docstring), then drop the old one;
        returns the layout the gallery was written in."""
        c = self.client
        done = c.get(self.info_name, ids=["layout"], output_fields=["value"])
        old_t, old_i = self._legacy
        if not done and c.has_collection(old_t) and self.info["dim"] is not None:
            c.load_collection(old_t)
            self._ensure_collections(self.info["dim"])
            templates = self._query_all(old_t, ["id", "identity", "hash", "vector"])
            rows = []
            if c.has_collection(old_i):
                c.load_collection(old_i)
                rows = self._query_all(old_i, ["identity", "templates", "metadata"])
            for i in range(0, len(templates), 1000):
                c.upsert(self.t_name, [{"id": r["id"], "key": identity_key(r["identity"]), "identity": r["identity"],
                                        "hash": r["hash"], "vector": list(r["vector"])} for r in templates[i:i + 1000]])
            by_identity: dict[str, list] = {}
            for r in templates:
                by_identity.setdefault(r["identity"], []).append(np.asarray(r["vector"], np.float32))
            for r in rows:  # a template without a row was never acknowledged: _reconcile drops it
                vectors = by_identity.get(r["identity"])
                if vectors:
                    self._upsert_identities([(r["identity"], len(vectors), np.mean(vectors, axis=0),
                                              _stored(r["metadata"], dict, "an identity's metadata"))])
            self._put_info({"layout": "copied"})  # the commit point: from here on the old collections go
            done = [{"value": "copied"}]
        if done and done[0]["value"] == "copied":
            for name in self._legacy:
                if c.has_collection(name):
                    c.drop_collection(name)
        # a new gallery starts at the current layout; the caller writes it once the repairs it needs are done
        return done[0]["value"] if done else (None if c.has_collection(self.t_name) else self.LAYOUT)

    def _reconcile(self) -> None:
        """Roll back what an interrupted write left (:mod:`visrec.index.gallery.base`), from its marks only, so
        the cost follows the interrupted writes, not the gallery's size: pending templates are removed and
        their identities' rows made to match what remains; a marked erasure is finished."""
        marks = [r for r in self._query_all(self.info_name, ["key", "value"])  # a few rows: the info and the marks
                 if r["key"].startswith(("pending:", "erasing:"))]
        if not marks:
            return
        pending = [i for m in marks if m["key"].startswith("pending:")
                   for i in (_stored(m["value"], list, "a pending mark") if m["value"]
                             else [m["key"].removeprefix("pending:")])]
        keys = set()
        for i in range(0, len(pending), BATCH):
            keys |= {r["key"] for r in self.client.get(self.t_name, ids=pending[i:i + BATCH], output_fields=["key"])}
        self._delete_templates(pending)
        for key in sorted(keys):
            self._refresh_row(key)
        erasing = [m["key"].removeprefix("erasing:") for m in marks if m["key"].startswith("erasing:")]
        for key in erasing:
            self._erase_key(key)
        self.client.delete(self.info_name, ids=[m["key"] for m in marks])
        log.warning("gallery %s: rolled back %d unacknowledged templates and finished %d erasures left by an "
                    "interrupted write", self.name, len(pending), len(erasing))

    def _refresh_row(self, key: str) -> None:
        """Make one identity's row match its stored templates (delete it when none is left)."""
        rows = self.client.get(self.i_name, ids=[key], output_fields=_ROW_FIELDS)
        vectors = self._query_all(self.t_name, ["vector"], filter=f'key == "{key}"')  # a hex key, never a name
        if rows and vectors:
            row = _row(rows[0])
            self._upsert_identities([(row["identity"], len(vectors),
                                      np.mean([np.asarray(v["vector"], np.float32) for v in vectors], axis=0),
                                      row["metadata"])])
        elif rows:
            self.client.delete(self.i_name, ids=[key])
        elif vectors:
            self.client.delete(self.t_name, filter=f'key == "{key}"')

    def _reconcile_by_scan(self) -> None:
        """Compare every template with the identity rows (once, for galleries of an older layout, whose
        erasures were not marked): templates without a row are removed, rows made to match their templates."""
        counts: dict[str, int] = {}
        for row in self._query_all(self.t_name, ["key"]):
            counts[row["key"]] = counts.get(row["key"], 0) + 1
        rows = {identity_key(r["identity"]): r for r in self._identity_rows()}
        orphans = sorted(set(counts) - set(rows))
        for key in orphans:
            self.client.delete(self.t_name, filter=f'key == "{key}"')  # a hex key: no name in the expression
        for key, row in rows.items():
            if row["templates"] != counts.get(key, 0):
                self._refresh_row(key)
        if orphans:
            log.warning("gallery %s: removed the templates of %d identities without a row left by an "
                        "interrupted erase", self.name, len(orphans))

    def _query_all(self, collection: str, fields: list[str], filter: str = "") -> list[dict]:
        return [row for batch in self._query_batches(collection, fields, filter) for row in batch]

    def _query_batches(self, collection: str, fields: list[str], filter: str = "", rows: int = 4096):
        """The matching rows, a batch of at most ``rows`` at a time (Milvus's query iterator: primary-key
        order)."""
        try:
            it = self.client.query_iterator(collection, batch_size=rows, filter=filter, output_fields=fields)
            try:
                while batch := it.next():
                    yield batch
            finally:
                it.close()
        except Exception as exc:  # noqa: BLE001 - as _Client does for single calls
            failure = _unavailable(exc, self.uri, "query")
            if failure is exc:
                raise
            raise failure from None

    def _read_info(self):
        self._ensure_info()
        rows = self.client.get(self.info_name, ids=["info"], output_fields=["value"])
        return _stored(rows[0]["value"], dict, "the info record") if rows else None

    def _write_info(self):
        self._put_info({"info": json.dumps(self.info, sort_keys=True)})

    def _mark_pending(self, ids):
        # one record per batch of template ids (a VARCHAR holds 65,535 bytes: 1000 ids of 32 hex digits fit)
        marks = {f"pending:{ids[i]}": json.dumps(ids[i:i + BATCH]) for i in range(0, len(ids), BATCH)}
        self._put_info(marks)
        return list(marks)

    def _clear_pending(self, marks):
        keys = [k for batch in marks for k in batch]
        for i in range(0, len(keys), BATCH):
            self.client.delete(self.info_name, ids=keys[i:i + BATCH])

    def _templates_of(self, identity):
        if self._dim is None:
            return {}
        rows = self.client.query(self.t_name, filter=f'key == "{identity_key(identity)}"',
                                 output_fields=["id", "vector"], limit=_MILVUS_TOPK)
        if len(rows) >= _MILVUS_TOPK:
            raise VisrecError(f"identity {identity!r} holds {_MILVUS_TOPK}+ templates, more than one Milvus query "
                              f"returns; split it or prune its templates")
        return {r["id"]: np.asarray(r["vector"], np.float32) for r in rows}

    def _template_hashes_of(self, identity):
        if self._dim is None:
            return {}
        rows = self.client.query(self.t_name, filter=f'key == "{identity_key(identity)}"',
                                 output_fields=["id", "hash"], limit=_MILVUS_TOPK)
        return {r["id"]: r["hash"] for r in rows}

    def _existing_templates(self, ids):
        if self._dim is None:
            return set()
        found = set()
        for i in range(0, len(ids), BATCH):  # by primary key: no scan
            found |= {r["id"] for r in self.client.get(self.t_name, ids=list(ids[i:i + BATCH]), output_fields=["id"])}
        return found

    def _identity_rows_of(self, identities):
        if self._dim is None:
            return {}
        out = {}
        for i in range(0, len(identities), BATCH):
            keys = [identity_key(name) for name in identities[i:i + BATCH]]
            for r in self.client.get(self.i_name, ids=keys, output_fields=_ROW_FIELDS + ["vector"]):
                row = _row(r)
                out[row["identity"]] = {**row, "centroid": _finite(r["vector"], row["identity"])}
        return out

    def _upsert_templates(self, rows):
        self._ensure_collections(self.info["dim"])
        for i in range(0, len(rows), BATCH):
            self.client.upsert(self.t_name, [{"id": t, "key": identity_key(identity), "identity": identity, "hash": h,
                                              "vector": np.asarray(v, np.float32).tolist()}
                                             for identity, t, h, v in rows[i:i + BATCH]])

    def _upsert_identities(self, rows):
        self._ensure_collections(self.info["dim"])
        records = []
        for identity, templates, centroid, metadata in rows:
            meta = json.dumps(metadata, sort_keys=True)
            if len(meta) > MAX_METADATA_CHARS:  # checked before any write by enroll; a last guard
                raise DataError(f"metadata for {identity!r} is {len(meta)} characters of JSON, above "
                                f"{MAX_METADATA_CHARS}")
            records.append({"key": identity_key(identity), "identity": identity, "templates": int(templates),
                            "metadata": meta, "vector": np.asarray(centroid, np.float32).tolist()})
        for i in range(0, len(records), BATCH):
            self.client.upsert(self.i_name, records[i:i + BATCH])

    def _delete_identity(self, identity):
        # marked first, then the identity row, then its templates: a crash anywhere is finished on the next open
        key = identity_key(identity)
        self._put_info({f"erasing:{key}": ""})
        self._erase_key(key)
        self.client.delete(self.info_name, ids=[f"erasing:{key}"])

    def _erase_key(self, key: str) -> None:
        self.client.delete(self.i_name, ids=[key])
        self.client.delete(self.t_name, filter=f'key == "{key}"')  # a hex key: no name in the expression

    def _delete_templates(self, ids):
        for i in range(0, len(ids), BATCH):
            self.client.delete(self.t_name, ids=list(ids[i:i + BATCH]))

    def _search(self, collection, q, limit, field):
        res = self.client.search(collection, data=q.tolist(), limit=int(limit), output_fields=[field],
                                 search_params={"metric_type": self._milvus_metric,
                                                "params": self._search_params(limit)}, anns_field="vector")
        return [[(_name(hit["entity"][field], "a search hit"), _score_from_raw(hit["distance"], self.metric))
                 for hit in row] for row in res]

    def _search_params(self, limit: int) -> dict:
        params = dict(self.search_params)
        if self.index["index"] == "HNSW":
            params["ef"] = max(int(params.get("ef", 64)), int(limit))  # Milvus refuses ef below the limit
        elif self.index["index"].startswith("IVF"):
            params.setdefault("nprobe", 16)
        return params

    def _search_templates(self, q, limit):
        return self._search(self.t_name, q, limit, "identity")

    def _search_identities(self, q, limit):
        return self._search(self.i_name, q, min(limit, _MILVUS_TOPK), "identity")

    def _identity_rows(self):
        if self._dim is None:
            return []
        return [_row(r) for r in self._query_all(self.i_name, _ROW_FIELDS)]

    def _identity_names(self):
        if self._dim is None:
            return []
        return [_name(r["identity"], "an identity row") for r in self._query_all(self.i_name, ["identity"])]

    def _count_templates(self):
        if self._dim is None:
            return 0
        return int(self.client.query(self.t_name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _template_batches(self, rows):
        if self._dim is None:
            return
        for batch in self._query_batches(self.t_name, ["id", "identity", "hash", "vector"], rows=rows):
            yield [(r["id"], _name(r["identity"], "a template row"), r["hash"], _finite(r["vector"], r["identity"]))
                   for r in batch]

    def close(self):
        self.client.close()


_ROW_FIELDS = ["identity", "templates", "metadata"]


def _row(r: dict) -> dict:
    """A Milvus identity row -> ``{"identity", "templates", "metadata"}``, each checked (:func:`_stored`)."""
    identity, templates = _name(r["identity"], "an identity row"), r["templates"]
    if isinstance(templates, bool) or not isinstance(templates, int) or templates < 1:
        raise DataError(f"Milvus gallery: the identity row of {shown(identity, 80)} counts {shown(templates)} "
                        "templates, not a whole number >= 1")
    return {"identity": identity, "templates": templates,
            "metadata": _stored(r["metadata"], dict, f"the metadata of {shown(identity, 80)}")}


# The collections are read back as visrec wrote them, but a Milvus Lite file or a server's collection may have been
# written by another client: what a reader hands on (names, counts, vectors, JSON) is checked as the FAISS gallery
# file's rows are, a DataError saying which row, never a name nobody could enroll or a NaN passed along.
def _name(value, where: str) -> str:
    try:
        return check_identity(value)
    except DataError as exc:
        raise DataError(f"Milvus gallery: {where} names {shown(value, 80)}: {exc}") from None


def _finite(vector, identity) -> np.ndarray:
    v = np.asarray(vector, np.float32)
    if not np.isfinite(v).all():
        raise DataError(f"Milvus gallery: a stored vector of {shown(identity, 80)} holds NaN or inf")
    return v


def _stored(text, kind: type, what: str):
    """A JSON ``kind`` (dict or list) read back from the gallery's collections. visrec wrote it, but the database
    may come from elsewhere: anything else is a DataError saying what, never a parser's bare error."""
    try:
        value = loads_json(text)
    except (TypeError, ValueError) as exc:
        raise DataError(f"Milvus gallery: {what} is not JSON ({exc})") from None
    if not isinstance(value, kind):
        raise DataError(f"Milvus gallery: {what} is a JSON {type(value).__name__}, not a JSON "
                        f"{'object' if kind is dict else 'array'}")
    return value


def _lite_folder(uri: str) -> str:
    """What Milvus Lite is handed for a gallery's ``uri``: a local one with its links resolved, so that a link to
    a gallery (or a path through a linked folder) reaches the database this process already has open for the
    real folder (Milvus Lite keeps one per path as given) instead of a second one on the same files, which its
    own lock refuses. A server's ``uri``, or a link whose target's name does not end in ``.db`` (which Milvus
    Lite requires), is passed as it is."""
    if "://" in uri:
        return uri
    real = os.path.realpath(uri)
    return real if real.endswith(".db") else uri


def _check_not_open_elsewhere(path: Path) -> None:
    """Milvus Lite keeps a local gallery (a folder) open under a ``flock`` on its ``LOCK`` file; a second opener
    got two logged tracebacks and "Open local milvus failed". Probed here first (taken and let go at once) for
    an error that says what is wrong and what to do, as the FAISS gallery's claim does."""
    lock = path / "LOCK"
    if not lock.is_file() or _held_here(lock):  # open in this process: Milvus Lite hands it the same database
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: Milvus Lite's own error stands
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise GalleryUnavailableError(f"the Milvus Lite gallery {path} is open elsewhere (a running service, or "
                                      "another gallery command): stop that first, or reach the gallery through "
                                      "the service's HTTP API") from None
    finally:
        os.close(fd)


def _held_here(lock: Path) -> bool:
    """Whether this process has ``lock`` open (Milvus Lite keeps a closed gallery's database, and its lock, for
    the process's life); read from ``/proc/self/fd``, False where there is none."""
    target = str(lock.resolve())
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
        except OSError:  # closed meanwhile
            continue
    return False
