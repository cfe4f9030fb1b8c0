"""CPU latency per stage of the real-face pipeline on the fixture photos (median of repeats, milliseconds).

Stages: dlib HOG detection, dlib 68 landmarks, alignment (dlib's 150x150 chip for the embedder and
visrec's 112x112 ArcFace crop), dlib ResNet 128-d embedding of one chip (its weights in PyTorch, the default, and in
dlib itself, for comparison), and a search of a faiss gallery
(the 45 real identities of ``visrec.demo_real`` plus ``--distractors`` random templates in 100 identities,
max fusion, top-5).
Single image, single face, one thread unless OMP_NUM_THREADS says otherwise.

    python -m visrec.data.fixtures            # once
    OMP_NUM_THREADS=1 python benchmarks/real_faces_latency.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg", "biden.jpg")


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dlib
    import faiss

    return (f"{cpu}; {os.cpu_count()} logical CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}; dlib {dlib.__version__}; "
            f"numpy {np.__version__}; faiss {faiss.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--upsample", type=int, default=0, help="HOG upsampling (0: faces above ~80 px)")
    ap.add_argument("--distractors", type=int, default=10_000)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from visrec.faces.align import align_face
    from visrec.data.fixtures import require_real_fixtures
    from visrec.data.images import read_image
    from visrec.demo_real import FacePipeline, calibration_set
    from visrec.index.gallery import open_gallery

    root = require_real_fixtures()
    pipe = FacePipeline(upsample=args.upsample)
    x, _, names = calibration_set(pipe, root)
    gallery = open_gallery("faiss", model_name=pipe.embedder.name, dim=pipe.embedder.dim, metric=pipe.embedder.metric)
    for row, name in zip(x, names):
        gallery.enroll(name, row, hashes=[f"{name}-{len(gallery.list())}"])
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((args.distractors, pipe.embedder.dim)).astype(np.float32)
    noise *= np.linalg.norm(x, axis=1).mean() / np.linalg.norm(noise, axis=1, keepdims=True)  # descriptor norms
    for i, part in enumerate(np.array_split(noise, 100)):  # 100 random identities share the templates
        gallery.enroll(f"random-{i}", part)

    from visrec.models.dlib_models import DlibResnetEmbedder

    embed = f"embed (1 chip; {pipe.embedder.runtime})"
    stages = ("detect (HOG)", "68 landmarks", "align: dlib chip", "align: visrec 112", embed, "gallery search")
    rows = {s: [] for s in stages}
    in_dlib = DlibResnetEmbedder(runtime="dlib")  # the same weights in dlib itself: beside the total, not in it
    rows["embed (1 chip; dlib), not in the total"] = []
    sizes = []
    for name in PHOTOS:
        img = read_image(root / "faces" / name)
        sizes.append(f"{name} {img.shape[1]}x{img.shape[0]}")
        box = pipe.detector(img)[0][0]
        shape = pipe.landmarker.shape(img, box)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        chip = pipe.embedder.chip(img, shape)
        emb = pipe.embedder.embed_chips(chip[None])
        rows["detect (HOG)"].append(median_ms(lambda: pipe.detector(img), args.repeats))
        rows["68 landmarks"].append(median_ms(lambda: pipe.landmarker(img, box), args.repeats))
        rows["align: dlib chip"].append(median_ms(lambda: pipe.embedder.chip(img, shape), args.repeats))
        rows["align: visrec 112"].append(median_ms(lambda: align_face(img, points), args.repeats))
        rows[embed].append(median_ms(lambda: pipe.embedder.embed_chips(chip[None]), args.repeats))
        rows["embed (1 chip; dlib), not in the total"].append(
            median_ms(lambda: in_dlib.embed_chips(chip[None]), args.repeats))
        gallery.search(emb, 5)  # build the index outside the timing
        rows["gallery search"].append(median_ms(lambda: gallery.search(emb, 5), args.repeats))

    console = Console(width=160)
    console.print(machine())
    flat = "IndexFlatIP" if gallery.metric == "cosine" else "IndexFlatL2"
    console.print(f"gallery: {gallery.count():,} templates ({len(names)} real faces of {len(set(names))} identities "
                  f"+ {args.distractors:,} random in 100 identities), faiss {flat} ({gallery.metric}), max fusion, "
                  f"top-5; "
                  f"HOG upsample {args.upsample}; median of {args.repeats} repeats after one warm-up")
    table = Table(title="real-face pipeline latency, ms (CPU)")
    table.add_column("stage")
    for name in PHOTOS:
        table.add_column(name.removesuffix(".jpg").replace("obama_partial_face", "partial"), justify="right")
    table.add_column("median", justify="right")
    for stage in rows:
        table.add_row(stage, *(f"{v:.2f}" for v in rows[stage]), f"{np.median(rows[stage]):.2f}")
    total = [sum(rows[s][i] for s in stages) for i in range(len(PHOTOS))]
    table.add_row("total", *(f"{v:.1f}" for v in total), f"{np.median(total):.1f}")
    console.print(table)
    console.print("image sizes: " + ", ".join(sizes))


if __name__ == "__main__":
    main()
