"""``visrec data ...``: render synthetic data sets in the real formats."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="data sets: synthetic rendering, format conversion", no_args_is_help=True)
synth_app = typer.Typer(help="render synthetic labelled data in the real formats", no_args_is_help=True)
app.add_typer(synth_app, name="synth")


@synth_app.command("faces")
def synth_faces(out: Path = typer.Argument(..., help="output directory"),
                identities: int = typer.Option(200, min=2), per_identity: int = typer.Option(20, min=1),
                format: str = typer.Option("recordio", help="recordio | folder"),
                difficulty: float = typer.Option(0.3, min=0.0, max=1.0), seed: int = 0,
                pairs: int = typer.Option(0, help="also write val.bin with this many held-out pairs")):
    """Face identities -> OUT/train (RecordIO or image folder) [+ OUT/val.bin of held-out identities]."""
    from rich.progress import Progress

    from visrec.data.synth import write_face_dataset, write_verification_pairs

    out = Path(out)
    with Progress(transient=True) as progress:
        task = progress.add_task("rendering", total=identities * per_identity)
        train_dir = write_face_dataset(out / "train", identities, per_identity, format=format, seed=seed,
                                       difficulty=difficulty, progress=lambda: progress.advance(task))
    table = Table(title="synthetic faces written")
    table.add_column("what")
    table.add_column("where")
    table.add_row(f"{identities} identities x {per_identity} images ({format})", str(train_dir))
    if pairs:
        val = write_verification_pairs(out / "val.bin", max(2, identities // 2), pairs, seed=seed + 1,
                                       difficulty=difficulty)
        table.add_row(f"{pairs} verification pairs, held-out identities", str(val))
    Console().print(table)
