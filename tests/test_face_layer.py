"""The face layer (visrec.faces): one photo gives one crop and one embedding on every path - the HTTP service,
``visrec data prepare faces`` and the Python API - including a phone photo stored sideways with an EXIF
"rotate 90" tag; detection on a scaled copy maps boxes and points back; ArcFace templates for other crop sizes."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from visrec.errors import VisrecError
from visrec.faces.align import ARCFACE_112, align_face, arcface_template
from visrec.faces.detectors import Detection, ScaledDetector

from conftest import save_tiny_face_model


class RecordingDetector:
    """Finds one 'face' at fixed fractions of whatever image it gets, and records the image sizes it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, image):
        h, w = image.shape[:2]
        self.seen.append((h, w))
        box = np.array([0.25 * w, 0.2 * h, 0.75 * w, 0.8 * h], np.float32)
        points = np.array([[0.4 * w - 0.5, 0.4 * h - 0.5]] * 5, np.float32)  # a pixel centre at 40 % of the way
        return [Detection(box, 0.9, points)]


def test_scaled_detector_finds_on_a_small_copy_and_maps_back():
    inner = RecordingDetector()
    det = ScaledDetector(inner, 500)
    image = np.zeros((1000, 2000, 3), np.uint8)
    (found,) = det(image)
    assert inner.seen == [(250, 500)]  # longest side 2000 -> 500
    np.testing.assert_allclose(found.box, [500, 200, 1500, 800], atol=1e-3)
    np.testing.assert_allclose(found.points, [[0.4 * 2000 - 0.5, 0.4 * 1000 - 0.5]] * 5, atol=1e-3)
    small = np.zeros((300, 400, 3), np.uint8)  # already below the size: passed as it is, never scaled up
    det(small)
    assert inner.seen[-1] == (300, 400)
    ScaledDetector(inner, None)(image)
    assert inner.seen[-1] == (1000, 2000)
    with pytest.raises(VisrecError, match="detect_size"):
        ScaledDetector(inner, -1)


def test_arcface_templates_for_other_crop_sizes():
    np.testing.assert_allclose(arcface_template(112), ARCFACE_112)
    np.testing.assert_allclose(arcface_template(224), ARCFACE_112 * 2, rtol=1e-6)
    # 128: the 112 face, same scale, moved 8 px right (InsightFace's rule for its 128-pixel models)
    np.testing.assert_allclose(arcface_template(128), ARCFACE_112 + [8, 0], rtol=1e-6)
    np.testing.assert_allclose(arcface_template(256), ARCFACE_112 * 2 + [16, 0], rtol=1e-6)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (400, 400, 3), np.uint8)
    five = ARCFACE_112 * 2.5 + 40  # a face 2.5x the template's size
    for size in (112, 128, 160):
        crop, m = align_face(image, five, size)
        assert crop.shape == (size, size, 3)
        mapped = five @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(mapped, arcface_template(size), atol=1e-3)


def sideways_jpeg(path: Path) -> tuple[bytes, np.ndarray]:
    """The photo as a phone stores it when held sideways: pixels turned 90 degrees, EXIF orientation 6 ("rotate
    90 clockwise to display"). Returns (the JPEG bytes, its pixels as stored)."""
    from PIL import Image

    upright = np.asarray(Image.open(path).convert("RGB"))
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 90 degrees counter-clockwise: orientation 6 undoes it
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), stored


@pytest.mark.real_faces
def test_a_sideways_phone_photo_gives_one_crop_and_one_embedding_over_http_cli_and_python(faces_dir, tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    import visrec
    from visrec.cli import app
    from visrec.data.images import encode_jpeg, read_image
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    model = save_tiny_face_model(tmp_path / "model")
    data, stored = sideways_jpeg(faces_dir / "obama.jpg")
    photos = tmp_path / "photos"
    (photos / "obama").mkdir(parents=True)
    (photos / "obama" / "phone.jpg").write_bytes(data)
    shutil.copy(faces_dir / "obama2.jpg", photos / "obama" / "other.jpg")

    # Python
    fa = visrec.FaceAnalysis(model, detector="dlib-hog", landmarks="dlib-68")
    upright = visrec.load_image(photos / "obama" / "phone.jpg")
    assert upright.shape[0] > upright.shape[1]  # obama.jpg is portrait: turned back upright
    (face,) = fa.pipeline.faces(upright)
    python_embedding = fa.embed(photos / "obama" / "phone.jpg")
    np.testing.assert_allclose(python_embedding, fa.embed(data), atol=1e-6)
    # the stored (sideways) pixels are another picture: no face, or not this crop
    sideways_faces = fa.pipeline.faces(stored)
    assert not sideways_faces or np.abs(sideways_faces[0].crop.astype(int) - face.crop.astype(int)).mean() > 20

    # CLI prepare: the crop it writes is the Python crop, byte for byte once both are JPEG-encoded (quality 95)
    res = CliRunner().invoke(app, ["data", "prepare", "faces", str(photos), "--out", str(tmp_path / "prepared"),
                                   "--detector", "dlib-hog", "--landmarks", "dlib-68"])
    assert res.exit_code == 0, res.output
    written = tmp_path / "prepared" / "obama" / "phone.jpg"
    assert written.read_bytes() == encode_jpeg(face.crop, 95)
    prepared = read_image(written)
    assert fa.embedder(prepared[None]).ravel() @ python_embedding.ravel() / (
        np.linalg.norm(fa.embedder(prepared[None])) * np.linalg.norm(python_embedding)) > 0.99

    # HTTP: the sideways JPEG against a lossless upright copy of its pixels scores as the same image, and
    # against another photo exactly as the Python API scores it
    client = TestClient(create_app(ServeConfig(faces={
        "model": str(model), "detector": "dlib-hog", "landmarks": "dlib-68", "gallery": {"backend": "faiss"}})))
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(upright).save(png, "PNG")
    r = client.post("/v1/faces/verify", files={"image_a": data, "image_b": png.getvalue()})
    assert r.status_code == 200 and r.json()["score"] == pytest.approx(1.0, abs=1e-5), r.text
    r = client.post("/v1/faces/verify", files={"image_a": data, "image_b": (photos / "obama" / "other.jpg").read_bytes()})
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(fa.verify(data, photos / "obama" / "other.jpg").score, abs=1e-5)
    # and the crop the service would embed for the raw sideways pixels is not the upright one
    r = client.post("/v1/faces/verify", files={"image_a": encode_jpeg(stored), "image_b": png.getvalue()})
    assert r.status_code == 422 or r.json()["score"] < 0.999, r.text


def test_an_image_opencv_cannot_warp_and_32_bit_pil_images_are_named(tiny_face_model):
    """A legal 3x40000 photo (120,000 pixels) reached cv2.warpAffine and raised a bare cv2.error (sides of
    32,767 or more); a PIL image of mode 'I' or 'F' came out white from convert('RGB')."""
    from PIL import Image

    from visrec.errors import DataError
    from visrec.faces.images import InputError, load_image
    from visrec.faces.pipeline import MAX_SIDE, FacePipeline

    pipe = FacePipeline(tiny_face_model)
    with pytest.raises(InputError, match="40000x3: a side of 32,767 pixels or more") as refused:
        pipe.faces(np.zeros((3, 40_000, 3), np.uint8))
    assert refused.value.status == 413 and MAX_SIDE == 32767
    for mode in ("I", "F"):
        with pytest.raises(DataError, match=f"mode '{mode}'"):
            load_image(Image.new(mode, (8, 8), 1000))
