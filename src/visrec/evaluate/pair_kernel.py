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

import torch

from visrec.errors import VisrecError

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only PyTorch build: the PyTorch scan is used
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BM, BN, BK = 64, 64, 32


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
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WIDEN: tl.constexpr):
        pid_m = tl.program_id(0)
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
                a = tl.load(e_ptr + i[:, None] * stride + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < d),
                            other=0.0)
                b = tl.load(e_ptr + j[None, :] * stride + kk[:, None], mask=col_ok[None, :] & (kk[:, None] < d),
                            other=0.0)
                if WIDEN:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc += tl.dot(a, b, input_precision="ieee")
            s0 = tl.load(seg_start_ptr + i, mask=row_ok, other=0)
            s1 = tl.load(seg_end_ptr + i, mask=row_ok, other=0)
            pair_ok = row_ok[:, None] & col_ok[None, :] & (j[None, :] > i[:, None])
            same = (j[None, :] >= s0[:, None]) & (j[None, :] < s1[:, None])
            pair = tl.reshape(i[:, None].to(tl.int64) * n + j[None, :], [BM * BN])

            score = tl.reshape(acc, [BM * BN])
            _append(tl.reshape((pair_ok & ~same & (acc >= bar)).to(tl.int32), [BM * BN]), pair, score,
                    cand_ptr, cand_score_ptr, cand_count_ptr, cand_capacity)
            _append(tl.reshape((pair_ok & same).to(tl.int32), [BM * BN]), pair, score,
                    gen_ptr, gen_score_ptr, gen_count_ptr, gen_capacity)

    @triton.jit
    def _append(flags, pair, score, pair_ptr, score_ptr, count_ptr, capacity):
        """Write the flagged (pair, score) entries of a tile after those other tiles wrote: one atomic add
        reserves the places, a prefix sum orders them. Past ``capacity`` nothing is written (the count says so)."""
        found = tl.sum(flags, axis=0)
        if found > 0:
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
    grid = (triton.cdiv(row_end - row0, BM), triton.cdiv(n - row0, BN))
    while True:
        cand = torch.empty(capacity, dtype=torch.int64, device=dev)
        cand_score = torch.empty(capacity, dtype=torch.float32, device=dev)
        gen = torch.empty(gen_capacity, dtype=torch.int64, device=dev)
        gen_score = torch.empty(gen_capacity, dtype=torch.float32, device=dev)
        counts = torch.zeros(2, dtype=torch.int32, device=dev)
        _scan_kernel[grid](fast_emb, fast_emb.stride(0), n, d, seg_start, seg_end, row0, row_end, float(bar),
                           cand, cand_score, counts[0:1], capacity, gen, gen_score, counts[1:2], gen_capacity,
                           BM=BM, BN=BN, BK=BK, WIDEN=INTERPRETED)
        found, genuine = (int(c) for c in counts.cpu())
        if found <= capacity:
            break
        capacity = found  # overflowed: the count is complete, so one more launch fits every candidate
    cand, gen = cand[:found], gen[:genuine]
    return (cand // n, cand % n, cand_score[:found]), (gen // n, gen % n, gen_score[:genuine])
