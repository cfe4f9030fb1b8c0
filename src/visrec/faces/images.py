"""Any image a user hands over -> upright RGB uint8 (H, W, 3), by one decoder for every path.

A path, bytes, a numpy array or a PIL image: files and bytes go through :func:`visrec.data.images.decode_image`
(the decoder the training readers use), so a photo gives the same pixels over HTTP, in ``visrec data prepare``
and in Python, EXIF orientation applied on all three. The header is read first, so a decompression bomb is
refused by its declared size (``max_pixels``, and what its byte count can honestly hold) before any pixel is
decoded. Arrays are taken as RGB as they are (grey is repeated to three channels, an alpha channel dropped);
PIL images are turned upright by their own EXIF tag, and a 16-bit grey one (mode ``I;16``) keeps its top byte,
as the decoder reads the same file (Pillow's own conversion would clip it to white).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from visrec.data.images import MAX_IMAGE_FILE_BYTES, decode_image
from visrec.data.text import read_bytes
from visrec.errors import DataError, VisrecError

MAX_PIXELS = 40_000_000  # a 40-megapixel photo: above any phone camera's, far below a bomb's


class InputError(VisrecError):
    """Bad user input: the service answers 4xx with this message. ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def load_image(image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a path, bytes, an array or a PIL image; :class:`DataError` naming the input
    (the path, or ``N bytes``) and what is wrong with it."""
    if isinstance(image, (str, Path)):
        return _decode(read_bytes(image, MAX_IMAGE_FILE_BYTES), str(image), max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return _decode(data, f"{len(data)} bytes", max_pixels)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4) or 0 in arr.shape:
            raise DataError(f"an image array must be uint8 (H, W, 3) RGB, got {arr.dtype} {arr.shape}")
        _check_max(arr.shape[1], arr.shape[0], max_pixels, "array")
        return np.ascontiguousarray(arr[..., :3])
    if type(image).__module__.startswith("PIL."):
        from PIL import ImageOps

        _check_max(*image.size, max_pixels, "PIL image")
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):  # 16-bit grey: its top byte, as the decoder reads such a file
            grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
        if image.mode in ("I", "F"):  # 32-bit integers or floats: convert("RGB") clips them (mostly to white)
            raise DataError(f"a PIL image of mode {image.mode!r} (32-bit {'integer' if image.mode == 'I' else 'float'} "
                            f"values) has no one way to 8-bit pixels: scale it to uint8 (or mode 'L' / 'RGB') first")
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise DataError(f"an image is a path, bytes, a uint8 array or a PIL image; got {type(image).__name__}")


def _check_max(w: int, h: int, max_pixels: int, what: str) -> None:
    if w * h > max_pixels:
        raise DataError(f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}",
                        path=what, field="pixels")


def _decode(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    if not data:
        raise DataError("empty: no image bytes", path=what)
    return decode_image(data, source=what, max_pixels=max_pixels)


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Upload bytes -> RGB uint8 (H, W, 3) by :func:`load_image`; its refusals as :class:`InputError` with the
    status a service answers: 400 for an empty body, 413 for too many pixels (or a decompression bomb), 422
    for bytes that are not a whole image."""
    if not data:
        raise InputError("empty body: no image bytes", 400)
    try:
        return _decode(data, "upload", max_pixels)
    except DataError as exc:
        status = 413 if exc.field == "pixels" or "decompression bomb" in exc.message else 422
        raise InputError(exc.message, status) from None


def image_hash(data: bytes) -> str:
    """A short content hash of encoded bytes (32 hex digits of SHA-256): a template's key in a gallery."""
    return hashlib.sha256(data).hexdigest()[:32]
