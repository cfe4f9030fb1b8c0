"""Exact TPR at FPR over all pairs, at trillion-pair scale, without the N x N matrix.

Definitions (docs/metrics.md): a pair's score is the cosine of the L2-normalised float32 embeddings; a pair is
accepted when score >= t. TPR@FPR=f is the highest TPR over all thresholds whose FPR <= f — not the ROC
point nearest f. With impostor scores sorted descending s_1 >= s_2 >= ... and K = floor(f * negatives),
FP(t) <= K exactly when t > s_{K+1}; the smallest such float32 t (the next float32 above s_{K+1}) gives
the highest TPR. So only the K+1 largest impostor scores are needed: the pairs that can be among them are
kept in a running buffer while blocks of the similarity matrix are computed, each block filtered against the
buffer's current bound, so memory is O(N*d + K + genuine pairs) whatever the number of pairs. Genuine pairs (same label)
are picked up in the same pass (labels are sorted first, so they lie in known runs) and counted against each
threshold once the thresholds are known. Ties are handled exactly: every impostor
tied at s_{K+1} is rejected, as the strict rule requires. For a large K (FPR 1e-2 or 1e-3 over many pairs) the
buffer's first bound is guessed from a random sample of pairs instead of read off the first block, so it
never takes in several times K pairs; the guess is checked after the scan and the scan repeated without it
if it was too high, so it changes the time, never the answer.

A pair's score is exact: its dot product accumulated in float64 and rounded once to float32
(:func:`exact_scores`), so the answer does not depend on the device, the block size or the number of ranks.
Computing that for every pair would be slow; the scan computes each block of pairs with a fast product
(bfloat16 where the hardware has it and the targets are deep in the tail, else float32), whose error from the
exact score is bounded (:func:`filter_margin`). It keeps (fast score, pair) for every pair within three
bounds of the running K-th largest fast score; at the end, for each target, the pairs whose fast score is
that close to the (K+1)-th largest are scored exactly, and every pair above them is counted, not scored.
``near_threshold_pairs`` counts the pairs within a few float32 steps of a
threshold (it includes the impostor pair(s) at s_{K+1} that set the threshold one float32 step below it):
another program that scores pairs in float32 by another summation order may decide those differently.
When negatives < 1/f, FPR = f cannot be resolved: the result is marked not estimable instead of a number.

Across processes (opt-in: ``group=`` a torch.distributed process group, or ``rank``/``world_size``/``gather=``
for another transport): every rank passes the same embeddings, labels and options; rank r scores the block
rows bi with bi % world == r, with the genuine pairs in them. The ranks' top-K buffers are
merged (the K+1 largest of the union of each rank's K+1 largest are the K+1 largest of all), their counts and
histograms summed, so every rank returns the single-process result bit for bit: each pair's exact score is
the same whichever rank computes it. A fingerprint of the inputs is compared first, so ranks that were given
different data fail with an error instead of merging unrelated buffers. Nothing here touches a process group
unless ``group`` is given: a caller that runs on one rank only (a trainer's validation) never waits for others.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from visrec.errors import VisrecError

NEAR = 4 * float(np.finfo(np.float32).eps)  # |score - t| below this: float32 rounding can flip the decision


def check_target_fpr(value, what: str = "target FPR") -> float:
    """``value`` as a float when it can be a false positive rate target: a finite number in (0, 1] (0 would
    need infinitely many impostor pairs, above 1 is no rate); else ``VisrecError`` naming ``what`` (the
    option or file field it came from). Every command that takes ``--target-fpr`` checks it when parsing, and
    every function here (and the calibrations) before any work."""
    try:
        fpr = float(value)
    except (TypeError, ValueError):
        fpr = math.nan
    if isinstance(value, bool) or not (math.isfinite(fpr) and 0.0 < fpr <= 1.0):
        raise VisrecError(f"{what} must be a finite number in (0, 1] (a share of impostor pairs), got {value!r}")
    return fpr


def check_target_fprs(values, what: str = "target FPR") -> list[float]:
    """:func:`check_target_fpr` of every value, sorted (the order the results are reported in)."""
    return sorted(check_target_fpr(v, what) for v in values)


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


class _Candidates:
    """The impostor pairs that can decide a threshold: every pair seen whose fast score is at least the k-th
    largest fast score so far less ``slack`` (three filter margins), as (fast score, pair id i * n + j).
    Pruned back to that bound whenever it has doubled; ``bar`` is the bound new pairs must reach.

    ``start_bar`` (from :func:`_sampled_bar`) is a guess at that bound made before any pair is seen: pairs
    below it are never kept, so the invariant holds only if, after the scan, the k-th largest kept score less
    ``slack`` is still at or above it and at least k pairs were kept (:meth:`holds_every_pair_that_matters`);
    every pair above the guess was kept, so then the kept set is exactly what the invariant asks for."""

    def __init__(self, k: int, slack: float, device, start_bar: float = -math.inf):
        self.k, self.slack = k, slack
        self.fast = torch.empty(0, device=device)
        self.ids = torch.empty(0, dtype=torch.int64, device=device)
        self.bar = self.start_bar = start_bar
        self.kth = -math.inf  # the k-th largest fast score kept, as of the last prune
        self._pruned_at = 0

    def add(self, fast: torch.Tensor, ids: torch.Tensor) -> None:
        if fast.numel() == 0:
            return
        self.fast = torch.cat([self.fast, fast.float()])
        self.ids = torch.cat([self.ids, ids])
        if self.fast.numel() >= self.k and self.fast.numel() >= 2 * max(self._pruned_at, self.k // 2):
            self.prune()

    def prune(self) -> None:
        if self.fast.numel() < self.k:
            return
        self.kth = _kth_largest(self.fast, self.k)
        self.bar = max(self.start_bar, self.kth - self.slack)
        keep = self.fast >= self.bar
        self.fast, self.ids = self.fast[keep], self.ids[keep]
        self._pruned_at = self.fast.numel()

    def holds_every_pair_that_matters(self) -> bool:
        """After the scan and a prune: whether the start guess kept every pair within ``slack`` of the k-th
        largest (always true without a guess; fewer than k pairs kept leaves ``kth`` at -inf: false)."""
        return self.start_bar == -math.inf or self.kth - self.slack >= self.start_bar


SAMPLED_PAIRS = 1 << 24  # at most this many pairs scored to guess a large K's bar (64 MB of float32 scores)
SAMPLE_MIN_ABOVE = 1000  # sampled pairs expected above the K-th largest's level, or no guess is made
SAMPLE_MAX_SHARE = 0.05  # the sample's pairs at most this share of the impostor pairs (of the scan's work)


def _sampled_bar(fast_emb: torch.Tensor, lab_idx: np.ndarray, k: int, impostor_total: int, slack: float) -> float:
    """A guess at the final bar for a large K, read off a random sample of pairs, so that the scan keeps about
    2K pairs from the first block on instead of starting from the first block's own K best (at FPR 1e-2 the
    buffer would otherwise take in several times K pairs and be pruned again and again). -inf (no guess) when
    the sample would hold fewer than 1,000 pairs above the K-th largest's level (a deep target: the usual bar
    is cheap there) or cost more than 5% of the scan. The guess sits a few standard deviations below the
    sampled 2K-th level less ``slack``; whether it held is checked after the scan
    (:meth:`_Candidates.holds_every_pair_that_matters`), so it changes the speed, never the result. The
    sample comes from a fixed seed and a local generator: the same guess every run, no global RNG drawn."""
    n = fast_emb.shape[0]
    share = k / max(1, impostor_total)
    size = min(SAMPLED_PAIRS, math.ceil(8000 / share))  # share > 0: k >= 1
    if share * size < SAMPLE_MIN_ABOVE or size > SAMPLE_MAX_SHARE * impostor_total:
        return -math.inf
    side = min(n, math.ceil(math.sqrt(size)))
    rng = np.random.default_rng(0)
    rows, cols = rng.choice(n, side, replace=False), rng.choice(n, side, replace=False)
    scores = (fast_emb[torch.from_numpy(rows)] @ fast_emb[torch.from_numpy(cols)].T).float()
    impostor = torch.from_numpy(lab_idx[rows][:, None] != lab_idx[cols][None, :]).to(scores.device)
    sample = scores[impostor]
    expected = share * sample.numel()
    rank = math.ceil(2 * expected + 4 * math.sqrt(expected))
    if sample.numel() == 0 or rank > sample.numel():
        return -math.inf
    return _kth_largest(sample, rank) - slack


def _count_pairs(labels: np.ndarray) -> tuple[int, int]:
    _, counts = np.unique(labels, return_counts=True)
    total = len(labels) * (len(labels) - 1) // 2
    genuine = int((counts * (counts - 1) // 2).sum())
    return genuine, total - genuine


def default_block_size(device: torch.device) -> int:
    """Rows (and columns) per block of the scan when the caller gives none. 4096 on a CPU. On CUDA each block
    costs a few host synchronisations and launches whatever its size, and at 8192 x 8192 those dominate: on an
    H200 the PyTorch scan took 3.66 s over 1,953 such blocks (500,000 embeddings), about 1.9 ms a block, where
    the bf16 products alone took 0.15 ms a block. So a block as large as the card holds comfortably: 32768 from
    40 GiB of device memory (a block's scores take 2 GiB in bfloat16, 4 in float32, plus a mask of 1 GiB),
    16384 from 16 GiB, else 8192. Read from the card's total memory, so every rank of a sharded run with the
    same cards picks the same size (they must: ``_same_inputs``)."""
    if device.type != "cuda":
        return 4096
    total = torch.cuda.get_device_properties(device).total_memory
    return 32768 if total >= 40 * 2 ** 30 else 16384 if total >= 16 * 2 ** 30 else 8192


def tpr_at_fpr(embeddings, labels, targets=(1e-4, 1e-6, 1e-8), *, block_size: int | None = None,
               device: str | torch.device | None = None, curve_bins: int = 0, progress=None,
               filter_precision: str = "auto", kernel: str = "auto", rank: int | None = None,
               world_size: int | None = None, group=None,
               gather: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None
               ) -> dict[float, TprResult] | tuple:
    """Exact TPR at each target FPR over all pairs i < j (module docstring).

    ``block_size``: rows and columns of the scores scored at once; None picks :func:`default_block_size` for
    the device. It changes the speed and the memory, never the result.
    ``device``: None picks CUDA when available. ``curve_bins`` > 0 also returns a :class:`Curve`
    (then the return value is ``(results, curve)``; its impostor histogram bins the fast product's scores).
    ``filter_precision``: the dtype of the product that finds the candidate pairs — "bf16", "fp32", or "auto"
    (bf16 where the hardware multiplies it natively). It changes the speed, never the result: every pair that
    can matter is re-scored exactly (:func:`exact_scores`). ``kernel``: "triton" scans with the fused Triton
    kernel (:mod:`visrec.evaluate.pair_kernel`: product and filter in one pass listing the few tiles that hold
    a candidate, one host sync per panel of ``block_size`` rows), "torch" with PyTorch operations block by
    block, "auto" the PyTorch scan (measured faster than the kernel's previous version on an H200: 34 against
    29 Gpairs/s at 500,000 embeddings, FPR 1e-8; the current kernel is not yet timed on a GPU).
    The same answer either way.

    Sharded across processes, each scoring its share of the pairs, every rank getting the single-process
    result: ``group`` is a torch.distributed process group (``torch.distributed.group.WORLD`` for all of
    them, e.g. under torchrun), which every rank of it must call with the same arguments. Without a process
    group, ``rank``, ``world_size`` and ``gather`` — a function taking this rank's 1-D tensor and returning
    every rank's tensor of that shape in rank order (an all-gather) — do the same over any transport.
    Without ``group`` or ``gather`` nothing is exchanged, whatever process group exists.
    """
    targets = check_target_fprs(targets)
    rank, world, gather = _world(rank, world_size, group, gather)
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
        raise VisrecError(f"block_size must be a positive integer or None, got {block_size!r}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    block_size = default_block_size(dev) if block_size is None else int(block_size)
    labels = np.asarray(labels).reshape(-1)
    emb = normalise(embeddings)
    if len(labels) != emb.shape[0]:
        raise VisrecError(f"{emb.shape[0]} embeddings but {len(labels)} labels")
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

    # one pass over the blocks i <= j: the k_max largest impostor scores, and every genuine pair's fast score
    # (+ impostor histogram for curves, from the float32 product: "auto" picks it when curves are asked for)
    fast_dtype = _filter_dtype(filter_precision, dev, curve_bins, k_max / max(1, impostor_total))
    margin = filter_margin(fast_dtype, emb.shape[1], dev)
    fast_emb = emb.to(fast_dtype)
    seg_start, seg_end = _segments(lab_idx, dev)
    slack = 3 * margin
    n = emb.shape[0]
    blocks = list(range(0, n, block_size))
    use_kernel = _use_kernel(kernel, dev, curve_bins)
    product, blas_threads = _block_product(fast_emb)
    # a large K (FPR 1e-2, 1e-3): start from a bar read off a sample of pairs, checked after the scan
    start_bar = _sampled_bar(fast_emb, lab_idx, k_max, impostor_total, slack) if world == 1 else -math.inf
    report = progress
    while True:
        cands = _Candidates(k_max, slack, dev, start_bar)
        with blas_threads():
            genuine_i, genuine_j, genuine_fast, imp_hist = _scan(cands, fast_emb, seg_start, seg_end, blocks,
                                                                 block_size, rank, world, use_kernel, curve_bins,
                                                                 report, product)
        cands.prune()
        if cands.holds_every_pair_that_matters():
            break
        # the sample misled (rare; never when start_bar is -inf): scan again, the bar from the blocks alone
        start_bar, report = -math.inf, None
    if world > 1:
        cands = _merge_candidates(cands, gather)
        if imp_hist is not None:
            imp_hist = _sum(gather, imp_hist)
        cands.prune()

    # thresholds: next float32 above the (K+1)-th largest exact impostor score; exact scores only near it
    thresholds, false_accepts, near_impostors = _impostor_thresholds(cands, ks, impostor_total, emb, n)

    # genuine pairs against each threshold: a fast score beyond the margin decides; the rest are scored exactly
    thr = torch.tensor([thresholds[t] for t in thresholds], device=dev, dtype=torch.float32)
    none = torch.empty(0, dtype=torch.int64, device=dev)
    gi, gj = torch.cat([none, *genuine_i]), torch.cat([none, *genuine_j])
    gf = torch.cat([none.float(), *genuine_fast])
    unsure = ((gf[None, :] - thr[:, None]).abs() <= margin).any(dim=0) if curve_bins == 0 else \
        torch.ones_like(gf, dtype=torch.bool)  # a curve bins every genuine pair's exact score
    exact = _exact_pairs(emb, gi[unsure], gj[unsure])
    sure = gf[~unsure]
    accepts = (sure[None, :] >= thr[:, None]).sum(dim=1) + (exact[None, :] >= thr[:, None]).sum(dim=1)
    near = ((exact[None, :] - thr[:, None]).abs() < NEAR).sum(dim=1)  # NEAR < margin: all of them are here
    gen_hist = torch.histc(exact, bins=curve_bins, min=-1, max=1).double() if curve_bins else None
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
        fa, near_imp = false_accepts[t], near_impostors[t]
        ta = int(accepts[i])
        results[t] = TprResult(t, True, tpr=ta / genuine_total if genuine_total else None, threshold=thr_t,
                               fpr=fa / impostor_total, true_accepts=ta, false_accepts=fa,
                               genuine_count=genuine_total, impostor_count=impostor_total,
                               near_threshold_pairs=int(near[i]) + near_imp,
                               reason="" if genuine_total else "no genuine pairs (every identity has one image)")
    if curve_bins:
        return results, _curve(gen_hist.cpu().numpy(), imp_hist.cpu().numpy(), curve_bins)
    return results


def _scan(cands, fast_emb, seg_start, seg_end, blocks, block_size, rank, world, use_kernel, curve_bins, progress,
          product):
    """One pass over this rank's blocks i <= j: impostor candidates into ``cands``; returns every genuine
    pair's (i list, j list, fast score list) and the impostor histogram for curves (None without).
    ``product(rows, cols)`` makes a block's fast scores (:func:`_block_product`)."""
    n = fast_emb.shape[0]
    genuine_i, genuine_j, genuine_fast = [], [], []
    imp_hist = torch.zeros(curve_bins, dtype=torch.float64, device=fast_emb.device) if curve_bins else None
    with _exact_cuda_products(fast_emb.device):
        for bi, r0 in enumerate(blocks):
            if bi % world != rank:
                continue
            if use_kernel and cands.bar > -math.inf:  # the fused kernel, once a bound is known
                from visrec.evaluate import pair_kernel  # imports Triton: only where the kernel runs

                i, j, fs = pair_kernel.scan_panel(fast_emb, seg_start, seg_end, r0, block_size, cands.bar)
                gi, gj, gs = _genuine_pairs(fast_emb, seg_start, seg_end, r0, min(n, r0 + block_size))
                genuine_i.append(gi)
                genuine_j.append(gj)
                genuine_fast.append(gs)
                cands.add(fs, i * n + j)
                if progress:
                    progress(1)
                continue
            rows = fast_emb[r0:r0 + block_size]
            for c0 in blocks[bi:]:
                fast = product(rows, fast_emb[c0:c0 + block_size])
                gi, gj = _same_label_positions(seg_start, seg_end, r0, r0 + fast.shape[0], c0, c0 + fast.shape[1])
                upper = c0 + gj > r0 + gi  # each genuine pair once, as i < j
                genuine_i.append(r0 + gi[upper])
                genuine_j.append(c0 + gj[upper])
                genuine_fast.append(fast[gi[upper], gj[upper]].float())
                fast[gi, gj] = -math.inf  # genuine pairs (and i == j) are never impostor candidates
                if imp_hist is not None:
                    keep = torch.ones_like(fast, dtype=torch.bool).triu_(1) if c0 == r0 else slice(None)
                    imp_hist += torch.histc(fast[keep].float(), bins=curve_bins, min=-1, max=1).double()
                _scan_block(cands, fast, r0, c0, n)
            if progress:
                progress(1)
    return genuine_i, genuine_j, genuine_fast, imp_hist


# --- the exact score and the filter that finds the few pairs that need it -------------------------------------

U32 = 2.0 ** -24  # float32 unit roundoff
EXACT_CHUNK = 8192  # candidate pairs re-scored per float64 product (2 x 8192 x d x 8 bytes at most)


def exact_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The score of each pair (a[k], b[k]) of float32 unit rows: their dot product accumulated in float64,
    rounded once to float32. Every product of two float32 values is exact in float64 and the sum's error is
    below d * 2^-53, so this is the correctly rounded float32 of the exact dot product unless that lies within
    ~1e-13 of a float32 rounding midpoint: the same value whatever device, block size or rank computes it."""
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    for k in range(0, a.shape[0], EXACT_CHUNK):
        out[k:k + EXACT_CHUNK] = (a[k:k + EXACT_CHUNK].double() * b[k:k + EXACT_CHUNK].double()).sum(1).float()
    return out


def _exact_pairs(emb: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """:func:`exact_scores` of the pairs (emb[i[k]], emb[j[k]]), gathering the rows a chunk at a time (the
    band around a threshold can hold many pairs; their rows are never all copied at once)."""
    out = torch.empty(i.numel(), dtype=torch.float32, device=emb.device)
    for k in range(0, i.numel(), EXACT_CHUNK):
        out[k:k + EXACT_CHUNK] = exact_scores(emb[i[k:k + EXACT_CHUNK]], emb[j[k:k + EXACT_CHUNK]])
    return out


def filter_margin(dtype: torch.dtype, dim: int, device: torch.device) -> float:
    """An upper bound on |fast product - exact score| for unit rows of ``dim`` components: the filter keeps
    every pair whose fast score is within it of the running floor. With u the unit roundoff of the product's
    inputs: rounding both inputs moves a dot product of unit vectors by at most 2u + u^2 (Cauchy-Schwarz);
    float32 accumulation of ``dim`` terms adds at most gamma = dim * 2^-24 / (1 - dim * 2^-24); a bfloat16
    output adds 2^-9 of |score| <= 1; the exact score's own rounding adds 2^-24 and its float64 sum dim * 2^-53.
    The sum is doubled against what the bound leaves out (flushed denormals, a library's extra rounding)."""
    gamma = dim * U32 / (1 - dim * U32)
    if dtype == torch.bfloat16:
        u_in, u_out = 2.0 ** -9, 2.0 ** -9
    elif device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        u_in, u_out = 2.0 ** -11, U32  # TF32 (or bf16x3) inputs, float32 output
    else:
        u_in, u_out = 0.0, U32
    input_error = 2 * u_in + u_in ** 2
    bound = input_error * (1 + gamma) + gamma + u_out * (1 + input_error + gamma) + U32 + dim * 2.0 ** -53
    return 2 * bound


def _filter_dtype(precision: str, device: torch.device, curve_bins: int, tail: float) -> torch.dtype:
    """The dtype of the fast product. "auto": bfloat16 where the hardware multiplies it natively (CUDA with
    bf16, CPUs with AMX or AVX512-BF16: 3x float32's rate on the Intel Xeon of BENCHMARKS.md) and the deepest target
    keeps under 1e-4 of the impostors (``tail``; above that, bfloat16's wider margin puts several times K
    pairs in the band scored exactly, which costs more than the product saves), float32 otherwise and when a
    curve is asked for (it bins the fast scores)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise VisrecError(f"filter_precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            cpu = torch.cpu
            native = device.type == "cpu" and any(getattr(cpu, f, lambda: False)() for f in
                                                  ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
        precision = "bf16" if native and not curve_bins and tail < 1e-4 else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


#: Which BLAS makes the scan's float32 block products on a CPU: "auto" times both once per process (below),
#: "torch" (its MKL) or "numpy" (its OpenBLAS). The choice changes the speed only (docstring of _block_product).
CPU_BLAS = "auto"
#: The fewest embeddings for which "auto" times the two libraries: the timing takes ~0.1 s at one thread, a
#: scan of 8192 embeddings ~0.6 s of products.
BLAS_PROBE_MIN_ROWS = 8192
_NUMPY_BLAS_FASTER: dict[tuple[int, int], bool] = {}


def _torch_product(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return rows @ cols.T


def _numpy_product(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    # both sides are views of the contiguous float32 embeddings, the result a fresh array torch takes over
    return torch.from_numpy(rows.numpy() @ cols.numpy().T)


def _numpy_blas_is_faster(dim: int, threads: int) -> bool:
    """Whether numpy's BLAS, held to ``threads``, multiplies 1024 x ``dim`` float32 blocks at least 1.15x
    torch's rate (best of 3 after one warm-up each), remembered per (dim, threads) for the process."""
    key = (dim, threads)
    if key not in _NUMPY_BLAS_FASTER:
        from threadpoolctl import threadpool_limits

        a = torch.randn(1024, dim, generator=torch.Generator().manual_seed(0))

        def best(product) -> float:
            product(a, a)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                product(a, a)
                times.append(time.perf_counter() - t0)
            return min(times)

        with threadpool_limits(limits=threads, user_api="blas"):
            numpy_secs = best(_numpy_product)
        _NUMPY_BLAS_FASTER[key] = numpy_secs * 1.15 < best(_torch_product)
    return _NUMPY_BLAS_FASTER[key]


def _block_product(fast_emb: torch.Tensor) -> tuple[Callable, Callable]:
    """``(product, threads)``: the scan's block product and a context that holds its BLAS to torch's thread
    count. On a CUDA device, or a bfloat16 filter, torch's product. A CPU's float32 product goes through
    whichever of torch's BLAS (MKL) and numpy's (OpenBLAS) is faster here (``CPU_BLAS``): they differ by CPU
    vendor; on an AMD EPYC (Zen 2) core torch's reached 65 GFLOPS and numpy's 93 on these blocks
    (BENCHMARKS.md). The choice never changes the result: the filter's margin (:func:`filter_margin`) bounds
    any float32 summation order of the products, and the pairs near a threshold are scored exactly."""
    if CPU_BLAS not in ("auto", "torch", "numpy"):
        raise VisrecError(f"CPU_BLAS must be 'auto', 'torch' or 'numpy', got {CPU_BLAS!r}")
    torch_choice = (_torch_product, contextlib.nullcontext)
    if fast_emb.device.type != "cpu" or fast_emb.dtype != torch.float32 or CPU_BLAS == "torch":
        return torch_choice
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it numpy's BLAS could not be held to torch's threads
        return torch_choice
    threads = torch.get_num_threads()
    if CPU_BLAS == "auto" and (fast_emb.shape[0] < BLAS_PROBE_MIN_ROWS
                               or not _numpy_blas_is_faster(fast_emb.shape[1], threads)):
        return torch_choice
    return _numpy_product, lambda: threadpool_limits(limits=threads, user_api="blas")


def _use_kernel(kernel: str, device: torch.device, curve_bins: int) -> bool:
    if kernel not in ("auto", "triton", "torch"):
        raise VisrecError(f"kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")
    if kernel == "triton":
        from visrec.evaluate import pair_kernel  # imports Triton: only where the kernel is asked for

        if not pair_kernel.available(device):
            raise VisrecError(f"kernel='triton' on {device}: the Triton pair kernel needs CUDA and Triton "
                              "(or TRITON_INTERPRET=1 for Triton's interpreter on a CPU)")
        if curve_bins:
            raise VisrecError("kernel='triton' bins no curve: pass kernel='torch' (or 'auto') with curve_bins")
        return True
    return False  # "auto": the PyTorch scan, until the kernel is measured faster (docstring of tpr_at_fpr)


class _exact_cuda_products:
    """cuBLAS may reduce bfloat16 products in reduced precision (split-K partial sums in bf16), which the
    filter's margin does not cover: off for the duration of the scan, restored after."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self.saved


def _segments(lab_idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of the label-sorted embeddings, the [start, end) of its identity's rows."""
    bounds = np.flatnonzero(np.diff(lab_idx)) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(lab_idx)]])
    counts = ends - starts
    return (torch.from_numpy(np.repeat(starts, counts)).to(device),
            torch.from_numpy(np.repeat(ends, counts)).to(device))


def _same_label_positions(seg_start, seg_end, r0: int, r1: int, c0: int, c1: int):
    """Block-local (row, column) of every same-identity pair in rows [r0, r1) x columns [c0, c1): labels are
    sorted, so row r's identity occupies the columns [seg_start[r], seg_end[r])."""
    lo = seg_start[r0:r1].clamp(min=c0)
    hi = seg_end[r0:r1].clamp(max=c1)
    counts = (hi - lo).clamp(min=0)
    total = int(counts.sum())
    rows = torch.repeat_interleave(torch.arange(r1 - r0, device=lo.device), counts, output_size=total)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
    cols = torch.repeat_interleave(lo - c0, counts, output_size=total) + torch.arange(total, device=lo.device) - first
    return rows, cols


def _genuine_pairs(fast_emb: torch.Tensor, seg_start, seg_end, r0: int, r1: int, chunk: int = 1 << 15):
    """Every genuine pair (i, j), i in [r0, r1), i < j, with its fast score: read off the identity segments and
    scored one dot product each — the fast rows widened to float32 (exact products) and summed in float32,
    inside the filter's margin like any fast product."""
    n = fast_emb.shape[0]
    gi, gj = _same_label_positions(seg_start, seg_end, r0, r1, r0, n)
    upper = gj > gi  # rows and columns both start at r0
    gi, gj = r0 + gi[upper], r0 + gj[upper]
    scores = [torch.empty(0, device=fast_emb.device)]
    for k in range(0, gi.numel(), chunk):
        scores.append((fast_emb[gi[k:k + chunk]].float() * fast_emb[gj[k:k + chunk]].float()).sum(dim=1))
    return gi, gj, torch.cat(scores)


def _scan_block(cands: _Candidates, fast: torch.Tensor, r0: int, c0: int, n: int) -> None:
    """Add this block's impostor pairs (i < j; genuine pairs already -inf in ``fast``) whose fast score reaches
    the candidates' bar. Before the buffer holds k pairs there is no bar yet: a bound on the k-th largest is
    read from this block's best pairs first (any k fast scores bound it from below)."""
    diagonal, bar = c0 == r0, cands.bar
    if bar == -math.inf:
        need = cands.k - cands.fast.numel()
        i, j = _bootstrap_pairs(fast, need, diagonal)
        if i.numel() < need:  # every impostor pair of the block: all of them go in
            cands.add(fast[i, j], (r0 + i) * n + c0 + j)
            return
        bar = _kth_largest(torch.cat([cands.fast, fast[i, j].float()]), cands.k) - cands.slack
    i, j = _pairs_at_least(fast, bar, diagonal)
    cands.add(fast[i, j], (r0 + i) * n + c0 + j)


def _kth_largest(x: torch.Tensor, k: int) -> float:
    """The k-th largest value of a 1-D tensor (1 <= k <= x.numel()). On a CPU numpy's introselect: over
    millions of values (large k: FPR 1e-2) it is an order of magnitude faster than torch.topk there."""
    if x.device.type == "cpu":
        flat = x.float().numpy()
        return float(np.partition(flat, flat.size - k)[flat.size - k])
    return float(torch.topk(x, k, sorted=False).values.min())


def _nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the True entries of a 2-D mask, row-major. numpy's flatnonzero on a CPU: torch.nonzero
    there is several times slower on a block with many hits."""
    if mask.device.type != "cpu":
        return torch.nonzero(mask, as_tuple=True)
    flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
    return flat // mask.shape[1], flat % mask.shape[1]


def _pairs_at_least(fast: torch.Tensor, bar: float, diagonal: bool, tile: int = 64):
    """Block-local (i, j) of the impostor pairs whose fast score is >= ``bar`` (finite), each pair once: on a
    diagonal block as i < j. One reduction gives each row's maximum over every ``tile`` columns; only the tiles
    whose maximum reaches the bar are compared element by element (a handful per block at FPR <= 1e-4). When
    more than 1/8 of the tiles reach it (a large FPR, or a low early bar), gathering them costs more than
    comparing the whole block, which is done instead."""
    if bar == -math.inf:
        i, j = _nonzero(torch.isfinite(fast))
    else:
        rows, width = fast.shape
        whole = width - width % tile
        tiles = fast[:, :whole].reshape(rows, whole // tile, tile)
        hit = tiles.amax(dim=2).float() >= bar
        if 8 * int(hit.sum()) > hit.numel():
            i, j = _nonzero(fast >= bar)
        else:
            ti, tj = torch.nonzero(hit, as_tuple=True)
            k, offset = torch.nonzero(tiles[ti, tj].float() >= bar, as_tuple=True)
            i, j = ti[k], tj[k] * tile + offset
            if whole < width:  # the last columns of a ragged block, compared directly
                ri, rj = torch.nonzero(fast[:, whole:].float() >= bar, as_tuple=True)
                i, j = torch.cat([i, ri]), torch.cat([j, rj + whole])
    if diagonal:  # the lower triangle mirrors the upper one
        upper = j > i
        i, j = i[upper], j[upper]
    return i, j


def _bootstrap_pairs(fast: torch.Tensor, need: int, diagonal: bool, stride: int = 8):
    """At least ``need`` impostor pairs of the block with the highest fast scores (or all of them, if fewer):
    a level is read off a strided sample (1/stride^2 of the block) so that about 4x ``need`` pairs lie above
    it, and lowered fourfold until enough do. Cheaper than a top-k over the block, which is slow on CPUs."""
    if fast.numel() <= 4 * need:  # a small block (or a large k): every pair
        return _pairs_at_least(fast, -math.inf, diagonal)
    sample = fast[::stride, ::stride].float()
    if diagonal:  # sample (a, b) is pair (a*stride, b*stride): keep it as a < b
        sample.masked_fill_(torch.ones_like(sample, dtype=torch.bool).tril_(), -math.inf)
    levels = torch.sort(sample[torch.isfinite(sample)], descending=True).values
    want = 4 * need
    while True:
        at = math.ceil(want / stride ** 2)
        bar = float(levels[at]) if at < levels.numel() else -math.inf
        i, j = _pairs_at_least(fast, bar, diagonal)
        if i.numel() >= need or bar == -math.inf:
            return i, j
        want *= 4


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


def _merge_candidates(cands: _Candidates, gather) -> _Candidates:
    """Every rank's candidates (padded to the longest with -inf), united: each rank kept every pair at or above
    its own k-th largest less the slack, which is at most the union's, so the union keeps every pair needed."""
    sizes = _gathered(gather, torch.tensor([cands.fast.numel()], device=cands.fast.device))
    longest = int(max(int(x) for x in sizes))
    fast = torch.full((longest,), -math.inf, device=cands.fast.device)
    ids = torch.full((longest,), -1, dtype=torch.int64, device=cands.fast.device)
    fast[:cands.fast.numel()], ids[:cands.ids.numel()] = cands.fast, cands.ids
    all_fast, all_ids = torch.cat(_gathered(gather, fast)), torch.cat(_gathered(gather, ids))
    merged = _Candidates(cands.k, cands.slack, cands.fast.device)
    keep = torch.isfinite(all_fast)
    merged.add(all_fast[keep], all_ids[keep])
    return merged


def _impostor_thresholds(cands: _Candidates, ks: dict, impostor_total: int, emb: torch.Tensor, n: int):
    """For each target: the threshold (the next float32 above the (K+1)-th largest exact impostor score), the
    impostors accepted at it and those within NEAR of it. With v the (K+1)-th largest fast score, the exact one
    lies within one margin of v (an order statistic moves no more than every value does); pairs with fast
    score above v + slack are all above it, those below v - slack all below, and only the band between is
    scored exactly."""
    order = torch.argsort(cands.fast, descending=True)
    fast, ids = cands.fast[order], cands.ids[order]
    exact = torch.full_like(fast, math.nan)
    thresholds, false_accepts, near = {}, {}, {}
    for t, k in ks.items():
        if impostor_total == 0 or t * impostor_total < 1:
            continue
        if k >= fast.numel():  # fewer than K+1 impostors: accept all
            thresholds[t], false_accepts[t], near[t] = -1.0, impostor_total, 0
            continue
        v = float(fast[k])
        band = (fast >= v - cands.slack) & (fast <= v + cands.slack)
        todo = band & torch.isnan(exact)
        if todo.any():
            pick = ids[todo]
            exact[todo] = _exact_pairs(emb, pick // n, pick % n)
        above = int((fast > v + cands.slack).sum())
        in_band = torch.sort(exact[band], descending=True).values
        kth = float(in_band[k - above])
        thr = _next_up(kth)
        thresholds[t] = thr
        false_accepts[t] = above + int((in_band >= thr).sum())
        near[t] = int(((in_band - thr).abs() < NEAR).sum())
    return thresholds, false_accepts, near


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
    targets = check_target_fprs(targets)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if pairs is not None:
        emb = normalise(scores_or_embeddings)
        pairs = np.asarray(pairs, dtype=np.int64)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] != len(issame):
            raise VisrecError(f"pairs must be ({len(issame)}, 2) row indices, got {pairs.shape}")
        if pairs.min() < 0 or pairs.max() >= emb.shape[0]:
            raise VisrecError(f"pair indices must be in [0, {emb.shape[0]}), got [{pairs.min()}, {pairs.max()}]")
        a, b = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        scores = _exact_pairs(emb, a, b).numpy()  # the score tpr_at_fpr gives each pair (exact_scores)
    else:
        scores = np.asarray(scores_or_embeddings, dtype=np.float32).reshape(-1)
        if not np.isfinite(scores).all():
            raise VisrecError(f"score {int(np.argwhere(~np.isfinite(scores))[0][0])} is NaN or inf")
    if len(scores) != len(issame):
        raise VisrecError(f"{len(scores)} scores for {len(issame)} labels")
    gen, imp = scores[issame], np.sort(scores[~issame])[::-1]
    results = {}
    for t in targets:
        if len(imp) == 0 or t * len(imp) < 1:
            results[t] = TprResult(t, False, genuine_count=len(gen), impostor_count=len(imp),
                                   reason=f"{len(imp)} impostor pairs < 1/FPR = {1 / t:.3g}")
            continue
        k = math.floor(t * len(imp))
        # k = every impostor: accepting them all is allowed, so the threshold accepts every pair, whatever the
        # score range (a negated distance lies below -1)
        thr = _next_up(imp[k]) if k < len(imp) else float(scores.min())
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
    targets = check_target_fprs(targets)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    fpr, tpr, thr = roc_points(scores, issame)
    if not np.isfinite(fpr).all() or not np.isfinite(tpr).all():
        raise VisrecError("the nearest-ROC-point rule needs both genuine and impostor pairs")
    fpr_d, tpr_d, thr_d = fpr[::-1], tpr[::-1], thr[::-1]
    out = {}
    for t in targets:
        i = int(np.argmin(np.abs(fpr_d - t)))
        out[t] = NearestResult(t, float(tpr_d[i]), float(fpr_d[i]), float(thr_d[i]), int(issame.sum()),
                               int((~issame).sum()))
    return out
