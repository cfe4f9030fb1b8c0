"""The fused pair-scan kernel (Triton) of :func:`visrec.evaluate.verification.tpr_at_fpr` on CUDA.

One launch scans a panel of rows against every column at or right of the panel's first row. Per tile of
``BM x BN`` pairs it computes the fast product (bfloat16 or float32 inputs, float32 accumulation), keeps
the pairs i < j, and writes out, compacted through one atomic counter per kind:

- the impostor pairs whose fast score is >= ``bar`` (the k-th largest fast score so far less three filter
  margins), with their fast scores: the candidates the caller keeps;
- every genuine pair (same identity: labels are sorted, so row i's identity is the columns
  ``[seg_start[i], seg_end[i])``) with its fast score: the caller counts them against the thresholds.

Nothing of the similarity matrix is stored, no threshold filter runs as a separate kernel, and the host
synchronises once per panel (to read the two counts). A count above the buffer's capacity means the
buffer overflowed: the caller runs the panel again with the capacity it now knows.

Triton is imported here only (it ships with CUDA builds of PyTorch). On a CPU the kernel runs in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before this module was imported (the tests do so); the
interpreter cannot multiply bfloat16 tiles, so there the tiles are widened to float32 first — the same
products (a product of two bfloat16 values is exact in float32) and the same float32 accumulation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from visrec.errors import VisrecError

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only PyTorch build: the PyTorch scan is used
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Tiles:
    """One launch's tiling: ``bm x bn`` pairs per program, ``bk`` dimensions per step of the product, and
    Triton's ``num_warps`` / ``num_stages`` (software pipelining of the loads)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int


# Measured on an H200 (scripts/gpu_bench.sh, 500,000 embeddings, FPR 1e-8): the whole tpr_at_fpr call ran at
# 19 Gpairs/s with 64 x 64 x 32 tiles and Triton's defaults, 29 with 128 x 128 x 64, 8 warps and 3 stages, and
# 10 with 4 warps and 4 stages; the kernel alone at 25 and 16 for the last two; the bf16 product alone at 561.
# The tile shape is not what holds the kernel back. The per-tile epilogue is the suspect (its count no longer
# flattens the tile); that change is not yet measured. The interpreter gets small tiles: it runs them in NumPy.
CUDA_TILES = Tiles(128, 128, 64, 8, 3)
INTERPRETER_TILES = Tiles(64, 64, 32, 4, 1)


def available(device: torch.device) -> bool:
    """Whether the kernel can run for ``device``: CUDA with Triton, or Triton's interpreter on a CPU."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


if triton is not None:
    @triton.jit
    def _scan_kernel(e_ptr, stride, n, d, seg_start_ptr, seg_end_ptr, row0, row_end, bar,
                     cand_ptr, cand_score_ptr, cand_count_ptr, cand_capacity,
                     gen_ptr, gen_score_ptr, gen_count_ptr, gen_capacity,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                     WIDEN: tl.constexpr):
        pid_m = tl.program_id(0)  # the fastest-varying index: the panel's row tiles share one column tile in L2
        pid_n = tl.program_id(1)
        first_row = row0 + pid_m * BM
        first_col = row0 + pid_n * BN
        if first_col + BN - 1 > first_row:  # a tile wholly at or below the diagonal holds no pair i < j
            i = first_row + tl.arange(0, BM)
            j = first_col + tl.arange(0, BN)
            row_ok = i < row_end
            col_ok = j < n
            k = tl.arange(0, BK)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, d, BK):
                kk = k0 + k
                if EVEN_K:
                    a_mask = row_ok[:, None]
                    b_mask = col_ok[:, None]
                else:
                    a_mask = row_ok[:, None] & (kk[None, :] < d)
                    b_mask = col_ok[:, None] & (kk[None, :] < d)
                # both tiles read rows of E (d contiguous); the column tile is transposed in registers
                a = tl.load(e_ptr + i[:, None] * stride + kk[None, :], mask=a_mask, other=0.0)
                b = tl.load(e_ptr + j[:, None] * stride + kk[None, :], mask=b_mask, other=0.0)
                if WIDEN:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            s0 = tl.load(seg_start_ptr + i, mask=row_ok, other=0)
            s1 = tl.load(seg_end_ptr + i, mask=row_ok, other=0)
            pair_ok = row_ok[:, None] & col_ok[None, :] & (j[None, :] > i[:, None])
            same = (j[None, :] >= s0[:, None]) & (j[None, :] < s1[:, None])
            _append(pair_ok & ~same & (acc >= bar), i, j, n, acc, BM * BN,
                    cand_ptr, cand_score_ptr, cand_count_ptr, cand_capacity)
            # genuine pairs lie in the few tiles that some row's identity segment reaches
            touch = tl.max((row_ok & (s1 > first_col) & (s0 < first_col + BN)).to(tl.int32), axis=0)
            if touch > 0:
                _append(pair_ok & same, i, j, n, acc, BM * BN, gen_ptr, gen_score_ptr, gen_count_ptr, gen_capacity)

    @triton.jit
    def _append(keep2d, i, j, n, acc, SIZE: tl.constexpr, pair_ptr, score_ptr, count_ptr, capacity):
        """Write the flagged (pair, score) entries of a tile after those other tiles wrote: one atomic add
        reserves the places, a prefix sum orders them. Past ``capacity`` nothing is written (the count says so).
        The count is summed in the tile's own 2-D layout: flattening a tile may move it through shared memory,
        which only the rare tile holding an entry should pay."""
        found = tl.sum(tl.sum(keep2d.to(tl.int32), axis=1), axis=0)
        if found > 0:
            flags = tl.reshape(keep2d.to(tl.int32), [SIZE])
            pair = tl.reshape(i[:, None].to(tl.int64) * n + j[None, :], [SIZE])
            score = tl.reshape(acc, [SIZE])
            base = tl.atomic_add(count_ptr, found)
            at = base + tl.cumsum(flags, axis=0) - 1
            keep = (flags > 0) & (at < capacity)
            tl.store(pair_ptr + at, pair, mask=keep)
            tl.store(score_ptr + at, score, mask=keep)


def scan_panel(fast_emb: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor, row0: int, rows: int,
               bar: float, capacity: int = 1 << 16):
    """Scan rows ``[row0, row0 + rows)`` against columns ``[row0, n)``, pairs i < j. Returns the candidate
    impostor pairs (fast score >= ``bar``) and the genuine pairs, each as global (i, j, fast score)."""
    if not available(fast_emb.device):
        raise VisrecError("the Triton pair kernel needs CUDA and Triton (or TRITON_INTERPRET=1 on a CPU)")
    n, d = fast_emb.shape
    dev = fast_emb.device
    row_end = min(n, row0 + rows)
    lo, hi = seg_start[row0:row_end], seg_end[row0:row_end]
    rows_i = torch.arange(row0, row_end, device=dev)
    gen_capacity = max(1, int((hi - torch.maximum(lo, rows_i + 1)).clamp(min=0).sum()))  # exact
    t = INTERPRETER_TILES if INTERPRETED else CUDA_TILES
    grid = (triton.cdiv(row_end - row0, t.bm), triton.cdiv(n - row0, t.bn))
    while True:
        cand = torch.empty(capacity, dtype=torch.int64, device=dev)
        cand_score = torch.empty(capacity, dtype=torch.float32, device=dev)
        gen = torch.empty(gen_capacity, dtype=torch.int64, device=dev)
        gen_score = torch.empty(gen_capacity, dtype=torch.float32, device=dev)
        counts = torch.zeros(2, dtype=torch.int32, device=dev)
        _scan_kernel[grid](fast_emb, fast_emb.stride(0), n, d, seg_start, seg_end, row0, row_end, float(bar),
                           cand, cand_score, counts[0:1], capacity, gen, gen_score, counts[1:2], gen_capacity,
                           BM=t.bm, BN=t.bn, BK=t.bk, EVEN_K=d % t.bk == 0, WIDEN=INTERPRETED,
                           num_warps=t.warps, num_stages=t.stages)
        found, genuine = (int(c) for c in counts.cpu())
        if found <= capacity:
            break
        capacity = found  # overflowed: the count is complete, so one more launch fits every candidate
    cand, gen = cand[:found], gen[:genuine]
    return (cand // n, cand % n, cand_score[:found]), (gen // n, gen % n, gen_score[:genuine])
