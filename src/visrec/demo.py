"""The offline demo: everything runs on CPU from synthetic data written in the real formats.

Faces: render identities -> RecordIO + held-out verification .bin -> accuracy of an untrained
MobileFaceNet -> train it for 80 steps (about 3 minutes on 2 cores) -> accuracy again; its budget, ONNX export and exact TPR@FPR;
a Milvus Lite gallery. Video: frame-fusion weights learned on top of that backbone against mean fusion
(TPR@1e-4 between held-out videos). Landmarks: a light 106-point model against the mean shape (NME, AUC).
Products: a catalogue index and mAP@7. Real faces: pretrained dlib models on real photos.

The demo repeats: fixed seeds, a fixed step count, deterministic algorithms and a fixed number of CPU threads
(``DEMO["threads"]``): the thread count changes the order of float reductions, and with it the trained weights.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from visrec.config import parse_config
from visrec.data.text import check_output
from visrec.data.verification import read_verification_bin
from visrec.demo_real import real_faces_section
from visrec.faces.pipeline import Embedder
from visrec.index.gallery import open_gallery


def faces_section(out: Path, steps: int, console: Console) -> dict:
    from visrec.data.synth import write_face_dataset, write_verification_pairs
    from visrec.evaluate.bin_protocol import evaluate_bin_pairs
    from visrec.models import build_backbone
    from visrec.models.embed import embed_images
    from visrec.models.model_file import load_backbone
    from visrec.train.trainer import train

    data = out / "data" / "faces"
    train_dir, val_bin = data / "train", data / "val.bin"
    if not ((train_dir / "landmarks106.npy").exists() and val_bin.exists()):  # the last files each writer renames in
        shutil.rmtree(data, ignore_errors=True)  # the demo's own folder, left half-written by a killed run
        console.print(f"rendering synthetic identities into {train_dir} (InsightFace RecordIO)")
        write_face_dataset(train_dir, DEMO["identities"], DEMO["per_identity"], format="recordio",
                           seed=1, difficulty=DEMO["difficulty"])
        write_verification_pairs(val_bin, DEMO["val_identities"], DEMO["val_pairs"], seed=2,
                                 difficulty=DEMO["difficulty"], first_identity=100_000)
    images, issame = read_verification_bin(val_bin)

    def accuracy(model) -> float:
        return float(evaluate_bin_pairs(embed_images(model, images), issame).accuracy_mean)

    import torch

    torch.manual_seed(0)  # the untrained baseline's random weights, the same in every run
    untrained = accuracy(build_backbone("mobilefacenet", embedding_size=512))
    run_dir = out / "runs" / "mbf-synth"
    cfg = parse_config({
        "task": "faces", "output": str(run_dir), "device": "cpu", "batch_size": 32, "seed": 0, "deterministic": True,
        "model": {"name": "mobilefacenet", "embedding_size": 512},
        "data": {"train": str(train_dir), "val": [str(val_bin)]},
        # CPU minutes allow only ~100 steps: AdamW and a mild CosFace margin converge in that many
        # (SGD at arcface_torch's lr 0.1 with ArcFace m=0.5 does not move a fresh MobileFaceNet that fast).
        "loss": {"name": "cosface", "s": 30.0, "m": 0.2},
        "optim": {"name": "adamw", "lr": 0.002, "weight_decay": 5e-4},
        "schedule": {"max_steps": steps, "warmup_steps": 5},
        "checkpoint_every": 100, "log_every": 10,
    }, source="demo config")
    started = time.perf_counter()
    # a demo cut short before the run's checkpoint left a log: resumed (from step 0), not refused
    result = train(cfg, resume=run_dir.exists(), source="demo config")
    trained_model, _ = load_backbone(run_dir / "model.pt")
    trained = accuracy(trained_model)
    return {"untrained": untrained, "trained": trained, "steps": result.global_step,
            "seconds": time.perf_counter() - started, "run": run_dir, "data": data}


# 80 face steps: fewer leave BatchNorm running statistics dominated by the first steps and the eval-mode
# embeddings collapse (seen at 26 steps); 80 is what the end-to-end test trains.
DEMO = {"identities": 100, "per_identity": 30, "difficulty": 0.3, "val_identities": 60, "val_pairs": 600,
        "gallery_identities": 50, "face_steps": 80, "threads": 2}


def budget_and_eval_section(out: Path, faces: dict, console: Console) -> dict:
    """The trained model against the DeepGlint-Light budget, exported to ONNX with parity, and evaluated
    with the exact TPR@FPR engine on held-out identities (report.html)."""
    from visrec.budget import check
    from visrec.faces.evaluation import evaluate_faces
    from visrec.export import export_checkpoint

    model_pt = faces["run"] / "model.pt"
    budget = check(model_pt, "deepglint-light")
    onnx_path, parity = export_checkpoint(model_pt, out / "export" / "mbf.onnx")
    held_out = faces["data"] / "heldout"
    if not (held_out / "landmarks106.npy").exists():
        from visrec.data.synth import write_face_dataset

        shutil.rmtree(held_out, ignore_errors=True)  # the demo's own folder, left half-written by a killed run
        write_face_dataset(held_out, 40, 8, format="recordio", seed=3, difficulty=DEMO["difficulty"],
                           first_identity=200_000)
    ev = evaluate_faces(model=onnx_path, data=held_out, targets=(1e-3, 1e-4), out=out / "report")
    return {"budget": budget, "onnx": onnx_path, "parity": parity, "eval": ev}


def run_demo(out: Path, steps: int = DEMO["face_steps"], console: Console | None = None) -> None:
    """Every section in turn, with ``DEMO["threads"]`` torch threads (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO["threads"])
    try:
        _run_demo(out, steps, console)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, steps: int, console: Console | None) -> None:
    import os

    # Milvus Lite's embedded server complains about the client's keepalive pings through gRPC's C-core
    # log, in the middle of later sections' tables; failures still surface as pymilvus exceptions
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    console = console or Console()
    out = check_output(out, kind="dir")  # a file, or a path under one, named before any work (as every command)
    out.mkdir(parents=True, exist_ok=True)
    faces = faces_section(out, steps, console)
    table = Table(title="visrec demo — faces (synthetic, held-out identities)")
    table.add_column("model")
    table.add_column("10-fold verification accuracy", justify="right")
    table.add_row("MobileFaceNet, untrained", f"{faces['untrained']:.4f}")
    table.add_row(f"MobileFaceNet, {faces['steps']} steps ({faces['seconds'] / 60:.1f} min CPU)",
                  f"{faces['trained']:.4f}")
    console.print(table)
    console.print(f"data: {faces['data']}\nrun (checkpoints, metrics.jsonl, model.pt): {faces['run']}")

    extra = budget_and_eval_section(out, faces, console)
    b = extra["budget"]
    table = Table(title="budget (deepglint-light) and exact evaluation of the exported model")
    table.add_column("item")
    table.add_column("value")
    for limit in b.limits:
        table.add_row(limit.name, f"{limit.measured} ({limit.limit}): {'pass' if limit.passed else 'FAIL'}")
    table.add_row("MACs / FLOPs (LFR rule)", f"{b.macs / 1e9:.3f} G / {b.lfr_flops / 1e9:.3f} G")
    table.add_row("ONNX parity", f"max |diff| {extra['parity'].max_abs_diff:.1e}, min cosine "
                                 f"{extra['parity'].min_cosine:.6f}")
    for t, r in extra["eval"].results.items():
        value = f"{r.tpr:.4f} at threshold {r.threshold:.4f}" if r.estimable and r.tpr is not None else r.reason
        table.add_row(f"TPR@FPR={t:g}, {r.genuine_count:,} genuine / {r.impostor_count:,} impostor pairs", value)
    console.print(table)
    console.print(f"ONNX model: {extra['onnx']}\nHTML report (open in a browser): {extra['eval'].report}")

    gallery_section(out, faces, console)
    video_section(out, faces["run"], console)
    landmarks_section(out, console)
    products_section(out, console)

    real_faces_section(out, console)


def gallery_section(out: Path, faces: dict, console: Console) -> dict:
    """Enroll held-out synthetic identities into a Milvus Lite gallery (one photo each) with the trained
    model, identify other photos of them, and print the top-1 rate (the service's path, without HTTP)."""
    import numpy as np

    from visrec.data.synth import render_face

    try:
        embedder = Embedder(faces["run"])
        path = out / "gallery" / "demo.db"
        if path.exists():
            path.unlink()  # a fresh gallery each run: the demo's model changes between runs
        gallery = open_gallery("milvus", uri=str(path), model_name=embedder.name, dim=embedder.dim)
    except Exception as exc:  # noqa: BLE001 - the demo goes on; say why this section did not run
        console.print(f"gallery: skipped — {exc}", markup=False)
        return {"skipped": str(exc)}
    ids = range(200_000, 200_000 + DEMO["gallery_identities"])
    shots = {i: [render_face(i, np.random.default_rng([i, k]), difficulty=0.2)[0] for k in range(3)] for i in ids}
    enroll = embedder(np.stack([s[0] for s in shots.values()]))
    for i, e in zip(ids, enroll):
        gallery.enroll(f"person-{i}", e[None], hashes=[f"{i}-0"])
    probes = embedder(np.stack([s[k] for s in shots.values() for k in (1, 2)]))
    hits = [m[0].identity == f"person-{i}" for i, m in zip([i for i in ids for _ in (1, 2)], gallery.search(probes, 1))]
    top1 = float(np.mean(hits))
    console.print(f"gallery (Milvus Lite, {path}): {len(ids)} held-out identities enrolled from one photo each; "
                  f"top-1 identification of {len(hits)} other photos: {top1:.3f}")
    gallery.close()
    return {"top1": top1, "identities": len(ids)}


def video_section(out: Path, backbone: Path, console: Console, identities: tuple[int, int] = (60, 50),
                  steps: int = 60) -> dict:
    """iQIYI-style videos (synthetic, 40% of frames degraded: blur, dark, occluded) -> a quality head that
    predicts per-frame fusion weights, trained on the frozen ``backbone`` (the settings of
    configs/faces/video-quality.yaml) -> TPR@FPR=1e-4 between held-out videos for mean, norm-weighted and
    learned fusion. ``identities``: (training, held-out); 3 and 4 videos of 8 frames each."""
    from visrec.data.video import write_video_dataset
    from visrec.faces.evaluation import evaluate_video_model
    from visrec.train.trainer import train

    data, run_dir = out / "data" / "videos", out / "runs" / "video-quality"
    if not (data / "val" / "videos.csv").exists():
        console.print(f"rendering synthetic videos into {data}")
        shutil.rmtree(data, ignore_errors=True)  # the demo's own folder, left half-written by a killed run
        write_video_dataset(data / "train", identities[0], 3, 8, seed=1, degraded_share=0.4)
        write_video_dataset(data / "val", identities[1], 4, 8, seed=2, degraded_share=0.4, first_identity=50_000)
    cfg = parse_config({
        "task": "faces_video", "output": str(run_dir), "device": "cpu", "batch_size": 16, "seed": 0,
        "model": {"name": "quality_fusion", "backbone": str(backbone), "hidden": 32, "freeze_backbone": True},
        "data": {"videos": str(data / "train" / "videos.csv"), "clip": 8},
        "loss": {"name": "cosface", "s": 30.0, "m": 0.2}, "optim": {"name": "adamw", "lr": 0.005, "weight_decay": 0.0},
        "schedule": {"max_steps": steps, "warmup_steps": 2}, "checkpoint_every": 1000,
    }, source="demo config")
    if run_dir.exists():  # the backbone may have changed since (or a run was cut short): a fresh head each run
        shutil.rmtree(run_dir)
    train(cfg, source="demo config")
    res = evaluate_video_model(run_dir, data / "val" / "videos.csv", ("mean", "norm", "learned"), (1e-4,))
    table = Table(title=f"video faces (synthetic iQIYI-style, {len(res.video_ids)} held-out videos): "
                        f"frame fusion, TPR@FPR=1e-4")
    table.add_column("fusion")
    table.add_column("TPR@1e-4", justify="right")
    table.add_column("threshold / why not", justify="right")
    for fusion, by_target in res.results.items():
        r = by_target[1e-4]
        if r.estimable:
            table.add_row(fusion, f"{r.tpr:.4f}", f"{r.threshold:.4f}")
        else:
            table.add_row(fusion, "-", r.reason)
    console.print(table)
    console.print(f"fusion model: {run_dir} (visrec eval faces {run_dir} --video --data "
                  f"{data / 'val' / 'videos.csv'} --fusion learned)")
    return {fusion: by_target[1e-4] for fusion, by_target in res.results.items()}


def landmarks_section(out: Path, console: Console, faces: tuple[int, int] = (300, 100), steps: int = 220) -> dict:
    """Synthetic 106-point faces in the JD-landmark layout -> heatmap_lite at half width, soft-argmax
    coordinates and the Wing loss (the settings of configs/landmarks/synthetic-heatmap.yaml) -> NME under
    each normalisation, AUC@0.08 and failure rate on held-out faces, beside the mean training shape as a
    baseline; HTML report with the CED curve. ``faces``: (training, held-out)."""
    import numpy as np

    from visrec.data.synth import write_synthetic_jd
    from visrec.evaluate.landmark_report import landmark_metrics
    from visrec.faces.evaluation import evaluate_landmarks
    from visrec.data.landmark_crops import JDCrops
    from visrec.train.trainer import train

    data, run_dir = out / "data" / "landmarks", out / "runs" / "landmarks-heatmap"
    if not (data / "complete").exists():  # written last: a killed run's half-written sets are rendered again
        shutil.rmtree(data, ignore_errors=True)
        console.print(f"rendering synthetic 106-point faces into {data} (JD-landmark layout)")
        write_synthetic_jd(data / "train", faces[0], seed=11, difficulty=0.3)
        write_synthetic_jd(data / "val", faces[1], seed=12, difficulty=0.3)
        (data / "complete").write_text("")
    if not (run_dir / "model.pt").exists():
        cfg = parse_config({
            "task": "landmarks", "output": str(run_dir), "device": "cpu", "batch_size": 32, "num_workers": 0,
            "model": {"name": "heatmap_lite", "width_mult": 0.5},
            "data": {"train": str(data / "train"), "points": 106, "augment": False},
            "loss": {"name": "wing", "w": 10.0, "eps": 2.0}, "optim": {"name": "adamw", "lr": 0.005,
                                                                     "weight_decay": 1.0e-4},
            "schedule": {"max_steps": steps, "warmup_steps": min(20, steps // 4), "kind": "cosine"},
            "checkpoint_every": 100000,
        }, source="demo config")
        train(cfg, resume=run_dir.exists(), source="demo config")  # a demo cut short left a log: from step 0 again
    ev = evaluate_landmarks(run_dir, data / "val", out / "eval-landmarks")
    # the mean-shape baseline: the mean training shape (crop coordinates) predicted for every held-out face
    from visrec.models.loading import model_contract

    c = model_contract(run_dir)  # the crop the model was trained on
    n, size, margin = c.num_points, c.crop_size, c.crop_margin
    train_set, val = JDCrops(data / "train", n, size, margin, False), JDCrops(data / "val", n, size, margin, False)
    mean_shape = np.mean([train_set[i][1].numpy() for i in range(len(train_set))], axis=0) * size
    gt = np.stack([val[i][1].numpy() for i in range(len(val))]) * size
    base = landmark_metrics(np.broadcast_to(mean_shape, gt.shape), gt)
    table = Table(title=f"landmarks (synthetic 106-point, {ev.faces} held-out faces): heatmap_lite, {steps} steps")
    for col in ("normalisation", "NME", "AUC@0.08", "failure@0.08", "mean-shape NME"):
        table.add_column(col, justify="left" if col == "normalisation" else "right")
    for norm, m in ev.metrics.items():
        table.add_row(norm, f"{m['nme']:.4f}", f"{m['auc@0.08']:.4f}", f"{m['fr@0.08']:.3f}", f"{base[norm]['nme']:.4f}")
    console.print(table)
    console.print(f"HTML report (CED curve, overlays): {ev.report}")
    return {"metrics": ev.metrics, "mean_shape": base, "report": ev.report}


def products_section(out: Path, console: Console) -> dict:
    """Synthetic Perfect-500K layout -> catalogue index (ImageNet-style ResNet-18 with GeM, random weights: no
    download) -> mAP@7 of the in-the-wild queries, both forms, and the HTML report with each query's top 7."""
    import torch

    from visrec.data.synth_products import write_product_dataset
    from visrec.index.evaluation import evaluate_products
    from visrec.index.catalogue import IndexOptions, build_catalogue_index
    from visrec.models import build_backbone

    root, index = out / "data" / "products", out / "products-index"
    if not (root / "val.csv").exists():
        shutil.rmtree(root, ignore_errors=True)  # the demo's own folder, left half-written by a killed run
        write_product_dataset(root, families=6, products_per_family=3, variants=3, queries_per_product=2, size=128)
    spec = {"name": "product", "backbone": "resnet18", "pooling": "gem", "dim": 128}
    torch.manual_seed(0)
    build_catalogue_index(root / "catalogue", index, build_backbone(**spec), spec, IndexOptions(size=128))
    res = evaluate_products(index, root, out / "eval-products")
    table = Table(title=f"products (synthetic Perfect-500K layout, {res.queries} queries, untrained ResNet-18 GeM)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in res.metrics.items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    console.print(f"submission: {res.submission}\nHTML report (queries and their top 7): {res.report}\n"
                  f"fine-tune the descriptor: visrec train --config configs/products/synthetic.yaml (BENCHMARKS.md: "
                  f"mAP@7 0.087 -> 0.370 on held-out queries, 160 steps)")
    return res.metrics
