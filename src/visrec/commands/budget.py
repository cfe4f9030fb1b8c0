"""``visrec budget MODEL --protocol NAME`` and ``visrec budget fit FAMILY --protocol NAME``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _model_from_spec(spec: str, overrides: list[str]):
    """A registry name (+ --set kwargs), a run config YAML (its model section), a checkpoint, or an .onnx path."""
    from visrec.config import load_config, parse_override
    from visrec.models import BACKBONES, build_backbone

    path = Path(spec)
    if path.suffix == ".onnx" or (path.exists() and path.suffix not in (".yaml", ".yml")):
        return spec
    if path.suffix in (".yaml", ".yml"):
        m = load_config(path).model
        return build_backbone(m.name, **m.kwargs)
    kwargs = dict(parse_override(o) for o in overrides)
    BACKBONES.get(spec)  # a clear error for an unknown name
    return build_backbone(spec, **kwargs)


def _report_table(report) -> Table:
    t = Table(title=f"{report.source} vs {report.protocol.name}")
    for col in ("limit", "allowed", "measured", "result"):
        t.add_column(col)
    for l in report.limits:
        t.add_row(l.name, l.limit, l.measured, "[green]pass[/]" if l.passed else "[red]FAIL[/]")
    return t


def _figures_table(report) -> Table:
    t = Table(title="figures (MACs = multiply-accumulates; FLOPs = floating-point operations = 2 x MACs)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("FLOPs, LFR rule (conv+FC, bias rule)", f"{report.lfr_flops:,}")
    t.add_row("MACs, conv+FC", f"{report.macs:,}")
    if report.full_flops is not None:
        t.add_row("FLOPs, every op (torch FlopCounterMode)", f"{report.full_flops:,}")
    t.add_row("parameters", f"{report.params:,}")
    t.add_row("fp32 ONNX size", f"{report.size_bytes:,} B = {report.size_mb:.3f} MB = {report.size_mib:.3f} MiB")
    t.add_row("weight dtypes", ", ".join(report.weight_dtypes))
    t.add_row("embedding dim", str(report.embedding_dim))
    t.add_row("BatchNorm folded into conv", "yes (adds bias FLOPs)" if report.batchnorm_folded else "no")
    return t


def budget(target: str = typer.Argument(..., help="MODEL (registry name, run config .yaml, checkpoint, .onnx) or 'fit'"),
           family: Optional[str] = typer.Argument(None, help="with 'fit': effnet_face | mobilefacenet | iresnet50"),
           protocol: str = typer.Option(..., "--protocol", "-p", help="protocol name or YAML file"),
           overrides: list[str] = typer.Option([], "--set", help="model kwarg for a registry name: width_mult=1.2"),
           layers: bool = typer.Option(False, "--layers", help="print the per-layer breakdown")):
    """Check a model against a protocol's budget (exit 0 only if every limit passes), or fit a family to it."""
    from visrec.budget import check, fit_to_budget

    if target == "fit":
        if not family:
            raise typer.BadParameter("give the family to fit: visrec budget fit effnet_face --protocol ...")
        result = fit_to_budget(family, protocol)
        t = Table(title=f"largest {family} inside {result.protocol.name} ({result.tried} candidates counted)")
        for col in ("model", "kwargs", "FLOPs (LFR)", "size MB", "passes"):
            t.add_column(col)
        t.add_row("fit", str(result.best_kwargs), f"{result.best.lfr_flops / 1e9:.4f} G",
                  f"{result.best.size_mb:.3f}", "yes" if result.best.passed else "no")
        if result.next_larger:
            t.add_row("next larger", str(result.next_larger_kwargs), f"{result.next_larger.lfr_flops / 1e9:.4f} G",
                      f"{result.next_larger.size_mb:.3f}", "yes" if result.next_larger.passed else "no")
        console.print(t)
        return
    report = check(_model_from_spec(target, overrides), protocol)
    console.print(_report_table(report))
    console.print(_figures_table(report))
    if layers:
        t = Table(title="per layer")
        for col in ("layer", "kind", "output", "MACs", "FLOPs (LFR)"):
            t.add_column(col)
        for l in report.layers:
            t.add_row(l.name, l.kind, "x".join(map(str, l.out_shape)), f"{l.macs:,}", f"{l.lfr_flops:,}")
        console.print(t)
    raise typer.Exit(0 if report.passed else 1)


def export(checkpoint: Path = typer.Argument(..., help="visrec checkpoint (model.pt or run dir)"),
           onnx: Path = typer.Option(..., "--onnx", help="output .onnx"),
           parity: bool = typer.Option(True, "--parity/--no-parity"),
           keep_batchnorm: bool = typer.Option(False, "--keep-batchnorm", help="keep BN nodes (for FLOP counting)"),
           latency: bool = typer.Option(False, "--latency", help="also time CPU latency (p50/p95)")):
    """Export a checkpoint to ONNX (dynamic batch) and check parity with PyTorch."""
    from visrec import export as ex

    path, report = ex.export_checkpoint(checkpoint, onnx, parity=parity, keep_batchnorm=keep_batchnorm)
    t = Table(title=f"exported {path}")
    t.add_column("check")
    t.add_column("value")
    if report:
        t.add_row("parity max |diff|", f"{report.max_abs_diff:.2e} (tolerance {report.tolerance:g})")
        t.add_row("parity min cosine", f"{report.min_cosine:.6f}")
    if latency:
        for bs, (p50, p95) in ex.latency(path).items():
            t.add_row(f"CPU latency, batch {bs}", f"p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    console.print(t)
