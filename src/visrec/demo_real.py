"""Real faces in the offline demo: pretrained dlib models on real photos from package registries.

Pipeline (:class:`FacePipeline`): dlib HOG detection -> dlib 68 landmarks -> alignment -> dlib ResNet 128-d
embedding -> visrec gallery. Two aligned crops per face: the 150x150 dlib chip (``get_face_chip``, what the
embedder takes) and visrec's own 112x112 ArcFace crop (``align_face`` on the 68 points, shown in the page).

Identification protocol (also what ``tests/test_real_faces.py`` checks):

- gallery: Obama enrolled from ONE photo (``obama2.jpg``) plus 44 distractor identities (the 43 annotated
  PASCAL VOC faces of dlib's examples and Tom Cruise), so rank 1 is a real choice;
- probes: the four other Obama photos (``obama.jpg``, ``obama3.jpg`` and the two partial-face crops of
  ``obama.jpg``) must come back as Obama and accepted; Biden (not enrolled) must be rejected;
- threshold: :func:`visrec.index.gallery.calibrate` at FPR 1e-3 on :func:`calibration_set` (the five Obama
  photos, the 43 VOC faces and Tom Cruise, each a distinct identity: 10 genuine / 1166 impostor pairs).
  Biden is held out of calibration. The threshold depends only on the impostor scores.
- scores: dlib-resnet is a distance model, so the gallery scores by the negated Euclidean distance of the
  raw descriptors (``metric="euclidean"``): -0.6 is dlib's own "same person below 0.6".

Boxes are x1 y1 x2 y2 pixels, images HxWx3 uint8 RGB.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.data.fixtures import fixtures_dir, read_imglab_xml, require_real_fixtures
from visrec.data.images import read_image
from visrec.errors import VisrecError
from visrec.faces.align import ARCFACE_112, align_face
from visrec.index.gallery import calibrate, open_gallery

OBAMA_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg")
ENROLL_PHOTO = "obama2.jpg"  # 32bit.png is the same photo as an RGBA PNG, so it is not a probe
TARGET_FPR = 1e-3
LANDMARK_XMLS = ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml")


@dataclass
class Face:
    box: np.ndarray  # (4,) x1 y1 x2 y2 pixels
    score: float  # detector score; nan when the box was given
    points: np.ndarray  # (68, 2) pixels, iBUG 300-W order
    chip: np.ndarray  # (150, 150, 3) uint8 RGB, dlib alignment: the embedder's input
    crop: np.ndarray  # (112, 112, 3) uint8 RGB, visrec's ArcFace alignment (5-point least squares)
    crop_eyes: np.ndarray  # (112, 112, 3) uint8 RGB, visrec's ArcFace alignment, eyes exactly on the template
    embedding: np.ndarray  # (128,) float32, as the network gives it


class FacePipeline:
    """detect (dlib-hog) -> 68 points (dlib-68) -> chip + ArcFace crop -> 128-d embedding (dlib-resnet).

    ``upsample=0`` finds faces larger than about 80 px (the photos here); use 1 for smaller faces.
    """

    def __init__(self, upsample: int = 0):
        from visrec.models.dlib_models import build_external

        self.detector = build_external("dlib-hog", upsample=upsample)
        self.landmarker = build_external("dlib-68")
        self.embedder = build_external("dlib-resnet")

    def __call__(self, image, box=None) -> Face | None:
        """The best-scoring face of an RGB image (or the face in ``box``); None if none is found."""
        score = float("nan")
        if box is None:
            found = self.detector(image)
            if not found:
                return None
            box, score = found[0]
        shape = self.landmarker.shape(image, box)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        chip = self.embedder.chip(image, shape)
        crop, _ = align_face(image, points)
        crop_eyes, _ = align_face(image, points, method="eyes")
        emb = self.embedder.embed_chips(chip[None])[0]
        return Face(np.asarray(box, np.float32), score, points, chip, crop, crop_eyes, emb)


def annotated_faces(root: Path) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """The 43 annotated faces of dlib's examples: (image, box x1y1x2y2, (68, 2) points)."""
    return [r for name in LANDMARK_XMLS for r in read_imglab_xml(Path(root) / "dlib-examples" / name)]


def calibration_set(pipe: FacePipeline, root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embeddings (49, 128), integer labels, names): five Obama photos (one label), the 43 VOC faces
    (landmarks predicted in their annotated boxes) and Tom Cruise, one label each. Biden is not in it."""
    root = Path(root)
    emb, names = [], []
    for n in OBAMA_PHOTOS:
        emb.append(_must(pipe(read_image(root / "faces" / n)), n).embedding)
        names.append("obama")
    images: dict[Path, np.ndarray] = {}
    for k, (path, box, _) in enumerate(annotated_faces(root)):
        img = images.setdefault(path, read_image(path))
        emb.append(pipe(img, box).embedding)
        names.append(f"voc-{path.stem}-{k}")
    emb.append(_must(pipe(read_image(root / "dlib-examples" / "Tom_Cruise_avp_2014_4.jpg")), "Tom Cruise").embedding)
    names.append("tom-cruise")
    _, labels = np.unique(names, return_inverse=True)
    return np.stack(emb), labels, names


def _must(face: Face | None, what: str) -> Face:
    if face is None:
        raise VisrecError(f"no face detected in {what}")
    return face


def run_identification(root: Path, pipe: FacePipeline | None = None) -> dict:
    """Calibrate, enroll and identify as in the module docstring; returns the numbers and the faces."""
    root, pipe = Path(root), pipe or FacePipeline()
    x, labels, names = calibration_set(pipe, root)
    gallery = open_gallery("faiss", model_name=pipe.embedder.name, dim=pipe.embedder.dim, metric=pipe.embedder.metric)
    cal = calibrate(gallery, x, labels, TARGET_FPR)
    enrolled = _must(pipe(read_image(root / "faces" / ENROLL_PHOTO)), ENROLL_PHOTO)
    gallery.enroll("obama", enrolled.embedding, hashes=[ENROLL_PHOTO])
    for row, name in zip(x, names):  # distractors: every non-Obama calibration face
        if name != "obama":
            gallery.enroll(name, row, hashes=[name])
    probes = [(n, "obama") for n in OBAMA_PHOTOS if n != ENROLL_PHOTO] + [("biden.jpg", None)]
    faces = [_must(pipe(read_image(root / "faces" / n)), n) for n, _ in probes]
    results = []
    for (n, expected), face, matches in zip(probes, faces, gallery.search(np.stack([f.embedding for f in faces]), 1)):
        top = matches[0]
        correct = (top.accepted and top.identity == expected) if expected else not top.accepted
        results.append({"probe": n, "expected": expected or "(not enrolled)", "identity": top.identity,
                        "score": top.score, "accepted": top.accepted, "correct": correct})
    return {"threshold": cal["threshold"], "metric": gallery.metric, "calibration": cal, "gallery_identities": len(gallery.list()),
            "enrolled": (ENROLL_PHOTO, enrolled), "results": results, "faces": dict(zip([p for p, _ in probes], faces))}


def _score_name(metric: str) -> str:
    return "cosine" if metric == "cosine" else "negated distance"


def _mark_eyes(crop: np.ndarray) -> np.ndarray:
    """A copy of a 112x112 crop with a green dot on each of the ArcFace template's eye positions."""
    out = crop.copy()
    for x, y in np.round(ARCFACE_112[:2]).astype(int):
        out[y, x] = (0, 255, 0)
    return out


def _png_b64(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    return base64.b64encode(buf.tobytes()).decode() if ok else ""


def _write_html(path: Path, run: dict) -> Path:
    def cell(name: str, face: Face) -> str:
        return (f"<td><img src='data:image/png;base64,{_png_b64(face.chip)}' title='dlib chip 150x150'>"
                f"<img src='data:image/png;base64,{_png_b64(_mark_eyes(face.crop))}' "
                f"title='visrec ArcFace crop 112x112, align lstsq'>"
                f"<img src='data:image/png;base64,{_png_b64(_mark_eyes(face.crop_eyes))}' "
                f"title='visrec ArcFace crop 112x112, align eyes'><br>{html.escape(name)}</td>")

    name, face = run["enrolled"]
    rows = [f"<tr>{cell(name, face)}<td>enrolled as <b>obama</b></td></tr>"]
    for r in run["results"]:
        verdict = "accepted" if r["accepted"] else "rejected"
        ok = "correct" if r["correct"] else "WRONG"
        rows.append(f"<tr>{cell(r['probe'], run['faces'][r['probe']])}<td>expected {html.escape(r['expected'])}; "
                    f"top-1 {html.escape(r['identity'])} at score {r['score']:.4f}: {verdict} ({ok})</td></tr>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>visrec — real faces</title>"
        "<style>body{font-family:sans-serif}td{padding:6px;vertical-align:middle}img{margin-right:4px}</style>"
        f"<h1>Real faces: dlib HOG + 68 points + ResNet 128-d, visrec gallery</h1>"
        f"<p>Threshold {run['threshold']:.4f} ({_score_name(run['metric'])}), calibrated at FPR {TARGET_FPR:g} on "
        f"{run['calibration']['impostor_pairs']} impostor / {run['calibration']['genuine_pairs']} genuine pairs; "
        f"gallery of {run['gallery_identities']} identities. Each face: the dlib chip (what is embedded), then "
        f"visrec's ArcFace 112x112 crops aligned by 5-point least squares and by the eyes; green dots: the "
        f"template's eye positions.</p>"
        f"<table>{''.join(rows)}</table>\n")
    return path


def _missing() -> str | None:
    from visrec.models.dlib_models import models_dir

    try:
        import dlib  # noqa: F401
    except ImportError:
        return "needs pip install 'visrec[dlib]' (dlib-bin face-recognition-models)"
    if models_dir() is None:
        return "needs the dlib model files: pip install face-recognition-models"
    try:
        require_real_fixtures()
    except VisrecError:
        return "needs the real-face fixtures: run `python -m visrec.data.fixtures`"
    return None


def real_faces_section(out: Path, console) -> dict:
    """Run the identification protocol on real photos, print a table, write ``out/real-faces/index.html``.

    Returns ``{"threshold", "target_fpr", "correct", "total", "results", "html"}`` or ``{"skipped": reason}``.
    """
    from rich.table import Table

    reason = _missing()
    if reason:
        console.print(f"real faces: skipped — {reason}", markup=False)
        return {"skipped": reason}
    run = run_identification(fixtures_dir())
    table = Table(title=f"real faces — Obama enrolled from {ENROLL_PHOTO}, {run['gallery_identities']} identities, "
                        f"threshold {run['threshold']:.4f} (FPR {TARGET_FPR:g})")
    score_col = _score_name(run["metric"])
    for col in ("probe", "expected", "top-1", score_col, "decision", ""):
        table.add_column(col, justify="right" if col == score_col else "left")
    for r in run["results"]:
        table.add_row(r["probe"], r["expected"], r["identity"], f"{r['score']:.4f}",
                      "accepted" if r["accepted"] else "rejected", "ok" if r["correct"] else "[red]WRONG[/]")
    console.print(table)
    page = _write_html(Path(out) / "real-faces" / "index.html", run)
    console.print(f"aligned crops and matches: {page}")
    return {"threshold": run["threshold"], "target_fpr": TARGET_FPR,
            "correct": sum(r["correct"] for r in run["results"]), "total": len(run["results"]),
            "results": run["results"], "html": page}
