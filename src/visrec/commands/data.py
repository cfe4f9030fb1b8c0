"""``visrec data ...``: render synthetic data sets in the real formats; prepare a user's raw photos and videos.

``visrec data prepare faces|landmarks|products SRC --out OUT`` and ``visrec data prepare videos VIDEO... --out OUT``
call ``visrec.faces.prepare`` / ``visrec.data.prepare`` / ``visrec.faces.tracking`` (resumable: re-run the same command to continue).

``visrec data synth faces --out OUT --identities 200 --per-identity 20 --format recordio|folder --difficulty 0.3
--seed 0 [--pairs N]`` writes ``OUT/train`` (InsightFace RecordIO or an image folder, with the 106-point
landmark sidecar described in ``visrec.data.synth``) and, with ``--pairs``, ``OUT/val.bin``: a verification
set over held-out identities (100000 and up, never in ``OUT/train``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="data sets: synthetic rendering in the real formats, preparing raw photos and videos",
                  no_args_is_help=True)
synth_app = typer.Typer(help="render synthetic labelled data in the real formats", no_args_is_help=True)
app.add_typer(synth_app, name="synth")

HELD_OUT_FIRST_IDENTITY = 100_000


class FaceFormat(str, Enum):
    recordio = "recordio"
    folder = "folder"


class VideoFormat(str, Enum):
    folder = "folder"
    avi = "avi"


def _out_folder(out: Path, reads: dict | None = None) -> Path:
    """``--out`` checked before any work: a folder, or a path where one can be made (``check_output``), and not
    inside what the command reads (``reads``: a prepared set inside its photos would be listed as photos by the
    next run, which resumes)."""
    from visrec.data.text import check_output

    return check_output(out, kind="dir", reads=reads)


@synth_app.command("faces")
def synth_faces(out: Path = typer.Option(..., "--out", help="output directory"),
                identities: int = typer.Option(200, min=2, help="training identities"),
                per_identity: int = typer.Option(20, min=1, help="images per training identity"),
                format: FaceFormat = typer.Option(FaceFormat.recordio, "--format", case_sensitive=False,
                                                  help="InsightFace RecordIO or one folder per identity"),
                difficulty: float = typer.Option(0.3, min=0.0, max=1.0,
                                                 help="0 = clean frontal, 1 = strong pose/light/blur/occlusion"),
                seed: int = typer.Option(0, min=0, help="identity and image seed"),
                pairs: int = typer.Option(0, min=0, help="also write OUT/val.bin with this many held-out pairs")):
    """Face identities -> OUT/train (RecordIO or image folder, + 106-point landmarks) [+ OUT/val.bin]."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from visrec.data.synth import write_face_dataset, write_verification_pairs
    from visrec.evaluate.bin_protocol import NFOLDS, fold_problem
    from visrec.errors import VisrecError

    if pairs and fold_problem(pairs, NFOLDS):  # before any rendering: a val.bin no evaluation could use
        raise VisrecError(f"--pairs {pairs}: {fold_problem(pairs, NFOLDS)}; give --pairs {NFOLDS} or more "
                          f"(or 0 for no val.bin)")
    out = _out_folder(out)
    fmt = FaceFormat(format).value
    held_out = max(2, identities // 2)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("rendering faces", total=identities * per_identity)
        train_dir = write_face_dataset(out / "train", identities, per_identity, format=fmt, seed=seed,
                                       difficulty=difficulty, progress=lambda: progress.advance(task))
        if pairs:
            task = progress.add_task("rendering pairs", total=pairs)
            val = write_verification_pairs(out / "val.bin", held_out, pairs, seed=seed + 1,
                                           difficulty=difficulty, first_identity=HELD_OUT_FIRST_IDENTITY,
                                           progress=lambda: progress.advance(task))
    sidecar = train_dir / "landmarks106.npy" if fmt == "recordio" else out / "train-landmarks"
    table = Table(title="synthetic faces written")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("where")
    table.add_row(f"training images ({fmt}), identities 0..{identities - 1}, difficulty {difficulty:g}",
                  f"{identities * per_identity}", str(train_dir))
    table.add_row("106-point landmarks (JD order)", f"{identities * per_identity}", str(sidecar))
    if pairs:
        table.add_row(f"verification pairs ({(pairs + 1) // 2} genuine), held-out identities "
                      f"{HELD_OUT_FIRST_IDENTITY}..{HELD_OUT_FIRST_IDENTITY + held_out - 1}", f"{pairs}", str(val))
    Console().print(table)


@synth_app.command("products")
def synth_products(out: Path = typer.Option(..., "--out", help="output root (Perfect-500K layout)"),
                   families: int = typer.Option(10, min=1, help="product families (shared shape and brand)"),
                   products_per_family: int = typer.Option(4, min=1, help="near-duplicate products per family"),
                   variants: int = typer.Option(3, min=1, help="catalogue shots per product"),
                   queries_per_product: int = typer.Option(2, min=0, help="in-the-wild queries per product"),
                   size: int = typer.Option(224, min=32, help="image side in pixels"),
                   difficulty: float = typer.Option(0.5, min=0.0, max=1.0, help="query nuisance strength"),
                   seed: int = typer.Option(0, help="product and image seed")):
    """Products -> OUT/catalogue/<id>.jpg, OUT/query/<id>.jpg, OUT/val.csv, OUT/catalogue_products.csv."""
    from rich.progress import Progress

    from visrec.data.synth_products import write_product_dataset

    _out_folder(out)
    n = families * products_per_family * (variants + queries_per_product)
    with Progress(transient=True) as progress:
        task = progress.add_task("rendering products", total=n)
        summary = write_product_dataset(out, families, products_per_family, variants, queries_per_product, seed=seed,
                                        size=size, difficulty=difficulty,
                                        progress=lambda done, total: progress.update(task, completed=done))
    table = Table(title="synthetic products written (Perfect-500K layout)")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("where")
    table.add_row("catalogue images", str(summary["catalogue_images"]), str(summary["catalogue_dir"]))
    table.add_row("queries (ground truth in val.csv)", str(summary["queries"]), str(summary["query_dir"]))
    table.add_row("product labels (catalogue_id,product_id)", str(summary["catalogue_images"]),
                  str(summary["product_labels"]))
    Console().print(table)


@synth_app.command("videos")
def synth_videos(out: Path = typer.Option(..., "--out", help="output root"),
                 identities: int = typer.Option(50, min=2, help="people"),
                 videos_per_identity: int = typer.Option(4, min=1, help="videos per person"),
                 frames: int = typer.Option(8, min=1, help="frames per video"),
                 degraded_share: float = typer.Option(0.3, min=0.0, max=1.0, help="share of degraded frames"),
                 video_format: VideoFormat = typer.Option(VideoFormat.folder, "--format", case_sensitive=False,
                                                          help="folder (PNG frames) | avi (MJPG)"),
                 first_identity: int = typer.Option(0, min=0, help="identity of label 0 (use a far range for "
                                                                   "held-out sets)"),
                 seed: int = typer.Option(0, min=0, help="video seed")):
    """Videos -> OUT/videos/, OUT/videos.csv (video_id,path,label), OUT/video_filelist.txt (LFR order)."""
    from rich.progress import Progress

    from visrec.data.video import write_video_dataset

    _out_folder(out)
    with Progress(transient=True) as progress:
        task = progress.add_task("rendering videos", total=identities * videos_per_identity)
        lst = write_video_dataset(out, identities, videos_per_identity, frames, seed=seed, degraded_share=degraded_share,
                                  first_identity=first_identity, video_format=VideoFormat(video_format).value,
                                  progress=lambda: progress.advance(task))
    table = Table(title="synthetic videos written")
    table.add_column("what")
    table.add_column("where")
    table.add_row(f"{identities * videos_per_identity} videos x {frames} frames, {degraded_share:.0%} degraded", str(lst))
    table.add_row("LFR video_filelist.txt", str(Path(out) / "video_filelist.txt"))
    Console().print(table)


@synth_app.command("landmarks")
def synth_landmarks(out: Path = typer.Option(..., "--out", help="output folder (JD-landmark layout)"),
                    faces: int = typer.Option(400, min=1, help="faces to render (one per identity)"),
                    difficulty: float = typer.Option(0.3, min=0.0, max=1.0, help="0 = clean frontal, 1 = strong "
                                                                                     "pose/light/blur/occlusion"),
                    seed: int = typer.Option(0, help="face seed (use another seed for a validation set)")):
    """106-point faces -> OUT/picture/, OUT/landmark/ (JD .txt), OUT/rect/, OUT/pose/ (the JD-landmark layout)."""
    from visrec.data.synth import write_synthetic_jd

    _out_folder(out)
    root = write_synthetic_jd(out, faces, seed=seed, difficulty=difficulty)
    table = Table(title="synthetic landmarks written (JD-landmark layout)")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("where")
    table.add_row("faces with 106 points, face box and head pose", str(faces), str(root))
    Console().print(table)


prepare_app = typer.Typer(help="raw photos / videos -> the aligned, labelled data visrec reads (resumable)",
                          no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


class Policy(str, Enum):
    largest = "largest"
    central = "central"
    skip = "skip"


class AlignMethod(str, Enum):
    lstsq = "lstsq"
    eyes = "eyes"


def _report_table(report, title: str) -> None:
    t = Table(title=title)
    t.add_column("outcome")
    t.add_column("count", justify="right")
    t.add_column("first few")
    t.add_row("inputs found", f"{report.total:,}", "")
    t.add_row("written", f"{report.written:,}", str(report.output or ""))
    t.add_row("done by an earlier run", f"{report.resumed:,}", "")
    for name in ("no_face", "multiple_faces", "unreadable", "bad_annotation", "skipped", "box_crops"):
        rows = getattr(report, name)
        if rows:
            t.add_row(name.replace("_", " "), f"{len(rows):,}", "; ".join(_problem(r) for r in rows[:3]))
    Console().print(t)


def _problem(row) -> str:
    if not isinstance(row, dict):
        return str(row)
    why = row.get("action") or row.get("error") or row.get("reason")
    return f"{row['path']} ({why})" if why else str(row["path"])


def _with_bar(label: str, run):
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(label, total=None)
        return run(lambda done, total: bar.update(task, completed=done, total=total))


@prepare_app.command("faces")
def prepare_faces_cmd(src: Path = typer.Argument(..., help="src/<identity>/<photo> folders or a path,label CSV"),
                      out: Path = typer.Option(..., "--out", help="output directory (re-run to continue)"),
                      detector: str = typer.Option("haar", help="haar | dlib-hog | dlib-cnn | an ONNX SCRFD/YuNet "
                                                                "file (scrfd:PATH)"),
                      landmarks: Path = typer.Option(None, help="landmark checkpoint or dlib-68 for 5 points when the "
                                                               "detector gives none (default then: dlib-68 when "
                                                               "visrec[dlib] is installed)"),
                      format: FaceFormat = typer.Option(FaceFormat.folder, "--format", case_sensitive=False,
                                                        help="image folder (one per identity) or InsightFace RecordIO"),
                      policy: Policy = typer.Option(Policy.largest, help="several faces in a photo: which one"),
                      box_margin: float = typer.Option(None, help="allow unaligned box crops (margin per side) "
                                                                  "when no 5 points exist"),
                      align: AlignMethod = typer.Option(AlignMethod.lstsq, case_sensitive=False,
                                                        help="lstsq: 5-point least squares (InsightFace's); "
                                                             "eyes: eyes exactly on the template"),
                      detect_size: int = typer.Option(640, min=0, help="find faces on a copy scaled to this longest "
                                                                       "side (pixels; 0: full size), align on the "
                                                                       "full photo"),
                      workers: int = typer.Option(1, min=1, help="processes"),
                      retry_problems: bool = typer.Option(False, help="retry photos an earlier run could not use")):
    """Photos -> detect -> one face -> ArcFace 112x112 alignment -> image folder or RecordIO + report."""
    from visrec.faces.prepare import prepare_faces

    _out_folder(out, reads={"SRC": src})
    report = _with_bar("photos", lambda p: prepare_faces(
        src, out, detector=detector, landmarker=landmarks, format=format.value, policy=policy.value,
        box_margin=box_margin, align=align.value, detect_size=detect_size or None, workers=workers,
        retry_problems=retry_problems, progress=p))
    _report_table(report, f"faces prepared into {out} (report: {out / 'prepare_report.json'})")


@prepare_app.command("landmarks")
def prepare_landmarks_cmd(src: Path = typer.Argument(..., help="photos with .pts / JD .txt sidecars"),
                          out: Path = typer.Option(..., "--out", help="JD-landmark layout output"),
                          annotations: Path = typer.Option(None, help="a WFLW annotation list instead of sidecars"),
                          detector: str = typer.Option(None, help="find the face box with this detector"),
                          size: int = typer.Option(256, min=32, help="crop side in pixels"),
                          workers: int = typer.Option(1, min=1, help="processes")):
    """Annotated photos -> square face-box crops in the JD-landmark layout (picture/, landmark/, rect/)."""
    from visrec.faces.prepare import prepare_landmarks

    _out_folder(out, reads={"SRC": src, "--annotations": annotations})
    report = _with_bar("photos", lambda p: prepare_landmarks(src, out, annotations=annotations, detector=detector,
                                                              size=size, workers=workers, progress=p))
    _report_table(report, f"landmark crops in {out}")


@prepare_app.command("products")
def prepare_products_cmd(src: Path = typer.Argument(..., help="product photos (sub-folder per product optional)"),
                         out: Path = typer.Option(..., "--out", help="Perfect-500K layout output"),
                         size: int = typer.Option(512, min=32, help="padded square side in pixels"),
                         workers: int = typer.Option(1, min=1, help="processes")):
    """Product photos -> white square padding -> OUT/catalogue/<id>.jpg."""
    from visrec.data.prepare import prepare_products

    _out_folder(out, reads={"SRC": src})
    report = _with_bar("photos", lambda p: prepare_products(src, out, size=size, workers=workers, progress=p))
    _report_table(report, f"catalogue in {out / 'catalogue'}")


@prepare_app.command("videos")
def prepare_videos_cmd(videos: list[Path] = typer.Argument(..., help="video files or frame folders"),
                       out: Path = typer.Option(..., "--out", help="video-set root (videos.csv, videos/)"),
                       detector: str = typer.Option("haar", help="haar | an ONNX SCRFD/YuNet file"),
                       model: Path = typer.Option(None, help="face embedder (checkpoint or .onnx) for "
                                                            "embedding association across crossings"),
                       min_len: int = typer.Option(5, min=1, help="shortest track kept (frames)"),
                       align: AlignMethod = typer.Option(AlignMethod.lstsq, case_sensitive=False,
                                                         help="with 5-point detections: lstsq or eyes"),
                       detect_size: int = typer.Option(640, min=0, help="find faces on a copy of each frame scaled "
                                                                        "to this longest side (0: full size)")):
    """Videos -> per-frame detection -> IoU + embedding tracking -> one track per person in the video-set format."""
    from visrec.faces.detectors import ScaledDetector, load_detector
    from visrec.faces.tracking import check_distinct_video_ids, video_to_tracks

    _out_folder(out, reads={f"VIDEOS item {i}": v for i, v in enumerate(videos, 1)})
    check_distinct_video_ids(videos)
    det = ScaledDetector(load_detector(detector), detect_size or None)
    embedder = None
    if model is not None:
        from visrec.faces.pipeline import Embedder

        embedder = Embedder(model)
    t = Table(title=f"tracks added to {out / 'videos.csv'}")
    t.add_column("video")
    t.add_column("tracks", justify="right")
    for video in videos:
        written = video_to_tracks(video, out, det, embedder, min_len=min_len, align=align.value, resume=True)
        t.add_row(str(video), str(len(written)))
    Console().print(t)
