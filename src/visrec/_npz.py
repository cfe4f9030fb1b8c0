"""Reading ``.npz`` files from elsewhere (gallery exports, catalogue indexes) without trusting their sizes.

``np.load`` on an ``.npz`` allocates each array from the shape its ``.npy`` header declares before reading
any data, so a 1 kB file can ask for terabytes. Here every member's declared size is checked first: an
uncompressed member must hold exactly the bytes its header declares, and a deflated one may not declare
more than deflate can expand to (about 1032:1, :data:`MAX_DEFLATE_RATIO`). Object arrays (pickles) are
refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from visrec.errors import DataError

MAX_DEFLATE_RATIO = 1032  # the most deflate can expand: 258-byte matches coded in ~2 bits


def _declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str) -> tuple[tuple, np.dtype]:
    fmt = np.lib.format
    try:
        with zf.open(info) as fh:
            version = fmt.read_magic(fh)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(fh)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: member {info.filename!r} is not a .npy array: {exc}", path=path) from None
    if dtype.hasobject:
        raise DataError(f"{what}: member {info.filename!r} holds Python objects (a pickle); refused", path=path)
    return shape, dtype


def load_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` by name (without ``.npy``); ``what`` names the file in errors.

    Raises :class:`DataError` naming the file and the member for a missing file, a file that is not a zip of
    ``.npy`` arrays, an object array, or a member whose declared size its bytes cannot hold.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found", path=path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"not a {what} (.npz): {exc}", path=path) from None
    out: dict[str, np.ndarray] = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise DataError(f"not a {what}: member {info.filename!r} is not a .npy array", path=path)
            shape, dtype = _declared(zf, info, path, what)
            count = 1
            for n in shape:
                count *= int(n)
            declared = count * dtype.itemsize
            stored = info.compress_size if info.compress_type == zipfile.ZIP_STORED else None
            bound = info.file_size if stored is not None else min(info.file_size, info.compress_size * MAX_DEFLATE_RATIO)
            if declared > bound:
                raise DataError(f"{what}: member {info.filename!r} declares a {shape} {dtype} array "
                                f"({declared:,} bytes) but holds at most {bound:,}", path=path)
            try:
                with zf.open(info) as fh:
                    out[info.filename[:-4]] = np.lib.format.read_array(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{what}: member {info.filename!r} cannot be read: {exc}", path=path) from None
    return out
