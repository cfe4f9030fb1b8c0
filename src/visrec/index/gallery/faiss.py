"""``faiss``: an in-memory gallery searched exactly by FAISS (``faiss.knn``, the brute-force engine behind
``IndexFlat``); ``export``/``import_`` persist it.

Vectors live in growable float32 matrices, one row per template and one per identity centroid, each row
addressed by its key. An enrollment appends rows and a removal moves the last row into the hole, so both cost
the same at any gallery size and nothing is rebuilt before the next search: a search scans exactly the live
rows, as ``IndexFlatIP.search`` would.

The FAISS library is imported lazily, by name (``require("faiss", ...)``), at the first search: this module's
own name never shadows it (absolute imports only).
"""

from __future__ import annotations

import numpy as np

from visrec._optional import require
from visrec.index.gallery.base import BACKENDS, Gallery, _score_from_raw


class KeyedRows:
    """Rows of a float32 matrix addressed by key, each with an owner name. ``put`` appends or overwrites,
    ``drop`` moves the last row into the freed one (O(dim)); capacity doubles as it fills."""

    def __init__(self):
        self.keys: list[str] = []
        self.owners: list[str] = []
        self.slot: dict[str, int] = {}
        self._x: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.slot

    @property
    def matrix(self) -> np.ndarray:
        """The live rows, (len, dim), a view (no copy)."""
        return self._x[:len(self.keys)]

    def vector(self, key: str) -> np.ndarray:
        return self._x[self.slot[key]].copy()

    def put(self, key: str, vector: np.ndarray, owner: str) -> None:
        vector = np.asarray(vector, np.float32)
        if self._x is None:
            self._x = np.zeros((16, vector.shape[0]), np.float32)
        i = self.slot.get(key)
        if i is None:
            i = len(self.keys)
            if i == len(self._x):
                grown = np.zeros((2 * len(self._x), self._x.shape[1]), np.float32)
                grown[:i] = self._x
                self._x = grown
            self.slot[key] = i
            self.keys.append(key)
            self.owners.append(owner)
        self._x[i] = vector
        self.owners[i] = owner

    def drop(self, key: str) -> None:
        i = self.slot.pop(key, None)
        if i is None:
            return
        last = len(self.keys) - 1
        if i != last:
            self._x[i] = self._x[last]
            self.keys[i], self.owners[i] = self.keys[last], self.owners[last]
            self.slot[self.keys[i]] = i
        self.keys.pop()
        self.owners.pop()


@BACKENDS.register("faiss")
class FaissGallery(Gallery):
    """In memory; exact search by FAISS over the live template (or centroid) rows."""

    def __init__(self, **kwargs):
        self._templates = KeyedRows()  # template id -> vector, owner = identity
        self._hashes: dict[str, str] = {}  # template id -> image hash
        self._by_identity: dict[str, set[str]] = {}  # identity -> its template ids
        self._centroids = KeyedRows()  # identity -> centroid, owner = identity
        self._rows: dict[str, tuple[int, dict]] = {}  # identity -> (template count, metadata)
        self._stored_info: dict | None = None
        super().__init__(**kwargs)

    def _read_info(self):
        return self._stored_info

    def _write_info(self):
        self._stored_info = dict(self.info)

    def _existing_templates(self, ids):
        return {i for i in ids if i in self._templates}

    def _identity_rows_of(self, identities):
        return {name: {"identity": name, "templates": self._rows[name][0], "metadata": dict(self._rows[name][1]),
                       "centroid": self._centroids.vector(name)} for name in identities if name in self._rows}

    def _templates_of(self, identity):
        return {i: self._templates.vector(i) for i in sorted(self._by_identity.get(identity, ()))}

    def _upsert_templates(self, rows):
        for identity, i, h, v in rows:
            self._templates.put(i, v, identity)
            self._hashes[i] = h
            self._by_identity.setdefault(identity, set()).add(i)

    def _upsert_identities(self, rows):
        for identity, templates, centroid, metadata in rows:
            self._rows[identity] = (int(templates), dict(metadata))
            self._centroids.put(identity, centroid, identity)

    def _delete_identity(self, identity):
        self._rows.pop(identity, None)
        self._centroids.drop(identity)
        self._delete_templates(sorted(self._by_identity.get(identity, ())))

    def _delete_templates(self, ids):
        for i in ids:
            if i in self._templates:
                owner = self._templates.owners[self._templates.slot[i]]
                self._templates.drop(i)
                self._hashes.pop(i, None)
                self._by_identity.get(owner, set()).discard(i)
                if not self._by_identity.get(owner, True):
                    del self._by_identity[owner]

    def _search(self, rows: KeyedRows, q, limit):
        if not len(rows):
            return [[] for _ in q]
        faiss = require("faiss", "index", "faiss-cpu")
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        scores, found = faiss.knn(np.ascontiguousarray(q, np.float32), rows.matrix, min(limit, len(rows)),
                                  metric=metric)
        owners = rows.owners
        return [[(owners[r], _score_from_raw(s, self.metric)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores.tolist(), found.tolist())]

    def _search_templates(self, q, limit):
        return self._search(self._templates, q, limit)

    def _search_identities(self, q, limit):
        return self._search(self._centroids, q, limit)

    def _identity_rows(self):
        return [{"identity": k, "templates": n, "metadata": dict(m)} for k, (n, m) in self._rows.items()]

    def _count_templates(self):
        return len(self._templates)

    def _all_templates(self):
        return [(i, self._templates.owners[self._templates.slot[i]], self._hashes[i], self._templates.vector(i))
                for i in sorted(self._templates.slot)]
