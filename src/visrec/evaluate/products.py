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

from collections.abc import Collection
from pathlib import Path

from visrec.data.products import QUERY_DIR, list_images, read_ground_truth
from visrec.errors import DataError, shown
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


def read_checked_ground_truth(path: str | Path, catalogue: Collection[str], skipped: Collection[str] = ()
                              ) -> tuple[dict[str, list[str]], int]:
    """The ground truth of ``path`` (``read_ground_truth``) checked against the catalogue searched: every
    ground-truth id must be one of ``catalogue`` (the ids searched) or of ``skipped`` (catalogue images the
    index skipped as unreadable, which no ranking can hold); any other id (a typo, another catalogue, other
    case) is a DataError naming the file, the line and the id, never a silent 0; so is a file that lists no
    query. Returns the ground truth and
    how many of its ids name skipped images (they stay in the ground truth and count as misses)."""
    lines: dict[str, int] = {}
    gt = read_ground_truth(path, lines)
    if not gt:  # metrics over no query would read as a score (or fail deep in the search)
        raise DataError("the ground truth lists no query (expected lines 'query_id,gt1,gt2,...')", path=path)
    known, skipped = set(catalogue), set(skipped)
    if not known:
        raise DataError("the catalogue searched holds no image: nothing to evaluate", path=path)
    unreadable = 0
    for qid, ids in gt.items():
        for gid in ids:
            if gid in known:
                continue
            if gid not in skipped:
                raise DataError(f"ground-truth id {shown(gid)} of query {shown(qid)} names no catalogue image "
                                f"(the catalogue holds {len(known):,} ids, e.g. {shown(min(known))})", path=path,
                                record=f"line {lines[qid]}")
            unreadable += 1
    return gt, unreadable
