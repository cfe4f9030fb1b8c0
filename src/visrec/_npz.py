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


def _header(fh) -> tuple[tuple, bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    return reader(fh)


def _declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str) -> tuple[tuple, np.dtype, bool]:
    try:
        with zf.open(info) as fh:
            shape, fortran, dtype = _header(fh)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: member {info.filename!r} is not a .npy array: {exc}", path=path) from None
    if dtype.hasobject:
        raise DataError(f"{what}: member {info.filename!r} holds Python objects (a pickle); refused", path=path)
    return shape, dtype, fortran


class NpyRows:
    """A 2-D member of an ``.npz`` read a block of rows at a time (a streamed member of :func:`load_npz`):
    memory stays one block whatever the array's size. Its declared size was checked against the bytes the
    member holds when the file was opened; a member that ends early is a :class:`DataError` naming it."""

    def __init__(self, path: Path, member: str, shape: tuple, dtype: np.dtype, what: str):
        self.path, self.member, self.shape, self.dtype, self.what = path, member, shape, dtype, what

    def __len__(self) -> int:
        return int(self.shape[0])

    def blocks(self, rows: int):
        """Yield (first row, rows as an array) for consecutive blocks of at most ``rows`` rows."""
        width = int(self.shape[1]) * self.dtype.itemsize
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as fh:
                _header(fh)
                for start in range(0, len(self), rows):
                    n = min(rows, len(self) - start)
                    data = fh.read(n * width)
                    if len(data) != n * width:
                        raise DataError(f"{self.what}: member {self.member!r} ends at row {start + len(data) // width} "
                                        f"of the {len(self):,} it declares", path=self.path)
                    yield start, np.frombuffer(data, self.dtype).reshape(n, int(self.shape[1]))
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.what}: member {self.member!r} cannot be read: {exc}", path=self.path) from None


def load_npz(path: str | Path, what: str, stream: tuple[str, ...] = ()) -> dict:
    """Every array of the ``.npz`` at ``path`` by name (without ``.npy``); ``what`` names the file in errors.
    Members named in ``stream`` are not read: they come back as :class:`NpyRows` (2-D, C order), read later a
    block at a time.

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
            shape, dtype, fortran = _declared(zf, info, path, what)
            count = 1
            for n in shape:
                count *= int(n)
            declared = count * dtype.itemsize
            stored = info.compress_size if info.compress_type == zipfile.ZIP_STORED else None
            bound = info.file_size if stored is not None else min(info.file_size, info.compress_size * MAX_DEFLATE_RATIO)
            if declared > bound:
                raise DataError(f"{what}: member {info.filename!r} declares a {shape} {dtype} array "
                                f"({declared:,} bytes) but holds at most {bound:,}", path=path)
            name = info.filename[:-4]
            if name in stream:
                if len(shape) != 2 or (fortran and shape[1] > 1):
                    raise DataError(f"{what}: member {info.filename!r} must be a 2-D array in C order, got "
                                    f"{'Fortran order ' if fortran else ''}shape {shape}", path=path)
                out[name] = NpyRows(path, info.filename, shape, dtype, what)
                continue
            try:
                with zf.open(info) as fh:
                    out[name] = np.lib.format.read_array(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{what}: member {info.filename!r} cannot be read: {exc}", path=path) from None
    return out


class NpzWriter:
    """Writes an ``.npz`` (stored, uncompressed, as ``np.savez`` writes it) member by member, so that a large 2-D
    member is written a block of rows at a time (:meth:`rows`): memory stays one block whatever its size."""

    def __init__(self, path: str | Path):
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def array(self, name: str, array) -> None:
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)

    def rows(self, name: str, shape: tuple[int, int], dtype, blocks) -> None:
        """Member ``name`` of ``shape`` from the 2-D arrays ``blocks`` yields, in order; they must add up to
        exactly ``shape[0]`` rows (a source that changed while it was read is an error, not a short file)."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": (int(shape[0]), int(shape[1]))}
        written = 0
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.ndim != 2 or block.shape[1] != shape[1] or written + len(block) > shape[0]:
                    raise ValueError(f"{name}: a block of shape {block.shape} does not continue a {shape} array "
                                     f"at row {written}")
                fh.write(block.tobytes())
                written += len(block)
        if written != shape[0]:
            raise ValueError(f"{name}: {written} rows written of the {shape[0]} declared")

    def close(self) -> None:
        self.zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
