"""Retrieval metrics for product search (Perfect-500K / AI Meets Beauty).

mAP@k over queries. For one query with ranked list r (best first, no duplicates) and
ground-truth set G, let rel(i) = 1 if r[i] in G, P(i) = hits in r[:i] / i (1-based i):

- form="hits":   AP = sum_{i<=k} P(i) rel(i) / (hits in r[:k]), and 0 when there is no hit in the
  top k (the AP is divided by the number of hits in the top k).
- form="min_gt": AP = sum_{i<=k} P(i) rel(i) / min(|G|, k) (the AP is divided by min(|G|, k); this is
  the ``apk``/``mapk`` definition of the ml_metrics package used by Kaggle).

No public source fixes which of the two the Perfect-500K organisers computed, so a number is named by
its definition ("hits" or "min_gt"), never by who is said to have used it.

mAP@k is the mean AP over the queries of ``ground_truth``; a query with no ranking scores 0.
Pure maths over ids: imports neither visrec.models nor visrec.train.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from visrec.errors import VisrecError
from visrec.registry import Registry

FORMS = ("hits", "min_gt")


def _check_row(query_id, ranked: Sequence) -> None:
    ranked = list(ranked)
    if len(set(ranked)) != len(ranked):
        seen: set = set()
        repeated = next(r for r in ranked if r in seen or seen.add(r))
        who = f"query {query_id!r}: " if query_id is not None else ""
        raise VisrecError(f"{who}duplicate catalogue id {repeated!r} in its ranked list (each id may be ranked once)")


def average_precision_at_k(ranked: Sequence, ground_truth: Sequence, k: int = 7,
                           form: str = "hits") -> float:
    """AP@k of one ranked list (see module docstring for the two forms); a list repeating an id is an error
    (each repeat would count as another hit)."""
    _check_row(None, ranked)
    if form not in FORMS:
        raise VisrecError(f"unknown mAP form {form!r}; expected one of {FORMS}")
    if k < 1:
        raise VisrecError(f"k must be >= 1, got {k}")
    gt = set(ground_truth)
    hits = 0
    total = 0.0
    for i, item in enumerate(list(ranked)[:k], start=1):
        if item in gt:
            hits += 1
            total += hits / i
    if form == "hits":
        return total / hits if hits else 0.0
    denom = min(len(gt), k)
    return total / denom if denom else 0.0


def map_at_k(ranked_ids: Mapping, ground_truth: Mapping, k: int = 7, form: str = "hits") -> float:
    """Mean AP@k over the queries of ``ground_truth`` (ranked_ids: query id -> ids best first)."""
    if not ground_truth:
        raise VisrecError("map_at_k: ground truth is empty")
    for qid, ranked in ranked_ids.items():
        _check_row(qid, ranked)
    aps = [average_precision_at_k(ranked_ids.get(qid, []), gt, k, form)
           for qid, gt in ground_truth.items()]
    return sum(aps) / len(aps)


def recall_at_k(ranked_ids: Mapping, ground_truth: Mapping, k: int = 7) -> float:
    """Fraction of queries with at least one ground-truth id in the top k."""
    if not ground_truth:
        raise VisrecError("recall_at_k: ground truth is empty")
    for qid, ranked in ranked_ids.items():
        _check_row(qid, ranked)
    found = sum(bool(set(list(ranked_ids.get(q, []))[:k]) & set(g)) for q, g in ground_truth.items())
    return found / len(ground_truth)


# Metrics ``visrec eval products`` reports, by column name (``{k}``: the cut-off); each is
# ``f(ranked_ids, ground_truth, k) -> float``. A new one is a function registered here (or by a plugin).
RETRIEVAL_METRICS: Registry = Registry("retrieval metric")
RETRIEVAL_METRICS.register("map@{k}_hits")(partial(map_at_k, form="hits"))
RETRIEVAL_METRICS.register("map@{k}_min_gt")(partial(map_at_k, form="min_gt"))
RETRIEVAL_METRICS.register("recall@1")(lambda ranked_ids, ground_truth, k: recall_at_k(ranked_ids, ground_truth, 1))
RETRIEVAL_METRICS.register("recall@{k}")(recall_at_k)
