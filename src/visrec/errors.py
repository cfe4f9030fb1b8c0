"""Exceptions that name what is wrong (file, record, field), so the CLI can print them cleanly."""

from __future__ import annotations

import errno as _errno
import os as _os
from pathlib import Path


class VisrecError(Exception):
    """Base class for every error visrec raises on purpose (bad input, bad config)."""


class DataError(VisrecError):
    """Bad input data. Carries the file and, where known, the record/line and field at fault."""

    def __init__(self, message: str, *, path: str | Path | None = None, record: int | str | None = None,
                 field: str | None = None):
        self.path = None if path is None else str(path)
        self.record = record
        self.field = field
        where = []
        if self.path is not None:
            where.append(self.path)
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)
        self.message = message


def shown(value, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a file's or a client's
    megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ConfigError(VisrecError):
    """A run config or protocol file that does not validate."""


class OptionalDependencyError(VisrecError, ImportError):
    """An optional dependency is missing; the message says which extra installs it."""


class StorageError(VisrecError):
    """The system refused to write (or read) a file: a full disk, a quota, a file size limit, a read-only file
    system, an I/O error. Not the input's fault: the same command succeeds once the cause is gone, and what was
    written whole before it (a checkpoint, a file replaced only by a complete one) is still there. ``path`` names
    the file or folder (None when the system did not say), ``reason`` is the system's own words, ``errno`` its
    number (None for a library's error such as SQLite's), ``advice`` what to do (by default, when the disk is
    full or a quota or file size limit is reached: make room and run the command again)."""

    NO_SPACE = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG})
    WRITE_REFUSALS = NO_SPACE | {_errno.EROFS}  # a write refused whichever file it named

    def __init__(self, reason: str, *, path: str | Path | None = None, errno: int | None = None,
                 action: str = "write", no_space: bool | None = None, advice: str | None = None):
        if no_space is None:  # a library's message may carry the system's words without the number
            no_space = errno in self.NO_SPACE if errno is not None else reason in map(_os.strerror, self.NO_SPACE)
        self.path = None if path is None else str(path)
        self.reason, self.errno, self.action, self.no_space = reason, errno, action, no_space
        if advice is None:
            advice = "make room (disk space, quota or file size limit) and run it again" if no_space else ""
        self.advice = advice
        self.problem = (f"{self.path}: " if self.path is not None else "") + f"cannot {action}: {reason}"
        super().__init__(self.problem + (f"; {self.advice}" if self.advice else ""))

    @classmethod
    def from_os(cls, exc: OSError, path: str | Path | None = None, action: str = "write") -> "StorageError":
        """The error for ``exc``, naming ``path`` (else the file the system named, if any)."""
        return cls(exc.strerror or str(exc) or type(exc).__name__, path=path if path is not None else exc.filename,
                   errno=exc.errno, action=action)

    def with_advice(self, advice: str) -> "StorageError":
        """The same error, saying ``advice`` instead (a command that knows how to go on: ``--resume``)."""
        return self._but(advice=advice)

    def naming(self, path: str | Path) -> "StorageError":
        """The same error, naming ``path`` (the file a temporary one was going to become)."""
        return self._but(path=path)

    def _but(self, **changes) -> "StorageError":
        fields = dict(path=self.path, errno=self.errno, action=self.action, no_space=self.no_space,
                      advice=self.advice)
        return StorageError(self.reason, **{**fields, **changes})
