"""1:N identification: closed-set CMC and open-set TPIR at FPIR.

Scores are cosines of L2-normalised embeddings; a gallery identity's score for a probe is the maximum
over that identity's gallery images. CMC rank-k = share of (mated) probes whose identity is among the k
best-scoring gallery identities. Open set: a probe is "mated" when its identity is enrolled. With the
strict rule of verification, FPIR(t) = share of non-mated probes whose best score is >= t; TPIR at FPIR=f
= share of mated probes whose best identity is correct with score >= t, at the smallest t whose FPIR <= f.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from visrec.errors import VisrecError
from visrec.evaluate.verification import _next_up, normalise


def _identity_scores(probe, gallery, gallery_labels):
    p, g = normalise(probe, what="probe embeddings"), normalise(gallery, what="gallery embeddings")
    ids, inverse = np.unique(np.asarray(gallery_labels), return_inverse=True)
    sims = p @ g.T  # (P, G)
    per_id = torch.full((p.shape[0], len(ids)), -2.0)
    per_id.scatter_reduce_(1, torch.from_numpy(inverse).long()[None].expand_as(sims), sims, reduce="amax")
    return ids, per_id.numpy()


def cmc(probe, probe_labels, gallery, gallery_labels, ranks=(1, 5)) -> dict[int, float]:
    """Closed-set CMC at the given ranks over probes whose identity is in the gallery."""
    ids, scores = _identity_scores(probe, gallery, gallery_labels)
    probe_labels = np.asarray(probe_labels)
    mated = np.isin(probe_labels, ids)
    if not mated.any():
        raise VisrecError("no probe identity is enrolled in the gallery")
    scores, probe_labels = scores[mated], probe_labels[mated]
    truth = scores[np.arange(len(scores)), np.searchsorted(ids, probe_labels)]
    rank_of_truth = (scores > truth[:, None]).sum(axis=1) + 1  # ties count in the probe's favour
    return {k: float((rank_of_truth <= k).mean()) for k in ranks}


def tpir_at_fpir(probe, probe_labels, gallery, gallery_labels, targets=(1e-2, 1e-1)) -> dict[float, dict]:
    ids, scores = _identity_scores(probe, gallery, gallery_labels)
    probe_labels = np.asarray(probe_labels)
    mated = np.isin(probe_labels, ids)
    if mated.all() or not mated.any():
        raise VisrecError("open-set evaluation needs both enrolled (mated) and non-enrolled probes")
    best = scores.max(axis=1)
    best_id = ids[scores.argmax(axis=1)]
    non = np.sort(best[~mated])[::-1]
    out = {}
    for f in sorted(targets):
        if f * len(non) < 1:
            out[f] = {"estimable": False, "reason": f"{len(non)} non-mated probes < 1/FPIR"}
            continue
        k = math.floor(f * len(non))
        t = _next_up(non[k]) if k < len(non) else float(best.min())  # every non-mated probe allowed: accept all
        hit = (best_id[mated] == probe_labels[mated]) & (best[mated] >= t)
        out[f] = {"estimable": True, "tpir": float(hit.mean()), "threshold": t, "fpir": float((non >= t).mean())}
    return out
