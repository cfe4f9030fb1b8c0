"""scripts/gpu_bench.sh is the one command a session with a GPU runs, once, for minutes it cannot get back:
its rehearsal (GPU_BENCH_REHEARSAL=1: the same steps on the CPU with tiny sizes) runs here so that a wrong
flag, a missing import or a renamed function fails in CI instead of on the device. The budget that keeps the
whole run inside one device command is checked too."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["kernel_check", "eval_pairs_500k", "eval_pairs_500k_default_block", "pair_kernel_tiles", "train_mbf_2",
         "train_r50_2", "products_extraction", "trainer_smoke", "train_mbf_128_eager", "train_mbf_nchw_bf16",
         "train_mbf_nhwc_fp16", "train_mbf_nchw_fp16"]


def bench(out: Path, **env) -> str:
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHON=sys.executable, GPU_BENCH_REHEARSAL="1", **env))
    assert done.returncode == 0, done.stderr[-3000:]
    return (out / "gpu_bench.txt").read_text()


@pytest.mark.slow
def test_every_step_of_the_gpu_script_runs_in_its_rehearsal(tmp_path):
    report = bench(tmp_path / "out")
    assert report.startswith("# visrec GPU bench REHEARSAL")
    for name in STEPS:
        assert f"-- {name}: exit 0 after" in report, f"{name} failed:\n{report[-4000:]}"
    # the figures each step exists for are in the report
    assert report.count("real input path / synthetic tensors:") == 2  # mbf and r50, from the .rec file
    assert "visrec (triton scan):" in report and "visrec (torch scan):" in report and "bf16 product alone:" in report
    assert "extraction torch cpu" in report and "520,000 images in" in report
    # and which side bounds each rate: the input path with no step, the loader threads and the descriptor alone
    assert report.count("none: the input path alone") == 2
    assert "bound: the descriptor alone" in report and "loader threads alone" in report
    assert report.count("PASS target") == 3 and "FAIL" not in report  # the kernel agrees with the CPU engine
    # each tile configuration of the sweep ran and gave the PyTorch scan's answer
    assert report.count("; same answer") == 2 and "DIFFERENT ANSWER" not in report
    assert "cuda graph bf16: mode eager" in report and "gpu smoke ok" in report
    with tarfile.open(tmp_path / "out" / "gpu_bench_logs.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {f"{name}.log" for name in STEPS} <= logs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_bench.txt", "gpu_bench_logs.tar.gz"]


def test_steps_past_the_budget_are_skipped_and_said_so(tmp_path):
    report = bench(tmp_path / "out", GPU_BENCH_BUDGET="20")
    for name in STEPS:
        assert f"-- {name}: skipped, " in report and f"== {name}" not in report


def test_gpu_bench_only_runs_the_steps_it_names(tmp_path):
    report = bench(tmp_path / "out", GPU_BENCH_ONLY="kernel_check")
    assert "-- kernel_check: exit 0 after" in report
    for name in STEPS[1:]:
        assert f"-- {name}: not in GPU_BENCH_ONLY" in report and f"== {name}" not in report
