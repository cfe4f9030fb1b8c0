"""``faiss``: an in-memory gallery (exact ``IndexFlat``), for tests and batch work; ``export``/``import_``
persist it.

The FAISS library is imported lazily, by name (``require("faiss", ...)``), where an index is built: this
module's own name never shadows it (absolute imports only).
"""

from __future__ import annotations

import numpy as np

from visrec._optional import require
from visrec.index.gallery.base import BACKENDS, Gallery, _score_from_raw


@BACKENDS.register("faiss")
class FaissGallery(Gallery):
    """In memory; exact search with FAISS ``IndexFlatIP`` / ``IndexFlatL2`` (rebuilt lazily after changes)."""

    def __init__(self, **kwargs):
        self._templates: dict[str, tuple[str, str, np.ndarray]] = {}  # id -> (identity, hash, vector)
        self._identities: dict[str, tuple[int, np.ndarray, dict]] = {}  # identity -> (count, centroid, metadata)
        self._stored_info: dict | None = None
        self._cache: dict = {}
        super().__init__(**kwargs)

    def _read_info(self):
        return self._stored_info

    def _write_info(self):
        self._stored_info = dict(self.info)

    def _templates_of(self, identity):
        return {i: v for i, (who, _, v) in self._templates.items() if who == identity}

    def _identity_row(self, identity):
        row = self._identities.get(identity)
        return None if row is None else {"identity": identity, "templates": row[0], "metadata": dict(row[2])}

    def _upsert_templates(self, identity, rows):
        for i, h, v in rows:
            self._templates[i] = (identity, h, np.asarray(v, np.float32))
        self._cache.clear()

    def _upsert_identity(self, identity, templates, centroid, metadata):
        self._identities[identity] = (templates, np.asarray(centroid, np.float32), metadata)
        self._cache.clear()

    def _delete_identity(self, identity):
        self._identities.pop(identity, None)
        self._templates = {i: r for i, r in self._templates.items() if r[0] != identity}
        self._cache.clear()

    def _delete_templates(self, ids):
        for i in ids:
            self._templates.pop(i, None)
        self._cache.clear()

    def _flat(self, kind: str):
        if kind not in self._cache:
            faiss = require("faiss", "index", "faiss-cpu")
            if kind == "templates":
                names = [r[0] for r in self._templates.values()]
                x = np.stack([r[2] for r in self._templates.values()])
            else:
                names = list(self._identities)
                x = np.stack([r[1] for r in self._identities.values()])
            index = (faiss.IndexFlatIP if self.metric == "cosine" else faiss.IndexFlatL2)(x.shape[1])
            index.add(np.ascontiguousarray(x, np.float32))
            self._cache[kind] = (index, names)
        return self._cache[kind]

    def _search(self, kind, q, limit):
        if not self._templates:
            return [[] for _ in q]
        index, names = self._flat(kind)
        scores, rows = index.search(np.ascontiguousarray(q), min(limit, len(names)))
        return [[(names[r], _score_from_raw(s, self.metric)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def _search_templates(self, q, limit):
        return self._search("templates", q, limit)

    def _search_identities(self, q, limit):
        return self._search("identities", q, limit)

    def _identity_rows(self):
        return [self._identity_row(k) for k in self._identities]

    def _count_templates(self):
        return len(self._templates)

    def _all_templates(self):
        return [(i, who, h, v) for i, (who, h, v) in sorted(self._templates.items())]
