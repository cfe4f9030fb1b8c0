"""Verification ``.bin`` files (LFW, CFP-FP, AgeDB-30 as InsightFace distributes them).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` the encoded images (JPEG/PNG bytes), image
2k and 2k+1 forming pair k; ``issame_list`` one bool per pair. InsightFace wrote them under Python 2 and
loads them with ``pickle.load(f, encoding="bytes")``. Pickle can run arbitrary code, so we unpickle with
a loader that admits only plain containers, bytes, bools and numpy arrays/scalars of bools (some
re-packed files store issame as a numpy array); anything else is refused before it runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec.data.images import decode_image, encode_jpeg
from visrec.errors import DataError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # protocol-5 pickles of numpy arrays (numpy >= 1.16 with pickle 5) rebuild from a raw buffer
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytearray"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes under protocol 2
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a verification .bin holds only "
                                     f"image bytes and booleans")


def read_verification_bin(path: str | Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Return (images as RGB uint8, issame as bool array of len(images) // 2)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", path=path) from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(str(exc), path=path) from None
    except (ValueError, TypeError, EOFError, IndexError, KeyError) as exc:
        raise DataError(f"not a verification .bin (pickle of (images, issame)): {exc}", path=path) from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError("not a verification .bin (pickle of (images, issame)): top level is "
                        f"{type(obj).__name__} of length {len(obj) if hasattr(obj, '__len__') else '?'}", path=path)
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise DataError(f"images must be a list of encoded images, got {type(bins).__name__}", path=path)
    flags = np.asarray(issame).reshape(-1)
    # bools, or 0/1 integers (some re-packed files); anything else (strings, 2, 0.5) is not a label
    if flags.dtype != bool and not (flags.dtype.kind in "iu" and np.isin(flags, (0, 1)).all()) and not all(
            isinstance(x, (bool, np.bool_)) for x in flags.tolist()):
        raise DataError(f"issame must hold booleans, got {flags.dtype} values", path=path)
    issame = flags.astype(bool)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{len(bins)} images for {len(issame)} pairs (need 2 per pair)", path=path)
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray, np.ndarray)):
            raise DataError(f"{type(b).__name__}, not encoded image bytes", path=path, record=i)
    images = [decode_image(bytes(b), source=path, record=i) for i, b in enumerate(bins)]
    return images, issame


def write_verification_bin(path: str | Path, images: Sequence[np.ndarray | bytes], issame: Sequence[bool]) -> Path:
    """Write pairs (images 2k, 2k+1) and their labels in InsightFace's layout (protocol 2 pickle)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    bins = [bytes(im) if isinstance(im, (bytes, bytearray)) else encode_jpeg(im) for im in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump((bins, [bool(x) for x in issame]), fh, protocol=2)
    return path
