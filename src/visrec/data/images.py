"""Image decoding shared by every reader: bytes -> HxWx3 RGB uint8, or a DataError naming the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visrec.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def decode_image(data: bytes, *, source: str | Path | None = None, record: int | str | None = None) -> np.ndarray:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if arr is None:
        raise DataError(f"not a decodable image ({len(data)} bytes)", path=source, record=record)
    return np.ascontiguousarray(arr[:, :, ::-1])


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image: {exc.strerror}", path=path) from None
    return decode_image(data, source=path)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
