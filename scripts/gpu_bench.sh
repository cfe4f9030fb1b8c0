#!/usr/bin/env bash
# Every GPU check and benchmark in one run, each under its own time limit, every figure into one file.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu-bench-out)
#
# Needs a CUDA machine with the project's venv (or PYTHON=... pointing at a Python with visrec's deps).
# A step that fails or runs out of time is recorded as such and the next one runs: one run gives every
# figure it can. OUT_DIR receives two files: gpu_bench.txt (every step's command, the tail of its output and
# its exit) and gpu_bench_logs.tar.gz (each step's whole output); runs and data go to a scratch folder.
set -u
OUT_DIR="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/visrec-gpu-bench.XXXXXX")"
mkdir -p "$WORK/logs"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# Wheels carried in .whl/ (what the machine's Python lacks; it has no network): unpacked beside the code
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
REPORT="$OUT_DIR/gpu_bench.txt"
: > "$REPORT"
trap 'tar -czf "$OUT_DIR/gpu_bench_logs.tar.gz" -C "$WORK" logs 2>/dev/null; rm -rf "$WORK"' EXIT

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$REPORT"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$WORK/logs/$name.log" >> "$REPORT"
  echo "-- $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$REPORT"
}

{
  echo "# visrec GPU bench, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  # what visrec needs that the machine's Python lacks (carry wheels for them in .whl/: BENCHMARKS.md)
  "$PY" -c "
import importlib
missing = [m for m in ('pydantic', 'typer', 'rich', 'yaml', 'cv2', 'scipy', 'matplotlib', 'torchvision', 'onnxruntime', 'faiss', 'timm')
           if importlib.util.find_spec(m) is None]
print('missing modules:', ', '.join(missing) or 'none')" 2>&1
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

# 3. the Trainer on CUDA (bf16 / fp16 autocast, stop + resume), the captured step against eager steps over
#    50 steps (bf16, fp16), nvJPEG batches against the workers' OpenCV
step trainer_smoke 360 "$PY" scripts/gpu_smoke.py "$WORK/gpu-smoke"

# 4. training step throughput (the step in a CUDA graph; arcface_torch side by side when ARCFACE_TORCH names a
#    checkout), with the real input path from a .rec file beside synthetic tensors in the same run
"$PY" -c "from visrec.data.synth import write_face_dataset as w; w('$WORK/rec', 410, 20, format='recordio', seed=0)" \
  > "$WORK/logs/write_rec.log" 2>&1 || echo "writing the synthetic .rec failed: see write_rec.log" | tee -a "$REPORT"
for bb in mbf r50; do
  for b in 128 512; do
    step "train_${bb}_${b}" 240 "$PY" benchmarks/train_throughput.py --backbone "$bb" --batch "$b" --steps 30 \
      --input recordio --rec "$WORK/rec" --workers 12 ${ARCFACE_TORCH:+--arcface-torch "$ARCFACE_TORCH"}
  done
done
# what the graph buys: the same step run eagerly
step train_mbf_128_eager 180 "$PY" benchmarks/train_throughput.py --backbone mbf --batch 128 --steps 30 --cuda-graph off

# 5. catalogue extraction on the GPU, JPEG files on disk -> vectors in the index (8,192 synthetic 512 px JPEGs,
#    ResNet-50 GeM at 224 px, batch 256, loader threads = the cores up to 16), 520,000 images (Perfect-500K)
#    extrapolated against the 5-minute goal: the descriptor in PyTorch on CUDA; ONNX Runtime's CUDA and TensorRT
#    providers only where onnxruntime lists them (onnxruntime-gpu), else one line says they were not measured
ORT_GPU=$("$PY" -c "import onnxruntime as o; a = o.get_available_providers(); print(*[w for w, p in (('cuda', 'CUDAExecutionProvider'), ('tensorrt', 'TensorrtExecutionProvider')) if p in a])" 2>/dev/null)
[ -n "$ORT_GPU" ] || echo "products_extraction: ONNX Runtime CUDA / TensorRT not measured: onnxruntime-gpu is absent (onnxruntime lists no GPU provider)" | tee -a "$REPORT"
step products_extraction 120 "$PY" benchmarks/products_search.py --dims --extract 8192 --backbone resnet50 --size 224 \
  --batch 256 --device cuda ${ORT_GPU:+--providers $ORT_GPU} --work "$WORK"

echo "done: $REPORT"
