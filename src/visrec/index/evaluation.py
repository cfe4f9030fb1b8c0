"""Evaluating a product index directory on a Perfect-500K-layout root: every ground-truth query searched in
the index, the challenge submission, an HTML report, and the post-processing ablation.

Post-processing ablation (``postprocess_ablation``): the same metrics after no stage of the index's
post-processing chain, after the first, the first two, ... and the whole chain, so that each stage is
measured rather than assumed to help. It uses the chain as the index fitted it (``chain.pt``, including any
shrink recorded in the manifest), the stored raw catalogue descriptors, and exact inner-product search for
every row (the diffusion re-ranker where the chain ends with it); for an index built with ``factory: Flat``
the last row equals the metrics of ``evaluate_products``. The metrics are :mod:`visrec.evaluate.products`'.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visrec.data.images import read_image
from visrec.data.products import GROUND_TRUTH, list_images, pad_to_square, write_submission
from visrec.data.text import staged_files
from visrec.errors import DataError
from visrec.evaluate.products import query_items, read_checked_ground_truth, retrieval_metrics
from visrec.index.catalogue import CatalogueIndex, open_for_queries
from visrec.index.postprocess import _topk

SUBMISSION = "submission.csv"  # in an evaluation's --out, beside report.html


@dataclass
class AblationRow:
    """One row of ``postprocess_ablation``: ``chain`` names the stages applied (``"none"`` for the raw
    descriptors, else the configured stages joined by " -> "), ``metrics`` as ``retrieval_metrics``."""

    chain: str
    metrics: dict[str, float]


@dataclass
class ProductEval:
    """``submission``: None when a catalogue smaller than ``k`` cannot fill a challenge row.
    ``ground_truth_unreadable``: ground-truth ids naming catalogue images the index skipped as unreadable
    (``unreadable_catalogue``); they stay in the ground truth and count as misses. ``notes``: what a reader of
    the figures must know (either of those), as the report and the CLI print them."""

    metrics: dict[str, float]
    ranked: dict[str, list[str]]
    submission: Path
    report: Path
    queries: int
    unreadable_catalogue: list = field(default_factory=list)
    ablation: list[AblationRow] | None = None
    postprocess_adjustments: list[str] = field(default_factory=list)
    ground_truth_unreadable: int = 0
    notes: list[str] = field(default_factory=list)


def _stage_label(spec: dict) -> str:
    params = ", ".join(f"{key}={value}" for key, value in spec.items() if key != "name")
    return f"{spec.get('name')}({params})" if params else str(spec.get("name"))


def _ablation(index, items: list[tuple[str, Path]], gt: dict[str, list[str]], k: int, progress=None
              ) -> list[AblationRow]:
    qids, raw_queries = index.describe_items(items, progress=progress)
    raw_catalogue = index.raw_catalogue()
    chain, specs = index.chain, index.opts.postprocess
    rows = []
    for n_stages, (cat, queries) in enumerate(chain.stagewise(raw_catalogue, raw_queries)):
        if n_stages and getattr(chain.stages[n_stages - 1], "reranker", False):
            # the re-ranker replaces the search; ranked in the index's query batches, as search_vectors is
            size = index.opts.batch_size
            order = np.concatenate([chain.reranker.rank(queries[s:s + size], k)[1] for s in range(0, len(queries), size)])
        else:
            order = _topk(queries, cat, k)[1]
        ranked = {qid: [index.ids[j] for j in row if j >= 0] for qid, row in zip(qids, order)}
        label = " -> ".join(_stage_label(sp) for sp in specs[:n_stages]) or "none"
        rows.append(AblationRow(label, retrieval_metrics(ranked, gt, k)))
    return rows


def postprocess_ablation(index_dir: str | Path, root: str | Path, k: int = 7, progress=None) -> list[AblationRow]:
    """mAP@k (both forms) and recall after each prefix of the index's post-processing chain (module
    docstring): ``len(stages) + 1`` rows, "none" first, the whole chain last. ``progress(n)`` is called as
    query images are described."""
    root = Path(root)
    index = CatalogueIndex(index_dir)
    gt, _ = _ground_truth(root, index)
    return _ablation(index, query_items(root, gt), gt, k, progress)


def _ground_truth(root: Path, index: CatalogueIndex) -> tuple[dict[str, list[str]], int]:
    """``root/val.csv`` checked against the index's ids and the catalogue images it skipped as unreadable
    (``visrec.evaluate.products.read_checked_ground_truth``)."""
    return read_checked_ground_truth(root / GROUND_TRUTH, index.ids,
                                     [u["id"] for u in index.manifest.get("unreadable", [])])


def evaluate_products(index_dir: str | Path, root: str | Path, out: str | Path = "eval-products", k: int = 7,
                      samples: int = 8, progress=None, ablation: bool = False, providers=None) -> ProductEval:
    """Search every ground-truth query of ``root`` in the index; write submission.csv and report.html (a
    catalogue smaller than ``k`` makes no submission: an earlier run's submission.csv in ``out`` is removed).
    With ``ablation`` also measure the metrics after each stage of the post-processing chain
    (``postprocess_ablation``; the queries are described a second time) and put that table in the report.
    ``providers``: where an index's ONNX descriptor runs (``visrec.index.catalogue.open_for_queries``)."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = open_for_queries(index_dir, providers)
    gt, gt_unreadable = _ground_truth(root, index)
    items = query_items(root, gt)
    ranked, scores = index.search_items(items, k, progress=progress)
    metrics = retrieval_metrics(ranked, gt, k)
    rows = _ablation(index, items, gt, k, progress) if ablation else None
    submission, note = out / SUBMISSION, None
    if not all(len(r) >= k for r in ranked.values()):  # a catalogue smaller than k cannot make a valid submission
        submission = None
        note = (f"no submission.csv: a challenge row needs {k} ids and the index returns fewer (catalogue of "
                f"{len(index.ids)})")
    adjustments = [str(m) for m in index.manifest.get("postprocess_adjustments", [])]
    unreadable = index.manifest.get("unreadable", [])
    notes = [n for n in (note, _unreadable_note(gt_unreadable, len(unreadable))) if n]
    with staged_files(out) as stage:  # the report renamed in after the submission: never one run's beside another's
        _write_report(stage, items, ranked, scores, gt, index, metrics, samples, k, rows, adjustments, notes)
        if submission is not None:
            write_submission(submission, ranked, k)
        else:  # an earlier run's submission (other queries, another catalogue) must not sit beside this report
            _remove_earlier_submission(out / SUBMISSION)
    report = out / "report.html"
    return ProductEval(metrics, ranked, submission, report, len(items), unreadable, rows, adjustments,
                       gt_unreadable, notes)


def _remove_earlier_submission(path: Path) -> None:
    """Remove the submission an earlier run left at ``path`` (inside the staged write, after this run's report is
    written and before it is renamed in: a failure keeps the earlier run's pair as it was). Anything there but a
    file or a link is a DataError naming it, not removed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        raise DataError("not a file: an earlier submission.csv is replaced by this run's files (or removed when "
                        "the run writes none); move it away or choose another --out", path=path)


def _unreadable_note(gt_unreadable: int, skipped: int) -> str | None:
    if not gt_unreadable:
        return None
    return (f"{gt_unreadable} ground-truth ids name catalogue images the index skipped as unreadable ({skipped} "
            "listed in its manifest.json): no ranking can hold them, they count as misses")


def _thumb(path: Path, size: int = 96) -> str:
    import base64

    import cv2

    img = cv2.resize(pad_to_square(read_image(path)), (size, size), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def _ablation_html(rows: list[AblationRow] | None, adjustments: list[str], k: int) -> str:
    parts = []
    if adjustments:
        parts.append("<h2>Post-processing stages shrunk to fit the catalogue</h2><ul>"
                     + "".join(f"<li>{html.escape(m)}</li>" for m in adjustments) + "</ul>")
    if rows:
        names = list(rows[0].metrics)
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(f"<tr><td>{html.escape(r.chain)}</td>" + "".join(f"<td>{r.metrics[n]:.4f}</td>" for n in names)
                       + "</tr>" for r in rows)
        parts.append(f"<h2>Post-processing ablation (exact search, metrics after each stage)</h2>"
                     f"<table><tr><th>stages applied</th>{head}</tr>{body}</table>")
    return "".join(parts)


def _write_report(out: Path, items, ranked, scores, gt, index, metrics, samples: int, k: int,
                  ablation: list[AblationRow] | None = None, adjustments: list[str] = (), notes: list[str] = ()
                  ) -> Path:
    catalogue = dict(list_images(index.manifest["catalogue"])) if Path(index.manifest["catalogue"]).is_dir() else {}
    rows = []
    for qid, qpath in items[:samples]:
        cells = [f'<td><img src="{_thumb(qpath)}"><br>{html.escape(qid)}</td>']
        for cid, s in zip(ranked[qid], scores[qid]):
            hit = cid in set(gt[qid])
            img = f'<img src="{_thumb(catalogue[cid])}">' if cid in catalogue else "(image not found)"
            cells.append(f'<td class="{"hit" if hit else "miss"}">{img}<br>{html.escape(cid)}<br>{s:.3f}'
                         f'{" &#10003;" if hit else ""}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = "".join(f"<tr><th>{html.escape(m)}</th><td>{v:.4f}</td></tr>" for m, v in metrics.items())
    page = f"""<!doctype html><meta charset="utf-8"><title>visrec products evaluation</title>
<style>body{{font-family:sans-serif}} td{{text-align:center;font-size:11px;padding:3px}}
.hit{{background:#c8f7c5}} .miss{{background:#f7d4d4}}</style>
<h1>Product retrieval: {len(items)} queries, catalogue of {index.manifest["count"]}</h1>
<p>mAP@{k} "hits": AP divided by the number of hits in the top {k};
"min_gt": AP divided by min(|GT|, {k}) (the Kaggle mapk definition).
No public source fixes which form the challenge organisers computed.</p>
<table>{table}</table>
{"".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in notes)}
{_ablation_html(ablation, list(adjustments), k)}
<h2>Sample queries and their top {k} (green = ground truth)</h2><table>{"".join(rows)}</table>"""
    path = out / "report.html"
    path.write_text(page)
    return path
