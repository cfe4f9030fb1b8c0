#!/usr/bin/env bash
# Every GPU check and benchmark in one run, each under its own time limit, every figure into one file.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu-bench-out)
#
# Needs a CUDA machine with the project's venv (or PYTHON=... pointing at a Python with visrec's deps).
# A step that fails or runs out of time is recorded as such and the next one runs: one run gives every
# figure it can. Figures land in OUT_DIR/gpu_bench.txt; each step's full output in OUT_DIR/<step>.log.
set -u
OUT_DIR="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
REPORT="$OUT_DIR/gpu_bench.txt"
: > "$REPORT"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$REPORT"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT_DIR/$name.log" >> "$REPORT"
  echo "-- $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$REPORT"
}

{
  echo "# visrec GPU bench, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} >> "$REPORT"

# 1. the fused pair kernel on CUDA: the same answer as the PyTorch scan and as float64 scores of every pair
step kernel_check 240 "$PY" - <<'EOF'
import numpy as np, torch
from visrec.evaluate import tpr_at_fpr
from visrec.evaluate.verification import normalise
rng = np.random.default_rng(0)
n, ids = 30_000, 1500
labels = rng.integers(0, ids, n)
emb = rng.standard_normal((ids, 512)).astype(np.float32)[labels] + 1.4 * rng.standard_normal((n, 512)).astype(np.float32)
emb[10:13] = emb[500]  # duplicates: ties at the top
targets = [1e-2, 1e-4, 1e-6]
runs = {(k, p): tpr_at_fpr(emb, labels, targets, device="cuda", kernel=k, filter_precision=p, block_size=4096)
        for k in ("triton", "torch") for p in ("bf16", "fp32")}
cpu = tpr_at_fpr(emb, labels, targets, device="cpu", kernel="torch", block_size=4096)
for t in targets:
    got = {(r[t].threshold, r[t].true_accepts, r[t].false_accepts) for r in runs.values()}
    want = (cpu[t].threshold, cpu[t].true_accepts, cpu[t].false_accepts)
    print("PASS" if got == {want} else "FAIL", f"target {t:g}: cuda runs {sorted(got)} cpu {want}")
EOF

# 2. the exact TPR@FPR engine: fused kernel vs PyTorch scan vs the bf16 product alone (Gpairs/s, same run)
step eval_pairs_500k 420 "$PY" benchmarks/eval_pairs.py --sizes --alone 500000 --device cuda --target 1e-8 \
  --kernels triton torch --matmul --threads 8

# 3. the Trainer on CUDA (bf16 / fp16 autocast, stop + resume)
step trainer_smoke 300 "$PY" scripts/gpu_smoke.py "$OUT_DIR/gpu-smoke"

# 4. training step throughput, visrec alone (arcface_torch side by side when ARCFACE_TORCH names a checkout)
for bb in mbf r50; do
  for b in 128 512; do
    step "train_${bb}_${b}" 240 "$PY" benchmarks/train_throughput.py --backbone "$bb" --batch "$b" --steps 30 \
      ${ARCFACE_TORCH:+--arcface-torch "$ARCFACE_TORCH"}
  done
done

echo "done: $REPORT"
