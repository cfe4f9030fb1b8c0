"""The one way visrec reads a torch file (``torch.load``): ``weights_only=True``, never a full unpickle.

A ``.pt`` / ``.pth`` is a pickle, and a full unpickle (``weights_only=False``) calls whatever the pickle
names: a downloaded ``backbone.pth``, a teacher, a served ``model.pt``, a product index's
``descriptor.pt`` or a resume file could run ``os.system`` on load. Every file visrec reads or writes
(model, resume, index, pretrained weights) holds only tensors, dicts, lists, tuples, strings and numbers,
which torch's restricted unpickler accepts. A file that needs any other global is refused with a
:class:`~visrec.errors.DataError` naming the file and the globals, before any of them is called.

This module sits below every layer (it imports only torch, numpy and :mod:`visrec.errors`), so
``models``, ``index`` and ``train`` all read through it.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visrec.errors import DataError


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


def _pickle_globals(path: Path, max_pickles: int = 8) -> list[str] | None:
    """The globals named by the pickle(s) at the start of a non-zip file, found by reading the opcodes
    (``pickletools.genops``: nothing is called). ``None`` when the file does not start with a pickle.
    A legacy torch file is several pickles in a row (magic, protocol, sys info, the object), then raw
    storage bytes: the scan reads pickles until one fails to parse."""
    import pickletools

    names: list[str] = []
    with open(path, "rb") as fh:
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
    path = Path(path)
    try:
        # safe_globals: for this load only (torch's allow-list is process-wide; nothing else is added to it)
        with torch.serialization.safe_globals(_numpy_array_globals()), warnings.catch_warnings():
            # a plain pickle of protocol > 2 makes torch warn before it refuses; the refusal says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
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
        raise DataError(f"not a readable torch file: {exc}", path=path) from None


def _weights_reason(exc: Exception) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return match.group(1).strip() if match else "not weights only"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, fsync, then rename: a crash mid-write leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
