"""benchmarks/train_throughput.py runs on a CPU (the GPU figures come from scripts/gpu_bench.sh): the Trainer's
step on tensors and on a real RecordIO input path in the same run, the share of the two, and the input path
timed alone."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recordio_input_path_is_timed_beside_tensors():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", "cpu",
                           "--backbone", "mbf", "--batch", "8", "--classes", "50", "--steps", "2", "--warmup", "1",
                           "--input", "recordio", "--images", "40", "--workers", "1", "--decode", "batched"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "wrote a synthetic .rec of 40 images" in out
    rows = [line for line in out.splitlines() if line.startswith("│ visrec")]
    assert len(rows) == 3, out
    assert "tensors" in rows[0] and "eager (cpu run: CUDA graphs need a CUDA device)" in rows[0]
    assert "RecordIO, decode batched, 1 workers" in rows[1] and "eager (cpu run" in rows[1]
    # the third row: the same input path with no step to feed, its ceiling
    assert "RecordIO, decode batched, 1 workers" in rows[2] and "none: the input path alone" in rows[2]
    rates = [float(re.search(r"│\s+([\d,]+\.\d)\s+│", row).group(1).replace(",", "")) for row in rows]
    assert all(rate > 0 for rate in rates)
    share = re.search(r"real input path / synthetic tensors: ([\d.]+)%", out)
    # the table rounds each rate to 0.1 img/s: the printed share lies within what those roundings allow
    low, high = 100 * (rates[1] - 0.05) / (rates[0] + 0.05), 100 * (rates[1] + 0.05) / max(rates[0] - 0.05, 1e-9)
    assert share and low - 0.05 <= float(share.group(1)) <= high + 0.05
