"""``visrec search faces|landmarks``: architecture search under a budget (an Optuna study in the run directory);
``visrec search report RUN``: its HTML report again; ``visrec search export RUN``: the best architecture as a run
config ``visrec train`` takes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from visrec.commands.eval import rate_option

console = Console()
app = typer.Typer(help="Architecture search under a compute budget (Optuna): trials trained briefly on your data, "
                       "scored on held-out data; the Pareto front and the best spec.",
                  no_args_is_help=True, add_completion=False)

STORAGE_HELP = ("an Optuna storage for several machines (postgresql://..., mysql://...) or a shared journal "
                "file path; default: RUN/study.journal")


def _search(task: str, data: Path, val: Path, out: Path, protocol: Optional[str], max_gflops: Optional[float],
            max_mb: Optional[float], max_ms: Optional[float], trials: int, steps: int, evaluations: int,
            space: Optional[Path], config: Optional[Path], target_fpr: float, storage: Optional[str], seed: int,
            resume: bool, no_prune: bool, device: str, no_progress: bool) -> None:
    from visrec.data.text import check_output
    from visrec.search.report import write_search_report
    from visrec.search.study import SearchSettings, load_search_study, resolve_budget, run_worker, summarise

    check_output(out, kind="dir")
    settings = SearchSettings(task=task, data=data, val=val, out=out,
                              budget=resolve_budget(protocol, max_gflops, max_mb, max_ms), trials=trials,
                              steps=steps, evaluations=evaluations, space_file=space, config=config,
                              target_fpr=target_fpr, storage=storage, seed=seed, prune=not no_prune, device=device)
    console.print(f"search {task}: budget {settings.budget.describe()}; {trials} trials of {steps} steps")
    worker = run_worker(settings, resume=resume, progress=not no_progress)
    if worker.converged:
        console.print("stopped before --trials: the sampler kept proposing architectures already trained (the "
                      "search has converged on this space)")
    if worker.recovered:
        console.print(f"resumed: trials {worker.recovered} of a stopped worker were marked abandoned and queued again")
    study, desc = load_search_study(storage, out)
    result = summarise(study, desc)
    report = write_search_report(out, result)
    console.print(_trials_table(result, top=10))
    console.print(f"this worker trained {worker.ran} trials, {worker.rejected} candidates rejected over budget; "
                  f"report: {report}; best spec: visrec search export {out} --out best.yaml")


def _trials_table(result, top: int | None = None) -> Table:
    sign = -1 if result.direction == "maximize" else 1
    rows = sorted((r for r in result.rows if r.status in ("complete", "pruned") and r.score is not None),
                  key=lambda r: (r.status != "complete", sign * r.score))
    t = Table(title=f"trials by {result.score_name} ({result.storage}); * = on the Pareto front")
    if top is not None and len(rows) > top:
        t.caption = f"the best {top} of {len(rows)} scored trials; visrec search report RUN lists all"
    for col in ("trial", "status", result.score_name, "GFLOPs (LFR)", "MB fp32", "note"):
        t.add_column(col)
    for r in rows[:top]:
        mark = "*" if r.number in result.pareto else ""
        t.add_row(f"{r.number}{mark}", r.status, f"{r.score:.4f}", f"{r.gflops:.4f}", f"{r.mb:.2f}", r.note)
    return t


def _command(task: str):
    def command(
        data: Path = typer.Option(..., "--data", help="training data: RecordIO dir, image folder or CSV (faces); "
                                                      "JD-landmark dir (landmarks)"),
        val: Path = typer.Option(..., "--val", help="held-out data, other identities/faces than --data: a face "
                                                    "data set or .bin pair file (faces); a JD-landmark dir"),
        out: Path = typer.Option(..., "--out", help="run directory: study journal, trials/, report.html"),
        protocol: Optional[str] = typer.Option(None, "--protocol", "-p", help="protocol name or YAML: its "
                                               "FLOP and size limits are the budget"),
        max_gflops: Optional[float] = typer.Option(None, "--max-gflops", help="LFR-rule GFLOPs at most this"),
        max_mb: Optional[float] = typer.Option(None, "--max-mb", help="float32 weights under this many MB"),
        max_ms: Optional[float] = typer.Option(None, "--max-ms", help="ms/image at batch 1 on one ONNX Runtime "
                                               "thread of this machine, measured per candidate"),
        trials: int = typer.Option(20, "--trials", min=1, help="trained trials in the study (all workers)"),
        steps: int = typer.Option(100, "--steps", min=1, help="training steps of each trial"),
        evaluations: int = typer.Option(3, "--evaluations", min=1, help="held-out scores per trial (the "
                                        "points where a bad trial is pruned)"),
        space: Optional[Path] = typer.Option(None, "--space", help="search space YAML (default: the shipped one)"),
        config: Optional[Path] = typer.Option(None, "--config", help="run config whose training settings "
                                              "(loss, optimizer, batch) every trial uses"),
        target_fpr: float = typer.Option(1e-2, "--target-fpr", callback=rate_option(),
                                         help="faces: the score is TPR at this FPR over all held-out pairs"),
        storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
        seed: int = typer.Option(0, "--seed", help="sampler and training seed"),
        resume: bool = typer.Option(False, "--resume", help="continue the study in --out (after a stop or a "
                                    "kill), or join it as another worker"),
        no_prune: bool = typer.Option(False, "--no-prune", help="train every trial to its last step"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
    ):
        _search(task, data, val, out, protocol, max_gflops, max_mb, max_ms, trials, steps, evaluations, space,
                config, target_fpr, storage, seed, resume, no_prune, device, no_progress)

    command.__doc__ = (f"Search the best {task} network inside a budget: Optuna trials, each trained --steps on "
                       f"--data and scored on --val; writes RUN/report.html.")
    return command


app.command("faces")(_command("faces"))
app.command("landmarks")(_command("landmarks"))


@app.command("report")
def report(run: Path = typer.Argument(..., help="the search's run directory (its --out)"),
           storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP)):
    """Write the search's HTML report (Pareto front, best spec and budget, trials) from its study."""
    from visrec.search.report import write_search_report
    from visrec.search.study import load_search_study, summarise

    study, desc = load_search_study(storage, run)
    result = summarise(study, desc)
    console.print(_trials_table(result))
    console.print(f"report: {write_search_report(run, result)}")


@app.command("export")
def export(run: Path = typer.Argument(..., help="the search's run directory (its --out)"),
           out: Path = typer.Option(..., "--out", help="the run config to write (YAML)"),
           trial: Optional[int] = typer.Option(None, "--trial", help="this trial instead of the best one"),
           steps: Optional[int] = typer.Option(None, "--steps", min=1, help="training steps of the written "
                                               "config (default: the trial's)"),
           storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP)):
    """Write the best (or --trial) architecture as a run config: visrec train --config OUT."""
    from visrec.data.text import check_output
    from visrec.search.study import export_spec, load_search_study, summarise

    check_output(out, kind="file")
    study, desc = load_search_study(storage, run)
    result = summarise(study, desc)
    path = export_spec(result, run, trial, out, steps=steps)
    t = Table(title=f"exported {path}")
    t.add_column("item")
    t.add_column("value")
    row = result.best if trial is None else next(r for r in result.rows if r.number == trial)
    t.add_row("trial", str(row.number))
    t.add_row(result.score_name, f"{row.score}")
    t.add_row("GFLOPs (LFR)", f"{row.gflops:.4f}")
    t.add_row("train it", f"visrec train --config {path}")
    console.print(t)
