"""``visrec models info PATH_OR_NAME [--arch NAME]``: a model's contract as a table; ``visrec models calibrate
MODEL --data D``: a verification threshold calibrated on labelled faces, stored in the model's contract."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from visrec.commands.eval import rate_option

app = typer.Typer(help="Inspect model files and adapters (their contracts).", add_completion=False)


@app.command()
def info(model: str = typer.Argument(..., help="run dir, model.pt, last.rank0.pt, .onnx, backbone.pth (with "
                                               "--arch) or an adapter name (dlib-resnet, dlib-68, dlib-5)"),
         arch: Optional[str] = typer.Option(None, "--arch", help="architecture of a bare state dict "
                                                                 "(arcface_torch backbone.pth), e.g. iresnet50")):
    """Print the model's contract: task, input, normalisation, alignment, dim, metric, threshold, crop."""
    from visrec.models.loading import model_contract

    contract = model_contract(model, arch=arch)
    table = Table(title=f"model contract: {model}")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in contract.rows():
        table.add_row(key, value)
    Console(width=160).print(table)


@app.command()
def calibrate(model: str = typer.Argument(..., help="face model: run dir, model.pt or .onnx"),
              data: str = typer.Option(..., "--data", help="labelled faces: aligned crops (folder per identity or "
                                                           "RecordIO), or photos with --photos"),
              target_fpr: float = typer.Option(1e-4, "--target-fpr", help="false accepts allowed among impostor pairs",
                                               callback=rate_option()),
              photos: bool = typer.Option(False, "--photos", help="--data holds raw photos: detect, align, embed"),
              detector: str = typer.Option("haar", "--detector", help="with --photos: haar | dlib-hog | an ONNX file"),
              landmarks: Optional[str] = typer.Option(None, "--landmarks", help="with --photos: dlib-68 or a "
                                                                               "landmark model"),
              write: bool = typer.Option(True, "--write/--no-write", help="store the threshold in the model file")):
    """Calibrate a face model's verification threshold on labelled faces and store it in its contract."""
    from rich.progress import Progress

    from visrec.faces.calibrate import calibrate_model

    with Progress(transient=True) as bar:
        task = bar.add_task("embedding", total=None)
        res = calibrate_model(model, data, target_fpr, photos=photos, detector=detector, landmarks=landmarks,
                              write=write, progress=lambda n: bar.advance(task, n))
    t = res["threshold"]
    table = Table(title=f"threshold of {model}")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    rows = [("threshold", t.describe()), ("achieved FPR", f"{res['fpr']:.3e}"), ("TPR", f"{res['tpr']:.4f}"),
            ("genuine / impostor pairs", f"{res['genuine_pairs']:,} / {res['impostor_pairs']:,}"),
            ("photos without a face", str(len(res["no_face"]))),
            ("written into", res["written"] or "nothing (--no-write)")]
    for key, value in rows:
        table.add_row(key, value)
    Console(width=160).print(table)
