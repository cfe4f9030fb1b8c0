"""End to end on CPU: a face backbone trained on stills, synthetic videos with degraded frames, a learned
quality head; learned fusion must beat the mean of the frames on TPR@FPR=1e-4 between held-out videos."""

import pytest
import torch
from conftest import TEST_THREADS
from typer.testing import CliRunner

from visrec.config import load_config, parse_config
from visrec.data.synth import write_face_dataset
from visrec.data.video import write_video_dataset
from visrec.faces.evaluation import evaluate_video_model
from visrec.train.trainer import train


@pytest.mark.slow
def test_learned_fusion_beats_mean_fusion_on_degraded_videos(tmp_path):
    torch.set_num_threads(TEST_THREADS)
    write_face_dataset(tmp_path / "stills", 150, 10, seed=11, difficulty=0.3)
    train(parse_config({
        "task": "faces", "output": str(tmp_path / "bb"), "device": "cpu", "batch_size": 32, "seed": 0,
        "model": {"name": "mobilefacenet", "embedding_size": 128, "scale": 1},
        "data": {"train": str(tmp_path / "stills")}, "loss": {"name": "cosface", "s": 30.0, "m": 0.2},
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 5e-4},
        "schedule": {"max_steps": 100, "warmup_steps": 5}, "checkpoint_every": 1000}), progress=False)
    write_video_dataset(tmp_path / "vtrain", 60, 3, 8, seed=1, degraded_share=0.4)
    val = write_video_dataset(tmp_path / "vval", 50, 4, 8, seed=2, degraded_share=0.4, first_identity=50_000)
    cfg = load_config("configs/faces/video-quality.yaml", {
        "output": str(tmp_path / "q"), "device": "cpu", "model.backbone": str(tmp_path / "bb"),
        "data.videos": str(tmp_path / "vtrain" / "videos.csv"), "data.val": str(val)})
    result = train(cfg, progress=False)
    res = evaluate_video_model(tmp_path / "q", val, ("mean", "norm", "learned"), (1e-4,))
    tpr = {f: r[1e-4].tpr for f, r in res.results.items()}
    print(f"held-out TPR@1e-4 between videos ({res.summary['impostor pairs']} impostor pairs): {tpr}")
    assert all(r[1e-4].estimable for r in res.results.values())
    assert result.metrics["val/learned_tpr@0.0001"] == pytest.approx(tpr["learned"])
    assert tpr["learned"] >= tpr["mean"] + 0.03
    # the CLI path: the saved fusion model reloads without the backbone's run dir (its architecture is recorded)
    import shutil

    shutil.rmtree(tmp_path / "bb")
    from visrec.cli import app

    r = CliRunner().invoke(app, ["eval", "faces", str(tmp_path / "q"), "--video", "--data", str(val),
                                 "--fusion", "learned", "--fusion", "mean", "--submission", str(tmp_path / "sub.bin")])
    assert r.exit_code == 0, r.output
    assert "learned" in r.output and f"{tpr['learned']:.6f}" in r.output
    assert (tmp_path / "sub.bin").stat().st_size == 16 + 200 * 128 * 4
