"""``visrec models info PATH_OR_NAME [--arch NAME]``: a model's contract as a table."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Inspect model files and adapters (their contracts).", add_completion=False)


@app.command()
def info(spec: str = typer.Argument(..., help="run dir, model.pt, last.rank0.pt, .onnx, backbone.pth (with "
                                               "--arch) or an adapter name (dlib-resnet, dlib-68, dlib-5)"),
         arch: Optional[str] = typer.Option(None, "--arch", help="architecture of a bare state dict "
                                                                 "(arcface_torch backbone.pth), e.g. iresnet50")):
    """Print the model's contract: task, input, normalisation, alignment, dim, metric, threshold, crop."""
    from visrec.models.loading import model_contract

    contract = model_contract(spec, arch=arch)
    table = Table(title=f"model contract: {spec}")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in contract.rows():
        table.add_row(key, value)
    Console(width=160).print(table)
