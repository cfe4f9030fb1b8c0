"""The fused pair kernel's tile configurations on CUDA: the kernel alone and the whole exact TPR@FPR call.

For each configuration (``bm,bn,bk,warps,stages``, see :class:`visrec.evaluate.pair_kernel.Tiles`):

- ``kernel alone``: every panel of the upper triangle scanned with the final bar fixed (the level the real
  scan reaches after its first panels), timed from the first launch to the last synchronisation: the rate
  of the kernel itself, in pairs (i < j) per second;
- ``tpr_at_fpr``: the whole call with ``kernel="triton"`` (upload, normalisation, the first panel's bar,
  every panel, the exact re-check), the answer checked against the PyTorch scan's.

The bf16 product alone (PyTorch's matmul over the same blocks, nothing kept) is printed beside them, so the
ratio is read in one run. Each configuration's line starts with what the compiler says one thread of it needs
on the device's architecture (registers, bytes spilled to the stack, tensor-core dots): ``--compile-only``
prints just that, for ``--arch`` (default 90: H100/H200), and needs no GPU.

    python benchmarks/pair_kernel_tiles.py --n 500000 --target 1e-8 --tiles 128,128,64,8,3 64,64,32,4,3
    python benchmarks/pair_kernel_tiles.py --compile-only --tiles 128,128,64,8,3 128,128,64,4,4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_pairs import make, run_matmul  # noqa: E402

from visrec.evaluate import pair_kernel, tpr_at_fpr  # noqa: E402
from visrec.evaluate.verification import _segments, filter_margin, normalise  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_alone(fast_emb, seg_start, seg_end, bar: float, block: int, device: str) -> float:
    n = fast_emb.shape[0]
    pair_kernel.scan_panel(fast_emb, seg_start, seg_end, 0, block, bar)  # compiles this configuration
    sync(device)
    t0 = time.perf_counter()
    for r0 in range(0, n, block):
        pair_kernel.scan_panel(fast_emb, seg_start, seg_end, r0, block, bar)
    sync(device)
    return time.perf_counter() - t0


def resources(spec: str, arch: int) -> str:
    try:
        r = pair_kernel.compiled_resources(pair_kernel.Tiles(*(int(v) for v in spec.split(","))), arch=arch)
    except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported, not fatal
        return f"sm_{arch} compile failed: {type(e).__name__}: {str(e)[:200]}"
    return (f"sm_{arch} {r['registers']} registers, {r['spill_bytes']} B spilled, "
            f"{r['tensor_core_dots']} tensor-core dots")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--target", type=float, default=1e-8)
    ap.add_argument("--block", type=int, default=8192, help="rows per panel")
    ap.add_argument("--tiles", nargs="+", default=["128,128,64,8,3"])
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs Triton's interpreter (TRITON_INTERPRET=1: "
                                                     "a rehearsal of this script, no rate worth reading)")
    ap.add_argument("--compile-only", action="store_true", help="the compiler's report alone (no GPU needed)")
    ap.add_argument("--arch", type=int, default=None, help="CUDA compute capability x 10 to compile for "
                                                           "(default: the device's, else 90)")
    args = ap.parse_args()
    arch = args.arch or (int("".join(map(str, torch.cuda.get_device_capability()))) if args.device == "cuda"
                         and torch.cuda.is_available() else 90)
    if args.compile_only:
        for spec in args.tiles:
            print(f"tiles {spec}: {resources(spec, arch)}", flush=True)
        return
    dev = torch.device(args.device)
    if not pair_kernel.available(dev):
        raise SystemExit(f"the pair kernel cannot run on {args.device}: it needs CUDA, or TRITON_INTERPRET=1 on a CPU")
    emb, labels = make(args.n)
    pairs = args.n * (args.n - 1) / 2
    want = tpr_at_fpr(emb, labels, [args.target], device=dev, block_size=args.block, kernel="torch")[args.target]
    print(f"N {args.n:,}, {pairs:.3g} pairs, target {args.target:g}: threshold {want.threshold!r}, "
          f"TPR {want.tpr:.6f}, false accepts {want.false_accepts}", flush=True)
    t_mm = run_matmul(args.n, args.device, 1, block=args.block)[0]
    print(f"bf16 product alone: {t_mm:.3f} s, {pairs / t_mm / 1e9:.1f} Gpairs/s", flush=True)

    order = labels.argsort(kind="stable")
    _, lab_idx = np.unique(labels[order], return_inverse=True)
    x = normalise(emb)[torch.from_numpy(order)].to(dev)
    fast_emb = x.to(torch.bfloat16)
    seg_start, seg_end = _segments(lab_idx, dev)
    bar = float(want.threshold) - 3 * filter_margin(torch.bfloat16, x.shape[1], x.device)
    del x
    for spec in args.tiles:
        tiles = pair_kernel.Tiles(*(int(v) for v in spec.split(",")))
        setattr(pair_kernel, "INTERPRETER_TILES" if pair_kernel.INTERPRETED else "CUDA_TILES", tiles)
        try:
            t_k = kernel_alone(fast_emb, seg_start, seg_end, bar, args.block, args.device)
            t0 = time.perf_counter()
            got = tpr_at_fpr(emb, labels, [args.target], device=dev, block_size=args.block,
                             kernel="triton")[args.target]
            sync(args.device)
            t_all = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one configuration that does not compile must not end the sweep
            print(f"tiles {spec}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        same = (got.threshold, got.true_accepts, got.false_accepts) == \
            (want.threshold, want.true_accepts, want.false_accepts)
        compiled = f"{resources(spec, arch)}; " if args.device == "cuda" else ""  # the interpreter compiles nothing
        print(f"tiles {spec}: {compiled}kernel alone {t_k:.3f} s = {pairs / t_k / 1e9:.1f} Gpairs/s "
              f"({t_mm / t_k:.2f} of the product's rate); tpr_at_fpr {t_all:.2f} s = "
              f"{pairs / t_all / 1e9:.1f} Gpairs/s; {'same answer' if same else 'DIFFERENT ANSWER'}", flush=True)


if __name__ == "__main__":
    main()
