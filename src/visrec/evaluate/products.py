"""Product retrieval evaluation on a Perfect-500K-layout root (catalogue/, query/, val.csv).

Metrics (definitions in ``visrec.evaluate.retrieval``): mAP@k in two forms named by their definition,
"hits" (AP divided by the number of hits in the top k) and "min_gt" (AP divided by min(|GT|, k), the
Kaggle ``mapk`` definition), and
recall@1 / recall@k (share of queries with a ground-truth id in the top 1 / k). The report is
``report.html`` with, for sample queries, the query and its top k with hits marked (thumbnails beside it).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visrec.errors import DataError
from visrec.evaluate.retrieval import map_at_k, recall_at_k


def retrieval_metrics(ranked: dict[str, list[str]], gt: dict[str, list[str]], k: int = 7) -> dict[str, float]:
    return {f"map@{k}_hits": map_at_k(ranked, gt, k, "hits"), f"map@{k}_min_gt": map_at_k(ranked, gt, k, "min_gt"),
            "recall@1": recall_at_k(ranked, gt, 1), f"recall@{k}": recall_at_k(ranked, gt, k)}


def _query_items(root: Path, gt: dict[str, list[str]]) -> list[tuple[str, Path]]:
    from visrec.data.products import QUERY_DIR, list_images

    queries = dict(list_images(root / QUERY_DIR))
    missing = [q for q in gt if q not in queries]
    if missing:
        raise DataError(f"{len(missing)} queries of the ground truth have no image, e.g. {missing[:3]}",
                        path=root / QUERY_DIR)
    return [(q, queries[q]) for q in gt]


@torch.no_grad()
def evaluate_descriptor(model: torch.nn.Module, root: str | Path, size: int = 224, k: int = 7,
                        device="cpu", batch_size: int = 32) -> dict[str, float]:
    """mAP@k / recall of a descriptor network on ``root`` with exact search (everything in memory: for
    validation sets; use an index directory for a full catalogue)."""
    from visrec.data.products import CATALOGUE_DIR, GROUND_TRUTH, list_images, read_ground_truth, read_image_checked
    from visrec.index.catalogue import describe

    root = Path(root)
    gt = read_ground_truth(root / GROUND_TRUTH)
    cat_items = list_images(root / CATALOGUE_DIR)
    was_training = model.training
    model.eval()

    def vectors(items):
        out = [describe(model, [read_image_checked(i, p) for i, p in items[s:s + batch_size]], size, device=device)
               for s in range(0, len(items), batch_size)]
        return np.concatenate(out)

    cat = torch.from_numpy(vectors(cat_items))
    q_items = _query_items(root, gt)
    q = torch.from_numpy(vectors(q_items))
    model.train(was_training)
    top = torch.topk(q @ cat.T, min(k, len(cat_items)), dim=1).indices.numpy()
    ranked = {qid: [cat_items[j][0] for j in row] for (qid, _), row in zip(q_items, top)}
    return retrieval_metrics(ranked, gt, k)


@dataclass
class ProductEval:
    metrics: dict[str, float]
    ranked: dict[str, list[str]]
    submission: Path
    report: Path
    queries: int
    unreadable_catalogue: list = field(default_factory=list)


def evaluate_products(index_dir: str | Path, root: str | Path, out: str | Path = "eval-products", k: int = 7,
                      samples: int = 8, progress=None) -> ProductEval:
    """Search every ground-truth query of ``root`` in the index; write submission.csv and report.html."""
    from visrec.data.products import GROUND_TRUTH, read_ground_truth, write_submission
    from visrec.index.catalogue import CatalogueIndex

    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gt = read_ground_truth(root / GROUND_TRUTH)
    index = CatalogueIndex(index_dir)
    items = _query_items(root, gt)
    ranked, scores = index.search_items(items, k, progress=progress)
    metrics = retrieval_metrics(ranked, gt, k)
    submission = out / "submission.csv"
    if all(len(r) >= k for r in ranked.values()):
        write_submission(submission, ranked, k)
    else:  # a catalogue smaller than k cannot make a valid challenge submission
        submission = None
    report = _write_report(out, items, ranked, scores, gt, index, metrics, samples, k)
    return ProductEval(metrics, ranked, submission, report, len(items), index.manifest.get("unreadable", []))


def _thumb(path: Path, size: int = 96) -> str:
    import base64

    import cv2

    from visrec.data.products import pad_to_square
    from visrec.data.images import read_image

    img = cv2.resize(pad_to_square(read_image(path)), (size, size), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def _write_report(out: Path, items, ranked, scores, gt, index, metrics, samples: int, k: int) -> Path:
    from visrec.data.products import list_images

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
<h2>Sample queries and their top {k} (green = ground truth)</h2><table>{"".join(rows)}</table>"""
    path = out / "report.html"
    path.write_text(page)
    return path
