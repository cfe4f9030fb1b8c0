"""An EXIF-rotated phone photo is decoded upright, to the same pixels, on every path: the file readers, uploads
and the Python API share one decoder."""

import io

import numpy as np
import pytest
from PIL import Image

from visrec.data.images import decode_image


def rotated_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    img = np.zeros((60, 100, 3), np.uint8)
    img[:20, :50] = (255, 40, 40)  # a red block top-left: where it lands shows the rotation
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), img


@pytest.mark.parametrize("orientation, shape", [(1, (60, 100)), (3, (60, 100)), (6, (100, 60)), (8, (100, 60))])
def test_uploads_files_and_python_decode_to_the_same_upright_pixels(orientation, shape, tmp_path):
    from visrec.faces.images import decode_upload, load_image

    data, _ = rotated_jpeg(orientation)
    (tmp_path / "p.jpg").write_bytes(data)
    from_file = decode_image(data)
    assert from_file.shape[:2] == shape
    for other in (decode_upload(data), load_image(tmp_path / "p.jpg"), load_image(data)):
        assert np.array_equal(other, from_file)
    red = np.argwhere((from_file[..., 0] > 200) & (from_file[..., 1] < 100))  # where the top-left block went
    corner = {1: (0, 0), 3: (1, 1), 6: (0, 1), 8: (1, 0)}[orientation]  # (bottom?, right?) after turning upright
    assert (red[:, 0].mean() > shape[0] / 2, red[:, 1].mean() > shape[1] / 2) == corner


def test_a_jpeg_cut_short_is_refused_on_every_path():
    from visrec.errors import DataError
    from visrec.faces.images import InputError, decode_upload

    data, _ = rotated_jpeg(1)
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(DataError, match="truncated JPEG"):
            decode_image(data[:cut])
        with pytest.raises(InputError, match="truncated JPEG"):
            decode_upload(data[:cut])
    assert decode_image(data + b"trailing bytes a phone appended").shape == (60, 100, 3)


def with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """``jpeg`` with an APP1 EXIF segment whose IFD1 holds ``thumbnail`` (as cameras and phones write it): a
    whole JPEG, scan and end marker included, before the photo's own first scan."""
    import struct

    ifd1 = struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 44) \
        + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 14) + ifd1 + thumbnail
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload + jpeg[2:]


def test_a_photo_with_an_exif_thumbnail_cut_short_is_named_a_truncated_jpeg():
    """The first FF DA of such a file is the thumbnail's scan, and the thumbnail's end marker followed it: the
    cut photo passed the check and the decoder refused it as 'not a decodable image' (or filled it grey)."""
    from visrec.errors import DataError

    data, img = rotated_jpeg(1)
    thumb, _ = rotated_jpeg(1)
    photo = with_exif_thumbnail(data, thumb)
    assert np.array_equal(decode_image(photo), decode_image(data))
    for cut in (len(photo) - 2, len(photo) - 200, len(data) // 2 + len(thumb)):
        with pytest.raises(DataError, match="truncated JPEG"):
            decode_image(photo[:cut])
