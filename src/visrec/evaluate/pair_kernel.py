"""The fused pair-scan kernel (Triton) of :func:`visrec.evaluate.verification.tpr_at_fpr` on CUDA.

One launch scans a panel of rows against every column at or right of the panel's first row. Per tile of
``BM x BN`` pairs it computes the fast product (bfloat16 or float32 inputs, float32 accumulation), keeps the
pairs i < j of different identities (labels are sorted, so row i's identity is the columns
``[seg_start[i], seg_end[i])``) and asks whether any of them reaches ``bar`` (the k-th largest fast score so
far less three filter margins). A tile that holds one adds its number to a list, through one atomic counter;
nothing else leaves the kernel, and the host synchronises once per panel to read the list's length.

At deep targets (FPR 1e-6 and below) that list is a few tiles in a million, and :func:`scan_panel` re-scores
just those tiles with PyTorch (the inputs gathered, the same products in float32) to read off their pairs.
The tile epilogue is kept that small on purpose: an earlier version wrote each pair out of the kernel (64-bit
pair ids and a prefix sum over the flattened tile) and, compiled for sm_90, held 255 registers and spilled
4.8 KB per thread to the stack, which the H200 figures in BENCHMARKS.md show (25 Gpairs/s for the kernel
alone, the bf16 product alone 561). :func:`compiled_resources` reports a configuration's registers, spills and
tensor-core instructions from the compiler without a GPU; a test holds the CUDA configuration to no spills.

Genuine pairs are not the kernel's business: they are known from the segments without scanning anything
(:func:`visrec.evaluate.verification._genuine_pairs` scores them directly).

Triton is imported here only (it ships with CUDA builds of PyTorch). On a CPU the kernel runs in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before this module was imported (the tests do so); the
interpreter cannot multiply bfloat16 tiles, so there the tiles are widened to float32 first — the same
products (a product of two bfloat16 values is exact in float32) and the same float32 accumulation.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


# 128 x 128 x 64, 8 warps, 3 stages: on sm_90 the tile-list kernel holds 128 registers and spills nothing
# (compiled_resources); with 4 warps it needs 246. Not yet timed on a GPU: benchmarks/pair_kernel_tiles.py does.
# The interpreter gets small tiles: it runs them in NumPy.
CUDA_TILES = Tiles(128, 128, 64, 8, 3)
INTERPRETER_TILES = Tiles(64, 64, 32, 4, 1)
RESCORE_BYTES = 1 << 28  # at most this much gathered input and scores per batch of re-scored tiles


def available(device: torch.device) -> bool:
    """Whether the kernel can run for ``device``: CUDA with Triton, or Triton's interpreter on a CPU."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


if triton is not None:
    @triton.jit
    def _scan_kernel(e_ptr, stride, n, d, seg_start_ptr, seg_end_ptr, row0, row_end, bar, tile_ptr, tile_count_ptr,
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
                # both tiles read rows of E (d contiguous); the column tile is transposed in registers. Row
                # offsets in 64 bits: past 2^31 elements (4.2M embeddings of 512-d) 32 bits would wrap
                a = tl.load(e_ptr + i[:, None].to(tl.int64) * stride + kk[None, :], mask=a_mask, other=0.0)
                b = tl.load(e_ptr + j[:, None].to(tl.int64) * stride + kk[None, :], mask=b_mask, other=0.0)
                if WIDEN:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            s0 = tl.load(seg_start_ptr + i, mask=row_ok, other=0)
            s1 = tl.load(seg_end_ptr + i, mask=row_ok, other=0)
            pair_ok = row_ok[:, None] & col_ok[None, :] & (j[None, :] > i[:, None])
            same = (j[None, :] >= s0[:, None]) & (j[None, :] < s1[:, None])
            keep = pair_ok & ~same & (acc >= bar)
            if tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0) > 0:
                at = tl.atomic_add(tile_count_ptr, 1)
                tl.store(tile_ptr + at, pid_m * tl.num_programs(1) + pid_n)


def scan_panel(fast_emb: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor, row0: int, rows: int,
               bar: float):
    """The impostor pairs (i, j) with i in ``[row0, row0 + rows)``, i < j, different identities and fast score
    >= ``bar``, as global (i, j, fast score): the kernel lists the tiles that hold one, PyTorch re-scores those
    tiles (:func:`rescore_tiles`)."""
    if not available(fast_emb.device):
        raise VisrecError("the Triton pair kernel needs CUDA and Triton (or TRITON_INTERPRET=1 on a CPU)")
    n, d = fast_emb.shape
    dev = fast_emb.device
    row_end = min(n, row0 + rows)
    t = INTERPRETER_TILES if INTERPRETED else CUDA_TILES
    grid = (triton.cdiv(row_end - row0, t.bm), triton.cdiv(n - row0, t.bn))
    tiles = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=dev)  # room for every tile: no overflow
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    _scan_kernel[grid](fast_emb, fast_emb.stride(0), n, d, seg_start, seg_end, row0, row_end, float(bar),
                       tiles, count, BM=t.bm, BN=t.bn, BK=t.bk, EVEN_K=d % t.bk == 0, WIDEN=INTERPRETED,
                       num_warps=t.warps, num_stages=t.stages)
    hit = tiles[:int(count.item())].long()  # the panel's one synchronisation
    return rescore_tiles(fast_emb, seg_start, seg_end, row0, row_end, bar, hit // grid[1], hit % grid[1], t)


def rescore_tiles(fast_emb, seg_start, seg_end, row0: int, row_end: int, bar: float, tile_rows: torch.Tensor,
                  tile_cols: torch.Tensor, t: Tiles):
    """The pairs of the listed tiles (tile (a, b) holds rows ``row0 + a*bm ...`` and columns ``row0 + b*bn ...``)
    that :func:`scan_panel` keeps, with their fast scores: the fast rows gathered and multiplied in float32 —
    a bfloat16 value is exact in float32 and in TF32, so each product is exact and each sum a float32 sum of
    ``d`` terms, inside the filter's margin whatever order the library adds them in."""
    n, d = fast_emb.shape
    dev = fast_emb.device
    none = torch.empty(0, dtype=torch.int64, device=dev)
    out_i, out_j, out_s = [none], [none], [torch.empty(0, device=dev)]
    per_batch = max(1, RESCORE_BYTES // (4 * (t.bm + t.bn) * d + 8 * t.bm * t.bn))
    for b0 in range(0, tile_rows.numel(), per_batch):
        r = row0 + tile_rows[b0:b0 + per_batch, None] * t.bm + torch.arange(t.bm, device=dev)  # [T, bm]
        c = row0 + tile_cols[b0:b0 + per_batch, None] * t.bn + torch.arange(t.bn, device=dev)  # [T, bn]
        r_ok, c_ok = r < row_end, c < n
        r, c = r.clamp(max=n - 1), c.clamp(max=n - 1)  # ragged edges read a valid row, masked out below
        s = torch.bmm(fast_emb[r].float(), fast_emb[c].float().transpose(1, 2))
        rr, cc = r[:, :, None], c[:, None, :]
        keep = (r_ok[:, :, None] & c_ok[:, None, :] & (cc > rr) & (s >= bar)
                & ((cc < seg_start[r][:, :, None]) | (cc >= seg_end[r][:, :, None])))
        tile, a, b = torch.nonzero(keep, as_tuple=True)
        out_i.append(r[tile, a])
        out_j.append(c[tile, b])
        out_s.append(s[tile, a, b])
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_s)


def compiled_resources(tiles: Tiles = CUDA_TILES, *, dtype: str = "bf16", d: int = 512, arch: int = 90) -> dict:
    """Compile the kernel for CUDA compute capability ``arch`` without a GPU (Triton's compiler and the ptxas
    shipped in its wheel) and report what one thread needs: ``registers``, ``spill_bytes`` (stores to the
    stack), and ``tensor_core_dots`` (warp-group MMA for sm_90, else MMA ops in the Triton GPU IR)."""
    if triton is None:
        raise VisrecError("compiled_resources needs Triton (it ships with CUDA builds of PyTorch)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ("stride", "n", "d", "row0", "row_end")
    sig = {name: ("i32" if name in ints else "fp32" if name == "bar" else
                  "*i64" if name.startswith("seg") else "*i32" if name.startswith("tile") else f"*{dtype}")
           for name in _scan_kernel.arg_names[:11]}
    consts = {"BM": tiles.bm, "BN": tiles.bn, "BK": tiles.bk, "EVEN_K": d % tiles.bk == 0, "WIDEN": False}
    sig.update({name: "constexpr" for name in consts})
    aligned = ("e_ptr", "stride", "n", "d", "seg_start_ptr", "seg_end_ptr", "tile_ptr")  # as launches see them
    attrs = {(_scan_kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    kernel = triton.compile(ASTSource(fn=_scan_kernel, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": tiles.warps, "num_stages": tiles.stages})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory(prefix="visrec-ptx-") as scratch:
        tmp = Path(scratch)
        (tmp / "k.ptx").write_text(kernel.asm["ptx"])
        run = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}{'a' if arch == 90 else ''}", str(tmp / "k.ptx"),
                              "-o", str(tmp / "k.cubin")], capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise VisrecError(f"ptxas failed on the pair kernel: {run.stderr[-500:]}")
    registers = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    ttgir = kernel.asm["ttgir"]
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else 0,
            "tensor_core_dots": ttgir.count("warp_group_dot") if arch >= 90 else ttgir.count("nvidia_mma"),
            "ptxas": run.stderr.strip()}

