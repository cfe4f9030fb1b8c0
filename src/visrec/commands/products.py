"""``visrec products index|search`` and ``visrec eval products``: catalogue indexing, search, mAP@7."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(help="product retrieval: index a catalogue, search it", no_args_is_help=True)
console = Console()


def _bar():
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


@app.command("index")
def index(catalogue: Path = typer.Argument(..., help="folder of <id>.jpg catalogue images"),
          out: Path = typer.Option(..., "--out", help="index directory (re-running resumes extraction)"),
          config: Optional[Path] = typer.Option(None, "--config", help="YAML with model and index sections"),
          checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="trained descriptor (run dir or model.pt)"),
          overrides: list[str] = typer.Option([], "--set", help="override a config key: index.factory=IVF64,Flat"),
          device: str = typer.Option("cpu", "--device")):
    """Describe every catalogue image (resumable), fit the post-processing chain, build the FAISS index."""
    from visrec.config import parse_override
    from visrec.data.products import list_images
    from visrec.index.catalogue import index_catalogue

    total = len(list_images(catalogue))
    with _bar() as bar:
        task = bar.add_task("describing catalogue", total=total)
        m = index_catalogue(catalogue, out, config=config, checkpoint=checkpoint, device=device,
                            overrides=dict(parse_override(o) for o in overrides),
                            progress=lambda n: bar.advance(task, n))
    t = Table(title=f"catalogue index {out}")
    t.add_column("item")
    t.add_column("value")
    t.add_row("images indexed", f"{m['count']:,}")
    t.add_row("unreadable (skipped, listed in manifest.json)", str(len(m["unreadable"])))
    for bad in m["unreadable"][:5]:
        t.add_row(f"  {bad['id']}", bad["reason"])
    t.add_row("descriptor", f"{m['model_config']['name']} {m['dim']}-d -> index {m['index_dim']}-d")
    t.add_row("FAISS", m["options"]["factory"])
    t.add_row("post-processing", " -> ".join(s["name"] for s in m["options"]["postprocess"]) or "none")
    for message in m.get("postprocess_adjustments", []):
        t.add_row("  stage shrunk", message)
    console.print(t)


@app.command("search")
def search(index_dir: Path = typer.Argument(..., help="index directory from visrec products index"),
           query: Path = typer.Argument(..., help="an image, or a folder of query images"),
           k: int = typer.Option(7, "-k", min=1, help="results per query"),
           submission: Optional[Path] = typer.Option(None, "--submission", help="write the challenge CSV (k ids)")):
    """Top-k catalogue ids for one image or every image of a folder."""
    from visrec.index.catalogue import search_catalogue

    ranked, scores = search_catalogue(index_dir, query, k, submission)
    t = Table(title=f"top {k} for {len(ranked)} quer{'y' if len(ranked) == 1 else 'ies'}")
    t.add_column("query")
    t.add_column("catalogue ids (score), best first")
    for qid in list(ranked)[:50]:
        t.add_row(qid, ", ".join(f"{c} ({s:.3f})" for c, s in zip(ranked[qid], scores[qid])))
    console.print(t)
    if submission:
        console.print(f"submission: {submission}")


def eval_products(index_dir: Path = typer.Argument(..., help="index directory from visrec products index"),
                  data: Path = typer.Option(..., "--data", help="root with query/ and val.csv"),
                  k: int = typer.Option(7, "-k", min=1),
                  out: Path = typer.Option(Path("eval-products"), "--out"),
                  ablation: bool = typer.Option(False, "--ablation",
                                                help="also report the metrics after each post-processing stage "
                                                     "(none, +stage 1, +stages 1-2, ...; exact search)")):
    """mAP@k in both labelled forms, recall@1/k, submission.csv and report.html."""
    from visrec.index.evaluation import evaluate_products

    with _bar() as bar:
        task = bar.add_task("searching queries", total=None)
        res = evaluate_products(index_dir, data, out, k, progress=lambda n: bar.advance(task, n), ablation=ablation)
    t = Table(title=f"product retrieval: {res.queries} queries")
    t.add_column("metric")
    t.add_column("value", justify="right")
    labels = {f"map@{k}_hits": f"mAP@{k} hits (AP / hits in top {k})",
              f"map@{k}_min_gt": f"mAP@{k} min_gt (AP / min(|GT|, {k}), Kaggle mapk)"}
    for name, v in res.metrics.items():
        t.add_row(labels.get(name, name), f"{v:.4f}")
    console.print(t)
    for message in res.postprocess_adjustments:
        console.print(f"[yellow]index built with a shrunk stage:[/] {message}")
    if res.ablation:
        a = Table(title="post-processing ablation (exact search; each row adds the next stage)")
        a.add_column("stages applied")
        for name in res.ablation[0].metrics:
            a.add_column(name, justify="right")
        for row in res.ablation:
            a.add_row(row.chain, *(f"{v:.4f}" for v in row.metrics.values()))
        console.print(a)
    console.print(f"report: {res.report}" + (f"\nsubmission: {res.submission}" if res.submission else ""))
