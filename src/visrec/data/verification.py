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
        bins, issame = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(str(exc), path=path) from None
    except (ValueError, TypeError, EOFError) as exc:
        raise DataError(f"not a verification .bin (pickle of (images, issame)): {exc}", path=path) from None
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{len(bins)} images for {len(issame)} pairs (need 2 per pair)", path=path)
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
