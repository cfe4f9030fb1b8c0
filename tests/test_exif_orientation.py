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
