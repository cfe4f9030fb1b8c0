"""Text files as every reader of an annotation, list or CSV file takes them: UTF-8, errors naming the line.

The formats visrec reads (JD-landmark ``.txt``/``.rect``, 300W ``.pts``, WFLW lines, pose files, ``videos.csv``,
CSV lists, Perfect-500K csv files, RecordIO ``.idx``/``property``) are ASCII in practice; they are decoded as
UTF-8 whatever the locale says, a leading UTF-8 byte-order mark (as spreadsheet programs write) is dropped,
and a byte that is not UTF-8 raises ``DataError`` naming the file and the 1-based line that holds it.

Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (and nowhere else, unlike ``str.splitlines``, which also breaks at
form feeds and Unicode separators: line numbers here are the ones an editor shows).

Output paths, the other way: every command checks where it will write (``check_output``: a folder that is a
file, a file that is a folder, a path under a file, a broken link or a folder it cannot write into) before it
does any work, and ``write_bytes_atomic`` writes a file whole or not at all; both raise ``DataError`` naming
the path.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import weakref
from pathlib import Path

from visrec._files import NOT_REGULAR, leftovers, replacing, writing_into
from visrec.errors import DataError, StorageError, VisrecError

BOM = b"\xef\xbb\xbf"
_EOL = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """``text`` cut at ``\\n``, ``\\r\\n`` and ``\\r``; a final line break does not open an empty last line."""
    lines = _EOL.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_bytes(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes, or ``DataError`` naming it (missing, unreadable, a bad name, longer than ``max_bytes``
    when given: refused from its size, before it is read). Only a regular file is read: a device (``/dev/zero``
    behind a symlink in a data set) or a FIFO would never end, and what is read is bounded by the file's length."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DataError(NOT_REGULAR, path=path)
        if max_bytes is not None and st.st_size > max_bytes:
            raise DataError(f"{st.st_size:,} bytes, more than the {max_bytes:,} a file of this kind may have",
                            path=path)
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


def read_text(path: str | Path, max_bytes: int | None = None) -> str:
    """The UTF-8 text of a file (module docstring); every failure is a ``DataError`` naming the file (one longer
    than ``max_bytes``, when given, is refused from its size: ``read_bytes``)."""
    return decode_text(read_bytes(path, max_bytes), path)


def read_lines(path: str | Path) -> list[str]:
    """``read_text(path)`` cut into lines (``split_lines``): index i is line i + 1."""
    return split_lines(read_text(path))


def listed_place(path: str | Path) -> str:
    """The key under which a list's readers compare the files it names: absolute and normalised, so that
    ``a.jpg``, ``./a.jpg``, ``x/../a.jpg`` and ``/data/a.jpg`` (with the list in ``/data``) are one place whatever
    folder the command runs in. Links are not followed (a key per line costs no file system call)."""
    return os.path.normpath(os.path.abspath(path))


def check_output(path: str | Path, *, kind: str, what: str = "--out", reads: dict | None = None) -> Path:
    """``path`` if the command can write its output there, else ``DataError`` naming it; nothing is created.

    ``kind`` is ``"dir"`` (a folder the command creates or writes into) or ``"file"`` (one file, created or
    replaced). Refused: a folder output that exists as something else than a folder, a file output that is a
    folder or not a regular file (a device, a pipe), a path below a file (its nearest existing ancestor must be a
    folder), a broken or looping link on the way, and a folder the user cannot write into. ``what`` names the
    option in the message (``--out``, ``--submission``). ``reads``: what the command reads, by the name the
    message gives it (``{"MODEL": model_file, "--filelist": filelist}``; None values are skipped): an output
    that is one of those files (by any path, link or hard link) or lies inside one of those folders is refused
    (:func:`check_apart`)."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = Path(path)
    try:
        if str(path) == "" or "\0" in str(path):
            raise DataError(f"{what} needs a path", path=path)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):  # the latter: a file on the way, reported below
            if path.is_symlink():
                raise DataError(f"{what} is a broken link", path=path) from None
            st = None
        if st is not None:
            if kind == "dir" and not stat.S_ISDIR(st.st_mode):
                raise DataError(f"{what} must be a folder; this is a file", path=path)
            if kind == "file" and stat.S_ISDIR(st.st_mode):
                raise DataError(f"{what} must be a file; this is a folder (name a file inside it)", path=path)
            if kind == "file" and not stat.S_ISREG(st.st_mode):
                raise DataError(f"{what} must be a regular file; this is a device or a pipe", path=path)
        parent = path if st is not None and kind == "dir" else path.absolute().parent
        for folder in (parent, *parent.parents):
            try:
                fst = folder.stat()
            except (FileNotFoundError, NotADirectoryError):
                if folder.is_symlink():
                    raise DataError(f"{what} lies under {folder}, a broken link", path=path) from None
                continue
            if not stat.S_ISDIR(fst.st_mode):
                raise DataError(f"{what} lies under {folder}, which is a file, not a folder", path=path)
            if not os.access(folder, os.W_OK | os.X_OK):
                read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY
                why = "a read-only file system" if read_only else "permission denied"
                raise DataError(f"{what}: cannot write into {folder} ({why})", path=path)
            break
    except OSError as exc:  # a link loop, a name too long, ...
        raise DataError(f"{what} cannot be written: {exc.strerror or exc}", path=path) from None
    if reads:
        check_apart(path, reads, what=what)
    return path


def check_apart(out: str | Path, reads: dict, *, what: str = "--out") -> None:
    """``DataError`` if writing ``out`` (a file, or a folder the command fills) would replace or add to what the
    command reads: ``reads`` maps the name a message gives an input (``MODEL``, ``--filelist``) to its path
    (None: not given). A file input is refused when ``out`` is that file (``os.path.samefile``: any spelling, a
    link, a hard link); a folder input when ``out`` is it or lies inside it (links resolved), as an index folder
    or a set of photos is read whole. Run before any work: a submission written over its own file list, or an
    --out inside the index it searches, would destroy the input the user asked to read."""
    out = Path(out)
    try:
        real_out = Path(os.path.realpath(out))
    except (OSError, ValueError):
        return  # check_output has refused what cannot be resolved
    for name, source in reads.items():
        if source is None:
            continue
        source = Path(source)
        try:
            if source.is_dir():
                if real_out.is_relative_to(os.path.realpath(source)):
                    raise DataError(f"{what} lies inside {name} ({source}), which this command reads: name a path "
                                    "outside it", path=out)
            elif out.exists() and source.exists() and os.path.samefile(out, source):
                raise DataError(f"{what} is {name} ({source}), which this command reads: writing would replace it; "
                                "name another file", path=out)
        except (OSError, ValueError):
            continue  # an input that cannot be examined is reported by the reader that opens it


def write_bytes_atomic(path: str | Path, data: bytes, *, what: str = "--out") -> Path:
    """Write ``data`` to ``path`` whole or not at all (``visrec._files.replacing``: a temporary file beside it,
    then a rename; a file there is replaced, a failure leaves it as it was). Creates the missing folders;
    ``DataError`` naming the path."""
    path = Path(check_output(path, kind="file", what=what))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions, as open()
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except OSError as exc:  # the folder could not be made (a full disk, /proc as root)
        raise StorageError.from_os(exc, path) from None
    return path


@contextlib.contextmanager
def staged_files(out: str | Path):
    """A hidden folder in ``out`` to write a set of output files into (a report and its pictures); when the block
    ends without an error each file is renamed into ``out`` (replacing one of that name), and the folder goes in
    every case. A kill mid-write leaves the earlier files whole (never a half-written page or picture), and
    work done inside the block after the files are written (a submission swapped in) comes before the renames,
    so the two sets disagree for the few renames only. A killed run's hidden folder is removed by the next."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in leftovers(out, ".staged-"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = out / f".staged-{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        with writing_into(out, stage):  # a full disk: a StorageError naming the folder, not a hidden file
            yield stage
            for f in sorted(stage.iterdir()):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_CLAIMS: "weakref.WeakSet[FolderClaim]" = weakref.WeakSet()


def _forget_claims_in_child() -> None:
    """In a forked child (a DataLoader or preparation worker): drop its copies of the claims' descriptors, never
    unlocking them, so a claim lasts as long as its own process holds it, not as long as a worker lingers."""
    for claim in list(_CLAIMS):
        if claim.fd is not None:
            os.close(claim.fd)
            claim.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_claims_in_child)


class FolderClaim:
    """An exclusive claim on an output folder for one run: ``flock`` on the folder itself (no file is added to
    it), released by :meth:`close`, by garbage collection, or by the process's death (kill -9 included); a
    forked worker does not keep it. A second process (or a second claim in this one) on the same folder gets a
    :class:`VisrecError` naming the folder, instead of two runs writing one folder's files at once and mixing
    them."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.fd = Path(folder), None
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no claim
            return
        fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VisrecError(f"{self.folder} is in use by another {what} (two runs would mix their files in it): "
                              f"wait for that one to end, or choose another folder") from None
        self.fd = fd
        _CLAIMS.add(self)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "FolderClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
