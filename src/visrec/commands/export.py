"""``visrec export MODEL --out model.onnx``: checkpoint -> ONNX (dynamic batch), parity check by default."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()
app = typer.Typer(help="Export a checkpoint to ONNX and check parity with PyTorch.", add_completion=False)


@app.command()
def export(model: Path = typer.Argument(..., help="visrec checkpoint (model.pt or run dir)"),
           out: Path = typer.Option(..., "--out", help="the .onnx file to write"),
           parity: bool = typer.Option(True, "--parity/--no-parity", help="compare ONNX and PyTorch embeddings"),
           keep_batchnorm: bool = typer.Option(False, "--keep-batchnorm",
                                               help="keep BN nodes unfolded (what the LFR FLOP count needs)"),
           latency: bool = typer.Option(False, "--latency", help="also time CPU latency (p50/p95)"),
           force: bool = typer.Option(False, "--force", help="replace an existing --out that is no ONNX file "
                                      "visrec exported (the checkpoint itself is never replaced)")):
    """Export a checkpoint to ONNX (dynamic batch) and check parity with PyTorch (exit 1 if it fails)."""
    from visrec import export as ex
    from visrec.errors import VisrecError

    try:
        path, report = ex.export_checkpoint(model, out, parity=parity, keep_batchnorm=keep_batchnorm,
                                                 force=force)
    except VisrecError as exc:
        if not str(exc).startswith("parity check failed"):
            raise
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1)
    t = Table(title=f"exported {path} ({path.stat().st_size / 1e6:.3f} MB, BatchNorm "
                    f"{'kept' if keep_batchnorm else 'folded'})")
    t.add_column("check")
    t.add_column("value")
    if report:
        t.add_row("parity max |diff|", f"{report.max_abs_diff:.2e} (tolerance {report.tolerance:g})")
        t.add_row("parity min cosine", f"{report.min_cosine:.6f}")
    if latency:
        for bs, (p50, p95) in ex.latency(path).items():
            t.add_row(f"CPU latency, batch {bs}", f"p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    console.print(t)
