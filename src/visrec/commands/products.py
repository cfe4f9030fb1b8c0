"""``visrec products index CATALOGUE --out DIR`` and ``visrec products search QUERY --index DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from visrec.commands import PROVIDERS_HELP

app = typer.Typer(help="product retrieval: index a catalogue, search it", no_args_is_help=True)
console = Console()
SHOWN_QUERIES = 50  # rows `products search` prints; a catalogue's query set runs to thousands (--out has them all)


def _bar(show: bool = True):
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True, disable=not show)


@app.command("index")
def index(catalogue: Path = typer.Argument(..., help="folder of <id>.jpg catalogue images"),
          out: Path = typer.Option(..., "--out", help="index directory (a re-run reuses the extraction shards of the "
                                   "same model, options and image files; the index files are replaced only once a "
                                   "build succeeds)"),
          config: Optional[Path] = typer.Option(None, "--config", help="YAML with model and index sections"),
          model: Optional[Path] = typer.Option(None, "--model", help="trained descriptor: run dir or model.pt (run "
                                               "in PyTorch on --device), or its .onnx export (run in ONNX Runtime "
                                               "on --providers)"),
          overrides: list[str] = typer.Option([], "--set", help="override a config key: index.factory=IVF64,Flat "
                                              "(without --config: index.* keys only)"),
          device: str = typer.Option("cpu", "--device", help="torch device of a PyTorch descriptor: cpu, cuda, "
                                                           "cuda:1, auto (CUDA when there is one)"),
          providers: str = typer.Option("cpu", "--providers", help=PROVIDERS_HELP + "; here: an .onnx --model")):
    """Describe every catalogue image (resumable), fit the post-processing chain, build the FAISS index.
    Images are read, decoded and preprocessed by loader threads (index.workers) ahead of the descriptor.
    Under torchrun (python -m torch.distributed.run --nproc_per_node=N -m visrec.cli products index ...) each
    process describes its share of the extraction shards into --out (a folder every process sees) and rank 0
    joins them into the index one process would build; --device is then cpu, cuda or auto (the LOCAL_RANK's
    GPU), and --providers cuda / tensorrt take the LOCAL_RANK's GPU too."""
    import os

    from visrec._onnx import parse_providers
    from visrec.config import parse_override
    from visrec.data.products import list_images
    from visrec.data.text import check_output
    from visrec.index.catalogue import index_catalogue
    from visrec.distributed import setup, teardown, world_group

    check_output(out, kind="dir")  # before the catalogue is listed (index_catalogue checks it too, for callers)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device not in ("cpu", "cuda", "auto"):
        raise typer.BadParameter(f"{device!r}: under torchrun give cpu or cuda, or auto (each process takes the "
                                 "GPU of its LOCAL_RANK)", param_hint="--device")
    spec = parse_providers(providers)  # a misspelt choice is an error before any process group
    ctx = setup(device_name=device if device in ("cpu", "cuda", "auto") else "cpu")  # a group under torchrun only
    if ctx.distributed and spec.word in ("cuda", "tensorrt") and ":" not in spec.text:
        providers = f"{spec.word}:{ctx.local_rank}"
    try:
        # one process: the whole catalogue; under torchrun: this rank's shards, a count only the run knows
        total = None if ctx.distributed else len(list_images(catalogue))
        with _bar(show=ctx.is_main) as bar:  # under torchrun rank 0's share stands for the whole
            task = bar.add_task("describing catalogue" + (f" (rank 0's share of {ctx.world_size})"
                                                          if ctx.distributed else ""), total=total)
            m = index_catalogue(catalogue, out, config=config, checkpoint=model,
                                device=str(ctx.device) if ctx.distributed else device, providers=providers,
                                overrides=dict(parse_override(o) for o in overrides),
                                progress=lambda n: bar.advance(task, n), group=world_group(ctx))
    finally:
        teardown(ctx)
    if not ctx.is_main:
        return
    t = Table(title=f"catalogue index {out}")
    t.add_column("item")
    t.add_column("value")
    t.add_row("images indexed", f"{m['count']:,}")
    shards = m.get("shards") or {}
    if shards:
        why = ", ".join(f"{reason}: {n}" for reason, n in sorted(shards.get("why", {}).items()))
        t.add_row("extraction shards", f"{shards.get('reused', 0)} reused, {shards.get('described', 0)} described"
                  + (f" ({why})" if why else ""))
    t.add_row("unreadable (skipped, listed in manifest.json)", str(len(m["unreadable"])))
    for bad in m["unreadable"][:5]:
        t.add_row(f"  {bad['id']}", bad["reason"])
    if len(m["unreadable"]) > 5:
        t.add_row(f"  and {len(m['unreadable']) - 5:,} more", "in manifest.json")
    t.add_row("descriptor", f"{m['model_config']['name']} {m['dim']}-d -> index {m['index_dim']}-d")
    t.add_row("descriptor ran on", m["runtime"])
    t.add_row("FAISS", m["options"]["factory"])
    t.add_row("post-processing", " -> ".join(s["name"] for s in m["options"]["postprocess"]) or "none")
    for message in m.get("postprocess_adjustments", []):
        t.add_row("  stage shrunk", message)
    console.print(t)


@app.command("search")
def search(query: Path = typer.Argument(..., help="an image, or a folder of query images"),
           index_dir: Path = typer.Option(..., "--index", help="index directory from visrec products index"),
           k: int = typer.Option(7, "-k", min=1, help="results per query"),
           out: Optional[Path] = typer.Option(None, "--out", help="write the challenge CSV (k ids per query)"),
           providers: str = typer.Option("cpu", "--providers", help=PROVIDERS_HELP + "; here: the index's ONNX "
                                         "descriptor (descriptor.onnx)")):
    """Top-k catalogue ids for one image or every image of a folder."""
    from visrec.index.catalogue import search_catalogue
    from visrec.distributed import one_process

    one_process("visrec products search")
    if out is not None:
        from visrec.data.text import check_output

        # before the index loads and the queries run; never over a query image or a file of the index
        check_output(out, kind="file", reads={"QUERY": query, "--index": index_dir})
    ranked, scores = search_catalogue(index_dir, query, k, out, providers=providers)
    t = Table(title=f"top {k} for {len(ranked)} quer{'y' if len(ranked) == 1 else 'ies'}")
    if len(ranked) > SHOWN_QUERIES:
        t.caption = (f"the first {SHOWN_QUERIES} of {len(ranked)} queries; "
                     + (f"{out} holds all" if out else "--out FILE writes all"))
    t.add_column("query")
    t.add_column("catalogue ids (score), best first")
    for qid in list(ranked)[:SHOWN_QUERIES]:
        t.add_row(qid, ", ".join(f"{c} ({s:.3f})" for c, s in zip(ranked[qid], scores[qid])))
    console.print(t)
    if out:
        console.print(f"submission: {out}")
