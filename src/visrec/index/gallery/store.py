"""A durable, crash-safe file beside the in-memory FAISS gallery: SQLite (Python's standard library) in WAL
mode with full sync, so a gallery write is one SQLite transaction that is either wholly on disk or, after a
crash (kill -9, power loss), wholly absent when the file is next opened. Searches never read it: the FAISS
gallery loads every row into memory when it opens and writes each change through.

Tables: ``info`` (key -> JSON text), ``templates`` (id, identity, image hash, vector as float32 bytes) and
``people`` (identity, template count, metadata JSON, centroid as float32 bytes). Names and every other value
reach SQL as bound parameters only. The file is untrusted when read back: every row is checked (sizes,
types, names) and a bad one is a :class:`DataError` naming the file, the table and the row.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from visrec._files import check_regular_file, writing_into
from visrec._structured import loads_json
from visrec.errors import DataError, StorageError
from visrec.index.gallery.base import MAX_HASH_CHARS, check_identity

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS templates (id TEXT PRIMARY KEY, identity TEXT NOT NULL, hash TEXT NOT NULL,
                                      vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS templates_by_identity ON templates (identity);
CREATE TABLE IF NOT EXISTS people (identity TEXT PRIMARY KEY, templates INTEGER NOT NULL, metadata TEXT NOT NULL,
                                   centroid BLOB NOT NULL);
"""


def _refused_by_storage(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed because the disk did (full, read-only, failing, the file not creatable there)."""
    return getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY",
                                                             "SQLITE_CANTOPEN"))


def _storage_error(exc: sqlite3.Error, path: Path) -> StorageError:
    return StorageError(str(exc), path=path, no_space=exc.sqlite_errorname.startswith("SQLITE_FULL"))


def _storage_refusals(write):
    """A :class:`GalleryFile` write whose disk refuses it (SQLite's "database or disk is full", a read-only or
    failing disk) raises a ``StorageError`` naming the file; the gallery's write is undone as for any error."""
    @functools.wraps(write)
    def call(self, *args, **kwargs):
        try:
            return write(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not _refused_by_storage(exc):
                raise
            raise _storage_error(exc, self.path) from None
    return call


class GalleryFile:
    """The SQLite file of one FAISS gallery: :meth:`load` everything, then write changes through, each gallery
    write between :meth:`begin` and :meth:`commit` (or :meth:`rollback`)."""

    def __init__(self, path: str | Path):
        self.path = check_regular_file(path)  # SQLite read a pipe as "disk I/O error"
        # the file itself, links resolved: what is claimed and opened, so that a link to a gallery file (or a
        # path through a linked folder) is the same gallery as the file, never a second writer of it
        self.real = real_file(self.path)
        with writing_into(self.real):  # a read-only or full disk: a StorageError naming the folder or lock file
            self.real.parent.mkdir(parents=True, exist_ok=True)
            self._claim = _claim(self.real, self.path)
        try:
            # autocommit mode: transactions are the explicit BEGIN/COMMIT below; the gallery's lock serialises
            # writers, so one connection is shared by the service's worker threads
            self.db = sqlite3.connect(str(self.real), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the write is acknowledged
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._claim.close()
            if _refused_by_storage(exc):
                raise _storage_error(exc, self.path) from None
            raise DataError(f"not a visrec FAISS gallery file (SQLite): {exc}", path=self.path) from None

    def _bad(self, table: str, row: int, what: str) -> DataError:
        return DataError(f"gallery file table {table!r} row {row}: {what}", path=self.path)

    def load(self) -> tuple[dict | None, list, list]:
        """(info record or None, templates as (identity, id, hash, vector), people as (identity, templates,
        centroid, metadata)), every row checked."""
        info = None
        for key, value in self.db.execute("SELECT key, value FROM info"):
            if key == "info":
                try:
                    info = loads_json(value)
                except (TypeError, ValueError) as exc:
                    raise self._bad("info", 0, f"the info record is not JSON ({exc})") from None
                if not isinstance(info, dict):
                    raise self._bad("info", 0, "the info record is not a JSON object")
        dim = info.get("dim") if info else None
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536):
            raise self._bad("info", 0, f"dim {dim!r} is not an integer in 1..65536")
        templates = []
        for n, (tid, identity, h, blob) in enumerate(self.db.execute(
                "SELECT id, identity, hash, vector FROM templates ORDER BY rowid")):
            templates.append((self._name("templates", n, identity), self._text("templates", n, tid, 64),
                              self._text("templates", n, h, MAX_HASH_CHARS), self._vector("templates", n, blob, dim)))
        people = []
        for n, (identity, count, meta, blob) in enumerate(self.db.execute(
                "SELECT identity, templates, metadata, centroid FROM people ORDER BY rowid")):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise self._bad("people", n, f"template count {count!r} is not a positive integer")
            try:
                metadata = loads_json(meta)
            except (TypeError, ValueError) as exc:
                raise self._bad("people", n, f"metadata is not JSON ({exc})") from None
            if not isinstance(metadata, dict):
                raise self._bad("people", n, "metadata is not a JSON object")
            people.append((self._name("people", n, identity), count, self._vector("people", n, blob, dim), metadata))
        return info, templates, people

    def _name(self, table, n, value) -> str:
        try:
            return check_identity(value)
        except DataError as exc:
            raise self._bad(table, n, str(exc)) from None

    def _text(self, table, n, value, limit) -> str:
        if not isinstance(value, str) or not 1 <= len(value) <= limit:
            raise self._bad(table, n, f"{str(value)[:40]!r} is not text of 1-{limit} characters")
        return value

    def _vector(self, table, n, blob, dim) -> np.ndarray:
        if not isinstance(blob, bytes) or dim is None or len(blob) != 4 * dim:
            raise self._bad(table, n, f"vector of {len(blob) if isinstance(blob, bytes) else '?'} bytes, expected "
                                      f"{dim} float32 values")
        v = np.frombuffer(blob, np.float32).copy()
        if not np.isfinite(v).all():
            raise self._bad(table, n, "vector holds NaN or inf")
        return v

    # -- writes (inside begin/commit when part of a gallery write) -------------------------------------------
    @_storage_refusals
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    @_storage_refusals
    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    @_storage_refusals
    def put_info(self, info: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO info (key, value) VALUES ('info', ?)",
                        (json.dumps(info, sort_keys=True),))

    @_storage_refusals
    def put_templates(self, rows) -> None:
        self.db.executemany("INSERT OR REPLACE INTO templates (id, identity, hash, vector) VALUES (?, ?, ?, ?)",
                            [(i, identity, h, np.asarray(v, np.float32).tobytes()) for identity, i, h, v in rows])

    @_storage_refusals
    def put_people(self, rows) -> None:
        self.db.executemany("INSERT OR REPLACE INTO people (identity, templates, metadata, centroid) "
                            "VALUES (?, ?, ?, ?)",
                            [(identity, int(n), json.dumps(meta, sort_keys=True), np.asarray(c, np.float32).tobytes())
                             for identity, n, c, meta in rows])

    @_storage_refusals
    def delete_identity(self, identity: str) -> None:
        """Erase the row and the templates together (one transaction of its own unless inside a write)."""
        own = not self.db.in_transaction
        if own:
            self.begin()
        try:
            self.db.execute("DELETE FROM people WHERE identity = ?", (identity,))
            self.db.execute("DELETE FROM templates WHERE identity = ?", (identity,))
        except BaseException:
            if own:
                self.rollback()
            raise
        if own:
            self.commit()

    @_storage_refusals
    def delete_templates(self, ids) -> None:
        self.db.executemany("DELETE FROM templates WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        if self._claim.closed:
            return
        try:
            self.rollback()
            self.db.close()
        finally:
            self._claim.close()  # releases the claim


def real_file(path: str | Path) -> Path:
    """``path`` with every symbolic link resolved (of the file and of the folders above it), absolute: the one
    name of a gallery file however it is reached. A link that points nowhere yet resolves to where the file
    will be made."""
    return Path(os.path.realpath(path))


def _claim(real: Path, given: Path | None = None):
    """An exclusive claim on the gallery file for this open (``flock`` on ``<file>.lock`` beside the real file,
    links resolved: a link to the file claims the same lock; released by close or by the process's death, kill -9
    included). The gallery searches what it loaded into memory, so a second process (or a second open in this
    one) writing the same file would leave the first one serving stale rows: it is refused instead."""
    lock = open(real.with_name(real.name + ".lock"), "a+b")
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no claim, as SQLite itself would not stop a second process
        return lock
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        given = real if given is None else given
        through = "" if real_file(given) == Path(os.path.abspath(given)) else f" (a link to {real})"
        raise DataError(f"the gallery file{through} is open elsewhere (a running service, or another gallery "
                        "command): stop that first, or reach the gallery through the service's HTTP API",
                        path=given) from None
    return lock
