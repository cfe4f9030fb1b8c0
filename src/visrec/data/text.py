"""Text files as every reader of an annotation, list or CSV file takes them: UTF-8, errors naming the line.

The formats visrec reads (JD-landmark ``.txt``/``.rect``, 300W ``.pts``, WFLW lines, pose files, ``videos.csv``,
CSV lists, Perfect-500K csv files, RecordIO ``.idx``/``property``) are ASCII in practice; they are decoded as
UTF-8 whatever the locale says, a leading UTF-8 byte-order mark (as spreadsheet programs write) is dropped,
and a byte that is not UTF-8 raises ``DataError`` naming the file and the 1-based line that holds it.

Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (and nowhere else, unlike ``str.splitlines``, which also breaks at
form feeds and Unicode separators: line numbers here are the ones an editor shows).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from visrec.errors import DataError

BOM = b"\xef\xbb\xbf"
_EOL = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """``text`` cut at ``\\n``, ``\\r\\n`` and ``\\r``; a final line break does not open an empty last line."""
    lines = _EOL.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or ``DataError`` naming it (missing, unreadable, a bad name). Only a
    regular file is read: a device (``/dev/zero`` behind a symlink in a data set) or a FIFO would never end,
    and what is read is bounded by the file's length."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise DataError("not a regular file (a directory, device or pipe)", path=path)
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except ValueError as exc:  # e.g. a NUL byte in the name (paths read from a list file)
        raise DataError(f"cannot read: {exc}", path=path) from None


def decode_text(raw: bytes, path: str | Path | None = None) -> str:
    """UTF-8 text of ``raw`` (a leading BOM dropped); a bad byte raises ``DataError`` naming ``path`` and its
    line."""
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start].decode("utf-8")  # valid: the error is the first bad byte
        line = len(_EOL.split(before))
        column = len(before) - max(before.rfind("\n"), before.rfind("\r"))
        raise DataError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} ({exc.reason})",
                        path=path, record=f"line {line}") from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file (module docstring); every failure is a ``DataError`` naming the file."""
    return decode_text(read_bytes(path), path)


def read_lines(path: str | Path) -> list[str]:
    """``read_text(path)`` cut into lines (``split_lines``): index i is line i + 1."""
    return split_lines(read_text(path))
