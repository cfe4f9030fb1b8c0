"""Post-processing of L2-normalised descriptors (rows), each stage with fit/apply.

DBA (database-side augmentation): each catalogue vector becomes the L2-normalised weighted sum of
itself and its k nearest catalogue neighbours, weights = max(sim, 0)^alpha (alpha=0: plain mean).
AlphaQE (alpha query expansion): same on the query side, neighbours taken from the catalogue.
"""
from __future__ import annotations

import numpy as np


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _expand(vectors: np.ndarray, catalogue: np.ndarray, k: int, alpha: float,
            include_self: bool) -> np.ndarray:
    sims = vectors @ catalogue.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, order, axis=1)
    weights = np.maximum(top, 0.0) ** alpha
    expanded = np.einsum("nk,nkd->nd", weights, catalogue[order])
    if not include_self:
        expanded = expanded + vectors
    return _l2n(expanded)


class DBA:
    def __init__(self, k: int = 2, alpha: float = 0.0):
        self.k, self.alpha = k, alpha

    def fit(self, catalogue: np.ndarray) -> "DBA":
        return self

    def apply(self, catalogue: np.ndarray) -> np.ndarray:
        # the top-1 neighbour of a catalogue vector is itself (sim 1), so k includes self
        return _expand(catalogue, catalogue, self.k, self.alpha, include_self=True)


class AlphaQE:
    def __init__(self, k: int = 2, alpha: float = 3.0):
        self.k, self.alpha = k, alpha
        self.catalogue: np.ndarray | None = None

    def fit(self, catalogue: np.ndarray) -> "AlphaQE":
        self.catalogue = catalogue
        return self

    def apply(self, queries: np.ndarray) -> np.ndarray:
        return _expand(queries, self.catalogue, self.k, self.alpha, include_self=False)
