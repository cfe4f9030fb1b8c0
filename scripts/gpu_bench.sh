#!/usr/bin/env bash
# Every GPU check and benchmark in one run, under one time budget, every figure into one file.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu-bench-out)
#   GPU_BENCH_REHEARSAL=1 bash scripts/gpu_bench.sh DIR    (CPU, tiny sizes: every step's wiring, no figures)
#
# Needs a CUDA machine with the project's venv (or PYTHON=... pointing at a Python with visrec's deps).
# A step that fails or runs out of time is recorded as such and the next one runs: one run gives every
# figure it can. The whole run stays inside GPU_BENCH_BUDGET seconds (default 540: a device command may run
# 600 s, and a script killed from outside loses its log archive): each step's limit is cut to what is left,
# and a step with under 30 s left is skipped with a line saying so. The steps run: the pair kernel's exactness
# check (seconds; what the kernel rates below are worth), the pair kernel's rates and its tile sweep, the
# training step throughput (visrec vs arcface_torch and the real input path), catalogue extraction, the
# Trainer smoke run, the eager step, and MobileFaceNet's step in other layouts, precisions and compiled.
# GPU_BENCH_ONLY="name ..." runs the named steps alone (a second run that fills in what the first could not).
# OUT_DIR receives two files: gpu_bench.txt
# (every step's command, the tail of its output and its exit) and gpu_bench_logs.tar.gz (each step's whole
# output); runs and data go to a scratch folder.
#
# arcface_torch runs side by side when ARCFACE_TORCH names its folder, or when
# third_party/insightface/recognition/arcface_torch exists (carry it to the device machine with the run).
set -u
OUT_DIR="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/visrec-gpu-bench.XXXXXX")"
mkdir -p "$WORK/logs"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export COLUMNS=200  # the benchmarks' Rich tables go to a log: wide enough that no cell wraps
DEADLINE=$((SECONDS + ${GPU_BENCH_BUDGET:-540}))
# Wheels carried in .whl/ (what the machine's Python lacks; it has no network): unpacked beside the code
if [ -z "${GPU_BENCH_REHEARSAL:-}" ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
ARCFACE_TORCH="${ARCFACE_TORCH:-}"
[ -z "$ARCFACE_TORCH" ] && [ -d third_party/insightface/recognition/arcface_torch ] \
  && ARCFACE_TORCH=third_party/insightface/recognition/arcface_torch

# The sizes of the real run, and of the rehearsal (CPU, the same commands with tiny sizes; a test runs it)
if [ -n "${GPU_BENCH_REHEARSAL:-}" ]; then
  DEV=cpu; CHECK_N=600; CHECK_IDS=60; CHECK_BLOCK=256; PAIRS_N=1000; THREADS=1; PANEL=256; TILES_N=400; TILES="64,64,16,4,1 64,64,32,4,1"; TILES_TARGET=1e-3; REC_IDS=12; REC_PER=4
  TRAIN="--steps 2 --warmup 1 --classes 500 --workers 1"; BATCHES="2"; EXTRACT="--extract 16 --batch 8 --workers 1"; EXTRACT_SIZE=64
  SMOKE="--rehearsal"; export TRITON_INTERPRET=1
else
  DEV=cuda; CHECK_N=30000; CHECK_IDS=1500; CHECK_BLOCK=4096; PAIRS_N=500000; THREADS=8; PANEL=8192; TILES_N=500000; TILES_TARGET=1e-8; REC_IDS=410;
  TILES="128,128,64,8,3 128,256,64,8,3 64,64,32,4,3"; REC_PER=20
  TRAIN="--steps 30 --workers 12"; BATCHES="512 128"; EXTRACT="--extract 8192 --batch 256"; EXTRACT_SIZE=224; SMOKE=""
fi

REPORT="$OUT_DIR/gpu_bench.txt"
: > "$REPORT"
trap 'tar -czf "$OUT_DIR/gpu_bench_logs.tar.gz" -C "$WORK" logs 2>/dev/null; rm -rf "$WORK"' EXIT

step() {  # step NAME SECONDS COMMAND...   (SECONDS: this step's own limit, cut to the budget left)
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_BENCH_ONLY:-}" ] && [[ " $GPU_BENCH_ONLY " != *" $name "* ]]; then
    echo "-- $name: not in GPU_BENCH_ONLY" >> "$REPORT"
    return
  fi
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "-- $name: skipped, ${left}s of the budget left: $*" | tee -a "$REPORT"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$REPORT"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$WORK/logs/$name.log" >> "$REPORT"
  echo "-- $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$REPORT"
}

{
  echo "# visrec GPU bench$([ -n "${GPU_BENCH_REHEARSAL:-}" ] && echo ' REHEARSAL (CPU, tiny sizes)'), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  # what visrec needs that the machine's Python lacks (carry wheels for them in .whl/: BENCHMARKS.md)
  "$PY" -c "
import importlib
missing = [m for m in ('pydantic', 'typer', 'rich', 'yaml', 'cv2', 'scipy', 'matplotlib', 'torchvision', 'onnxruntime', 'faiss', 'timm')
           if importlib.util.find_spec(m) is None]
print('missing modules:', ', '.join(missing) or 'none')" 2>&1
  echo "arcface_torch: ${ARCFACE_TORCH:-absent (no ratios: set ARCFACE_TORCH or carry third_party/insightface/recognition/arcface_torch)}"
} >> "$REPORT"

# 1. the fused pair kernel: the same answer as the PyTorch scan and as the CPU engine, ties included (first:
#    its tiles are what the rates below time)
step kernel_check 90 env CHECK_DEV="$DEV" CHECK_N="$CHECK_N" CHECK_IDS="$CHECK_IDS" CHECK_BLOCK="$CHECK_BLOCK" "$PY" - <<'EOF'
import os
import numpy as np
from visrec.evaluate import tpr_at_fpr
rng = np.random.default_rng(0)
n, ids, block, dev = int(os.environ["CHECK_N"]), int(os.environ["CHECK_IDS"]), int(os.environ["CHECK_BLOCK"]), os.environ["CHECK_DEV"]
labels = rng.integers(0, ids, n)
emb = rng.standard_normal((ids, 512)).astype(np.float32)[labels] + 1.4 * rng.standard_normal((n, 512)).astype(np.float32)
emb[10:13] = emb[500]  # duplicates: ties at the top
targets = [1e-2, 1e-4, 1e-6]
runs = {(k, p): tpr_at_fpr(emb, labels, targets, device=dev, kernel=k, filter_precision=p, block_size=block)
        for k in ("triton", "torch") for p in ("bf16", "fp32")}
cpu = tpr_at_fpr(emb, labels, targets, device="cpu", kernel="torch", block_size=block)
fails = 0
for t in targets:
    got = {(r[t].threshold, r[t].true_accepts, r[t].false_accepts) for r in runs.values()}
    want = (cpu[t].threshold, cpu[t].true_accepts, cpu[t].false_accepts)
    fails += got != {want}
    print("PASS" if got == {want} else "FAIL", f"target {t:g}: {dev} runs {sorted(got)} cpu {want}")
raise SystemExit(1 if fails else 0)
EOF

# 2. the exact TPR@FPR engine: fused kernel vs PyTorch scan vs the bf16 product alone (Gpairs/s, same run),
#    then the kernel's tile configurations, alone and in the whole call
step eval_pairs_500k 150 "$PY" benchmarks/eval_pairs.py --sizes --alone "$PAIRS_N" --device "$DEV" --target 1e-8 \
  --kernels triton torch --matmul --threads "$THREADS" --block "$PANEL"
# the PyTorch scan at the device's default block size (default_block_size: 32768 rows on a card of >= 40 GiB)
step eval_pairs_500k_default_block 60 "$PY" benchmarks/eval_pairs.py --sizes --alone "$PAIRS_N" --device "$DEV" \
  --target 1e-8 --kernels torch --threads "$THREADS"

step pair_kernel_tiles 120 "$PY" benchmarks/pair_kernel_tiles.py --n "$TILES_N" --target "$TILES_TARGET" \
  --block "$PANEL" --device "$DEV" --tiles $TILES

# 3. training step throughput (the step in a CUDA graph; arcface_torch side by side), with the real input path
#    from a .rec file beside synthetic tensors in the same run; batch 512 first (the input-path goal)
"$PY" -c "from visrec.data.synth import write_face_dataset as w; w('$WORK/rec', $REC_IDS, $REC_PER, format='recordio', seed=0)" \
  > "$WORK/logs/write_rec.log" 2>&1 || echo "writing the synthetic .rec failed: see write_rec.log" | tee -a "$REPORT"
for b in $BATCHES; do
  for bb in mbf r50; do
    step "train_${bb}_${b}" 100 "$PY" benchmarks/train_throughput.py --backbone "$bb" --batch "$b" $TRAIN \
      --device "$DEV" --input recordio --rec "$WORK/rec" ${ARCFACE_TORCH:+--arcface-torch "$ARCFACE_TORCH"}
  done
done

# 4. catalogue extraction, JPEG files on disk -> vectors in the index (8,192 synthetic 512 px JPEGs, ResNet-50
#    GeM at 224 px, batch 256, loader threads = the cores up to 16), 520,000 images (Perfect-500K) extrapolated
#    against the 5-minute goal: the descriptor in PyTorch on CUDA; ONNX Runtime's CUDA and TensorRT providers
#    only where onnxruntime lists them (onnxruntime-gpu), else one line says they were not measured
ORT_GPU=$("$PY" -c "import onnxruntime as o; a = o.get_available_providers(); print(*[w for w, p in (('cuda', 'CUDAExecutionProvider'), ('tensorrt', 'TensorrtExecutionProvider')) if p in a])" 2>/dev/null)
[ -n "$ORT_GPU" ] || echo "products_extraction: ONNX Runtime CUDA / TensorRT not measured: onnxruntime-gpu is absent (onnxruntime lists no GPU provider)" | tee -a "$REPORT"
step products_extraction 100 "$PY" benchmarks/products_search.py --dims $EXTRACT --backbone resnet50 --size "$EXTRACT_SIZE" \
  --device "$DEV" ${ORT_GPU:+--providers $ORT_GPU} --work "$WORK"

# 5. the Trainer on CUDA (bf16 / fp16 autocast, stop + resume), the captured step against eager steps over
#    50 steps (bf16, fp16), nvJPEG batches against the workers' OpenCV
step trainer_smoke 180 "$PY" scripts/gpu_smoke.py "$WORK/gpu-smoke" $SMOKE

# 6. what the graph buys: the same step run eagerly
step train_mbf_128_eager 60 "$PY" benchmarks/train_throughput.py --backbone mbf --batch "${BATCHES##* }" $TRAIN \
  --device "$DEV" --cuda-graph off

# 7. what holds MobileFaceNet back (21 ms a step at batch 128 in the graph, not launch-bound): the same step
#    with NCHW activations, and with fp16 in place of bf16 (arcface_torch runs NCHW fp16), on tensors; then the
#    backbone compiled by TorchInductor (BN + PReLU fused). The compile step is left out of the rehearsal:
#    Inductor compiles MobileFaceNet's forward and backward for minutes on two CPU cores.
for v in "nchw_bf16:off:bf16" "nhwc_fp16:on:fp16" "nchw_fp16:off:fp16"; do
  IFS=: read -r vname vcl vamp <<< "$v"
  step "train_mbf_${vname}" 60 "$PY" benchmarks/train_throughput.py --backbone mbf --batch "${BATCHES%% *}" $TRAIN \
    --device "$DEV" --channels-last "$vcl" --amp "$vamp"
done
if [ -z "${GPU_BENCH_REHEARSAL:-}" ]; then
  step train_mbf_compile 180 "$PY" benchmarks/train_throughput.py --backbone mbf --batch "${BATCHES%% *}" $TRAIN \
    --device "$DEV" --compile
fi

echo "done: $REPORT (${SECONDS}s)"
