"""``visrec data ...``: render synthetic data sets in the real formats.

``visrec data synth faces OUT --identities 200 --per-identity 20 --format recordio|folder --difficulty 0.3
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

app = typer.Typer(help="data sets: synthetic rendering in the real formats", no_args_is_help=True)
synth_app = typer.Typer(help="render synthetic labelled data in the real formats", no_args_is_help=True)
app.add_typer(synth_app, name="synth")

HELD_OUT_FIRST_IDENTITY = 100_000


class FaceFormat(str, Enum):
    recordio = "recordio"
    folder = "folder"


@synth_app.command("faces")
def synth_faces(out: Path = typer.Argument(..., help="output directory"),
                identities: int = typer.Option(200, min=2, help="training identities"),
                per_identity: int = typer.Option(20, min=1, help="images per training identity"),
                format: FaceFormat = typer.Option(FaceFormat.recordio, "--format", case_sensitive=False,
                                                  help="InsightFace RecordIO or one folder per identity"),
                difficulty: float = typer.Option(0.3, min=0.0, max=1.0,
                                                 help="0 = clean frontal, 1 = strong pose/light/blur/occlusion"),
                seed: int = typer.Option(0, help="identity and image seed"),
                pairs: int = typer.Option(0, min=0, help="also write OUT/val.bin with this many held-out pairs")):
    """Face identities -> OUT/train (RecordIO or image folder, + 106-point landmarks) [+ OUT/val.bin]."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from visrec.data.synth import write_face_dataset, write_verification_pairs

    out = Path(out)
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
def synth_products(out: Path = typer.Argument(..., help="output root (Perfect-500K layout)"),
                   families: int = typer.Option(10, min=1, help="product families (shared shape and brand)"),
                   products_per_family: int = typer.Option(4, min=1, help="near-duplicate products per family"),
                   variants: int = typer.Option(3, min=1, help="catalogue shots per product"),
                   queries_per_product: int = typer.Option(2, min=0, help="in-the-wild queries per product"),
                   size: int = typer.Option(224, min=32, help="image side in pixels"),
                   difficulty: float = typer.Option(0.5, min=0.0, max=1.0, help="query nuisance strength"),
                   seed: int = typer.Option(0)):
    """Products -> OUT/catalogue/<id>.jpg, OUT/query/<id>.jpg, OUT/val.csv, OUT/catalogue_products.csv."""
    from rich.progress import Progress

    from visrec.data.synth_products import write_product_dataset

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
def synth_videos(out: Path = typer.Argument(..., help="output root"),
                 identities: int = typer.Option(50, min=2), videos_per_identity: int = typer.Option(4, min=1),
                 frames: int = typer.Option(8, min=1, help="frames per video"),
                 degraded_share: float = typer.Option(0.3, min=0.0, max=1.0, help="share of degraded frames"),
                 video_format: str = typer.Option("folder", "--format", help="folder (PNG frames) | avi (MJPG)"),
                 first_identity: int = typer.Option(0, help="identity of label 0 (use a far range for held-out sets)"),
                 seed: int = typer.Option(0)):
    """Videos -> OUT/videos/, OUT/videos.csv (video_id,path,label), OUT/video_filelist.txt (LFR order)."""
    from rich.progress import Progress

    from visrec.data.video import write_video_dataset

    with Progress(transient=True) as progress:
        task = progress.add_task("rendering videos", total=identities * videos_per_identity)
        lst = write_video_dataset(out, identities, videos_per_identity, frames, seed=seed, degraded_share=degraded_share,
                                  first_identity=first_identity, video_format=video_format,
                                  progress=lambda: progress.advance(task))
    table = Table(title="synthetic videos written")
    table.add_column("what")
    table.add_column("where")
    table.add_row(f"{identities * videos_per_identity} videos x {frames} frames, {degraded_share:.0%} degraded", str(lst))
    table.add_row("LFR video_filelist.txt", str(Path(out) / "video_filelist.txt"))
    Console().print(table)
