"""The ``visrec`` command: one Typer app; each command parses, calls one library function, prints a table."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from visrec.errors import VisrecError

app = typer.Typer(help="visrec: faces, landmarks, products — data -> train -> budget -> eval -> export -> serve",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()


@app.command()
def train(config: Path = typer.Argument(..., help="YAML run config (see configs/)"),
          resume: bool = typer.Option(False, "--resume", help="continue from the output dir's checkpoint"),
          overrides: list[str] = typer.Option([], "--set", help="override a config key: optim.lr=0.05"),
          no_progress: bool = typer.Option(False, "--no-progress")):
    """Train any task from a YAML config (single process, or under torchrun with the same config)."""
    from visrec.config import load_config, parse_override
    from visrec.train.trainer import train as run_training

    cfg = load_config(config, dict(parse_override(o) for o in overrides))
    if cfg.task == "faces_kd" and int((cfg.loss.get("distill") or {}).get("rounds", 1)) > 1:
        # recursive KD (VarGFaceNet): round k's student teaches round k+1, each in <output>/round{k}
        from visrec.train.distill_task import recursive_distill

        result = recursive_distill(cfg, resume=resume, progress=not no_progress, source=str(config))[-1]
    else:
        result = run_training(cfg, resume=resume, source=str(config), progress=not no_progress)
    table = Table(title=f"trained {cfg.model.name} ({cfg.task})")
    table.add_column("item")
    table.add_column("value")
    table.add_row("steps", f"{result.global_step} / {result.total_steps}")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("outputs", str(result.output))
    console.print(table)


@app.command()
def finetune(config: Path = typer.Argument(..., help="YAML run config of the new run"),
             from_: Path = typer.Option(..., "--from", help="pretrained backbone: arcface_torch backbone.pth, "
                                                            "visrec model.pt or run dir"),
             overrides: list[str] = typer.Option([], "--set", help="override a config key: optim.lr=0.01"),
             no_progress: bool = typer.Option(False, "--no-progress")):
    """Train from a pretrained backbone with a fresh margin head (the config's classes); = train with init."""
    train(config, resume=False, overrides=[*overrides, f"init={from_}"], no_progress=no_progress)


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), help="where the demo writes data, runs and reports"),
         minutes: float = typer.Option(3.0, help="CPU training budget in minutes")):
    """The offline demo: synthetic data -> train -> evaluate -> (and every capability as it lands)."""
    from visrec.demo import run_demo

    run_demo(out, minutes=minutes, console=console)


@app.command()
def serve(config: Path = typer.Option(..., "--config", help="serve YAML (configs/serve/example.yaml)"),
          overrides: list[str] = typer.Option([], "--set", help="override a config key: port=8080"),
          aligned: bool = typer.Option(False, "--aligned", help="uploads are aligned crops: no detection "
                                                                "(= --set faces.aligned=true)")):
    """HTTP API + web page: enroll/identify/verify faces, landmarks, product search (FastAPI + uvicorn)."""
    from visrec.config import parse_override
    from visrec.serve.app import serve as run_server
    from visrec.serve.config import load_serve_config

    cfg = load_serve_config(config, dict(parse_override(o) for o in [*overrides, *(["faces.aligned=true"]
                                                                                  if aligned else [])]))
    console.print(f"serving on http://{cfg.host}:{cfg.port} (OpenAPI at /docs, page at /); "
                  f"API key {'required' if cfg.keys() else 'not required (loopback)'}")
    run_server(cfg)


def _add_groups() -> None:
    # Each command group lives in visrec.commands.<area> and imports its heavy dependencies lazily.
    import importlib

    for module, name in [("data", "data"), ("eval", "eval"), ("models", "models")]:
        mod = importlib.import_module(f"visrec.commands.{module}")
        app.add_typer(mod.app, name=name)
    budget = importlib.import_module("visrec.commands.budget")
    app.command("budget")(budget.budget)
    app.command("export")(importlib.import_module("visrec.commands.export").export)
    lm = importlib.import_module("visrec.commands.landmarks")
    app.command("landmarks")(lm.landmarks)
    importlib.import_module("visrec.commands.eval").app.command("landmarks")(lm.eval_landmarks)
    app.add_typer(importlib.import_module("visrec.commands.gallery").app, name="gallery")
    products = importlib.import_module("visrec.commands.products")
    app.add_typer(products.app, name="products")
    importlib.import_module("visrec.commands.eval").app.command("products")(products.eval_products)


_add_groups()


def main() -> None:
    try:
        app()
    except VisrecError as exc:
        # Text, not markup: a message quoting a user's name or path (say "[/]") must print as written
        Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
