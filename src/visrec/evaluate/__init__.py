"""Metrics over arrays (embeddings, scores, points, rankings). Imports no model and no trainer."""

from visrec.evaluate.verification import TprResult, tpr_at_fpr, tpr_at_fpr_pairs  # noqa: F401
