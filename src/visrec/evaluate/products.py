"""Product retrieval metrics over rankings, and the queries of a Perfect-500K-layout root (catalogue/, query/,
val.csv).

Metrics (definitions in ``visrec.evaluate.retrieval``): mAP@k in two forms named by their definition,
"hits" (AP divided by the number of hits in the top k) and "min_gt" (AP divided by min(|GT|, k), the
Kaggle ``mapk`` definition), recall@1 / recall@k (share of queries with a ground-truth id in the top 1 / k),
and every other metric registered in ``visrec.evaluate.retrieval.RETRIEVAL_METRICS``. A descriptor network is
evaluated by ``visrec.models.inference.evaluate_descriptor`` (exact search in memory) and an index directory by
``visrec.index.evaluation.evaluate_products`` (submission, report, post-processing ablation).
"""

from __future__ import annotations

from pathlib import Path

from visrec.data.products import QUERY_DIR, list_images
from visrec.errors import DataError
from visrec.evaluate.retrieval import RETRIEVAL_METRICS


def retrieval_metrics(ranked: dict[str, list[str]], gt: dict[str, list[str]], k: int = 7) -> dict[str, float]:
    """Every registered retrieval metric (``RETRIEVAL_METRICS``) of the rankings at cut-off ``k``, keyed by its
    column name with ``{k}`` filled in: ``map@7_hits``, ``map@7_min_gt``, ``recall@1``, ``recall@7``, ..."""
    return {name.format(k=k): RETRIEVAL_METRICS.get(name)(ranked, gt, k) for name in RETRIEVAL_METRICS.names()}


def query_items(root: Path, gt: dict[str, list[str]]) -> list[tuple[str, Path]]:
    """(query id, image path) of every ground-truth query, in ground-truth order; a query without an image in
    ``root/query`` is a DataError."""
    queries = dict(list_images(root / QUERY_DIR))
    missing = [q for q in gt if q not in queries]
    if missing:
        raise DataError(f"{len(missing)} queries of the ground truth have no image, e.g. {missing[:3]}",
                        path=root / QUERY_DIR)
    return [(q, queries[q]) for q in gt]
