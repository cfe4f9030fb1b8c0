"""Image decoding shared by every reader: bytes -> HxWx3 RGB uint8, or a DataError naming the source.

Encoded images come from files and requests nobody vetted, and a few hundred bytes of PNG or JPEG can declare
a picture of billions of pixels (a "decompression bomb"). Before anything is decoded the size is read from
the header (``header_size``) and bounded by the encoded length: at most ``MAX_PIXELS_PER_BYTE`` pixels per
byte of input beyond a floor of ``FREE_PIXELS`` (16 Mpx, which any honest photo may use whatever its size),
and never more than ``MAX_PIXELS``. Real JPEG and PNG files sit far below the ratio (a flat 112x112 JPEG is
~50 pixels a byte); only crafted files reach it.

A progressive JPEG's cost is also paid per scan: each scan revisits every pixel's coefficients, so a small
file that repeats one scan thousands of times (88 KB took 20 s of CPU to decode) is a bomb of time. JPEGs
with more than ``MAX_JPEG_SCANS`` scans are refused before decoding: ten times the 10 scans of libjpeg's own
progressive script (6 for grey), which bounds a file's decoding time to ten times an honest one's of its size.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

from visrec.data.text import read_bytes
from visrec.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def not_an_image_reason(path: str | Path) -> str:
    """Why a file is not read as an image, naming its suffix and the ones read (a ``.gif`` or ``.heic`` photo
    is an image to its owner: "not an image file" alone read as a bug)."""
    return (f"not an image file visrec reads (suffix {Path(path).suffix or 'none'}; it reads "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}, any case)")


FREE_PIXELS = 1 << 24
MAX_PIXELS_PER_BYTE = 1024
MAX_PIXELS = 1 << 28
# bytes of an image file read whole (a 2 GB file, sparse or not, was read into every worker before it was
# found undecodable): 2^28 pixels of 8-bit RGB uncompressed, the most any image visrec decodes could need
MAX_IMAGE_FILE_BYTES = 3 * MAX_PIXELS
MAX_JPEG_SCANS = 100

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:  # stray bytes before a marker: libjpeg skips them (with a warning), so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if marker in _SOF:
            if pos + 9 > n:
                return None
            h, w = struct.unpack_from(">HH", data, pos + 5)
            return w, h
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        pos += 2 + length
    return None


def jpeg_scans(data: bytes, stop: int = MAX_JPEG_SCANS + 1) -> int:
    """How many scans (start-of-scan segments) a JPEG holds, counted up to ``stop``. Markers are walked by their
    lengths, and a scan's entropy-coded data is skipped to the next marker (a data byte ``FF`` is stuffed as
    ``FF 00``; ``FF D0``-``FF D7`` are restart markers inside it), so bytes inside metadata are not counted."""
    pos, n, scans = 2, len(data), 0
    while pos + 4 <= n and scans < stop:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker in (0xD8, 0x01):
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            break
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:  # the scan's data runs to the next marker that is neither stuffing nor a restart
            scans += 1
    return scans


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) declared by an encoded image's header, without decoding it; None when the format is
    not recognised. JPEG and PNG are parsed here (fast); other formats through Pillow's lazy open."""
    if data.startswith(_PNG):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        w, h = struct.unpack_from(">II", data, 16)
        return w, h
    if data.startswith(b"\xff\xd8"):
        size = _jpeg_size(data)
        if size is not None:
            return size
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return tuple(int(v) for v in im.size)
    except Exception:  # noqa: BLE001 - any failure of a third-party parser on hostile bytes means "unknown"
        return None


def check_pixels(size: tuple[int, int], nbytes: int, *, source=None, record=None) -> None:
    """Refuse a declared (width, height) that ``nbytes`` of encoded data cannot honestly hold (docstring)."""
    w, h = size
    limit = min(MAX_PIXELS, FREE_PIXELS + MAX_PIXELS_PER_BYTE * nbytes)
    if w * h > limit:
        raise DataError(f"image header declares {w}x{h} pixels, more than {limit} allowed for "
                        f"{nbytes} encoded bytes (a decompression bomb?)", path=source, record=record)


def _check_png_chunks(data: bytes, *, source=None, record=None) -> None:
    """Every PNG chunk's length fits in what follows it: OpenCV's PNG reader allocates a chunk's announced
    length before reading it (a flipped bit in a 20 KB file's IDAT length made it allocate 1 GiB)."""
    pos, n = len(_PNG), len(data)
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > n - pos - 12:
            raise DataError(f"PNG chunk {kind!r} at byte {pos} announces {length} bytes, the data holds "
                            f"{max(n - pos - 12, 0)} after it", path=source, record=record)
        if kind == b"IEND":
            return
        pos += 12 + length


def check_encoded(data: bytes, *, source=None, record=None) -> tuple[int, int]:
    """(width, height) of encoded image bytes once what decoding them would allocate has been bounded by
    their length (module docstring; PNG chunk lengths too); else ``DataError`` naming the source."""
    size = header_size(data) if data else None
    if size is None:
        raise DataError(f"not a decodable image ({len(data)} bytes)", path=source, record=record)
    check_pixels(size, len(data), source=source, record=record)
    if data.startswith(_PNG):
        _check_png_chunks(data, source=source, record=record)
    return size


def _jpeg_complete(data: bytes) -> bool:
    """A JPEG's end-of-image marker follows its first scan. Entropy-coded data never holds ``FF D9`` (a data
    byte ``FF`` is stuffed as ``FF 00``), so a file cut anywhere inside its scans fails this; trailing bytes
    after the marker (some phones append data) do not. The first scan is found by walking the marker segments
    from the start: an EXIF thumbnail is a whole JPEG inside the APP1 segment, and a search for the first
    ``FF DA`` found the thumbnail's scan, whose end marker then passed a photo cut short. The walk reads the
    headers as :func:`_jpeg_size` (and libjpeg) does."""
    pos, n = 2, len(data)
    while True:
        if pos + 2 > n:
            return False  # the file ends among its headers
        if data[pos] != 0xFF:  # stray bytes before a marker: skipped, as libjpeg does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return False
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", pos + 2) >= 0
        elif marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker == 0xD9:
            return False  # an end of image before any scan
        else:
            if pos + 4 > n:
                return False
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")


def decode_image(data: bytes, *, source: str | Path | None = None, record: int | str | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
    """Encoded bytes -> upright RGB uint8 (H, W, 3): visrec's one image decoder (files, RecordIO records,
    uploads, the Python API). OpenCV decodes and turns the pixels upright by the EXIF orientation tag (a phone
    photo tagged "rotate 90" comes out as it was held). Refused with a ``DataError`` naming ``source`` /
    ``record``: a size beyond what the bytes can hold (module docstring), beyond ``max_pixels`` when given
    (the field is ``pixels``), a JPEG cut short (its scans end without the end-of-image marker: decoders
    would fill the rest grey without a word), a JPEG of more than ``MAX_JPEG_SCANS`` scans (module docstring),
    and bytes no decoder reads."""
    import cv2

    w, h = check_encoded(data, source=source, record=record)
    if w < 1 or h < 1:
        raise DataError(f"image has zero size ({w}x{h})", path=source, record=record)
    if max_pixels is not None and w * h > max_pixels:
        raise DataError(f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}",
                        path=source, record=record, field="pixels")
    if data.startswith(b"\xff\xd8"):
        if not _jpeg_complete(data):
            raise DataError(f"truncated JPEG: its {len(data)} bytes end before the end-of-image marker",
                            path=source, record=record)
        # FF DA never occurs in entropy-coded data, so the C-speed count is an upper bound of the scans: only a
        # file it puts over the limit is walked marker by marker (every training image passes here)
        if data.count(b"\xff\xda") > MAX_JPEG_SCANS and jpeg_scans(data) > MAX_JPEG_SCANS:
            raise DataError(f"JPEG holds more than {MAX_JPEG_SCANS} scans (honest progressive files hold about "
                            f"10): decoding it would take many times an image's time (a decompression bomb?)",
                            path=source, record=record)
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        arr = None
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise DataError(f"not a decodable image ({len(data)} bytes)", path=source, record=record)
    return np.ascontiguousarray(arr[:, :, ::-1])


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of IFD0 of EXIF data in TIFF form (``II*\0`` / ``MM\0*``, then the first
    IFD's offset), or 1 (upright) when it has none or the data is not such: every read is bounded by ``tiff``."""
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack_from(order + "H", tiff, ifd)[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == 0x0112:
            if kind == 3:  # SHORT, the type the EXIF standard gives it
                return struct.unpack_from(order + "H", tiff, entry + 8)[0]
            if kind == 4:  # LONG, as a few writers store it
                return struct.unpack_from(order + "I", tiff, entry + 8)[0]
            return 1
    return 1


def _jpeg_exif(data: bytes) -> bytes | None:
    """The TIFF data of a JPEG's first ``Exif`` APP1 segment, found by walking the header segments (as
    :func:`_jpeg_size` does) up to the first scan; None when it has none."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            return None
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if length < 2:
            return None
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            return body[6:]
        pos += 2 + length
    return None


def _png_exif(data: bytes) -> bytes | None:
    """The data of a PNG's ``eXIf`` chunk, before or after the image data (OpenCV honours either), walking the
    chunks by their lengths; None when it has none."""
    pos, n = len(_PNG), len(data)
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"eXIf":
            return data[pos + 8:pos + 8 + length]
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


# EXIF orientations whose upright picture is the stored one turned by a quarter (transposed, rotated 90,
# transversed, rotated 270): the decoded image's width is the stored height
QUARTER_TURNS = {5, 6, 7, 8}


def upright_size(data: bytes, stored: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the picture ``decode_image`` returns for encoded ``data`` whose header declares
    ``stored`` (``header_size``'s answer for JPEG / PNG, the stored frame): swapped when the EXIF orientation
    tag (1-8; 5-8 are quarter turns) says the decoder turns the pixels by a quarter, as OpenCV does for JPEG,
    PNG, WebP and TIFF. Read from the header, nothing decoded: JPEG (the first ``Exif`` APP1) and PNG
    (``eXIf``) are parsed here, other formats by Pillow's lazy open, which reads their tags only (for TIFF its
    stored width and length: Pillow's own ``size`` of a TIFF is already turned). No tag, or one this cannot
    read: ``stored``."""
    if data.startswith(b"\xff\xd8") or data.startswith(_PNG):
        tiff = _jpeg_exif(data) if data.startswith(b"\xff\xd8") else _png_exif(data)
        orientation = _tiff_orientation(tiff) if tiff is not None else 1
    else:
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                if im.format == "TIFF":
                    stored = (int(im.tag_v2[256]), int(im.tag_v2[257]))  # ImageWidth, ImageLength
                else:
                    stored = tuple(int(v) for v in im.size)
                orientation = im.getexif().get(0x0112, 1)
            if not isinstance(orientation, int):  # a hostile tag of another type (a list, a string)
                orientation = 1
        except Exception:  # noqa: BLE001 - a third-party parser failing on hostile bytes: no tag read
            orientation = 1
    w, h = stored
    return (h, w) if orientation in QUARTER_TURNS else (w, h)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) in pixels of an image file as ``read_image`` returns it: the upright picture, so the
    header's size with width and height swapped when its EXIF orientation is a quarter turn (``upright_size``;
    a phone photo stored 224x112 and tagged "rotate 90" is 112 wide, 224 high). Read from the header (nothing
    decoded): the frame annotation points are given in. ``DataError`` naming the file when it is not a
    readable image."""
    path = Path(path)
    data = read_bytes(path, MAX_IMAGE_FILE_BYTES)
    if header_size(data) is None:
        raise DataError("not a readable image", path=path)
    size = check_encoded(data, source=path)
    if min(size) < 1:
        raise DataError("not a readable image", path=path)
    return upright_size(data, size)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as HxWx3 RGB uint8 (a regular file only: ``visrec.data.text.read_bytes``); ``max_pixels``
    as :func:`decode_image` (a user's photo: the face pipeline's limit)."""
    path = Path(path)
    return decode_image(read_bytes(path, MAX_IMAGE_FILE_BYTES), source=path, max_pixels=max_pixels)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> Path:
    """Write an HxWx3 RGB uint8 image to ``path`` in the format its extension names (``.jpg``, ``.png``):
    encoded in memory, then written, so a write the system refuses (a full disk) is its ``OSError`` with the
    reason, where ``cv2.imwrite`` only answers False."""
    import cv2

    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(image[:, :, ::-1]), params)
    if not ok:
        raise ValueError(f"OpenCV cannot encode {path.suffix!r} images")
    path.write_bytes(buf.tobytes())
    return path
