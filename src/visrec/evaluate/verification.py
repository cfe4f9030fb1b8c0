"""Exact TPR at FPR over all pairs, at trillion-pair scale, without the N x N matrix.

Definitions (docs/metrics.md): a pair's score is the cosine of the L2-normalised float32 embeddings; a pair is
accepted when score >= t. TPR@FPR=f is the highest TPR over all thresholds whose FPR <= f — not the ROC
point nearest f. With impostor scores sorted descending s_1 >= s_2 >= ... and K = floor(f * negatives),
FP(t) <= K exactly when t > s_{K+1}; the smallest such float32 t (the next float32 above s_{K+1}) gives
the highest TPR. So only the K+1 largest impostor scores are needed: they are kept in a running top-K
buffer while blocks of the similarity matrix are computed, and filtered against the buffer's current
minimum, so memory is O(N*d + K) whatever the number of pairs. Genuine pairs (same label) are scored in a
second pass per identity and counted against each threshold. Ties are handled exactly: every impostor
tied at s_{K+1} is rejected, as the strict rule requires.

A blocked float32 product can differ from another float32 product in the last bits, so results are exact
up to pairs within float32 rounding of a threshold; ``near_threshold_pairs`` says how many there were
(it includes the impostor pair(s) at s_{K+1} that set the threshold one float32 step below it).
When negatives < 1/f, FPR = f cannot be resolved: the result is marked not estimable instead of a number.

Across processes (opt-in: ``group=`` a torch.distributed process group, or ``rank``/``world_size``/``gather=``
for another transport): every rank passes the same embeddings, labels and options; rank r scores the block
rows bi with bi % world == r and the genuine pairs of every world-th identity. The ranks' top-K buffers are
merged (the K+1 largest of the union of each rank's K+1 largest are the K+1 largest of all), their counts and
histograms summed, so every rank returns the single-process result bit for bit: each block is the same float32
product whichever rank computes it. A fingerprint of the inputs is compared first, so ranks that were given
different data fail with an error instead of merging unrelated buffers. Nothing here touches a process group
unless ``group`` is given: a caller that runs on one rank only (a trainer's validation) never waits for others.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from visrec.errors import VisrecError

NEAR = 4 * float(np.finfo(np.float32).eps)  # |score - t| below this: float32 rounding can flip the decision


@dataclass
class TprResult:
    target: float
    estimable: bool
    tpr: float | None = None
    threshold: float | None = None
    fpr: float | None = None
    true_accepts: int = 0
    false_accepts: int = 0
    genuine_count: int = 0
    impostor_count: int = 0
    near_threshold_pairs: int = 0
    reason: str = ""


@dataclass
class Curve:
    """ROC/DET points from score histograms (``bins`` equal bins on [-1, 1]): approximate, for plots."""

    thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    genuine_hist: np.ndarray = field(repr=False)
    impostor_hist: np.ndarray = field(repr=False)


def normalise(embeddings, *, what: str = "embeddings") -> torch.Tensor:
    """float32 torch tensor of unit rows; NaN/inf or zero rows raise an error naming the row."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise VisrecError(f"{what} must be a non-empty (N, D) array, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        raise VisrecError(f"{what} row {int(bad.nonzero()[0])} contains NaN or inf")
    norms = x.norm(dim=1)
    if (norms == 0).any():
        raise VisrecError(f"{what} row {int((norms == 0).nonzero()[0])} is a zero vector (no direction)")
    return x / norms[:, None]


def _next_up(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


class _TopK:
    """The k largest values seen so far (a multiset), merged block by block."""

    def __init__(self, k: int, device):
        self.k = k
        self.values = torch.empty(0, device=device)

    @property
    def floor(self) -> float:
        return float(self.values[-1]) if self.values.numel() >= self.k else -math.inf

    def add(self, candidates: torch.Tensor) -> None:
        if candidates.numel() == 0 or self.k == 0:
            return
        merged = torch.cat([self.values, candidates.float()])
        if merged.numel() > self.k:
            merged = torch.topk(merged, self.k, sorted=True).values
        else:
            merged = torch.sort(merged, descending=True).values
        self.values = merged


def _count_pairs(labels: np.ndarray) -> tuple[int, int]:
    _, counts = np.unique(labels, return_counts=True)
    total = len(labels) * (len(labels) - 1) // 2
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, total - genuine


def tpr_at_fpr(embeddings, labels, targets=(1e-4, 1e-6, 1e-8), *, block_size: int = 4096,
               device: str | torch.device | None = None, curve_bins: int = 0, progress=None,
               rank: int | None = None, world_size: int | None = None, group=None,
               gather: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None
               ) -> dict[float, TprResult] | tuple:
    """Exact TPR at each target FPR over all pairs i < j (module docstring).

    ``device``: None picks CUDA when available. ``curve_bins`` > 0 also returns a :class:`Curve`
    (then the return value is ``(results, curve)``).

    Sharded across processes, each scoring its share of the pairs, every rank getting the single-process
    result: ``group`` is a torch.distributed process group (``torch.distributed.group.WORLD`` for all of
    them, e.g. under torchrun), which every rank of it must call with the same arguments. Without a process
    group, ``rank``, ``world_size`` and ``gather`` — a function taking this rank's 1-D tensor and returning
    every rank's tensor of that shape in rank order (an all-gather) — do the same over any transport.
    Without ``group`` or ``gather`` nothing is exchanged, whatever process group exists.
    """
    rank, world, gather = _world(rank, world_size, group, gather)
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise VisrecError(f"block_size must be a positive integer, got {block_size!r}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels = np.asarray(labels).reshape(-1)
    emb = normalise(embeddings)
    if len(labels) != emb.shape[0]:
        raise VisrecError(f"{emb.shape[0]} embeddings but {len(labels)} labels")
    targets = sorted(float(t) for t in targets)
    if world > 1:
        _same_inputs(gather, emb, labels, targets, block_size, curve_bins)
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    emb = emb[torch.from_numpy(order)]
    _, lab_idx = np.unique(labels, return_inverse=True)
    genuine_total, impostor_total = _count_pairs(labels)
    ks = {t: math.floor(t * impostor_total) for t in targets}
    k_max = max(ks.values()) + 1 if targets else 1
    emb = emb.to(dev)
    lab = torch.from_numpy(lab_idx.astype(np.int64)).to(dev)

    # pass 1: the k_max largest impostor scores (+ impostor histogram for curves)
    top = _TopK(k_max, dev)
    imp_hist = torch.zeros(curve_bins, dtype=torch.float64, device=dev) if curve_bins else None
    n = emb.shape[0]
    blocks = list(range(0, n, block_size))
    for bi, r0 in enumerate(blocks):
        if bi % world != rank:
            continue
        rows, rlab = emb[r0:r0 + block_size], lab[r0:r0 + block_size]
        for c0 in blocks[bi:]:
            scores = rows @ emb[c0:c0 + block_size].T
            clab = lab[c0:c0 + block_size]
            floor = top.floor
            if imp_hist is not None or floor == -math.inf:
                keep = rlab[:, None] != clab[None, :]
                if c0 == r0:  # diagonal block: pairs j > i only
                    keep &= torch.ones_like(keep).triu_(1)
                if imp_hist is not None:
                    imp_hist += torch.histc(scores[keep], bins=curve_bins, min=-1, max=1).double()
                if floor > -math.inf:
                    keep &= scores > floor
                top.add(scores[keep])
            else:
                # the common case: one comparison pass finds the few candidates above the running floor;
                # the label and j > i tests run on those candidates only
                i, j = torch.nonzero(scores > floor, as_tuple=True)
                ok = rlab[i] != clab[j]
                if c0 == r0:
                    ok &= j > i
                top.add(scores[i[ok], j[ok]])
        if progress:
            progress(1)
    if world > 1:
        top = _merge_topk(top, k_max, dev, gather)
        if imp_hist is not None:
            imp_hist = _sum(gather, imp_hist)
    imp_sorted = top.values.cpu().numpy()

    # thresholds: next float32 above the (K+1)-th largest impostor
    thresholds: dict[float, float] = {}
    for t in targets:
        k = ks[t]
        if impostor_total == 0 or t * impostor_total < 1:
            continue
        kth = imp_sorted[k] if k < len(imp_sorted) else -np.inf  # fewer than K+1 impostors: accept all
        thresholds[t] = _next_up(kth) if np.isfinite(kth) else -1.0

    # pass 2: genuine scores per identity, counted against each threshold
    thr = torch.tensor([thresholds[t] for t in thresholds], device=dev, dtype=torch.float32)
    accepts = torch.zeros(len(thresholds), dtype=torch.int64, device=dev)
    near = torch.zeros(len(thresholds), dtype=torch.int64, device=dev)
    gen_hist = torch.zeros(curve_bins, dtype=torch.float64, device=dev) if curve_bins else None
    bounds = np.flatnonzero(np.diff(lab_idx)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])
    for k, (s, e) in enumerate(zip(starts, ends)):
        if k % world != rank or e - s < 2:
            continue
        block = emb[s:e]
        sims = block @ block.T
        iu = torch.triu_indices(e - s, e - s, offset=1, device=dev)
        g = sims[iu[0], iu[1]]
        if len(thresholds):
            accepts += (g[None, :] >= thr[:, None]).sum(dim=1)
            near += ((g[None, :] - thr[:, None]).abs() < NEAR).sum(dim=1)
        if gen_hist is not None:
            gen_hist += torch.histc(g, bins=curve_bins, min=-1, max=1).double()
    if world > 1:
        accepts, near = _sum(gather, accepts), _sum(gather, near)
        if gen_hist is not None:
            gen_hist = _sum(gather, gen_hist)

    results = {}
    for t in targets:
        if t not in thresholds:
            results[t] = TprResult(t, False, genuine_count=genuine_total, impostor_count=impostor_total,
                                   reason=f"{impostor_total} impostor pairs < 1/FPR = {1 / t:.3g}: "
                                          f"FPR {t:g} cannot be resolved")
            continue
        i = list(thresholds).index(t)
        thr_t = thresholds[t]
        fa = int((imp_sorted >= thr_t).sum())
        near_imp = int((np.abs(imp_sorted - thr_t) < NEAR).sum())
        ta = int(accepts[i])
        results[t] = TprResult(t, True, tpr=ta / genuine_total if genuine_total else None, threshold=thr_t,
                               fpr=fa / impostor_total, true_accepts=ta, false_accepts=fa,
                               genuine_count=genuine_total, impostor_count=impostor_total,
                               near_threshold_pairs=int(near[i]) + near_imp,
                               reason="" if genuine_total else "no genuine pairs (every identity has one image)")
    if curve_bins:
        return results, _curve(gen_hist.cpu().numpy(), imp_hist.cpu().numpy(), curve_bins)
    return results


def _world(rank, world_size, group, gather) -> tuple[int, int, Callable | None]:
    """(this rank, number of ranks, the all-gather that merges their partial results)."""
    if (rank is None) != (world_size is None):
        raise VisrecError(f"give rank and world_size together (got rank={rank!r}, world_size={world_size!r})")
    if rank is not None:
        whole = all(isinstance(v, (int, np.integer)) for v in (rank, world_size))
        if not whole or world_size < 1 or not 0 <= rank < world_size:
            raise VisrecError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank!r}, "
                              f"world_size={world_size!r}")
    if group is not None and gather is not None:
        raise VisrecError("give group (a torch.distributed process group) or gather (an all-gather function), "
                          "not both")
    if group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise VisrecError("group= was given but no torch.distributed process group is initialised "
                              "(call torch.distributed.init_process_group, or run under torchrun)")
        actual = dist.get_rank(group), dist.get_world_size(group)
        if rank is not None and (rank, world_size) != actual:
            raise VisrecError(f"rank={rank}, world_size={world_size} disagree with the process group "
                              f"(rank {actual[0]} of {actual[1]})")
        return actual[0], actual[1], (_process_group_gather(group) if actual[1] > 1 else None)
    if gather is not None:
        if rank is None:
            raise VisrecError("gather= needs rank= and world_size= (which share of the pairs this process scores)")
        return rank, world_size, gather
    if rank is not None and world_size > 1:
        raise VisrecError(f"rank={rank}, world_size={world_size}: the ranks' partial results must be merged; "
                          "give group= (a torch.distributed process group, e.g. torch.distributed.group.WORLD "
                          "under torchrun) or gather= (an all-gather function)")
    return 0, 1, None


def _process_group_gather(group) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """All-gather over a torch.distributed group: NCCL exchanges CUDA tensors, gloo (and mixed backends) CPU
    ones; the parts come back on the tensor's own device."""
    import torch.distributed as dist

    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        x = t.to(comm).contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return [p.to(t.device) for p in parts]

    return gather


def _gathered(gather, t: torch.Tensor) -> list[torch.Tensor]:
    parts = list(gather(t))
    if any(p.shape != t.shape or p.dtype != t.dtype for p in parts):
        raise VisrecError(f"gather returned parts of shapes {[tuple(p.shape) for p in parts]}, expected every "
                          f"rank's {tuple(t.shape)} {t.dtype}")
    return parts


def _sum(gather, t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, added in rank order (counts are integers: exact in int64 and in float64)."""
    total = torch.zeros_like(t)
    for part in _gathered(gather, t):
        total += part
    return total


def _digest48(data: bytes) -> float:
    return float(int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "little"))


FINGERPRINT = ("embeddings (rows)", "embedding dimension", "embeddings (content)", "labels", "targets",
               "block_size", "curve_bins")


def _same_inputs(gather, emb: torch.Tensor, labels: np.ndarray, targets, block_size: int, curve_bins: int):
    """Every rank must score the same data the same way, or the merged result would mean nothing: compare a
    fingerprint (the normalised float32 rows and the labels, as given, hashed) before any pair is scored."""
    h = hashlib.blake2b(digest_size=6)
    h.update(np.ascontiguousarray(emb.numpy()).data)
    _, label_idx = np.unique(labels, return_inverse=True)  # which rows share a label: the labels' meaning here
    mine = torch.tensor([emb.shape[0], emb.shape[1], float(int.from_bytes(h.digest(), "little")),
                         _digest48(np.ascontiguousarray(label_idx.reshape(-1), dtype=np.int64).tobytes()),
                         _digest48(repr(list(targets)).encode()), block_size, curve_bins], dtype=torch.float64)
    parts = _gathered(gather, mine)
    for r, part in enumerate(parts):
        differ = [name for name, a, b in zip(FINGERPRINT, parts[0].tolist(), part.tolist()) if a != b]
        if differ:
            raise VisrecError(f"rank {r} was given different {', '.join(differ)} than rank 0: every rank must "
                              "pass the same embeddings, labels, targets, block_size and curve_bins")


def _merge_topk(top: _TopK, k: int, dev, gather) -> _TopK:
    """Gather every rank's buffer (padded to k with -inf) and keep the k largest."""
    padded = torch.full((k,), -math.inf, device=dev)
    padded[:top.values.numel()] = top.values
    merged = _TopK(k, dev)
    allv = torch.cat(_gathered(gather, padded))
    merged.add(allv[torch.isfinite(allv)])
    return merged


def _curve(gen_hist: np.ndarray, imp_hist: np.ndarray, bins: int) -> Curve:
    edges = np.linspace(-1, 1, bins + 1)
    # accept when score >= edge: counts of bins at or above each lower edge
    tp = np.cumsum(gen_hist[::-1])[::-1]
    fp = np.cumsum(imp_hist[::-1])[::-1]
    tpr = tp / max(1.0, gen_hist.sum())
    fpr = fp / max(1.0, imp_hist.sum())
    return Curve(edges[:-1], fpr, tpr, gen_hist, imp_hist)


def tpr_at_fpr_pairs(scores_or_embeddings, issame, targets=(1e-4, 1e-6, 1e-8), *, pairs=None) -> dict[float, TprResult]:
    """The same strict rule on an explicit pair list (IJB 1:1 templates, LFR-style pair files).

    Give either ``scores`` (P,) directly, or embeddings (N, D) with ``pairs`` (P, 2) of row indices."""
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if pairs is not None:
        emb = normalise(scores_or_embeddings)
        pairs = np.asarray(pairs, dtype=np.int64)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] != len(issame):
            raise VisrecError(f"pairs must be ({len(issame)}, 2) row indices, got {pairs.shape}")
        if pairs.min() < 0 or pairs.max() >= emb.shape[0]:
            raise VisrecError(f"pair indices must be in [0, {emb.shape[0]}), got [{pairs.min()}, {pairs.max()}]")
        a, b = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        scores = (emb[a] * emb[b]).sum(dim=1).numpy()
    else:
        scores = np.asarray(scores_or_embeddings, dtype=np.float32).reshape(-1)
        if not np.isfinite(scores).all():
            raise VisrecError(f"score {int(np.argwhere(~np.isfinite(scores))[0][0])} is NaN or inf")
    if len(scores) != len(issame):
        raise VisrecError(f"{len(scores)} scores for {len(issame)} labels")
    gen, imp = scores[issame], np.sort(scores[~issame])[::-1]
    results = {}
    for t in sorted(float(x) for x in targets):
        if len(imp) == 0 or t * len(imp) < 1:
            results[t] = TprResult(t, False, genuine_count=len(gen), impostor_count=len(imp),
                                   reason=f"{len(imp)} impostor pairs < 1/FPR = {1 / t:.3g}")
            continue
        k = math.floor(t * len(imp))
        thr = _next_up(imp[k]) if k < len(imp) else -1.0
        ta, fa = int((gen >= thr).sum()), int((imp >= thr).sum())
        near = int((np.abs(scores - thr) < NEAR).sum())
        results[t] = TprResult(t, True, tpr=ta / len(gen) if len(gen) else None, threshold=thr, fpr=fa / len(imp),
                               true_accepts=ta, false_accepts=fa, genuine_count=len(gen), impostor_count=len(imp),
                               near_threshold_pairs=near)
    return results


@dataclass
class NearestResult:
    """TPR at the ROC point nearest a target FPR (the published IJB tables' reading); ``fpr`` may exceed
    ``target``."""

    target: float
    tpr: float
    fpr: float
    threshold: float
    genuine_count: int
    impostor_count: int


def roc_points(scores, issame, *, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds) with accept-when-score >= t, one point per distinct score from
    the highest down, preceded by the point (0, 0) at t = +inf — the points scikit-learn's ``roc_curve``
    returns. With ``drop_intermediate`` (its default), a point is dropped when it lies in the middle of a
    straight run (both the false- and true-positive counts have a zero second difference there)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(scores) != len(issame):
        raise VisrecError(f"{len(scores)} scores for {len(issame)} labels")
    if not np.isfinite(scores).all():
        raise VisrecError(f"score {int(np.argwhere(~np.isfinite(scores))[0][0])} is NaN or inf")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], issame[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    thr = s[last]
    if drop_intermediate and len(tps) > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps, fps, thr = np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, thr]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(len(fps), np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(len(tps), np.nan)
    return fpr, tpr, thr


def tpr_at_fpr_nearest(scores, issame, targets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> dict[float, NearestResult]:
    """TPR at the ROC point (:func:`roc_points`) whose FPR is nearest each target: scanning the points from
    the highest FPR down, the first with the smallest |FPR - target| (InsightFace's ``ijb_11.py`` reading of
    ``roc_curve``; among points of one FPR it takes the highest TPR). Not the strict rule: the FPR found may exceed the
    target, and a tied group of scores is accepted or rejected whole."""
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    fpr, tpr, thr = roc_points(scores, issame)
    if not np.isfinite(fpr).all() or not np.isfinite(tpr).all():
        raise VisrecError("the nearest-ROC-point rule needs both genuine and impostor pairs")
    fpr_d, tpr_d, thr_d = fpr[::-1], tpr[::-1], thr[::-1]
    out = {}
    for t in sorted(float(x) for x in targets):
        i = int(np.argmin(np.abs(fpr_d - t)))
        out[t] = NearestResult(t, float(tpr_d[i]), float(fpr_d[i]), float(thr_d[i]), int(issame.sum()),
                               int((~issame).sum()))
    return out
