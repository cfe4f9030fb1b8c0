"""Writing a file whole or not at all, and clearing what a killed writer left.

Every output visrec writes over (a model, an index, a report, a list, a log rewritten on resume) goes to a
temporary name beside it and is renamed over it once complete: a reader, or a crash at any instant, sees the
earlier file or the new one, never a part. The temporary name carries the writer's process id and a random
token (``.<name>.<pid>.<token>.tmp``), so two writers never share one, and a later writer of the same file
removes the temporary files of processes that are no longer running (a ``kill -9`` mid-write).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Iterator

from visrec.errors import DataError, StorageError

NOT_REGULAR = "not a regular file (a directory, device or pipe)"


def check_regular_file(path: str | Path) -> Path:
    """``path``, unless it exists and is not a regular file (links followed): then a :class:`DataError` naming
    it. Every reader of a file a user names (a model, a gallery export, a study journal, an index) calls it
    first: a FIFO blocks its reader until some writer comes, a device (``/dev/zero`` behind a link) never
    ends, and a folder fails in each library its own way. A missing path passes: its reader says so."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return path
    except (OSError, ValueError) as exc:  # a link loop, a name too long, a NUL byte
        raise DataError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(NOT_REGULAR, path=path)
    return path


def leftovers(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` named ``<prefix><pid>-...`` or ``<prefix><pid>....`` (the temporary names visrec
    gives a process's own files and folders) whose process is no longer running: what a killed run left."""
    found = []
    for path in Path(folder).glob(f"{glob.escape(prefix)}*"):
        pid = re.match(r"(\d+)[-.]", path.name[len(prefix):])
        if pid and not Path(f"/proc/{pid.group(1)}").exists():
            found.append(path)
    return found


def temporary_name(path: Path, suffix: str = "") -> Path:
    """``.<name>.<pid>.<token>.tmp<suffix>`` beside ``path`` (a suffix for writers that insist on an extension)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


@contextlib.contextmanager
def replacing(path: str | Path, *, suffix: str = "", durable: bool = False,
              keep_mode: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error it is renamed over
    ``path`` (after an ``fsync`` when ``durable``, keeping the replaced file's permission bits when
    ``keep_mode``); the temporary file goes in every case. Temporary files of ``path`` left by processes that
    are no longer running are removed first. The folder must exist. A write the system refuses (a full disk, a
    read-only file system: an ``OSError`` naming no file or the temporary one, raised in the block or by the
    rename) is a :class:`StorageError` naming ``path`` (:func:`writing_into`); one naming another file keeps
    it, and an ``OSError`` that is no refused write (a missing input the block was reading) passes through."""
    path = Path(path)
    own = re.compile(rf"\.{re.escape(path.name)}\.\d+\.[0-9a-f]+\.tmp{re.escape(suffix)}")
    for stale in leftovers(path.parent, f".{path.name}."):
        if own.fullmatch(stale.name) and stale.is_file():  # never another file's (``<name>.5``'s, say)
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = temporary_name(path, suffix)
    try:
        with writing_into(path, tmp):  # what names ``tmp`` (a nested writer's error too) names ``path``
            yield tmp
            if durable:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            if keep_mode and path.exists():
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def writing_into(out: str | Path, stage: str | Path | None = None) -> Iterator[None]:
    """A write the system refuses in the block is a :class:`StorageError`: naming ``out`` (the folder or file the
    block writes) when the system named no file, as under a buffered write to a full disk, or named ``stage``
    or a file directly in it (the temporary file, or the hidden folder whose files, that become ``out``), else
    the file it named. Other ``OSError``s naming a file (an input that is missing) pass through."""
    def staged(name) -> bool:
        if stage is None or not isinstance(name, (str, os.PathLike)):  # (an OSError may name bytes or nothing)
            return False
        return Path(stage) in (Path(name), Path(name).parent)

    try:
        yield
    except OSError as exc:
        if exc.filename is None or staged(exc.filename):
            raise StorageError.from_os(exc, out) from None
        if exc.errno in StorageError.WRITE_REFUSALS:
            raise StorageError.from_os(exc) from None
        raise
    except StorageError as exc:
        raise (exc.naming(out) if staged(exc.path) else exc) from None


def names_its_output(func):
    """Decorator of a writer ``func(out, ...)`` (its first parameter the folder or file it writes): what
    :func:`writing_into` says, for that ``out``."""
    first = next(iter(inspect.signature(func).parameters))

    @functools.wraps(func)
    def write(*args, **kwargs):
        with writing_into(args[0] if args else kwargs[first]):
            return func(*args, **kwargs)
    return write
