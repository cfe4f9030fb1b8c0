"""``visrec budget check MODEL --protocol NAME``: a model against a protocol's compute budget;
``visrec budget fit FAMILY --protocol NAME``: the largest member of a scalable family inside it.
Exit code 0 only if every limit passes.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


console = Console()
app = typer.Typer(help="Compute budgets (LFR FLOP rule, fp32 ONNX size): check a model, or fit a family to one.",
                  no_args_is_help=True, add_completion=False)

MODEL_HELP = ("registry name (+ --set key=value), run config .yaml, architecture spec .yaml (a search's), visrec "
              "checkpoint, or .onnx file")
PROTOCOL_HELP = "protocol name (deepglint-light, ...) or a protocol YAML file"


def _model_from_spec(spec: str, overrides: list[str]):
    """``(model or path, contract)`` of a registry name (+ --set kwargs), a run config YAML (its model
    section), a checkpoint, or an .onnx path. A registry/YAML model gets the contract its checkpoint would
    carry, so its size is that of the file ``visrec export`` writes for a trained checkpoint of it; a file
    path brings its own contract (None here)."""
    from visrec.budget import check_buildable, registry_contract
    from visrec.config import load_config, model_option_problem, parse_override
    from visrec.errors import ConfigError
    from visrec.models import BACKBONES, build_backbone

    path = Path(spec)
    is_file = path.suffix in (".onnx", ".yaml", ".yml") or path.exists()
    if overrides and is_file:  # a file brings its own architecture: --set would be silently ignored
        raise ConfigError(f"--set is for a registry name; {spec} is a file whose model is what it says")
    if path.suffix == ".onnx" or (path.exists() and path.suffix not in (".yaml", ".yml")):
        return spec, None
    if path.suffix in (".yaml", ".yml"):
        from visrec.config import read_yaml_mapping

        raw = read_yaml_mapping(path)
        if "stages" in raw:  # a bare architecture spec (what a search samples): the `searched` backbone
            name, kwargs = "searched", {"spec": raw}
        else:
            m = load_config(path).model
            name, kwargs = m.name, m.kwargs
        check_buildable(name, kwargs, str(path))
        model = build_backbone(name, **kwargs)
        return model, registry_contract(model, name, kwargs)
    kwargs = dict(parse_override(o) for o in overrides)
    BACKBONES.get(spec)  # a clear error for an unknown name
    problem = model_option_problem(kwargs)  # the sizes a run config allows (a 0-d embedding builds, then fails)
    if problem:
        raise ConfigError(f"--set {problem}")
    check_buildable(spec, kwargs, f"{spec} {' '.join(f'--set {o}' for o in overrides)}".strip())
    model = build_backbone(spec, **kwargs)
    return model, registry_contract(model, spec, kwargs)


def _report_table(report) -> Table:
    t = Table(title=f"{report.source} vs {report.protocol.name}")
    for col in ("limit", "allowed", "measured", "result"):
        t.add_column(col)
    for l in report.limits:
        t.add_row(l.name, l.limit, l.measured, "[green]pass[/]" if l.passed else "[red]FAIL[/]")
    return t


def _figures_table(report) -> Table:
    t = Table(title="figures (MACs = multiply-accumulates; FLOPs = floating-point operations = 2 x MACs; "
                    "thop/ptflops print MACs labelled 'FLOPs')")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("FLOPs, LFR rule (conv+FC, bias rule)", f"{report.lfr_flops:,}")
    t.add_row("MACs, conv+FC", f"{report.macs:,}")
    if report.full_flops is not None:
        t.add_row("FLOPs, every op (torch FlopCounterMode)", f"{report.full_flops:,}")
    t.add_row("parameters", f"{report.params:,}")
    if report.size_bytes is not None:
        t.add_row("fp32 ONNX size (the file `visrec export` writes)",
                  f"{report.size_bytes:,} B = {report.size_mb:.3f} MB = {report.size_mib:.3f} MiB")
    t.add_row("weight dtypes", ", ".join(report.weight_dtypes))
    shape = report.output_shape
    if shape is None or len(shape) == 1:  # an embedder: one feature vector per image
        t.add_row("embedding dim", str(report.embedding_dim))
    else:  # landmark points, heatmaps: the per-image output as it is
        t.add_row("output per image", " x ".join(map(str, shape)))
    t.add_row("BatchNorm folded into conv", "yes (adds bias FLOPs)" if report.batchnorm_folded else "no")
    return t


def _layers_table(report) -> Table:
    t = Table(title="per layer")
    for col in ("layer", "kind", "output", "MACs", "FLOPs (LFR)"):
        t.add_column(col)
    for l in report.layers:
        t.add_row(l.name, l.kind, "x".join(map(str, l.out_shape)), f"{l.macs:,}", f"{l.lfr_flops:,}")
    return t


def run_check(target: str, protocol: str, overrides: list[str], layers: bool) -> bool:
    from visrec.budget import check

    model, contract = _model_from_spec(target, overrides)
    # a registry name / run config builds fresh weights that stand for the architecture: its size is that
    # of a trained model's exported file (fresh constant initial values export smaller)
    report = check(model, protocol, contract=contract, untrained=contract is not None)
    console.print(_report_table(report))
    console.print(_figures_table(report))
    if layers:
        console.print(_layers_table(report))
    return report.passed


def run_fit(family: str, protocol: str) -> bool:
    from visrec.search.fit import fit_to_budget

    result = fit_to_budget(family, protocol)
    t = Table(title=f"largest {family} inside {result.protocol.name} ({result.tried} candidates counted)")
    for col in ("model", "kwargs", "FLOPs (LFR)", "MACs", "params", "size MB (fp32 ONNX)", "passes"):
        t.add_column(col)
    rows = [("fit", result.best_kwargs, result.best)]
    if result.next_larger:
        rows.append(("next larger", result.next_larger_kwargs, result.next_larger))
    for label, kwargs, r in rows:
        size = "not measured (no size limit)" if r.size_mb is None else f"{r.size_mb:.3f}"
        t.add_row(label, str(kwargs), f"{r.lfr_flops / 1e9:.4f} G", f"{r.macs / 1e9:.4f} G", f"{r.params:,}",
                  size, "yes" if r.passed else "no")
    console.print(t)
    if result.next_larger_why:
        console.print(f"next larger {result.next_larger_kwargs}: {result.next_larger_why}", markup=False)
    return result.best.passed


@app.command("check")
def check_command(model: str = typer.Argument(..., help=MODEL_HELP),
                  protocol: str = typer.Option(..., "--protocol", "-p", help=PROTOCOL_HELP),
                  overrides: list[str] = typer.Option([], "--set", help="model kwarg for a registry name: "
                                                                        "width_mult=1.2"),
                  layers: bool = typer.Option(False, "--layers", help="print the per-layer breakdown")):
    """Check a model against a protocol's budget: FLOPs (LFR rule), size, dtype, dim (exit 0 only if all pass)."""
    raise typer.Exit(0 if run_check(model, protocol, overrides, layers) else 1)


@app.command("fit")
def fit_command(family: str = typer.Argument(..., help="effnet_face | mobilefacenet | iresnet18/34/50/100 | "
                                                         "pfld | heatmap_lite (landmarks)"),
                protocol: str = typer.Option(..., "--protocol", "-p", help=PROTOCOL_HELP)):
    """The largest member of a scalable family that passes a protocol's budget (and the next larger one)."""
    raise typer.Exit(0 if run_fit(family, protocol) else 1)
