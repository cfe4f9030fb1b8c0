"""Video sets: list format, frame folders and video files, detector scores, fusion definitions, evaluation."""

import numpy as np
import pytest
import torch

from visrec.data.video import (read_frame_scores, read_frames, read_video_list, render_video, write_video_dataset)
from visrec.errors import ConfigError, DataError
from visrec.evaluate.video import fuse
from visrec.faces.evaluation import evaluate_videos


def test_synthetic_videos_in_both_layouts_read_back(tmp_path):
    lst = write_video_dataset(tmp_path / "f", 3, 2, 6, seed=1, degraded_share=0.5)
    items = read_video_list(lst)
    assert len(items) == 6 and [it.label for it in items] == ["0", "0", "1", "1", "2", "2"]
    frames = read_frames(items[0].path, items[0].video_id)
    assert len(frames) == 6 and frames[0].shape == (112, 112, 3) and frames[0].dtype == np.uint8
    scores = read_frame_scores(items[0].path, 6)
    assert scores.shape == (6,) and ((0 < scores) & (scores <= 1)).all()
    assert (tmp_path / "f" / "video_filelist.txt").read_text().split() == [it.video_id for it in items]
    avi = read_video_list(write_video_dataset(tmp_path / "a", 2, 1, 5, seed=1, video_format="avi"))
    decoded = read_frames(avi[0].path, avi[0].video_id)
    assert len(decoded) == 5
    # MJPG is lossy: the decoded frames are close to the rendered ones, not equal
    rendered, _, _ = render_video(0, 5, np.random.default_rng([1, 0, 0, 7727]), seed=1, degraded_share=0.3)
    assert np.abs(decoded[0].astype(int) - rendered[0].astype(int)).mean() < 6


def test_degraded_share_and_smooth_pose():
    frames, kinds, scores = render_video(5, 20, np.random.default_rng(0), degraded_share=0.25)
    assert sum(k != "clean" for k in kinds) == 5
    clean = [i for i, k in enumerate(kinds) if k == "clean"]
    # consecutive clean frames differ little (smooth motion); a degraded frame differs more from its clean neighbours
    steps = [np.abs(frames[a].astype(int) - frames[b].astype(int)).mean() for a, b in zip(clean, clean[1:]) if b == a + 1]
    assert steps and max(steps) < 25
    assert scores[[i for i, k in enumerate(kinds) if k != "clean"]].mean() < scores[clean].mean()


def test_list_and_scores_errors_name_file_and_line(tmp_path):
    lst = tmp_path / "v.csv"
    lst.write_text("a,x,0\n# comment\n\nb,y\n")
    with pytest.raises(DataError, match=r"v\.csv.*line 4.*video_id,path,label"):
        read_video_list(lst)
    lst.write_text("a,x,0\na,y,1\n")
    with pytest.raises(DataError, match=r"line 2.*repeats line 1"):
        read_video_list(lst)
    with pytest.raises(DataError, match="not found"):
        read_frames(tmp_path / "nope", "v1")
    d = tmp_path / "frames"
    d.mkdir()
    (d / "0000.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"0000\.png.*video v1.*not a decodable"):
        read_frames(d, "v1")
    (d / "scores.txt").write_text("0.5\nhigh\n")
    with pytest.raises(DataError, match=r"scores\.txt.*line 2"):
        read_frame_scores(d, 2)
    (d / "scores.txt").write_text("0.5\n")
    with pytest.raises(DataError, match="1 scores for 2 frames"):
        read_frame_scores(d, 2)


def test_fusion_definitions():
    e = np.array([[3.0, 0.0], [0.0, 1.0]])
    assert np.allclose(fuse(e, "mean"), np.array([1, 1]) / np.sqrt(2))
    assert np.allclose(fuse(e, "norm"), np.array([0.75, 0.25]) / np.linalg.norm([0.75, 0.25]))
    assert np.allclose(fuse(e, "score", scores=np.array([1.0, 3.0])), np.array([1, 3]) / np.sqrt(10))
    z = np.array([0.0, np.log(2.0)])  # softmax weights 1/3, 2/3
    assert np.allclose(fuse(e, "learned", logits=z), np.array([1, 2]) / np.sqrt(5))
    with pytest.raises(DataError, match="scores"):
        fuse(e, "score")
    with pytest.raises(ConfigError, match="quality_fusion"):
        fuse(e, "learned")
    with pytest.raises(ConfigError, match="unknown fusion"):
        fuse(e, "max")


def test_quality_fusion_weights_and_frozen_backbone():
    from visrec.models import build_backbone

    m = build_backbone("quality_fusion", backbone={"name": "mobilefacenet", "embedding_size": 64, "scale": 1}, hidden=8)
    m.train()
    assert not m.backbone.training and m.quality.training  # frozen backbone keeps BN statistics
    x = torch.randn(2, 3, 3, 112, 112)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    fused, w = m.fuse(x, mask)
    assert torch.allclose(w.sum(1), torch.ones(2)) and w[0, 2] == 0
    assert torch.allclose(fused.norm(dim=1), torch.ones(2), atol=1e-5)
    fused.sum().backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.quality.parameters())


def test_evaluate_videos_and_lfr_submission_order(tmp_path):
    from visrec.evaluate.lfr import read_lfr_features
    from visrec.models import build_backbone

    lst = write_video_dataset(tmp_path / "v", 4, 2, 4, seed=3)
    model = build_backbone("mobilefacenet", embedding_size=32, scale=1)
    order = tmp_path / "order.txt"
    ids = [it.video_id for it in read_video_list(lst)]
    order.write_text("\n".join(ids[::-1]) + "\n")
    res = evaluate_videos(model, lst, ("mean", "norm", "score"), (0.1,), submission=tmp_path / "sub.bin", filelist=order)
    assert set(res.results) == {"mean", "norm", "score"}
    r = res.results["mean"][0.1]
    assert r.genuine_count == 4 and r.impostor_count == 24
    sub = read_lfr_features(tmp_path / "sub.bin")
    assert np.allclose(sub, res.features["mean"][::-1])
    order.write_text("nope\n")
    with pytest.raises(DataError, match="not in the video list"):
        evaluate_videos(model, lst, ("mean",), (0.1,), submission=tmp_path / "s2.bin", filelist=order)


def _video_run(tmp_path, name, *, flip=True, freeze=True, steps=6, num_workers=0, optim="adamw"):
    from visrec.config import parse_config

    if not (tmp_path / "v" / "videos.csv").exists():
        write_video_dataset(tmp_path / "v", 6, 2, 5, seed=3, degraded_share=0.4)
    return parse_config({
        "task": "faces_video", "output": str(tmp_path / name), "device": "cpu", "batch_size": 4, "seed": 0,
        "log_every": 1, "checkpoint_every": 1000, "num_workers": num_workers,
        "model": {"name": "quality_fusion", "hidden": 8, "freeze_backbone": freeze,
                  "backbone": {"name": "mobilefacenet", "embedding_size": 32, "scale": 1}},
        "data": {"videos": str(tmp_path / "v" / "videos.csv"), "clip": 4, "flip": flip},
        "loss": {"name": "cosface", "s": 30.0, "m": 0.2},
        "optim": {"name": optim, "lr": 0.01 if optim == "adamw" else 0.1, "weight_decay": 0.0},
        "schedule": {"max_steps": steps, "warmup_steps": 1}})


def _losses(run_dir):
    import json

    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.parametrize("flip", [True, False])
def test_a_frozen_backbone_embeds_each_frame_once_and_trains_as_if_it_ran_every_step(tmp_path, monkeypatch, flip):
    from visrec.train import video_task
    from visrec.train.trainer import train

    calls = []
    real_embed = video_task.embed_frames
    monkeypatch.setattr(video_task, "embed_frames", lambda *a, **k: calls.append(k["flip"]) or real_embed(*a, **k))
    # SGD: the embeddings of the two runs agree to float32 rounding only (the cached ones come from calls of
    # forward_batch frames, the per-step ones from the step's batch, and a CPU's conv kernels round by batch
    # size), and Adam would turn that rounding on a near-zero gradient into a step of the learning rate
    cached = train(_video_run(tmp_path, "cached", flip=flip, optim="sgd"), progress=False)
    assert calls == [flip]  # once, at the start
    # the same run with the frames through the (frozen) backbone at every step
    monkeypatch.setattr(video_task.VideoTask, "frozen_backbone", lambda self: False)
    stepwise = train(_video_run(tmp_path, "stepwise", flip=flip, optim="sgd"), progress=False)
    assert calls == [flip]
    assert _losses(tmp_path / "cached") == pytest.approx(_losses(tmp_path / "stepwise"), rel=1e-5)
    assert len(_losses(tmp_path / "cached")) == 6 and cached.global_step == stepwise.global_step == 6
    a, b = (torch.load(tmp_path / n / "model.pt", weights_only=True)["backbone"] for n in ("cached", "stepwise"))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert abs(_losses(tmp_path / "cached")[-1] - _losses(tmp_path / "cached")[0]) > 1e-3  # and it did train


def test_embed_frames_keeps_list_order_across_batches_and_long_videos():
    from visrec.models import build_backbone
    from visrec.models.embed import images_to_tensor
    from visrec.train.video_task import embed_frames

    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", embedding_size=16, scale=1).eval()
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8) for n in (3, 7, 1, 5)]
    got = embed_frames(net, videos, torch.device("cpu"), flip=True, batch_size=4)
    frames = np.concatenate(videos)
    with torch.no_grad():
        x = images_to_tensor(frames)
        want = torch.stack([net(x), net(x.flip(3))], dim=1)
    assert got.shape == (16, 2, 16)
    assert torch.allclose(got, want, atol=1e-4)
    assert embed_frames(net, videos, torch.device("cpu"), flip=False).shape == (16, 1, 16)


def test_a_fine_tuned_backbone_still_runs_every_frame_through_it(tmp_path, monkeypatch):
    from visrec.train import video_task
    from visrec.train.trainer import train

    calls = []
    real_embed = video_task.embed_frames
    monkeypatch.setattr(video_task, "embed_frames", lambda *a, **k: calls.append(1) or real_embed(*a, **k))
    assert train(_video_run(tmp_path, "tuned", freeze=False, steps=2), progress=False).global_step == 2
    assert calls == []
    train(_video_run(tmp_path, "frozen", freeze=True, steps=2), progress=False)
    tuned, frozen = (torch.load(tmp_path / n / "model.pt", weights_only=True)["backbone"] for n in ("tuned", "frozen"))
    moved = [k for k in tuned if k.startswith("backbone.") and tuned[k].is_floating_point()
             and not torch.equal(tuned[k], frozen[k])]
    assert moved  # the same initial backbone, trained in one run and kept in the other


def test_torchrun_two_gloo_processes_train_one_quality_head(tmp_path):
    """Under DDP the fused paths go through forward (the wrapper exposes nothing else), and the quality head's
    gradients are averaged: both ranks end with the same head; one result table is printed."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = _video_run(tmp_path, "ddp", steps=3).model_dump(mode="json")
    cfg["deterministic"] = False
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "visrec.cli", "train", "--config", str(tmp_path / "ddp.yaml"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained quality_fusion") == 1
    r0, r1 = (torch.load(tmp_path / "ddp" / f"last.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 3
    head0, head1 = r0["modules"]["backbone"], r1["modules"]["backbone"]
    quality = [k for k in head0 if k.startswith("quality.")]
    assert quality and all(torch.equal(head0[k], head1[k]) for k in quality)
    final = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["backbone"]
    assert all(torch.equal(final[k], head0[k]) for k in quality)  # model.pt is rank 0's final state


def test_an_onnx_export_evaluates_videos_as_its_checkpoint_does_and_learned_fusion_asks_for_the_checkpoint(
        tmp_path, tiny_face_model):
    pytest.importorskip("onnxruntime", reason="visrec[export]")
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.export import export_checkpoint
    from visrec.faces.evaluation import evaluate_video_model

    lst = write_video_dataset(tmp_path / "v", 5, 2, 4, seed=4, degraded_share=0.4)
    onnx_path, _ = export_checkpoint(tiny_face_model, tmp_path / "m.onnx")
    fusions = ("mean", "norm")
    torch_res = evaluate_video_model(tiny_face_model, lst, fusions, (0.1,))
    onnx_res = evaluate_video_model(onnx_path, lst, fusions, (0.1,))
    for f in fusions:
        assert np.allclose(onnx_res.features[f], torch_res.features[f], atol=1e-4)
        assert onnx_res.results[f][0.1].tpr == torch_res.results[f][0.1].tpr
    assert onnx_res.summary["runtime"].startswith("ONNX Runtime on ")
    r = CliRunner().invoke(app, ["eval", "faces", str(onnx_path), "--video", "--data", str(lst), "--fusion", "mean",
                                 "--target-fpr", "0.1", "--submission", str(tmp_path / "sub.bin")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sub.bin").stat().st_size == 16 + 10 * onnx_res.features["mean"].shape[1] * 4
    r = CliRunner().invoke(app, ["eval", "faces", str(onnx_path), "--video", "--data", str(lst), "--fusion", "learned"])
    from visrec.errors import ConfigError as Refused  # main() prints it as "error: ..." and exits 2

    assert isinstance(r.exception, Refused) and "needs a quality_fusion checkpoint" in str(r.exception)
