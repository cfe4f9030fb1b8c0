"""``milvus``: a Milvus Lite file (``uri="gallery.db"``, embedded, offline) or a Milvus cluster
(``uri="http://host:19530"``), one code path through ``pymilvus.MilvusClient`` (imported lazily, when a
gallery is opened). The collections and the upgrade of the older layout: :class:`MilvusGallery`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from visrec._optional import require
from visrec.errors import DataError, VisrecError
from visrec.index.gallery.base import (_MILVUS_TOPK, BACKENDS, MAX_HASH_CHARS, MAX_METADATA_CHARS, Gallery,
                                       _score_from_raw, identity_key)

log = logging.getLogger(__name__)


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

    # MilvusClient calls are thread-safe and the server orders reads after acknowledged writes
    # (collections are created with Strong consistency), so searches need not queue behind each other
    serial_reads = False
    LAYOUT = "2"

    def __init__(self, uri: str | Path = "gallery.db", collection: str = "visrec_faces", *, token: str = "",
                 **kwargs):
        pymilvus = require("pymilvus", "serve", "pymilvus milvus-lite")
        # Milvus Lite has no server-side session timestamp, so every query iterator warns that it falls back
        # to the client's (harmless for a single embedded client): keep that out of the user's log
        logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
        uri = str(uri)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$", collection):
            raise VisrecError(f"collection name {collection!r}: letters, digits and underscores only")
        if "://" not in uri:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = pymilvus.MilvusClient(uri=uri, token=token)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises many kinds; say which gallery failed
            raise VisrecError(f"cannot open the Milvus gallery at {uri}: {exc}") from None
        self.uri, self.name = uri, collection
        self.t_name, self.i_name, self.info_name = f"{collection}_templates", f"{collection}_people", f"{collection}_info"
        self._legacy = (collection, f"{collection}_identities")
        self._dim = None
        super().__init__(**kwargs)
        self._upgrade_layout()
        if self.info["dim"] is not None:
            self._ensure_collections(self.info["dim"])
            self._reconcile()

    # collections are created on the first enrollment, when the dimension is known
    def _ensure_collections(self, dim: int) -> None:
        from pymilvus import DataType

        if self._dim == dim:
            return
        c = self.client
        if not c.has_collection(self.t_name):
            s = c.create_schema(auto_id=False, enable_dynamic_field=False)
            s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
            s.add_field("key", DataType.VARCHAR, max_length=64)
            s.add_field("identity", DataType.VARCHAR, max_length=1024)
            s.add_field("hash", DataType.VARCHAR, max_length=MAX_HASH_CHARS * 4)
            s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            p = c.prepare_index_params()
            p.add_index(field_name="vector", index_type="FLAT", metric_type=self._milvus_metric)
            c.create_collection(self.t_name, schema=s, index_params=p, consistency_level="Strong")
        if not c.has_collection(self.i_name):
            s = c.create_schema(auto_id=False, enable_dynamic_field=False)
            s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
            s.add_field("identity", DataType.VARCHAR, max_length=1024)
            s.add_field("templates", DataType.INT64)
            s.add_field("metadata", DataType.VARCHAR, max_length=MAX_METADATA_CHARS)
            s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            p = c.prepare_index_params()
            p.add_index(field_name="vector", index_type="FLAT", metric_type=self._milvus_metric)
            c.create_collection(self.i_name, schema=s, index_params=p, consistency_level="Strong")
        c.load_collection(self.t_name)
        c.load_collection(self.i_name)
        self._dim = dim

    @property
    def _milvus_metric(self) -> str:
        return "IP" if self.metric == "cosine" else "L2"

    def _ensure_info(self) -> None:
        from pymilvus import DataType

        c = self.client
        if not c.has_collection(self.info_name):
            s = c.create_schema(auto_id=False, enable_dynamic_field=False)
            s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
            s.add_field("value", DataType.VARCHAR, max_length=65535)
            s.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field in every collection
            p = c.prepare_index_params()
            p.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
            c.create_collection(self.info_name, schema=s, index_params=p, consistency_level="Strong")
        c.load_collection(self.info_name)

    def _put_info(self, rows: dict[str, str]) -> None:
        self.client.upsert(self.info_name, [{"key": k, "value": v, "vector": [0.0, 0.0]} for k, v in rows.items()])

    def _upgrade_layout(self) -> None:
        """Copy a gallery of the name-keyed layout into this one (class docstring), then drop the old one."""
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
                    self._upsert_identity(r["identity"], len(vectors), np.mean(vectors, axis=0),
                                          json.loads(r["metadata"]))
            self._put_info({"layout": "copied"})  # the commit point: from here on the old collections go
            done = [{"value": "copied"}]
        if done and done[0]["value"] == "copied":
            for name in self._legacy:
                if c.has_collection(name):
                    c.drop_collection(name)
        if not done or done[0]["value"] != self.LAYOUT:
            self._put_info({"layout": self.LAYOUT})

    def _reconcile(self) -> None:
        """Roll back what a crash left half-written (:mod:`visrec.index.gallery.base`): pending templates and
        templates without an identity row are removed; identity rows are made to match their templates."""
        pending = [r["key"] for r in self._query_all(self.info_name, ["key"]) if r["key"].startswith("pending:")]
        if pending:
            self._delete_templates([k.removeprefix("pending:") for k in pending])
            self.client.delete(self.info_name, ids=pending)
        counts: dict[str, int] = {}
        names: dict[str, str] = {}
        for row in self._query_all(self.t_name, ["key", "identity"]):
            counts[row["key"]] = counts.get(row["key"], 0) + 1
            names[row["key"]] = row["identity"]
        rows = {identity_key(r["identity"]): r for r in self._identity_rows()}
        orphans = sorted(set(counts) - set(rows))
        for key in orphans:
            self.client.delete(self.t_name, filter=f'key == "{key}"')  # a hex key: no name in the expression
        for key, row in rows.items():
            if key not in counts:
                self.client.delete(self.i_name, ids=[key])
            elif row["templates"] != counts[key]:
                vectors = list(self._templates_of(row["identity"]).values())
                self._upsert_identity(row["identity"], len(vectors), np.mean(vectors, axis=0), row["metadata"])
        if pending or orphans:
            log.warning("gallery %s: rolled back %d unacknowledged templates and %d identities without a row "
                        "left by an interrupted write", self.name, len(pending), len(orphans))

    def _query_all(self, collection: str, fields: list[str], filter: str = "") -> list[dict]:
        it = self.client.query_iterator(collection, batch_size=4096, filter=filter, output_fields=fields)
        out = []
        try:
            while batch := it.next():
                out.extend(batch)
        finally:
            it.close()
        return out

    def _read_info(self):
        self._ensure_info()
        rows = self.client.get(self.info_name, ids=["info"], output_fields=["value"])
        return json.loads(rows[0]["value"]) if rows else None

    def _write_info(self):
        self._put_info({"info": json.dumps(self.info, sort_keys=True)})

    def _mark_pending(self, ids):
        self._put_info({f"pending:{i}": "" for i in ids})

    def _clear_pending(self, ids):
        if ids:
            self.client.delete(self.info_name, ids=[f"pending:{i}" for i in ids])

    def _templates_of(self, identity):
        if self._dim is None:
            return {}
        rows = self.client.query(self.t_name, filter=f'key == "{identity_key(identity)}"',
                                 output_fields=["id", "vector"], limit=_MILVUS_TOPK)
        if len(rows) >= _MILVUS_TOPK:
            raise VisrecError(f"identity {identity!r} holds {_MILVUS_TOPK}+ templates, more than one Milvus query "
                              f"returns; split it or prune its templates")
        return {r["id"]: np.asarray(r["vector"], np.float32) for r in rows}

    def _identity_row(self, identity):
        if self._dim is None:
            return None
        rows = self.client.get(self.i_name, ids=[identity_key(identity)], output_fields=_ROW_FIELDS)
        return _row(rows[0]) if rows else None

    def _upsert_templates(self, identity, rows):
        self._ensure_collections(self.info["dim"])
        key = identity_key(identity)
        self.client.upsert(self.t_name, [{"id": i, "key": key, "identity": identity, "hash": h, "vector": v.tolist()}
                                         for i, h, v in rows])

    def _upsert_identity(self, identity, templates, centroid, metadata):
        self._ensure_collections(self.info["dim"])
        meta = json.dumps(metadata, sort_keys=True)
        if len(meta) > MAX_METADATA_CHARS:  # checked before any write by enroll; a last guard
            raise DataError(f"metadata for {identity!r} is {len(meta)} characters of JSON, above {MAX_METADATA_CHARS}")
        self.client.upsert(self.i_name, [{"key": identity_key(identity), "identity": identity,
                                          "templates": int(templates), "metadata": meta,
                                          "vector": np.asarray(centroid, np.float32).tolist()}])

    def _delete_identity(self, identity):
        # identity row first: a crash in between leaves templates without a row, which _reconcile removes
        key = identity_key(identity)
        self.client.delete(self.i_name, ids=[key])
        self.client.delete(self.t_name, filter=f'key == "{key}"')

    def _delete_templates(self, ids):
        for i in range(0, len(ids), 1000):
            self.client.delete(self.t_name, ids=list(ids[i:i + 1000]))

    def _search(self, collection, q, limit, field):
        res = self.client.search(collection, data=q.tolist(), limit=int(limit), output_fields=[field],
                                 search_params={"metric_type": self._milvus_metric}, anns_field="vector")
        return [[(hit["entity"][field], _score_from_raw(hit["distance"], self.metric)) for hit in row] for row in res]

    def _search_templates(self, q, limit):
        return self._search(self.t_name, q, limit, "identity")

    def _search_identities(self, q, limit):
        return self._search(self.i_name, q, min(limit, _MILVUS_TOPK), "identity")

    def _identity_rows(self):
        if self._dim is None:
            return []
        return [_row(r) for r in self._query_all(self.i_name, _ROW_FIELDS)]

    def _count_templates(self):
        if self._dim is None:
            return 0
        return int(self.client.query(self.t_name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _all_templates(self):
        if self._dim is None:
            return []
        rows = self._query_all(self.t_name, ["id", "identity", "hash", "vector"])
        return sorted((r["id"], r["identity"], r["hash"], np.asarray(r["vector"], np.float32)) for r in rows)

    def close(self):
        self.client.close()


_ROW_FIELDS = ["identity", "templates", "metadata"]


def _row(r: dict) -> dict:
    """A Milvus identity row -> ``{"identity", "templates", "metadata"}``."""
    return {"identity": r["identity"], "templates": int(r["templates"]), "metadata": json.loads(r["metadata"])}
