"""The ``visrec`` command: one Typer app; each command parses, calls one library function, prints a table."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from visrec.commands import PROVIDERS_HELP
from visrec.errors import StorageError, VisrecError

from visrec.commands import budget as budget_commands
from visrec.commands import data as data_commands
from visrec.commands import eval as eval_commands
from visrec.commands import export as export_commands
from visrec.commands import gallery as gallery_commands
from visrec.commands import landmarks as landmark_commands
from visrec.commands import models as model_commands
from visrec.commands import products as product_commands
from visrec.commands import search as search_commands

app = typer.Typer(help="visrec: faces, landmarks, products — data -> train -> budget -> eval -> export -> serve. "
                       "Grammar (docs/cli.md): the thing a command acts on is its one positional argument; "
                       "--config, --model, --data, --out and --target-fpr mean the same in every command.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from visrec import __version__

        console.print(f"visrec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")):
    """visrec: faces, landmarks, products."""


@app.command()
def train(config: Path = typer.Option(..., "--config", help="YAML run config (see configs/)"),
          resume: bool = typer.Option(False, "--resume", help="continue from the output dir's checkpoint"),
          overrides: list[str] = typer.Option([], "--set", help="override a config key: optim.lr=0.05"),
          no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (logs only)")):
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
    if result.rank != 0:
        return  # under torchrun one table, from the rank that validated
    table = Table(title=f"trained {cfg.model.name} ({cfg.task})")
    table.add_column("item")
    table.add_column("value")
    table.add_row("steps", f"{result.global_step} / {result.total_steps}")
    table.add_row("last loss", f"{result.last_loss:.4f}")
    if result.skipped:
        table.add_row("unreadable records skipped (data.skip_bad)", str(result.skipped))
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("outputs", str(result.output))
    console.print(table)


@app.command()
def finetune(config: Path = typer.Option(..., "--config", help="YAML run config of the new run"),
             model: Path = typer.Option(..., "--model", help="pretrained backbone: arcface_torch backbone.pth, "
                                                            "visrec model.pt or run dir"),
             overrides: list[str] = typer.Option([], "--set", help="override a config key: optim.lr=0.01"),
             resume: bool = typer.Option(False, "--resume", help="continue an interrupted fine-tune from its "
                                         "output's last checkpoint (which holds the weights: --model is not read "
                                         "again)"),
             no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar (logs only)")):
    """Train from a pretrained backbone with a fresh margin head (the config's classes); = train with init."""
    train(config, resume=resume, overrides=[*overrides, f"init={model}"], no_progress=no_progress)


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), "--out", help="where the demo writes data, runs and reports"),
         steps: int = typer.Option(80, "--steps", min=1, help="face training steps (80: about 3 minutes on 2 "
                                                              "cores; the figures in BENCHMARKS.md)")):
    """The offline demo: synthetic data -> train -> evaluate -> (and every capability as it lands)."""
    from visrec.demo import run_demo

    run_demo(out, steps=steps, console=console)


@app.command()
def serve(config: Path = typer.Option(..., "--config", help="serve YAML (configs/serve/example.yaml)"),
          overrides: list[str] = typer.Option([], "--set", help="override a config key: port=8080"),
          aligned: bool = typer.Option(False, "--aligned", help="uploads are aligned crops: no detection "
                                                                "(= --set faces.aligned=true)"),
          providers: Optional[str] = typer.Option(None, "--providers", help=PROVIDERS_HELP + "; here: every model "
                                                  "the service runs in ONNX Runtime (= --set providers=...; "
                                                  "default: the config's, cpu)")):
    """HTTP API + web console: galleries, enroll/identify/verify faces, landmarks, product search (FastAPI + uvicorn)."""
    from visrec.config import parse_override
    from visrec.serve.app import serve as run_server, server_url
    from visrec.serve.config import load_serve_config

    changes = dict(parse_override(o) for o in [*overrides, *(["faces.aligned=true"] if aligned else [])])
    if providers is not None:
        changes["providers"] = providers
    cfg = load_serve_config(config, changes)
    run_server(cfg, announce=lambda host, port: console.print(
        f"serving on {server_url(host, port)} (OpenAPI at /docs, page at /); "
        f"API key {'required' if cfg.keys() else 'not required (loopback)'}"))


app.add_typer(data_commands.app, name="data")
app.add_typer(eval_commands.app, name="eval")
app.add_typer(model_commands.app, name="models")
app.add_typer(budget_commands.app, name="budget")
app.command("export")(export_commands.export)
app.command("landmarks")(landmark_commands.landmarks)
app.add_typer(gallery_commands.app, name="gallery")
app.add_typer(product_commands.app, name="products")
app.add_typer(search_commands.app, name="search")


# the commands that run as several torchrun processes (docs/distributed.md, docs/training.md); under torchrun
# every other one stops before any work, instead of each process doing all of it and writing the same files
TORCHRUN_COMMANDS = ("train", "finetune", "eval faces", "products index")


def _command_path(args: list[str]) -> str:
    """The command ``args`` name (``gallery enroll``), found down the command tree; '' when they name none."""
    cmd, path = typer.main.get_command(app), []
    words = iter(args)
    while hasattr(cmd, "commands"):  # a group (typer's own click)
        name = next((w for w in words if not w.startswith("-")), None)
        if name is None or name not in cmd.commands:
            return ""
        path.append(name)
        cmd = cmd.commands[name]
    return " ".join(path)


def refuse_torchrun_for_one_process_commands(args: list[str]) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        command = _command_path(args)
        if command and command not in TORCHRUN_COMMANDS:
            from visrec.distributed import one_process

            one_process(f"visrec {command}")


def _print_error(message: str) -> None:
    # Text, not markup: a message quoting a user's name or path (say "[/]") must print as written
    Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)


def run_app() -> int:
    """The command's exit status: 2 for a :class:`VisrecError` (its message printed, no traceback), 3 when the
    system refused a read or write (a full disk, a read-only file system: a :class:`StorageError`, or an
    ``OSError`` no layer below named) or memory, 130 when interrupted. The exception is gone when this returns,
    and with it every frame it held."""
    try:
        refuse_torchrun_for_one_process_commands(sys.argv[1:])
        app()
    except SystemExit as done:  # typer ends every command with one
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    except StorageError as exc:
        _print_error(str(exc))
        return 3
    except VisrecError as exc:
        _print_error(str(exc))
        return 2
    except OSError as exc:  # one no layer below turned into a StorageError: the system's words, and its file
        if exc.errno in StorageError.WRITE_REFUSALS:
            _print_error(str(StorageError.from_os(exc)))
        else:
            names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
            _print_error(": ".join(([" -> ".join(names)] if names else []) + [exc.strerror or str(exc)]))
        return 3
    except MemoryError:  # every size read from a file is bounded; what is left is a workload this machine lacks
        _print_error("out of memory: the system could not give this command the memory it asked for (try a "
                     "smaller --batch or fewer workers, or a machine with more memory); files are replaced only by "
                     "complete ones, so what was written before is still there")
        return 3
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    return 0


def main() -> None:
    code = run_app()
    dist = sys.modules.get("visrec.distributed")  # imported by a command that may have started a process group
    if dist is not None:
        dist.end_process(code)  # every file is written and closed by now
    sys.exit(code)


if __name__ == "__main__":
    main()
