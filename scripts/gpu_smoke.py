"""GPU smoke run of the real Trainer (CI has no GPU): synthetic RecordIO -> MobileFaceNet on CUDA with
bf16 and with fp16 (GradScaler) autocast, a stop + resume, and the loss going down; then the captured step
(cuda_graph: on) against eager steps over 50 steps, and batched nvJPEG decoding against the workers' OpenCV.

    PYTHONPATH=src python scripts/gpu_smoke.py /tmp/gpu-smoke
    PYTHONPATH=src python scripts/gpu_smoke.py /tmp/gpu-smoke --rehearsal   # CPU, a few steps: wiring only

``--rehearsal`` runs the same calls on the CPU with tiny sizes (a test runs it, so the one GPU run a session
gets does not die of a typo); it checks that every call goes through, not the numerics (no autocast, no
graph, libjpeg instead of nvJPEG on a CPU).
"""

import json
import sys
from pathlib import Path

import torch

from visrec.config import parse_config
from visrec.data.synth import write_face_dataset
from visrec.train.trainer import train

args = [a for a in sys.argv[1:] if a != "--rehearsal"]
REHEARSAL = "--rehearsal" in sys.argv[1:]
out = Path(args[0] if args else "/tmp/gpu-smoke")
if REHEARSAL:
    DEVICE, IDS, PER_ID, BATCH, WORKERS, STEPS, GRAPH_STEPS, GRAPH, MODE = "cpu", 8, 4, 4, 0, 4, 4, "auto", "eager"
    AMPS = ("bf16",)  # autocast is CUDA-only: the second precision would repeat the same float32 run
else:
    assert torch.cuda.is_available(), "needs a GPU (or --rehearsal)"
    DEVICE, IDS, PER_ID, BATCH, WORKERS, STEPS, GRAPH_STEPS, GRAPH, MODE = \
        "cuda", 100, 20, 64, 4, 120, 50, "on", "cuda_graph"
    AMPS = ("bf16", "fp16")
data = write_face_dataset(out / "train", IDS, PER_ID, format="recordio", seed=1)
for amp in AMPS:
    cfg = parse_config({"task": "faces", "output": str(out / f"run-{amp}"), "device": DEVICE, "amp": amp,
                        "batch_size": BATCH, "num_workers": WORKERS, "model": {"name": "mobilefacenet"},
                        "data": {"train": str(data)}, "loss": {"name": "arcface", "s": 32.0, "m": 0.3},
                        "optim": {"name": "adamw", "lr": 0.002},
                        "schedule": {"max_steps": STEPS, "warmup_steps": max(1, STEPS // 24)},
                        "checkpoint_every": STEPS * 5 // 12, "log_every": max(1, STEPS // 12)})
    first = train(cfg, progress=False, stop_after_steps=STEPS // 2)
    done = train(cfg, resume=True, progress=False)
    losses = [json.loads(l)["loss"] for l in (out / f"run-{amp}" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    print(f"{amp}: steps {first.global_step} + resume -> {done.global_step}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert done.global_step == STEPS and (REHEARSAL or losses[-1] < losses[0])


# The whole step in a CUDA graph is the same run as eager steps (same fused optimizer, same kernels): 50 steps
# each way from one seed, for bf16 and for fp16 (the loss scaler inside the graph). cuDNN may pick other
# algorithms run to run (not deterministic mode), hence a tolerance rather than equality.
def run(name, **over):
    raw = {"task": "faces", "output": str(out / name), "device": DEVICE, "seed": 11, "batch_size": 2 * BATCH,
           "num_workers": WORKERS, "model": {"name": "mobilefacenet"}, "data": {"train": str(data)},
           "loss": {"name": "arcface", "s": 32.0, "m": 0.3}, "optim": {"name": "sgd", "lr": 0.05},
           "schedule": {"max_steps": GRAPH_STEPS, "warmup_steps": 5}, "checkpoint_every": GRAPH_STEPS,
           "log_every": 1}
    for key, value in over.items():
        if isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    result = train(parse_config(raw), progress=False)
    losses = [json.loads(l)["loss"] for l in (out / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    return result, losses


for amp in AMPS:
    eager, eager_losses = run(f"eager-{amp}", amp=amp, cuda_graph="off", data={"decode": "workers"})
    graph, graph_losses = run(f"graph-{amp}", amp=amp, cuda_graph=GRAPH, data={"decode": "workers"})
    worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(graph_losses, eager_losses))
    print(f"cuda graph {amp}: mode {graph.step_mode}, {len(graph_losses)} losses, worst relative difference to "
          f"eager {worst:.2e}, loss {graph_losses[0]:.3f} -> {graph_losses[-1]:.3f} "
          f"(eager {eager_losses[0]:.3f} -> {eager_losses[-1]:.3f})")
    assert graph.step_mode == MODE and len(graph_losses) == GRAPH_STEPS and worst < 2e-2

# nvJPEG (batched, on the GPU) against OpenCV in the workers: pixels, then the same 50-step run
from visrec.data.datasets import open_face_dataset
from visrec.data.jpeg_batches import EncodedFaces, collate_encoded

faces = open_face_dataset(data)
encoded = EncodedFaces(faces)
index = list(range(0, len(faces), max(1, len(faces) // 256)))[:256]
gpu_images, _ = encoded.decode(collate_encoded([encoded[i] for i in index]), torch.device(DEVICE))
cpu_images = torch.stack([faces[i][0] for i in index])
levels = ((gpu_images.cpu() - cpu_images).abs() * 127.5).round()
print(f"nvJPEG vs OpenCV over {len(index)} images: max {levels.max():.0f} levels, mean {levels.mean():.3f}")
assert levels.max() <= 8
batched, batched_losses = run("batched-bf16", amp="bf16", data={"decode": "batched"})
workers, workers_losses = run("workers-bf16", amp="bf16", data={"decode": "workers"})
print(f"decode batched vs workers (bf16, {batched.step_mode}): loss {batched_losses[-1]:.3f} vs {workers_losses[-1]:.3f}")
assert abs(batched_losses[-1] - workers_losses[-1]) < 0.1 * abs(workers_losses[0])

# Product images are normalised on the network's device: the same float32 bits as preprocess_product's NumPy
import numpy as np  # noqa: E402

from visrec.data.products import normalise_product_pixels, preprocess_product  # noqa: E402
from visrec.models.inference import prepare_batch  # noqa: E402

rng = np.random.default_rng(0)
shots = [rng.integers(0, 256, (int(rng.integers(40, 500)), int(rng.integers(40, 500)), 3), dtype=np.uint8)
         for _ in range(16)]
on_device = normalise_product_pixels(torch.from_numpy(prepare_batch(shots, 224).scales[0]).to(DEVICE)).cpu().numpy()
want = np.stack([preprocess_product(im, 224) for im in shots])
same_bits = np.array_equal(on_device.view(np.uint32), want.view(np.uint32))
print(f"product normalisation on {DEVICE}: {'the same bits as' if same_bits else 'DIFFERENT from'} NumPy's")
assert same_bits
print("gpu smoke ok")
