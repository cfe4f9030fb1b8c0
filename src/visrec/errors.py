"""Exceptions that name what is wrong (file, record, field), so the CLI can print them cleanly."""

from __future__ import annotations

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
