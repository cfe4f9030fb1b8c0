"""``visrec eval faces|ijb|landmarks|products MODEL --data D``: each evaluates the model (or product index)
named by its positional argument on ``--data`` and writes into ``--out``.

faces: exact TPR at the protocol's FPR targets, a table and an HTML report (or an LFR submission); ijb: IJB-B/C
1:1 and 1:N with InsightFace's template pooling, both TAR@FAR rules side by side; landmarks: NME under four
normalisations, AUC@0.08, the challenge submission; products: mAP@k in both forms, recall, submission."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from visrec.commands import PROVIDERS_HELP

app = typer.Typer(help="evaluate models and submissions", no_args_is_help=True)


def rate_option(what: str = "impostor pairs"):
    """A typer callback checking a --target-fpr (or --target-fpir) value, or each of a repeated one, when the
    command line is parsed (``visrec.evaluate.verification.check_target_fpr``: finite, in (0, 1]); ``what``:
    what the rate is a share of. ``search``, ``models calibrate`` and ``gallery calibrate`` take it too."""
    def check(value):
        from visrec.errors import VisrecError
        from visrec.evaluate.verification import check_target_fpr

        for v in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
            try:
                check_target_fpr(v)
            except VisrecError:
                raise typer.BadParameter(f"must be a finite number in (0, 1] (a share of {what}), got {v:g}") \
                    from None
        return value

    return check


def _check_out(path, kind: str, what: str = "--out", reads: dict | None = None):
    from visrec.data.text import check_output

    return check_output(path, kind=kind, what=what, reads=reads)


def _model_file(model):
    """The file a model argument names (a run directory's ``model.pt``), or None for none or an adapter name."""
    from visrec.models.loading import checkpoint_file

    return None if model is None else checkpoint_file(model)


@app.command("faces")
def faces(model: Optional[Path] = typer.Argument(None, help="face model: checkpoint, run dir or .onnx (not with "
                                                           "--features)"),
          data: Optional[Path] = typer.Option(None, "--data", help=".bin pairs, RecordIO dir, image folder or CSV"),
          features: Optional[Path] = typer.Option(None, "--features", help="LFR feature binary"),
          filelist: Optional[Path] = typer.Option(None, "--filelist", help="row order of --features or of "
                                                  "--submission (first field of each line)"),
          labels: Optional[Path] = typer.Option(None, "--labels", help="CSV name,label for --features"),
          protocol: str = typer.Option("deepglint-light", "--protocol", "-p", help="its FPR targets are the default"),
          target_fpr: list[float] = typer.Option([], "--target-fpr", callback=rate_option(),
                                                 help="FPR target(s) instead of the protocol's (repeat for several)"),
          flip: bool = typer.Option(False, "--flip", help="flip test: add the mirrored image's embedding (image "
                                    "folders, RecordIO, CSV; a .bin always reports both, the flip figure as "
                                    "the headline)"),
          video: bool = typer.Option(False, "--video", help="--data is a video list (video_id,path,label)"),
          fusion: list[str] = typer.Option([], "--fusion", help="video frame fusion: mean | norm | score | learned"),
          submission: Optional[Path] = typer.Option(
              None, "--submission", help="LFR feature binary to write: the image track (--data = the folder the "
              "--filelist paths are relative to), or with --video the video track"),
          expect_rows: Optional[int] = typer.Option(
              None, "--expect-rows", help="image submission: the file list must have this many entries "
              "(1862120 for the DeepGlint test set)"),
          out: Optional[Path] = typer.Option(None, "--out", help="report folder (report.html, PNGs); default "
                                             "eval-out (not with --video or --submission, which write no report)"),
          providers: str = typer.Option("cpu", "--providers", help=PROVIDERS_HELP)):
    """Face verification: exact TPR@FPR (strict rule), 10-fold accuracy for .bin sets (flip and no flip,
    the flip figure the headline), report.html; with --video, TPR@FPR between videos for each frame fusion;
    with --submission, the LFR feature binary (image track, or video track with --video). Under torchrun
    (python -m torch.distributed.run --nproc_per_node=N -m visrec.cli eval faces ...) the embedding and the
    all-pairs scoring are shared by the processes; rank 0 prints and writes the same results as one process."""
    from rich.progress import Progress

    _check_faces_options(model, data, features, filelist, labels, flip, video, fusion, submission, expect_rows, out,
                         target_fpr)
    if submission is not None:
        _check_out(submission, "file", "--submission",
                   reads={"MODEL": _model_file(model), "--data": data, "--filelist": filelist})
    if video:
        _one_process("visrec eval faces --video")
        return _videos(model, data, fusion or ["mean"], target_fpr or [1e-4], submission, filelist, providers)
    if submission is not None:
        _one_process("visrec eval faces --submission")
        return _image_submission(model, data, filelist, submission, expect_rows, providers)
    if not target_fpr:
        _check_protocol_targets(protocol)
    out = _check_out(Path("eval-out") if out is None else out, "dir")
    from visrec.faces.evaluation import evaluate_faces
    from visrec.distributed import setup, teardown, world_group

    ctx = setup()  # a gloo (CPU) or NCCL (CUDA) process group under torchrun only
    try:
        with Progress(transient=True, disable=not ctx.is_main) as bar:
            task = bar.add_task("embedding", total=None)
            res = evaluate_faces(data=data, model=model, features=features, labels=labels, filelist=filelist,
                                 protocol=protocol, targets=tuple(target_fpr) or None, out=out, flip=flip,
                                 progress=lambda n: bar.advance(task, n), group=world_group(ctx),
                                 providers=providers)
    finally:
        teardown(ctx)
    if not ctx.is_main:
        return
    t = Table(title="face verification (" + ", ".join(f"{k}: {v}" for k, v in res.summary.items()) + ")")
    for col in ("target FPR", "TPR", "threshold", "achieved FPR", "false accepts / impostors", "near t"):
        t.add_column(col)
    for tgt, r in res.results.items():
        if not r.estimable:
            t.add_row(f"{tgt:g}", "not estimable", r.reason, "", "", "")
            continue
        t.add_row(f"{tgt:g}", "n/a" if r.tpr is None else f"{r.tpr:.6f}", f"{r.threshold:.6f}", f"{r.fpr:.3e}",
                  f"{r.false_accepts:,} / {r.impostor_count:,}", str(r.near_threshold_pairs))
    Console().print(t)
    if "bin" in res.extra:
        for label, r in res.extra["bin"].as_dict().items():
            head = " (headline: the field's convention)" if r is res.extra["bin"].headline else ""
            Console().print(f"10-fold accuracy, {label}{head}: {r.accuracy_mean:.4f} +- {r.accuracy_std:.4f}")
    Console().print(f"report: {res.report}")


def _check_faces_options(model, data, features, filelist, labels, flip, video, fusion, submission, expect_rows,
                         out, target_fpr) -> None:
    """Refuse what ``eval faces`` would otherwise ignore without a word, before anything is read."""
    from visrec.errors import VisrecError

    def refuse(given: dict, why: str) -> None:
        named = [name for name, value in given.items() if value not in (None, False, [], ())]
        if named:
            raise VisrecError(f"{', '.join(named)}: {why}")

    if features is not None:
        refuse({"MODEL": model, "--data": data, "--video": video, "--submission": submission, "--fusion": fusion,
                "--flip": flip, "--expect-rows": expect_rows},
               "not with --features (the feature binary is evaluated as it is)")
        if filelist is None or labels is None:
            raise VisrecError("--features needs --filelist (the row order) and --labels (CSV name,label)")
        return
    refuse({"--labels": labels}, "only with --features (a model's data carries its own labels)")
    if model is None:
        raise VisrecError("give MODEL (a face model: checkpoint, run dir or .onnx) with --data D, or --features FILE "
                          "with --filelist L and --labels C")
    if data is None:
        raise VisrecError(f"{model}: --data is needed (.bin pairs, RecordIO dir, image folder or CSV list; with "
                          f"--video a video list; with --submission the images folder)")
    if not video:
        refuse({"--fusion": fusion}, "only with --video (frame fusion of a video list)")
    else:
        refuse({"--flip": flip, "--expect-rows": expect_rows, "--out": out},
               "not with --video (it prints its results and writes no report; --submission FILE writes the "
               "video-track features)")
        if filelist is not None and submission is None:
            refuse({"--filelist": filelist}, "with --video only beside --submission (the row order of its file)")
        return
    if submission is not None:
        refuse({"--out": out, "--target-fpr": target_fpr}, "not with --submission (it writes the image-track feature "
               "binary only, nothing is scored)")
        return
    refuse({"--filelist": filelist, "--expect-rows": expect_rows},
           "only with --features or --submission (the row order of a feature binary)")


def _check_protocol_targets(protocol: str) -> None:
    """The protocol (its FPR targets among its fields) checked before anything is read (a user YAML may hold
    ``targets: [0]``; :class:`visrec.protocols.Protocol` refuses it)."""
    from visrec.protocols import load_protocol

    load_protocol(protocol)


def _one_process(command: str) -> None:
    from visrec.distributed import one_process

    one_process(command)


def _image_submission(model, data, filelist, submission, expect_rows, providers):
    from rich.progress import Progress

    from visrec.errors import VisrecError
    from visrec.faces.evaluation import image_submission

    if model is None or data is None or filelist is None:
        raise VisrecError("an image-track submission needs MODEL, --data IMAGES_FOLDER and "
                          "--filelist filelist.txt (paths relative to IMAGES_FOLDER)")
    with Progress(transient=True) as bar:
        task = bar.add_task("embedding", total=None)
        path = image_submission(model=model, images=data, filelist=filelist, out=submission,
                                expected_rows=expect_rows, progress=lambda n: bar.advance(task, n),
                                providers=providers)
    import struct

    with open(path, "rb") as fh:
        rows, cols, _, _ = struct.unpack("<4i", fh.read(16))
    Console().print(f"LFR image features: {path} ({rows:,} rows in file-list order, {cols}-d float32, "
                    f"flip-summed and L2-normalised)")


def _videos(model, data, fusions, targets, submission, filelist, providers):
    from rich.progress import Progress

    from visrec.errors import VisrecError
    from visrec.faces.evaluation import evaluate_video_model

    if model is None or data is None:
        raise VisrecError("--video needs MODEL and --data VIDEO_LIST")
    with Progress(transient=True) as bar:
        task = bar.add_task("videos", total=None)
        res = evaluate_video_model(model, data, fusions, targets, submission, filelist,
                                   progress=lambda n: bar.advance(task, n), providers=providers)
    t = Table(title="video verification (" + ", ".join(f"{k}: {v}" for k, v in res.summary.items()) + ")")
    for col in ("fusion", "target FPR", "TPR", "threshold", "achieved FPR"):
        t.add_column(col)
    for f, results in res.results.items():
        for tgt, r in results.items():
            if not r.estimable:
                t.add_row(f, f"{tgt:g}", "not estimable", r.reason, "")
            elif r.tpr is None:  # no genuine pair (one video per identity): the FPR side is still measured
                t.add_row(f, f"{tgt:g}", f"n/a ({r.reason})", f"{r.threshold:.6f}", f"{r.fpr:.3e}")
            else:
                t.add_row(f, f"{tgt:g}", f"{r.tpr:.6f}", f"{r.threshold:.6f}", f"{r.fpr:.3e}")
    Console().print(t)
    if res.submission:
        Console().print(f"LFR video features ({fusions[0]} fusion): {res.submission}")


@app.command("ijb")
def ijb(model: Path = typer.Argument(..., help="face model: checkpoint, run dir, .onnx or model-zoo file"),
        data: Path = typer.Option(..., "--data", help="IJB release root: loose_crop/ and meta/ (IJB_C or IJB_B)"),
        release: Optional[str] = typer.Option(None, "--release", help="IJBC | IJBB (default: from the meta file "
                                                                      "names)"),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="image + mirror embeddings summed (F1)"),
        norm_score: bool = typer.Option(True, "--norm-score/--no-norm-score",
                                        help="keep raw feature norms (N1) or L2-normalise each image first (N0)"),
        detector_score: bool = typer.Option(True, "--detector-score/--no-detector-score",
                                            help="weight each image by its detector score (D1)"),
        all_options: bool = typer.Option(False, "--all-options", help="report all eight F/N/D pooling settings"),
        target_fpr: list[float] = typer.Option([], "--target-fpr", callback=rate_option(),
                                               help="1:1 false accept rate target(s) (default 1e-6 ... 1e-1)"),
        target_fpir: list[float] = typer.Option([], "--target-fpir", callback=rate_option("non-mated probes"),
                                                help="1:N false positive identification rate target(s) (default "
                                                     "0.01, 0.1)"),
        batch: int = typer.Option(64, "--batch", min=1, max=4096, help="images per forward pass"),
        out: Optional[Path] = typer.Option(None, "--out", help="also write the results as JSON to this file"),
        providers: str = typer.Option("cpu", "--providers", help=PROVIDERS_HELP)):
    """IJB-B/C: templates pooled as InsightFace pools them; 1:1 TAR@FAR by the strict rule and by the
    nearest-ROC-point rule of the published tables, side by side; 1:N CMC and TPIR@FPIR (both rules) when
    the gallery/probe CSVs are present."""
    from rich.progress import Progress

    from visrec.evaluate.ijb import PoolOptions
    from visrec.faces.evaluation import evaluate_ijb

    _one_process("visrec eval ijb")
    if out is not None:
        _check_out(out, "file", reads={"MODEL": _model_file(model), "--data": data})

    with Progress(transient=True) as bar:
        task = bar.add_task("embedding", total=None)
        run = evaluate_ijb(data, model, target=release, options=PoolOptions(flip, norm_score, detector_score),
                           all_options=all_options, far_targets=tuple(target_fpr) or None,
                           fpir_targets=tuple(target_fpir) or None,
                           batch=batch, progress=lambda n: bar.advance(task, n), providers=providers)
    con = Console()
    con.print(f"{run.target} at {run.root}: {run.images:,} images, {run.templates:,} templates, "
              f"{run.genuine_pairs:,} genuine + {run.impostor_pairs:,} impostor template pairs; alignment: {run.align}")
    for label, entry in run.results.items():
        opt = entry["options"]
        v = entry["verification"]
        t = Table(title=f"1:1 TAR@FAR, pooling {label} ({opt.describe()})")
        for col in ("target FAR", "TAR strict", "threshold", "FAR strict", "TAR nearest", "FAR nearest"):
            t.add_column(col)
        for tgt, r in v["strict"].items():
            n = v["nearest"][tgt]
            if r.estimable:
                t.add_row(f"{tgt:g}", f"{r.tpr:.4f}", f"{r.threshold:.6f}", f"{r.fpr:.3e}", f"{n.tpr:.4f}", f"{n.fpr:.3e}")
            else:
                t.add_row(f"{tgt:g}", "n/a", f"< 1/{tgt:g} impostors", "", f"{n.tpr:.4f}", f"{n.fpr:.3e}")
        con.print(t)
        con.print("strict: the highest TAR whose achieved FAR <= target (accept score >= t; n/a when there are "
                  "fewer than 1/target impostor pairs). nearest: the ROC point whose FAR is nearest the target, "
                  "as the published IJB tables (InsightFace ijb_11.py) read it; its FAR may exceed the target.")
        ident = entry["identification"]
        if ident is not None:
            t = Table(title=f"1:N, pooling {label}: {ident.probes:,} probe templates vs {ident.gallery:,} gallery "
                            f"templates (G1 + G2); CMC " + ", ".join(f"rank-{k} {v:.4f}" for k, v in ident.cmc.items()))
            for col in ("target FPIR", "TPIR strict", "FPIR strict", "TPIR insightface", "FPIR insightface"):
                t.add_column(col)
            for f, s in ident.strict.items():
                i = ident.insightface[f]
                t.add_row(f"{f:g}", f"{s['tpir']:.4f}" if s["estimable"] else "n/a",
                          f"{s['fpir']:.3e}" if s["estimable"] else "",
                          f"{i['tpir']:.4f}" if i["estimable"] else "n/a",
                          f"{i['fpir']:.3e}" if i["estimable"] else "")
            con.print(t)
            con.print("FPIR = non-mated (probe, gallery template) scores passing the threshold / probes, as "
                      "InsightFace's ijb_1n.py counts it. strict: the highest TPIR whose FPIR <= target (accept "
                      "score >= t; n/a below 1/target probes). insightface: t = the ceil(target x probes)-th "
                      "largest non-mated score, accept score > t.")
            for name, res in ident.open_set.items():
                cells = [f"FPIR {f:g}: TPIR {r['tpir']:.4f} (FPIR {r['fpir']:.3e})" if r["estimable"] else
                         f"FPIR {f:g}: n/a ({r['reason']})" for f, r in res.items()]
                con.print(f"open set on {name} alone (probes not enrolled in {name} are non-mated; strict rule): "
                          + "; ".join(cells))
            for note in ident.notes:
                con.print(note)
    for note in run.notes:
        con.print(note)
    if out is not None:
        import json

        from visrec.data.text import write_bytes_atomic

        write_bytes_atomic(out, json.dumps(ijb_json(run), indent=2).encode())
        con.print(f"results: {out}")


def ijb_json(run) -> dict:
    """A JSON-ready dict of an ``IJBRun`` (rules and pooling labelled)."""
    from dataclasses import asdict

    out = {"target": run.target, "root": str(run.root), "images": run.images, "templates": run.templates,
           "genuine_pairs": run.genuine_pairs, "impostor_pairs": run.impostor_pairs, "alignment": run.align,
           "notes": run.notes, "pooling": {}}
    for label, entry in run.results.items():
        v = entry["verification"]
        item = {"options": asdict(entry["options"]), "description": entry["options"].describe(),
                "tar_at_far": {"strict": {str(t): asdict(r) for t, r in v["strict"].items()},
                               "nearest_roc_point": {str(t): asdict(r) for t, r in v["nearest"].items()}}}
        ident = entry["identification"]
        if ident is not None:
            item["identification"] = {"cmc": {str(k): x for k, x in ident.cmc.items()},
                                      "tpir_at_fpir": {"strict": {str(k): x for k, x in ident.strict.items()},
                                                       "insightface": {str(k): x for k, x in ident.insightface.items()}},
                                      "open_set_strict": {g: {str(k): x for k, x in r.items()}
                                                          for g, r in ident.open_set.items()},
                                      "probes": ident.probes, "gallery": ident.gallery, "notes": ident.notes}
        out["pooling"][label] = item
    return out


@app.command("landmarks")
def landmarks(model: Path = typer.Argument(..., help="landmark model: checkpoint, run dir or .onnx"),
                   data: Path = typer.Option(..., "--data", help="JD-landmark directory"),
                   points: Optional[int] = typer.Option(None, "--points", help="default: the model's contract"),
                   out: Path = typer.Option(Path("eval-landmarks"), "--out", help="report and submission folder"),
                   coordinates: str = typer.Option(
                       "integer", "--coordinates",
                       help="submission coordinates: integer (what the ICME 2019 JD-landmark challenge asked for, "
                            "'with integer format', in its Details document on "
                            "facial-landmarks-localization-challenge.github.io) or decimal (3 decimals)"),
                   providers: str = typer.Option("cpu", "--providers", help=PROVIDERS_HELP)):
    """NME (four normalisations), AUC@0.08, failure rate; report.html with the CED and overlays."""
    from visrec.data.landmarks import SUBMISSION_COORDINATES
    from visrec.faces.evaluation import evaluate_landmarks

    _one_process("visrec eval landmarks")

    if coordinates not in SUBMISSION_COORDINATES:
        raise typer.BadParameter(f"must be one of {', '.join(SUBMISSION_COORDINATES)}", param_hint="--coordinates")
    _check_out(out, "dir")
    res = evaluate_landmarks(model, data, out, points=points, coordinates=coordinates, providers=providers)
    t = Table(title=f"landmarks: {res.faces} faces")
    t.add_column("normalisation")
    for key in next(iter(res.metrics.values())):
        t.add_column(key)
    for norm, m in res.metrics.items():
        t.add_row(norm, *(f"{v:.5f}" for v in m.values()))
    Console().print(t)
    Console().print(f"report: {res.report}\nchallenge submission (one .txt per picture, {coordinates} coordinates): "
                    f"{res.report.parent / 'submission'}")


@app.command("products")
def products(index_dir: Path = typer.Argument(..., help="index directory from visrec products index"),
                  data: Path = typer.Option(..., "--data", help="root with query/ and val.csv"),
                  k: int = typer.Option(7, "-k", min=1, help="results per query (mAP@k)"),
                  out: Path = typer.Option(Path("eval-products"), "--out", help="report and submission folder"),
                  ablation: bool = typer.Option(False, "--ablation",
                                                help="also report the metrics after each post-processing stage "
                                                     "(none, +stage 1, +stages 1-2, ...; exact search)"),
                  providers: str = typer.Option("cpu", "--providers", help=PROVIDERS_HELP + "; here: the index's "
                                                "ONNX descriptor (descriptor.onnx), run on the queries")):
    """mAP@k in both labelled forms, recall@1/k, submission.csv and report.html."""
    from visrec.index.evaluation import evaluate_products

    from rich.progress import Progress

    _one_process("visrec eval products")
    _check_out(out, "dir")
    _check_ground_truth(data)

    with Progress(transient=True) as bar:
        task = bar.add_task("searching queries", total=None)
        res = evaluate_products(index_dir, data, out, k, progress=lambda n: bar.advance(task, n), ablation=ablation,
                                providers=providers)
    t = Table(title=f"product retrieval: {res.queries} queries")
    t.add_column("metric")
    t.add_column("value", justify="right")
    labels = {f"map@{k}_hits": f"mAP@{k} hits (AP / hits in top {k})",
              f"map@{k}_min_gt": f"mAP@{k} min_gt (AP / min(|GT|, {k}), Kaggle mapk)"}
    for name, v in res.metrics.items():
        t.add_row(labels.get(name, name), f"{v:.4f}")
    Console().print(t)
    for message in res.postprocess_adjustments:
        Console().print(f"[yellow]index built with a shrunk stage:[/] {message}")
    for note in res.notes:
        Console().print(f"note: {note}", markup=False, style="yellow")
    if res.ablation:
        a = Table(title="post-processing ablation (exact search; each row adds the next stage)")
        a.add_column("stages applied")
        for name in res.ablation[0].metrics:
            a.add_column(name, justify="right")
        for row in res.ablation:
            a.add_row(row.chain, *(f"{v:.4f}" for v in row.metrics.values()))
        Console().print(a)
    Console().print(f"report: {res.report}" + (f"\nsubmission: {res.submission}" if res.submission else ""))


def _check_ground_truth(root: Path) -> None:
    """``ROOT/val.csv`` lists at least one query (read before the index is opened): an empty file would only
    surface later as a metric over nothing."""
    from visrec.data.products import GROUND_TRUTH, read_ground_truth
    from visrec.errors import DataError

    path = Path(root) / GROUND_TRUTH
    if path.exists() and not read_ground_truth(path):
        raise DataError("the ground truth lists no query (expected lines 'query_id,gt1,gt2,...')", path=path)
