"""Verification ``.bin`` files (LFW, CFP-FP, AgeDB-30 as InsightFace distributes them).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` the encoded images (JPEG/PNG bytes), image
2k and 2k+1 forming pair k; ``issame_list`` one bool per pair. InsightFace wrote them under Python 2 and
loads them with ``pickle.load(f, encoding="bytes")``.

Pickle is a program, not data, so a ``.bin`` is run by a restricted interpreter:
* the pure-Python unpickler (``pickle._Unpickler``): its memo is a dict, where the C unpickler sizes an array
  by the largest memo index a file names (4 bytes of pickle could ask for 32 GiB); its one opcode that
  allocates before reading (``BYTEARRAY8``, in both unpicklers) is replaced by one that reads first;
* ``find_class`` admits only what the real files hold (plain containers, bytes, bools and numpy
  arrays/scalars of booleans or numbers), and hands back checked stand-ins, never the real callables:
  ``bytearray``/``bytes`` only copy bytes (``bytearray(2**40)`` would allocate 1 TiB), ``numpy.ndarray``
  cannot be called, ``numpy.dtype`` makes only plain numeric dtypes, and every numpy array is rebuilt
  (``_reconstruct`` + its state, or ``_frombuffer``) only after its shape times its item size has been
  checked against the bytes the pickle actually holds. So nothing allocates more than the file's length.
Anything else is refused before it runs, as a ``DataError`` naming the file.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec._files import replacing
from visrec.data.images import decode_image, encode_jpeg
from visrec.data.text import read_bytes
from visrec.errors import DataError

_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what issame or an image byte array can be
_MAX_DIMS = 32


def _refuse(message: str):
    raise pickle.UnpicklingError(message)


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may take it; calling it is refused
    (``numpy.ndarray(shape)`` would allocate whatever the shape says)."""

    def __new__(cls, *args, **kwargs):
        _refuse("numpy.ndarray may only be rebuilt through numpy's _reconstruct")


class _Dtype:
    """A checked plain numeric ``numpy.dtype``; its pickled state may set only the byte order."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags), as numpy writes it
        if not isinstance(state, tuple) or len(state) < 2:
            _refuse("malformed numpy dtype state")
        order = state[1].decode("latin-1") if isinstance(state[1], bytes) else state[1]
        if any(x is not None for x in state[2:5]):
            _refuse("structured or sub-array numpy dtypes are not allowed")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            _refuse(f"numpy dtype byte order {order!r}")


def _dtype(spec, align=False, copy=False) -> _Dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("latin-1")
    if not isinstance(spec, str) or len(spec) > 4:
        _refuse(f"numpy dtype {spec!r} is not a plain numeric type")
    try:
        dt = np.dtype(spec)
    except TypeError:
        _refuse(f"numpy dtype {spec!r} is not a plain numeric type")
    if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None or dt.itemsize < 1:
        _refuse(f"numpy dtype {spec!r} is not a plain numeric type (only bool, int, uint, float)")
    return _Dtype(dt)


def _unwrap(dt) -> np.dtype:
    if not isinstance(dt, _Dtype):
        _refuse(f"expected a numpy dtype, got {type(dt).__name__}")
    return dt.dtype


def _check_shape(shape, dtype: np.dtype, nbytes: int) -> tuple[int, ...]:
    """The shape, when it describes exactly ``nbytes`` bytes of ``dtype``: the data is already in hand, so
    nothing larger than the file is ever allocated."""
    if not isinstance(shape, tuple) or len(shape) > _MAX_DIMS or not all(
            type(d) is int and d >= 0 for d in shape):
        _refuse(f"numpy array shape {shape!r} is not a tuple of sizes")
    need = math.prod(shape) * dtype.itemsize
    if need != nbytes:
        _refuse(f"numpy array of shape {shape} ({dtype}) needs {need} bytes, the pickle holds {nbytes}")
    return shape


class _SafeArray(np.ndarray):
    """What the pickle's numpy arrays are built as: ``__setstate__`` checks the state before numpy sees it."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            _refuse("malformed numpy array state")
        shape, dt, fortran, raw = state[-4:]
        dtype = _unwrap(dt)
        if not isinstance(raw, (bytes, bytearray)):
            _refuse(f"numpy array data must be bytes, got {type(raw).__name__}")
        shape = _check_shape(shape, dtype, len(raw))
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), bytes(raw)))


def _reconstruct(subtype, shape, spec):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then sets its state
    if subtype is not _NdarrayType:
        _refuse("numpy _reconstruct of something other than numpy.ndarray")
    if not isinstance(shape, tuple) or len(shape) > _MAX_DIMS or any(type(d) is not int for d in shape) \
            or math.prod(shape) != 0:
        _refuse(f"numpy _reconstruct with shape {shape!r} (numpy writes an empty one)")
    _dtype(spec)
    return _SafeArray((0,), np.int8)


def _frombuffer(buf, dt, shape, order):
    if isinstance(buf, memoryview):
        buf = buf.tobytes()
    if not isinstance(buf, (bytes, bytearray)):
        _refuse(f"numpy _frombuffer of {type(buf).__name__}")
    dtype = _unwrap(dt)
    shape = _check_shape(shape, dtype, len(buf))
    if order not in ("C", "F"):
        _refuse(f"numpy array order {order!r}")
    return np.frombuffer(bytes(buf), dtype).reshape(shape, order=order).copy(order="K").view(_SafeArray)


def _scalar(dt, data=None):
    dtype = _unwrap(dt)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse("numpy scalar without exactly its item's bytes")
    return np.frombuffer(data, dtype)[0].item()  # a Python bool/int/float: nothing left to set state on


def _bytearray(*args):
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin-1", "latin1"):
        return bytearray(args[0], "latin-1")  # how Python 3 pickles a bytearray under protocol 2
    _refuse("bytearray(...) only of bytes (a size would allocate whatever the file asks)")


def _bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    _refuse("bytes(...) only of bytes (a size would allocate whatever the file asks)")


def _encode(obj, encoding="utf-8", errors="strict"):
    # how Python 3 pickles bytes under protocol 2: _codecs.encode(text, 'latin1')
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        _refuse("_codecs.encode other than of text to latin1")
    return obj.encode("latin-1")


_ALLOWED = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _reconstruct
    _ALLOWED[(_module, "scalar")] = _scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    # protocol-5 pickles of numpy arrays (numpy >= 1.16 with pickle 5) rebuild from a raw buffer
    _ALLOWED[(_module, "_frombuffer")] = _frombuffer
for _module in ("builtins", "__builtin__"):
    _ALLOWED[(_module, "bytearray")] = _bytearray
    _ALLOWED[(_module, "bytes")] = _bytes
_ALLOWED.update({("numpy", "ndarray"): _NdarrayType, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _encode})


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: module docstring
    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_bytearray8(self):
        # the stock opcode allocates bytearray(n) for the n the file announces, then reads: read first
        (n,) = struct.unpack("<Q", self.read(8))
        if n > sys.maxsize:
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {n} bytes")
        data = self.read(n)  # at most what the file holds
        if len(data) != n:
            raise pickle.UnpicklingError(f"BYTEARRAY8 announces {n} bytes, the file holds {len(data)}")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a verification .bin holds only "
                                         f"image bytes and booleans") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids: a verification .bin holds only image bytes "
                                     "and booleans")


def _plain(x):
    """A loaded array as a plain ndarray (it was built as ``_SafeArray``)."""
    return np.asarray(x) if isinstance(x, np.ndarray) else x


def _issame(issame, path) -> np.ndarray:
    """bools, or 0/1 integers (some re-packed files); anything else (strings, 2, 0.5) is not a label."""
    if isinstance(issame, np.ndarray):
        flags = np.asarray(issame).reshape(-1)
        if flags.dtype == bool or (flags.dtype.kind in "iu" and np.isin(flags, (0, 1)).all()):
            return flags.astype(bool)
        raise DataError(f"issame must hold booleans, got {flags.dtype} values", path=path)
    if not isinstance(issame, (list, tuple)):
        raise DataError(f"issame must be a list of booleans, got {type(issame).__name__}", path=path)
    for i, x in enumerate(issame):
        if not (isinstance(x, bool) or (type(x) is int and x in (0, 1))):
            raise DataError(f"issame must hold booleans, got {type(x).__name__} {x!r}"[:200], path=path,
                            record=f"pair {i}")
    return np.array([bool(x) for x in issame], dtype=bool)


def read_verification_bin(path: str | Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Return (images as RGB uint8, issame as bool array of len(images) // 2). A file without pairs, or whose
    images are not all of one size (aligned crops; a model takes one input size), is a ``DataError`` naming
    the file and the first image (0-based record) that differs."""
    path = Path(path)
    raw = read_bytes(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refusing"):  # what this reader refuses to run says so itself
            raise DataError(str(exc), path=path) from None
        raise DataError(f"not a verification .bin (pickle of (images, issame)): {str(exc)[:200]}", path=path) from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle program fails in any of the interpreter's ways
        detail = f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else f"{type(exc).__name__} (data ends early?)"
        raise DataError(f"not a verification .bin (pickle of (images, issame)): {detail}", path=path) from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError("not a verification .bin (pickle of (images, issame)): top level is "
                        f"{type(obj).__name__} of length {len(obj) if hasattr(obj, '__len__') else '?'}", path=path)
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise DataError(f"images must be a list of encoded images, got {type(bins).__name__}", path=path)
    issame = _issame(_plain(issame), path)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{len(bins)} images for {len(issame)} pairs (need 2 per pair)", path=path)
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray, np.ndarray)):
            raise DataError(f"{type(b).__name__}, not encoded image bytes", path=path, record=i)
    if not bins:
        raise DataError("no pairs (images and issame are empty)", path=path)
    images = []
    for i, b in enumerate(bins):
        images.append(decode_image(bytes(_plain(b)), source=path, record=i))
        if images[-1].shape != images[0].shape:  # checked as they decode: one odd image stops the read at once
            (h, w), (h0, w0) = images[-1].shape[:2], images[0].shape[:2]
            raise DataError(f"image is {w}x{h}, image 0 is {w0}x{h0}: a .bin holds aligned crops of one size",
                            path=path, record=i)
    return images, issame


def write_verification_bin(path: str | Path, images: Sequence[np.ndarray | bytes], issame: Sequence[bool]) -> Path:
    """Write pairs (images 2k, 2k+1) and their labels in InsightFace's layout (protocol 2 pickle), whole or not
    at all (an earlier file there stays until the new one is complete)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    bins = [bytes(im) if isinstance(im, (bytes, bytearray)) else encode_jpeg(im) for im in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        pickle.dump((bins, [bool(x) for x in issame]), fh, protocol=2)
    return path
