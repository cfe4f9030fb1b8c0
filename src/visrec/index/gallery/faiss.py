"""``faiss``: an in-memory gallery searched by FAISS; ``export``/``import_`` persist it.

Vectors live in growable float32 matrices, one row per template and one per identity centroid, each row
addressed by its key. An enrollment appends rows and a removal moves the last row into the hole, so both cost
the same at any gallery size and nothing is rebuilt before the next search.

With ``path`` the gallery is durable: every change is written through to a SQLite file
(:mod:`visrec.index.gallery.store`), one transaction per gallery write, and loaded back when the gallery is
opened; without it the gallery lives in memory only.

``index="Flat"`` (the default) searches exactly: ``faiss.knn`` over the live rows, as ``IndexFlatIP.search``
would. Any other FAISS factory string (``"HNSW32"``, ``"IVF4096,Flat"``, ``"IVF4096,PQ64"``) searches
approximately through :class:`ApproximateIndex`, tuned by ``search_params`` (``nprobe`` for IVF, ``efSearch``
for HNSW); until an index that needs training has enough rows to train on, searches stay exact.

The FAISS library is imported lazily, by name (``require("faiss", ...)``), at the first search: this module's
own name never shadows it (absolute imports only).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from visrec._optional import require
from visrec.errors import ConfigError, DataError
from visrec.index.gallery.base import BACKENDS, Gallery, _score_from_raw
from visrec.index.gallery.store import GalleryFile

SEARCH_PARAMS = {"nprobe": (1, 65536), "efSearch": (1, 65536)}  # name -> bounds


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


class ApproximateIndex:
    """A FAISS index built from a factory string over keyed rows, kept up to date incrementally.

    Rows are added at the index's next positions; a removed or replaced row's position is a tombstone that
    searches exclude (``IDSelectorNot`` over the tombstones), so no row is ever removed from the index (IVF's
    removal scans every list; HNSW has none). When tombstones pass a tenth of the index it is rebuilt from the
    live rows. An index that needs training (IVF, PQ) is trained on the live rows once there are ``40 x`` its
    centroids (FAISS's own rule of thumb); until then :meth:`search` answers None and the caller searches
    exactly."""

    def __init__(self, factory: str, dim: int, metric: str, search_params: dict):
        self.faiss = require("faiss", "index", "faiss-cpu")
        self.factory, self.dim = factory, dim
        self.metric = self.faiss.METRIC_INNER_PRODUCT if metric == "cosine" else self.faiss.METRIC_L2
        self.search_params = dict(search_params)
        self._selector_lock = threading.Lock()  # searches run together (shared reads): one builds the selector
        self._reset()

    def _reset(self) -> None:
        self.index = self.faiss.index_factory(self.dim, self.factory, self.metric)
        self.keys: list[str | None] = []  # position -> key (None: tombstone)
        self.owners: list[str] = []
        self.position: dict[str, int] = {}
        self.tombstones: list[int] = []
        self._selector = None

    @property
    def train_size(self) -> int:
        if self.index.is_trained:
            return 0
        try:
            centroids = self.faiss.extract_index_ivf(self.index).nlist
        except RuntimeError:
            centroids = 0
        return 40 * max(centroids, 256)  # a PQ's 256 codes per sub-quantizer need training rows too

    def sync(self, rows: KeyedRows, changed: list[str], removed: list[str]) -> None:
        """Follow ``rows`` after ``changed`` keys were put and ``removed`` keys dropped."""
        for key in list(removed) + [k for k in changed if k in self.position]:
            pos = self.position.pop(key, None)
            if pos is not None:
                self.keys[pos] = None
                self.tombstones.append(pos)
                self._selector = None
        if not self.index.is_trained:
            if len(rows) >= self.train_size:
                self.rebuild(rows)
            return
        new = [k for k in changed if k in rows]
        if new:
            self._add(new, np.stack([rows.vector(k) for k in new]), [rows.owners[rows.slot[k]] for k in new])
        if len(self.tombstones) > max(64, len(self.keys) // 10):
            self.rebuild(rows)

    def rebuild(self, rows: KeyedRows) -> None:
        self._reset()
        if not len(rows):
            return
        x = np.ascontiguousarray(rows.matrix)
        if not self.index.is_trained:
            sample = x if len(x) <= 200_000 else x[np.random.default_rng(0).choice(len(x), 200_000, replace=False)]
            self.index.train(sample)
        self._add(list(rows.keys), x, list(rows.owners))

    def _add(self, keys: list[str], x: np.ndarray, owners: list[str]) -> None:
        start = len(self.keys)
        self.index.add(np.ascontiguousarray(x, np.float32))
        self.keys += keys
        self.owners += owners
        self.position.update({k: start + i for i, k in enumerate(keys)})

    def _params(self):
        reads = _search_params_of(self.faiss, self.index)
        if not reads:
            return None
        params = self.faiss.SearchParametersIVF() if reads == ("nprobe",) else self.faiss.SearchParametersHNSW()
        for name, value in self.search_params.items():  # check_faiss_index let through only names it reads
            setattr(params, name, int(value))
        if self.tombstones:
            with self._selector_lock:
                if self._selector is None:
                    batch = self.faiss.IDSelectorBatch(np.asarray(self.tombstones, np.int64))
                    self._selector = (batch, self.faiss.IDSelectorNot(batch))
            params.sel = self._selector[1]
            params._keep = self._selector  # SWIG holds no reference: the search's params keep both alive
        return params

    def search(self, q: np.ndarray, limit: int):
        """(scores, owners) per probe, best first; None while the index is not trained."""
        if not self.index.is_trained:
            return None
        live = len(self.keys) - len(self.tombstones)
        if not live:
            return [[] for _ in q], [[] for _ in q]
        _apply_search_threads(self.faiss)
        scores, found = self.index.search(np.ascontiguousarray(q, np.float32), min(limit, live),
                                          params=self._params())
        return scores.tolist(), [[self.owners[r] if r >= 0 else None for r in row] for row in found.tolist()]


_search_threads: int | None = None
_this_thread = threading.local()


def set_search_threads(threads: int | None) -> None:
    """The OpenMP threads every thread that searches a FAISS gallery gives FAISS (None: FAISS's default).

    OpenMP's thread count is a per-thread setting: ``faiss.omp_set_num_threads`` in the main thread leaves a
    service's request workers running FAISS on every core, so eight concurrent searches on two cores run
    sixteen spinning threads (measured: IVF search p50 0.8 ms becomes 150 ms). Each searching thread applies
    this value once, before its first search."""
    global _search_threads
    _search_threads = threads


def _apply_search_threads(faiss) -> None:
    if _search_threads is not None and getattr(_this_thread, "threads", None) != _search_threads:
        faiss.omp_set_num_threads(_search_threads)
        _this_thread.threads = _search_threads


PRODUCT_FROM = 4  # queries in one exact search from which one matrix product beats FAISS's per-query scan


def _product_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each row of ``q`` with the rows of ``x``, best first, through one
    matrix product per block of queries (torch: its intra-op threads are the service's per-worker setting;
    blocks keep the score matrix under 64 MB)."""
    import torch

    rows = torch.from_numpy(x)
    step = max(1, (1 << 24) // max(1, len(x)))
    scores, found = [], []
    with torch.no_grad():
        for s in range(0, len(q), step):
            v, i = torch.topk(torch.from_numpy(q[s:s + step]) @ rows.T, k, dim=1)
            scores.append(v.numpy())
            found.append(i.numpy())
    return np.concatenate(scores), np.concatenate(found)


class Coalescer:
    """Exact searches that arrive while one runs are answered together, by one batched search.

    A single exact search of N rows is a scan of the whole matrix; eight at once are one matrix product that
    reads it once (on the reference machine, 100,000 x 512 on one thread: 13 ms for one query by FAISS's scan,
    99 ms for eight one by one, about 35 ms for eight as one product). Nothing waits to form a batch: a search that finds none
    running runs at once; those arriving meanwhile queue, and the first of them runs the queue as one batch
    when the running one ends (no thread serves another's batch after its own). Each caller holds the
    gallery's read lock throughout, so the rows cannot change under a batch."""

    def __init__(self, search):
        self._search = search  # (q, k) -> (scores, rows)
        self._lock = threading.Lock()
        self._queue: list[dict] = []
        self._running = False

    def __call__(self, q: np.ndarray, k: int):
        me = {"q": q, "k": k, "done": threading.Event(), "lead": False, "out": None}
        with self._lock:
            if self._running:
                self._queue.append(me)
            else:
                self._running = me["lead"] = True
        if not me["lead"]:
            me["done"].wait()
            if not me["lead"]:  # answered by the batch it joined
                if isinstance(me["out"], BaseException):
                    raise me["out"]
                return me["out"]
        with self._lock:  # the lead runs what queued before it, itself included
            batch = [me] + [item for item in self._queue if item is not me]
            self._queue = []
        try:
            self._run(batch)
        finally:
            with self._lock:
                if self._queue:  # hand over to the first waiting search
                    self._queue[0]["lead"] = True
                    self._queue[0]["done"].set()
                else:
                    self._running = False
        if isinstance(me["out"], BaseException):
            raise me["out"]
        return me["out"]

    def _run(self, batch: list[dict]) -> None:
        k = max(item["k"] for item in batch)
        try:
            scores, rows = self._search(np.concatenate([item["q"] for item in batch]), k)
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for item in batch:
                item["out"] = exc
        else:
            at = 0
            for item in batch:
                n = len(item["q"])
                item["out"] = (scores[at:at + n, :item["k"]], rows[at:at + n, :item["k"]])
                at += n
        for item in batch[1:]:
            item["done"].set()


def _search_params_of(faiss, index) -> tuple[str, ...]:
    """The :data:`SEARCH_PARAMS` a built index reads at search time (``nprobe``: an IVF index, also inside a
    pre-transform; ``efSearch``: HNSW): what :func:`check_faiss_index` admits and :meth:`ApproximateIndex._params`
    sets."""
    try:
        faiss.extract_index_ivf(index)
        return ("nprobe",)
    except RuntimeError:
        return ("efSearch",) if "HNSW" in type(index).__name__ else ()


def check_faiss_index(index: str, search_params: dict) -> None:
    """A FAISS factory string FAISS can build, and search parameters by known name and bounds."""
    if not isinstance(index, str) or not 1 <= len(index) <= 200:
        raise ConfigError(f"FAISS index {str(index)[:80]!r}: a factory string such as Flat, HNSW32 or IVF4096,Flat")
    faiss = require("faiss", "index", "faiss-cpu")
    try:
        built = faiss.index_factory(8 if "PQ" not in index else 64, index)
    except RuntimeError as exc:
        raise ConfigError(f"FAISS index {index!r} is not a factory string FAISS builds: "
                          f"{str(exc).strip().splitlines()[-1][:200]}") from None
    takes = _search_params_of(faiss, built)
    for name, value in (search_params or {}).items():
        bounds = SEARCH_PARAMS.get(name)
        if bounds is None:
            raise ConfigError(f"FAISS search parameter {name!r}: expected one of {', '.join(SEARCH_PARAMS)}")
        if name not in takes:  # set, it would be ignored: the search would not be the one the config asks for
            raise ConfigError(f"FAISS search parameter {name!r} does not apply to index {index!r}: it takes "
                              + (", ".join(takes) if takes else "none"))
        if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
            raise ConfigError(f"FAISS search parameter {name}={value!r}: an integer in {bounds[0]}..{bounds[1]}")


@BACKENDS.register("faiss")
class FaissGallery(Gallery):
    """In memory; exact search by FAISS over the live template (or centroid) rows, or approximate search through
    an :class:`ApproximateIndex` (module docstring). Searches run together (FAISS searches only read); writes
    wait for them."""

    reads = "shared"

    def __init__(self, *, path: str | Path | None = None, index: str = "Flat", search_params: dict | None = None,
                 **kwargs):
        check_faiss_index(index, search_params or {})
        self.index_spec, self.search_params = index, dict(search_params or {})
        self._file = None if path is None else GalleryFile(path)
        self._lazy_lock = threading.Lock()  # a search that builds the centroids' index first: one at a time
        self._exact = {kind: Coalescer(lambda q, k, kind=kind: self._knn(kind, q, k))
                       for kind in ("templates", "identities")}
        try:
            self._load()
            super().__init__(**kwargs)
        except BaseException:
            self.close()  # a refused open (a bad file, another model) leaves the file unclaimed
            raise

    def _load(self) -> None:
        """Empty memory, then (durable) every row of the file."""
        self._ann: dict[str, ApproximateIndex] = {}  # "templates" / "identities", once the dimension is known
        self._templates = KeyedRows()  # template id -> vector, owner = identity
        self._hashes: dict[str, str] = {}  # template id -> image hash
        self._by_identity: dict[str, set[str]] = {}  # identity -> its template ids
        self._centroids = KeyedRows()  # identity -> centroid, owner = identity
        self._rows: dict[str, tuple[int, dict]] = {}  # identity -> (template count, metadata)
        self._stored_info: dict | None = None
        if self._file is None:
            return
        self._stored_info, templates, people = self._file.load()
        self._put_templates(templates)
        self._put_identities(people)
        for identity in self._by_identity.keys() - self._rows.keys():
            raise DataError(f"gallery file: templates of {identity!r}, who has no identity row", path=self._file.path)
        for identity, (count, _) in self._rows.items():
            if len(self._by_identity.get(identity, ())) != count:
                raise DataError(f"gallery file: identity {identity!r} records {count} templates, the file holds "
                                f"{len(self._by_identity.get(identity, ()))}", path=self._file.path)
        self._sync("templates", [], [])

    def _read_info(self):
        return self._stored_info

    def _write_info(self):
        if self._file is not None:
            self._file.put_info(self.info)
        self._stored_info = dict(self.info)

    # a durable gallery's write is one SQLite transaction: undone by SQLite, then memory reloaded from the file
    def _begin(self):
        if self._file is not None:
            self._file.begin()

    def _commit(self):
        if self._file is not None:
            self._file.commit()

    def _rollback(self, undo):
        if self._file is None:
            return super()._rollback(undo)
        self._file.rollback()
        self._load()
        self.info = dict(undo.info)

    def close(self):
        if self._file is not None:
            self._file.close()

    def _existing_templates(self, ids):
        return {i for i in ids if i in self._templates}

    def _identity_rows_of(self, identities):
        return {name: {"identity": name, "templates": self._rows[name][0], "metadata": dict(self._rows[name][1]),
                       "centroid": self._centroids.vector(name)} for name in identities if name in self._rows}

    def _templates_of(self, identity):
        return {i: self._templates.vector(i) for i in sorted(self._by_identity.get(identity, ()))}

    def _template_hashes_of(self, identity):
        return {i: self._hashes[i] for i in sorted(self._by_identity.get(identity, ()))}

    def _sync(self, kind: str, changed: list[str], removed: list[str], needed: bool = False) -> None:
        # the centroids' index serves mean fusion only: built when a search first needs it, then kept up to date
        if self.index_spec == "Flat" or (kind == "identities" and "identities" not in self._ann and not needed):
            return
        rows = self._templates if kind == "templates" else self._centroids
        if kind not in self._ann:
            if not len(rows):
                return
            ann = self._ann[kind] = ApproximateIndex(self.index_spec, rows.matrix.shape[1], self.metric,
                                                     self.search_params)
            if ann.train_size <= len(rows):
                ann.rebuild(rows)
            return
        self._ann[kind].sync(rows, changed, removed)

    def _put_templates(self, rows):
        for identity, i, h, v in rows:
            self._templates.put(i, v, identity)
            self._hashes[i] = h
            self._by_identity.setdefault(identity, set()).add(i)

    def _put_identities(self, rows):
        for identity, templates, centroid, metadata in rows:
            self._rows[identity] = (int(templates), dict(metadata))
            self._centroids.put(identity, centroid, identity)

    def _upsert_templates(self, rows):
        if self._file is not None:  # the file first: a failed write leaves memory as the file is
            self._file.put_templates(rows)
        self._put_templates(rows)
        self._sync("templates", [i for _, i, _, _ in rows], [])

    def _upsert_identities(self, rows):
        if self._file is not None:
            self._file.put_people(rows)
        self._put_identities(rows)
        self._sync("identities", [identity for identity, _, _, _ in rows], [])

    def _delete_identity(self, identity):
        if self._file is not None:
            self._file.delete_identity(identity)
        self._rows.pop(identity, None)
        self._centroids.drop(identity)
        self._sync("identities", [], [identity])
        self._delete_templates(sorted(self._by_identity.get(identity, ())))

    def _delete_templates(self, ids):
        if self._file is not None:
            self._file.delete_templates(ids)
        gone = []
        for i in ids:
            if i in self._templates:
                owner = self._templates.owners[self._templates.slot[i]]
                self._templates.drop(i)
                self._hashes.pop(i, None)
                self._by_identity.get(owner, set()).discard(i)
                if not self._by_identity.get(owner, True):
                    del self._by_identity[owner]
                gone.append(i)
        self._sync("templates", [], gone)

    def _search(self, rows: KeyedRows, q, limit):
        if not len(rows):
            return [[] for _ in q]
        kind = "templates" if rows is self._templates else "identities"
        if kind not in self._ann:
            with self._lazy_lock:
                if kind not in self._ann:
                    self._sync(kind, [], [], needed=True)
        ann = self._ann.get(kind)
        found = None if ann is None else ann.search(q, limit)
        if found is not None:
            return [[(o, _score_from_raw(s, self.metric)) for s, o in zip(srow, orow) if o is not None]
                    for srow, orow in zip(*found)]
        scores, found = self._exact[kind](np.ascontiguousarray(q, np.float32), min(limit, len(rows)))
        owners = rows.owners
        return [[(owners[r], _score_from_raw(s, self.metric)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores.tolist(), found.tolist())]

    def _knn(self, kind: str, q: np.ndarray, k: int):
        faiss = require("faiss", "index", "faiss-cpu")
        _apply_search_threads(faiss)
        rows = self._templates if kind == "templates" else self._centroids  # every k is at most len(rows)
        if len(q) >= PRODUCT_FROM and self.metric == "cosine":  # a batch: one read of the rows for all of it
            return _product_topk(q, rows.matrix, k)
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        return faiss.knn(q, rows.matrix, k, metric=metric)

    def _search_templates(self, q, limit):
        return self._search(self._templates, q, limit)

    def _search_identities(self, q, limit):
        return self._search(self._centroids, q, limit)

    def _identity_rows(self):
        return [{"identity": k, "templates": n, "metadata": dict(m)} for k, (n, m) in self._rows.items()]

    def _identity_names(self):
        return list(self._rows)

    def _count_templates(self):
        return len(self._templates)

    def _template_batches(self, rows):
        ids = sorted(self._templates.slot)
        for start in range(0, len(ids), rows):
            yield [(i, self._templates.owners[self._templates.slot[i]], self._hashes[i], self._templates.vector(i))
                   for i in ids[start:start + rows]]
