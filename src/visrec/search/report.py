"""The search's HTML report: the Pareto front (held-out metric vs LFR GFLOPs, the budget line drawn), the best
architecture's spec and its budget table, and every trial. A PNG beside ``report.html``; no scripts, no CDN."""

from __future__ import annotations

import html
from pathlib import Path

import yaml

from visrec._files import replacing
from visrec.budget import check, registry_contract
from visrec.errors import VisrecError
from visrec.models import build_backbone
from visrec.search.study import SearchResult


def _budget_rows(result: SearchResult) -> list[list[str]]:
    """(limit, allowed, measured, result) of the best architecture as the search counted it; with a protocol,
    also ``visrec.budget.check``'s verdict on the built network (its fp32 ONNX file where size is limited)."""
    best = result.best
    budget = result.settings.get("budget") or {}

    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    rows = [["FLOPs (LFR rule)", "-" if budget.get("max_gflops") is None else f"<= {budget['max_gflops']:g} G",
             f"{best.gflops:.4f} G", verdict(budget.get("max_gflops") is None or best.gflops <= budget["max_gflops"])],
            ["float32 weights", "-" if budget.get("max_mb") is None else f"< {budget['max_mb']:g} MB",
             f"{best.mb:.3f} MB", verdict(budget.get("max_mb") is None or best.mb < budget["max_mb"])]]
    if budget.get("max_ms") is not None:
        rows.append(["latency, 1 ONNX Runtime thread (this machine)", f"<= {budget['max_ms']:g} ms",
                     "not measured" if best.ms is None else f"{best.ms:.2f} ms",
                     verdict(best.ms is not None and best.ms <= budget["max_ms"])])
    if budget.get("protocol"):
        kwargs = {"spec": best.spec}
        model = build_backbone("searched", **kwargs)
        try:
            report = check(model, budget["protocol"], contract=registry_contract(model, "searched", kwargs),
                           untrained=True)
        except VisrecError as exc:  # e.g. a protocol file moved since the search: the rest of the report stands
            return rows + [[f"protocol {budget['protocol']}", "-", "not checked", f"cannot check: {exc}"]]
        rows += [[f"{report.protocol.name}: {lim.name}", lim.limit, lim.measured, verdict(lim.passed)]
                 for lim in report.limits]
    return rows


def _plot(result: SearchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:gray")}
    for status, (marker, colour) in styles.items():
        pts = [(r.gflops, r.score) for r in result.rows if r.status == status and r.score is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=colour, label=f"{status} ({len(pts)})")
    front = sorted((r.gflops, r.score) for r in result.rows if r.number in result.pareto and r.score is not None)
    if front:
        ax.plot(*zip(*front), "-s", color="tab:orange", markersize=3, label="Pareto front")
    if result.best is not None:
        ax.scatter([result.best.gflops], [result.best.score], s=160, facecolors="none", edgecolors="tab:red",
                   label=f"best: trial {result.best.number}")
    limit = (result.settings.get("budget") or {}).get("max_gflops")
    if limit is not None:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"budget {limit:g} GFLOPs")
    ax.set(xlabel="GFLOPs (LFR rule)", ylabel=f"held-out {result.score_name}",
           title=f"trials ({'higher' if result.direction == 'maximize' else 'lower'} is better)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_search_report(out_dir: str | Path, result: SearchResult) -> Path:
    """``report.html`` (and ``pareto.png``) in ``out_dir``; returns the page's path. Written to a temporary name
    and renamed, so a reader never sees half a page."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(result, out / "pareto.png")
    counts: dict[str, int] = {}
    for r in result.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    settings = result.settings
    budget = settings.get("budget") or {}
    budget_text = ", ".join(f"{k} {v:g}" for k, v in budget.items() if k.startswith("max_") and v is not None)
    parts = [f"<h1>Architecture search: {html.escape(settings.get('task', '?'))}</h1>",
             f"<p>Study: <code>{html.escape(result.storage)}</code>. Budget ({html.escape(str(budget.get('origin')))}): "
             f"{html.escape(budget_text)}. Each trial trained {settings.get('steps')} steps on "
             f"<code>{html.escape(str(settings.get('data')))}</code>, scored by held-out {html.escape(result.score_name)} "
             f"on <code>{html.escape(str(settings.get('val')))}</code>. Trials: "
             f"{html.escape(', '.join(f'{n} {k}' for k, n in sorted(counts.items())))}.</p>",
             '<img src="pareto.png" alt="held-out metric against GFLOPs for every trained trial, the Pareto front '
             'and the budget line">']
    if result.best is not None:
        b = result.best
        parts += [f"<h2>Best: trial {b.number}</h2>",
                  f"<p>{html.escape(result.score_name)} = {b.score:.4f} at {b.gflops:.4f} GFLOPs. Train it: "
                  f"<code>visrec search export {html.escape(str(out))} --out best.yaml</code>, then "
                  f"<code>visrec train --config best.yaml</code>.</p>",
                  _table(["limit", "allowed", "measured", "result"], _budget_rows(result)),
                  "<h3>Spec</h3>", f"<pre>{html.escape(yaml.safe_dump(b.spec, sort_keys=False))}</pre>"]
    else:
        parts.append("<p>No trial has completed yet.</p>")
    rows = [[r.number, r.status + (" (Pareto)" if r.number in result.pareto else ""),
             "" if r.score is None else f"{r.score:.4f}", "" if r.gflops is None else f"{r.gflops:.4f}",
             "" if r.mb is None else f"{r.mb:.2f}", "" if r.ms is None else f"{r.ms:.2f}", r.note]
            for r in result.rows]
    parts += ["<h2>Trials</h2>",
              _table(["trial", "status", result.score_name, "GFLOPs", "MB fp32", "ms (ORT, 1 thread)", "note"], rows)]
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>visrec search</title><style>"
            "body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
            "img{max-width:100%}</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = out / "report.html"
    with replacing(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
