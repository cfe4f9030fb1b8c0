"""An EXIF-rotated phone photo is decoded upright on every path: the file readers (OpenCV) and uploads (Pillow)."""

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
def test_uploads_and_files_decode_to_the_same_upright_pixels(orientation, shape):
    pytest.importorskip("fastapi", reason="uploads are the service's path")
    from visrec.serve.pipeline import decode_upload

    data, _ = rotated_jpeg(orientation)
    from_file, from_upload = decode_image(data), decode_upload(data)
    assert from_file.shape[:2] == from_upload.shape[:2] == shape
    assert np.abs(from_file.astype(int) - from_upload.astype(int)).max() <= 2
