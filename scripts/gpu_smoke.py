"""GPU smoke run of the real Trainer (CI has no GPU): synthetic RecordIO -> MobileFaceNet on CUDA with
bf16 and with fp16 (GradScaler) autocast, a stop + resume, and the loss going down.

    PYTHONPATH=src python scripts/gpu_smoke.py /tmp/gpu-smoke
"""

import json
import sys
from pathlib import Path

import torch

from visrec.config import parse_config
from visrec.data.synth import write_face_dataset
from visrec.train.trainer import train

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-smoke")
data = write_face_dataset(out / "train", 100, 20, format="recordio", seed=1)
assert torch.cuda.is_available(), "needs a GPU"
for amp in ("bf16", "fp16"):
    cfg = parse_config({"task": "faces", "output": str(out / f"run-{amp}"), "device": "cuda", "amp": amp,
                        "batch_size": 64, "num_workers": 4, "model": {"name": "mobilefacenet"},
                        "data": {"train": str(data)}, "loss": {"name": "arcface", "s": 32.0, "m": 0.3},
                        "optim": {"name": "adamw", "lr": 0.002}, "schedule": {"max_steps": 120, "warmup_steps": 5},
                        "checkpoint_every": 50, "log_every": 10})
    first = train(cfg, progress=False, stop_after_steps=60)
    done = train(cfg, resume=True, progress=False)
    losses = [json.loads(l)["loss"] for l in (out / f"run-{amp}" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    print(f"{amp}: steps {first.global_step} + resume -> {done.global_step}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert done.global_step == 120 and losses[-1] < losses[0]
print("gpu smoke ok")
