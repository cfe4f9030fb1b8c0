"""The one way visrec reads a torch file (``torch.load``): ``weights_only=True``, never a full unpickle.

A ``.pt`` / ``.pth`` is a pickle, and a full unpickle (``weights_only=False``) calls whatever the pickle
names: a downloaded ``backbone.pth``, a teacher, a served ``model.pt``, a product index's
``descriptor.pt`` or a resume file could run ``os.system`` on load. Every file visrec reads or writes
(model, resume, index, pretrained weights) holds only tensors, dicts, lists, tuples, strings and numbers,
which torch's restricted unpickler accepts. A file that needs any other global is refused with a
:class:`~visrec.errors.DataError` naming the file and the globals, before any of them is called.

Sizes are bounded by the file before anything is allocated. A zip-format file's storages are records whose
length torch checks against the declared size before it reads them. An old-format (legacy, non-zip) file
declares each storage's element count in its pickle and torch allocates that many bytes as it unpickles,
before it reaches the bytes that should follow: a 280 kB file declaring 2**31 floats allocated 8.6 GB before
failing. :func:`_check_legacy_storages` reads those counts first (the pickle scanned with stand-ins for every
global, nothing called) and refuses a file whose storages need more bytes than follow its pickle; and every
read of a non-zip file asks for at most what the file still holds (:class:`_BoundedReader`), so no length
field in a pickle or tar header makes a read buffer larger than the file.

This module sits below every layer (it imports only torch, numpy and :mod:`visrec.errors`), so
``models``, ``index`` and ``train`` all read through it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visrec._files import check_regular_file, replacing
from visrec.errors import DataError, shown


def _numpy_array_globals() -> list:
    """What a pickled numpy array names: the array type, dtype (and its class) and numpy's rebuild function.

    Resume files written before visrec stored the numpy RNG state as plain tensors hold one
    ``np.random.get_state()`` (a uint32 array); these globals let them still resume. They are exactly the
    ones torch's ``weights_only`` documentation allow-lists for numpy arrays: ``_reconstruct`` only
    builds an ``ndarray`` of an allowed subtype, and dtypes/arrays carry data, not callables (an object
    array's elements still pass through the restricted unpickler)."""
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct")]  # the same function as numpy 1.x names it


_ALLOWED = {"numpy.ndarray", "numpy.dtype", f"numpy.dtypes.{type(np.dtype(np.uint32)).__name__}",
            "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"}


_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load checks to choose its zip reader
_MAX_ELEMENT_SIZE = 16  # bytes of the widest storage element (complex128): the bound for a type not known here


class _BoundedReader(io.BufferedReader):
    """A file opened for reading whose ``read(n)`` asks for at most the bytes left in the file.

    ``BufferedReader.read(n)`` allocates ``n`` bytes before reading, and pickle and tar readers take ``n`` from
    the file itself (a pickle's 4- or 8-byte string length, a tar header's size): a few bytes claiming 4 GB
    would allocate 4 GB to read nothing. Here ``n`` is clamped to the file's length less the position, so
    a read never holds more than the file; a short read then fails in the reader as a truncated file."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self.length = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(self.length - self.tell(), 0))
        return super().read(size)


class _Stand:
    """What every global of a scanned pickle becomes (:class:`_StorageScan`): a class named after the global,
    whose calls, builds and fills do nothing, so no code the pickle names runs while it is read."""

    pickled_name = ""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stand()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageScan(pickle._Unpickler):  # the pure-Python unpickler: each opcode's reads go through our file
    """Reads one pickle of a legacy torch file with :class:`_Stand` in place of every global, recording the
    storages it declares: ``persistent_load`` gets torch's ``("storage", type, key, location, numel, view)``
    ids, each allocated by ``torch.load`` as ``numel`` elements of the type's size."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fh):
        super().__init__(fh, encoding="bytes")
        self.storages: dict[object, int] = {}  # root key -> bytes torch would allocate for it

    def find_class(self, module, name):
        return type(str(name), (_Stand,), {"pickled_name": f"{module}.{name}"})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage"):
            _, storage_type, key, _, numel, _ = pid
            if type(numel) is not int or numel < 0:
                raise pickle.UnpicklingError(f"a storage declares {numel!r} elements")
            try:
                hash(key)
            except TypeError:
                raise pickle.UnpicklingError("a storage key is not a plain value") from None
            nbytes = numel * _element_size(getattr(storage_type, "pickled_name", ""))
            self.storages[key] = max(self.storages.get(key, 0), nbytes)
        return _Stand()

    def load_bytearray8(self):
        """BYTEARRAY8 read before it is allocated (pickle's own allocates the declared length first)."""
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError(f"BYTEARRAY8 declares {size:,} bytes; the file holds {len(data):,}")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _element_size(pickled_name: str) -> int:
    """Bytes per element of a pickled storage type, as torch's legacy loader resolves it (by the name
    ``FloatStorage``, ...); the widest element for a name it does not know (torch refuses those anyway)."""
    name = pickled_name.rpartition(".")[2]
    if name == "UntypedStorage":
        return 1
    try:
        return torch._utils._element_size(torch.serialization.StorageType(name).dtype)
    except Exception:
        return _MAX_ELEMENT_SIZE


def _check_legacy_storages(path: Path) -> None:
    """Refuse (:class:`DataError` naming ``path``) an old-format torch file whose storages declare more bytes
    than the file holds after its pickle, before ``torch.load`` allocates them.

    The legacy format is four pickles (magic number, protocol, system info, the object), the list of storage
    keys, then each storage as an 8-byte count and its bytes: every storage ``torch.load`` allocates from the
    object pickle's declared element count must fit in what follows it. The pickles are read by
    :class:`_StorageScan` (nothing called). A file that does not start with the legacy magic number (a plain
    pickle, not a pickle at all) is left to ``torch.load``, which refuses it without allocating storages; a
    legacy file whose pickle cannot be read this way is refused, as its storages cannot be bounded."""
    with _BoundedReader(path) as fh:
        if fh.read(4) == _ZIP_MAGIC:
            return
        fh.seek(0)
        try:
            magic = _StorageScan(fh).load()
        except Exception:
            return  # not a legacy torch file: torch.load finds no magic number and allocates nothing
        if type(magic) is not int or magic != torch.serialization.MAGIC_NUMBER:
            return
        try:
            if _StorageScan(fh).load() != torch.serialization.PROTOCOL_VERSION:
                return  # torch.load refuses the version before the object
            _StorageScan(fh).load()  # system info
            scan = _StorageScan(fh)
            scan.load()
        except Exception as exc:
            raise DataError(f"not a readable torch file (old format): its pickle cannot be read: {exc}",
                            path=path) from None
        held = fh.length - fh.tell()
        needed = sum(8 + n for n in scan.storages.values())  # each storage: its 8-byte count, then its bytes
        if needed > held:
            raise DataError(f"not a readable torch file (old format): its {len(scan.storages)} storage(s) declare "
                            f"{needed:,} bytes but the file holds {held:,} after its pickle", path=path)


def _pickle_globals(path: Path, max_pickles: int = 8) -> list[str] | None:
    """The globals named by the pickle(s) at the start of a non-zip file, found by reading the opcodes
    (``pickletools.genops``: nothing is called). ``None`` when the file does not start with a pickle.
    A legacy torch file is several pickles in a row (magic, protocol, sys info, the object), then raw
    storage bytes: the scan reads pickles until one fails to parse."""
    import pickletools

    names: list[str] = []
    with _BoundedReader(path) as fh:  # genops reads each length the pickle declares: at most the file's
        for i in range(max_pickles):
            strings: list[str] = []
            memo: dict[int, object] = {}
            last: object = None
            try:
                for op, arg, _ in pickletools.genops(fh):
                    if op.name == "GLOBAL":
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                        last = arg
                        strings.append(last)
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = last
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(arg)] = last
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        last = memo.get(int(arg))
                        if isinstance(last, str):
                            strings.append(last)
                    else:
                        last = None
            except Exception:
                if i == 0 and not names:
                    return None
                break
    return names


def _refused_globals(path: Path, exc: Exception) -> list[str] | None:
    """The globals the file needs that are not allowed: from the zip's pickle or the file's own pickle
    opcodes (read, never run), else from torch's message. ``None`` when the file is not a pickle at all."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip-format torch file: a legacy torch file or a plain pickle
        names = _pickle_globals(path)
        if names is None:
            return None
    names += re.findall(r"GLOBAL ([\w.]+)", str(exc))
    try:  # what torch's restricted unpickler accepts by itself (its rebuild functions, OrderedDict, ...)
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _ALLOWED | set(_get_allowed_globals())
    except Exception:  # a private helper: without it, name everything the file needs
        allowed = _ALLOWED
    return [g for g in dict.fromkeys(names) if g not in allowed]


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (numpy arrays of old resume files allowed); any file that
    needs another global, or that is not a torch file at all, raises ``DataError`` naming ``path``."""
    path = check_regular_file(path)
    head = None
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        is_zip = head.startswith(_ZIP_MAGIC)
        if not is_zip:
            _check_legacy_storages(path)  # storage sizes bounded by the file before torch allocates them
        # safe_globals: for this load only (torch's allow-list is process-wide; nothing else is added to it)
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings(), \
                (contextlib.nullcontext(path) if is_zip else _BoundedReader(path)) as source:
            # a plain pickle of protocol > 2 makes torch warn before it refuses; the refusal says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # a zip-format file by path (torch checks each record's length against its declared size); any
            # other through a reader whose reads never ask for more than the file holds
            return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except DataError:
        raise
    except Exception as exc:
        # torch's restricted unpickler refuses with an UnpicklingError that names weights_only; any other
        # failure (a torn file, not a torch file) is reported as unreadable
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            names = _refused_globals(path, exc)
            if names is None:
                raise DataError("not a torch file (torch.load with weights_only=True cannot parse it: "
                                f"{_weights_reason(exc)})", path=path) from None
            what = (f"needs the pickle global(s) {', '.join(names)}" if names else
                    f"holds pickle instructions that torch's weights_only loader refuses ({_weights_reason(exc)})")
            raise DataError(f"refused to load: it {what}, which loading with weights_only=True does not "
                            f"allow (unpickling a global can run arbitrary code). visrec's own files need "
                            f"none; if you trust this file, re-save it as a plain state dict of tensors",
                            path=path) from None
        if head is not None and not head.startswith(_ZIP_MAGIC) and not head.startswith(b"\x80"):
            # neither torch.save's zip nor a pickle: the unpickler's own complaint would say nothing useful
            raise DataError(f"not a torch file: torch.save writes a zip archive (an older torch a pickle); this "
                            f"starts with {shown(head)}", path=path) from None
        raise DataError(f"not a readable torch file: {exc}", path=path) from None


def _weights_reason(exc: Exception) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return match.group(1).strip() if match else "not weights only"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, fsync, then rename: a crash mid-write leaves the previous file. A file
    replaced keeps its permission bits (a model made read-only stays read-only once a threshold is written).
    The same object gives the same bytes: saved through an open file, the archive's folder is ``archive/``
    (given a path, torch names it after the file, here the temporary name with its process id and token)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, durable=True, keep_mode=True) as tmp, open(tmp, "wb") as fh:
        writes = _KeepsWriteError(fh)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is None:
                raise
            raise writes.error from None  # replacing names the file: "model.pt: cannot write: No space left ..."


class _KeepsWriteError:
    """The file ``torch.save`` writes through, keeping the first ``OSError`` a write raised: torch reports a
    failed write (a full disk) as its own ``RuntimeError`` ("unexpected pos 704 vs 598"), without the reason."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()
