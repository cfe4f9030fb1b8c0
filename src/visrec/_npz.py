"""Reading ``.npz`` files from elsewhere (gallery exports, catalogue indexes) without trusting their sizes.

``np.load`` on an ``.npz`` allocates each array from the shape its ``.npy`` header declares before reading
any data, so a 1 kB file can ask for terabytes. Here every member's declared size is checked first against
the bytes the member really occupies in the file: its compressed size in the zip (``compress_size``), which
must itself fit between the member's local header and the end of the file. An uncompressed (stored) member
may not declare more bytes than it holds (a ratio of exactly 1); a deflated one may not declare more than its
compressed bytes can expand to (about 1032:1, :data:`MAX_DEFLATE_RATIO`). The zip's own claim of the uncompressed size
(``file_size``, a zip64 field a forger sets to anything) is never what a bound rests on. Other compression
methods (bzip2, lzma: millions to one) and encrypted members are refused, object arrays (pickles) too.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from visrec._files import check_regular_file
from visrec.errors import DataError

MAX_DEFLATE_RATIO = 1032  # the most deflate can expand: 258-byte matches coded in ~2 bits


_RATIOS = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: MAX_DEFLATE_RATIO}  # methods read -> most expansion
_EMPTY_SLACK = 1024  # elements of no bytes (zero-size dtype, before a zero-length axis) allowed beyond the bytes
MAX_HEADER = 10_000  # bytes of a .npy header dict: numpy's own limit (np.lib.format's max_header_size)
# what reading a hostile zip can raise: zipfile's NotImplementedError for a compression method it lacks and
# RuntimeError for an encrypted member ("password required") are the file's fault as much as a BadZipFile
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError)


def _header(fh) -> tuple[tuple, bool, np.dtype]:
    """The (shape, fortran order, dtype) of the ``.npy`` at ``fh``'s position, which is left at the data.

    The header's length is checked before it is read: numpy reads the 2- or 4-byte length's worth of bytes
    first and only then compares it with its limit, so a 4 GB length in a deflated member would be
    decompressed into memory before being refused."""
    fmt = np.lib.format
    magic = fh.read(fmt.MAGIC_LEN)
    version = fmt.read_magic(io.BytesIO(magic))
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not one numpy writes")
    raw_len = fh.read(2 if version == (1, 0) else 4)
    if len(raw_len) != (2 if version == (1, 0) else 4):
        raise EOFError("the .npy header ends before its length")
    length = int.from_bytes(raw_len, "little")
    if length > MAX_HEADER:
        raise ValueError(f"the .npy header declares {length:,} bytes (at most {MAX_HEADER:,})")
    head = fh.read(length)
    if len(head) != length:
        raise EOFError("the .npy header ends early")
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    return reader(io.BytesIO(raw_len + head))  # 3.0 differs from 2.0 only in allowing UTF-8


def _capacity(info: zipfile.ZipInfo, length: int, path: Path, what: str) -> int:
    """The most bytes member ``info`` can yield when read, from what it occupies in the file, not from what
    the zip claims it expands to.

    ``compress_size`` must fit between the member's local header (``header_offset``) and the end of the file
    (``length`` bytes): a member larger than its file is a forgery. A stored member yields exactly its
    ``compress_size`` bytes, and its claimed ``file_size`` must agree (zipfile would otherwise trust a zip64
    ``file_size`` of 2**40 for a member holding 200 bytes). A deflated member yields at most
    ``compress_size * MAX_DEFLATE_RATIO``, and no more than the ``file_size`` it claims (zipfile stops there).
    Checked before anything of the member is read."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise DataError(f"{what}: member {name!r} is encrypted; refused", path=path)
    if info.compress_type not in _RATIOS:
        raise DataError(f"{what}: member {name!r} is compressed with zip method {info.compress_type}; only stored "
                        f"and deflated members are read (others can expand millions of times)", path=path)
    if info.header_offset + info.compress_size > length:
        raise DataError(f"{what}: member {name!r} claims {info.compress_size:,} bytes from offset "
                        f"{info.header_offset:,}, but the file holds {length:,} bytes", path=path)
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise DataError(f"{what}: stored member {name!r} claims {info.file_size:,} bytes but holds "
                            f"{info.compress_size:,}", path=path)
        return info.compress_size
    return min(info.file_size, info.compress_size * MAX_DEFLATE_RATIO)


def _items(shape: tuple, itemsize: int) -> int:
    """What an array of ``shape`` costs to hold or walk, in the units a byte of data pays for: its bytes, but
    at least one per element (a ``<U0`` array holds no bytes, yet ``tolist()`` makes a string per element),
    and the product of the axes before a zero-length one (a ``(2**40, 0)`` array is empty, yet ``tolist()``
    makes 2**40 lists and :class:`NpyRows` would loop 2**40 times)."""
    count, leading = 1, 1
    for n in shape:
        count *= int(n)
        if count:
            leading = count
    return max(count * max(itemsize, 1), leading)


def _declared(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str,
              length: int) -> tuple[tuple, np.dtype, bool]:
    """The (shape, dtype, fortran order) member ``info`` declares, refused (:class:`DataError` naming the file
    and the member) when the array would take more than the member can yield (:func:`_capacity`, less the
    ``.npy`` header): checked from the header alone, before the array is allocated."""
    capacity = _capacity(info, length, path, what)
    try:
        with zf.open(info) as fh:
            shape, fortran, dtype = _header(fh)
            header = fh.tell()
    except _READ_ERRORS as exc:
        raise DataError(f"{what}: member {info.filename!r} is not a .npy array: {exc}", path=path) from None
    if dtype.hasobject:
        raise DataError(f"{what}: member {info.filename!r} holds Python objects (a pickle); refused", path=path)
    held = max(capacity - header, 0)
    count = 1
    for n in shape:
        count *= int(n)
    declared = count * dtype.itemsize
    if declared > held or _items(shape, dtype.itemsize) > held + _EMPTY_SLACK:
        raise DataError(f"{what}: member {info.filename!r} declares a {shape} {dtype} array "
                        f"({declared:,} bytes) but holds at most {held:,}", path=path)
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
        except _READ_ERRORS as exc:
            raise DataError(f"{self.what}: member {self.member!r} cannot be read: {exc}", path=self.path) from None


def load_npz(path: str | Path, what: str, stream: tuple[str, ...] = ()) -> dict:
    """Every array of the ``.npz`` at ``path`` by name (without ``.npy``); ``what`` names the file in errors.
    Members named in ``stream`` are not read: they come back as :class:`NpyRows` (2-D, C order), read later a
    block at a time.

    Raises :class:`DataError` naming the file and the member for a missing file, a file that is not a zip of
    ``.npy`` arrays, an object array, or a member whose declared size its bytes cannot hold.
    """
    path = check_regular_file(path)
    if not path.exists():
        raise DataError(f"{what} not found", path=path)
    try:
        length = path.stat().st_size
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as exc:
        raise DataError(f"not a {what} (.npz): {exc}", path=path) from None
    out: dict[str, np.ndarray] = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise DataError(f"not a {what}: member {info.filename!r} is not a .npy array", path=path)
            shape, dtype, fortran = _declared(zf, info, path, what, length)
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
            except _READ_ERRORS as exc:
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
