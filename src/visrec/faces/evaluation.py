"""Face evaluation runs: a model (checkpoint or ONNX) or a features file, a labelled data set, a protocol
-> exact TPR at the protocol's targets (+ 10-fold accuracy for a .bin) and an HTML report; the LFR image-track
submission; IJB-B/C; video lists. The model runs here and its outputs go to the metrics of
:mod:`visrec.evaluate`, which imports no model.

``evaluate_faces`` (and ``embed_all``) also run as several processes (``group``: a torch.distributed process
group, as ``visrec eval faces`` under torchrun passes): each rank embeds every world-th batch, the embeddings are
gathered back into data-set order, the exact all-pairs TPR@FPR is sharded across the ranks, and every rank gets
the single-process result; rank 0 writes the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visrec._onnx import parse_providers
from visrec.data.datasets import open_face_dataset
from visrec.data.images import read_image
from visrec.data.landmark_crops import JDCrops
from visrec.data.schemes import SCHEMES
from visrec.data.text import check_apart, staged_files
from visrec.data.verification import read_verification_bin
from visrec.errors import ConfigError, DataError, VisrecError
from visrec.evaluate import ijb
from visrec.evaluate.bin_protocol import evaluate_bin_both, flip_embeddings, fold_problem, format_both, mirror
from visrec.evaluate.landmark_report import (LandmarkEval, check_submission_folder, landmark_metrics,
                                             write_landmark_report, write_submission)
from visrec.evaluate.lfr import (image_submission_entries, labelled_rows, read_entry_labels,
                                 write_image_submission)
from visrec.evaluate.report import write_face_report
from visrec.evaluate.verification import _curve, normalise, tpr_at_fpr, tpr_at_fpr_pairs
from visrec.evaluate.video import score_videos
from visrec.faces import align
from visrec.models.inference import video_features
from visrec.models.loading import checkpoint_file, load_model
from visrec.protocols import load_protocol
from visrec.distributed import all_gather_rows, on_every_rank, rank_and_size


@dataclass
class FaceEvalResult:
    """``bin_accuracy``: the headline 10-fold accuracy (mean, std) of a ``.bin``, with the flip test (the
    field's convention); ``extra["bin"]``: both figures, a :class:`~visrec.evaluate.bin_protocol.BinBoth`."""

    results: dict
    summary: dict[str, str]
    report: Path
    bin_accuracy: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)


def _load(model: str | Path, providers=None, summary: dict | None = None):
    """The face embedder of ``model`` (``visrec.models.loading.load_model``: a torch module on CUDA when there
    is one, an ONNX file on the onnxruntime execution ``providers``); an ONNX Runtime model's providers go into
    ``summary`` (``runtime``)."""
    loaded = load_model(model, device="auto", providers=providers)
    if loaded.contract.task == "landmarks":
        raise VisrecError(f"{model} is a landmark model, not a face embedder")
    return _runs_on(loaded, model, providers, summary)


def _runs_on(loaded, model, providers, summary: dict | None):
    """``loaded``, checked: ``providers`` asking for a GPU apply to a model ONNX Runtime runs, and are a
    ConfigError for one it does not (they would be ignored); an ONNX Runtime model's providers into ``summary``."""
    spec = parse_providers(providers)
    if spec.explicit_gpu and loaded.runtime != "onnxruntime":
        raise ConfigError(f"--providers {spec.text}: {model} runs in {loaded.runtime} (PyTorch places a checkpoint "
                          f"on CUDA when there is one); --providers applies to .onnx models")
    if summary is not None and loaded.runtime == "onnxruntime":
        summary["runtime"] = loaded.runtime_note
    return loaded


def _evaluate_bin(data: Path, model, targets, summary: dict, out, batch: int, progress, curve_bins: int,
                  group=None, providers=None) -> FaceEvalResult:
    """A verification ``.bin``: 10-fold accuracy with and without the flip test (both, labelled; the flip
    figure is the headline), and exact TPR@FPR (strict rule) over its pairs on the flip embeddings."""
    images, issame = read_verification_bin(data)  # a bad .bin fails before the model loads, as other data do
    problem = fold_problem(len(issame))  # nor would the 10-fold accuracy after every image was embedded
    if problem:
        raise DataError(problem, path=data)
    loaded = _load(model, providers, summary)
    size = tuple(loaded.contract.input_size or ())
    if size and images[0].shape[:2] != size:  # as the LFR image track: aligned crops are never resized here
        h, w = images[0].shape[:2]
        raise DataError(f"images are {w}x{h}, {model} takes aligned {size[1]}x{size[0]} crops", path=data, record=0)
    plain = embed_all(loaded.embed, len(images), images.__getitem__, batch, progress, group=group)
    mirrored = embed_all(loaded.embed, len(images), lambda i: mirror([images[i]])[0], batch, progress, group=group)
    both = evaluate_bin_both(plain, mirrored, issame)
    emb = flip_embeddings(plain, mirrored)
    summary["flip test"] = ("both reported; the headline accuracy and the TPR table use the flip test "
                            "(image + mirror embeddings summed, the field's convention)")
    summary.update(format_both(both))
    pairs = np.stack([np.arange(0, len(emb), 2), np.arange(1, len(emb), 2)], 1)
    results = tpr_at_fpr_pairs(emb, issame, targets, pairs=pairs)
    e = normalise(emb).numpy()
    scores = (e[0::2] * e[1::2]).sum(1)
    edges = np.linspace(-1, 1, curve_bins + 1)
    gh, _ = np.histogram(scores[issame], edges)
    ih, _ = np.histogram(scores[~issame], edges)
    curve = _curve(gh.astype(float), ih.astype(float), curve_bins)
    report = _report(out, results, curve, summary, group)
    head = both.headline
    return FaceEvalResult(results, summary, report, (head.accuracy_mean, head.accuracy_std), {"bin": both})


def _report(out, results, curve, summary: dict, group) -> Path:
    """The HTML report, written by rank 0 alone (every rank holds the same results)."""
    if rank_and_size(group)[0] == 0:
        with staged_files(out) as stage:  # a kill leaves the earlier report whole, not a half-written page
            write_face_report(stage, results, curve, summary)
    return Path(out) / "report.html"


def embed_all(embed, count: int, get_image, batch: int, progress, *, group=None) -> np.ndarray:
    """``embed`` over images ``get_image(0..count-1)`` in batches of ``batch``; ``progress(n)`` per batch.

    With ``group`` (a torch.distributed process group; every rank calls this with the same images), rank r
    embeds the batches b with b % world == r — the same batches one process would form, so the same bits — and
    every rank returns all the embeddings in image order; ``progress`` hears this rank's batches."""
    rank, world = rank_and_size(group)
    starts = list(range(0, count, batch))

    def mine() -> list[np.ndarray]:
        out = []
        for b, start in enumerate(starts):
            if b % world != rank:
                continue
            imgs = [get_image(i) for i in range(start, min(count, start + batch))]
            out.append(embed(np.stack(imgs)))
            if progress:
                progress(len(imgs))
        return out

    if world == 1:
        return np.concatenate(mine())
    local = on_every_rank("embedding the images", mine, group)
    parts = all_gather_rows(np.concatenate(local) if local else np.zeros((0,), np.float32), group)
    taken, ordered = [0] * world, []
    for b, start in enumerate(starts):
        r, size = b % world, min(count, start + batch) - start
        ordered.append(parts[r][taken[r]:taken[r] + size])
        taken[r] += size
    return np.concatenate(ordered)


def evaluate_faces(*, data: str | Path | None = None, model: str | Path | None = None,
                   features: str | Path | None = None, labels: str | Path | None = None,
                   filelist: str | Path | None = None, protocol: str = "deepglint-light",
                   targets: tuple[float, ...] | None = None, out: str | Path = "eval-out",
                   batch: int = 128, progress=None, curve_bins: int = 2000, flip: bool = False,
                   group=None, providers=None) -> FaceEvalResult:
    """Evaluate a features file, or a model on a data set. A ``.bin`` always reports the 10-fold accuracy
    with and without the flip test (the flip figure is the headline); ``flip`` applies to the other data
    kinds (image folder, RecordIO, CSV), whose TPR@FPR uses it when set. ``group``: run as the ranks of this
    torch.distributed process group (module docstring); every rank returns the single-process result.
    ``providers``: the onnxruntime execution providers of an ONNX model (``visrec._onnx``; None: the CPU)."""
    proto = load_protocol(protocol)
    targets = tuple(targets or proto.targets or (1e-4, 1e-6, 1e-8))
    summary = {"protocol": proto.name, "targets": ", ".join(f"{t:g}" for t in targets)}
    world = rank_and_size(group)[1]
    if world > 1:
        summary["processes"] = f"{world} (embedding batches and all-pairs blocks sharded, results merged exactly)"
    bin_acc = None
    if features is not None:
        if labels is None or filelist is None:
            raise VisrecError("--features needs --filelist (the row order) and --labels (CSV name,label)")
        emb, lab = labelled_rows(features, filelist, read_entry_labels(labels))
        summary.update({"features": str(features), "rows": f"{len(emb):,}"})
    elif model is not None and data is not None:
        data = Path(data)
        summary.update({"model": str(model), "data": str(data)})
        if data.suffix == ".bin":
            return _evaluate_bin(data, model, targets, summary, out, batch, progress, curve_bins, group, providers)
        # bad data fails before the model loads
        ds = open_face_dataset(data, also_accepted="a .bin pairs file", scored=True)
        loaded = _load(model, providers, summary)
        summary["flip test"] = "yes" if flip else "no"
        size = loaded.contract.input_size
        emb = embed_all(lambda images: loaded.embed(images, flip=flip), len(ds),
                        lambda i: ds.crop(i, size, str(model)), batch, progress, group=group)
        lab = ds.labels
        summary.update({"images": f"{len(ds):,}", "identities": f"{ds.num_classes:,}"})
    else:
        raise VisrecError("give features= (a features file), or model= (a checkpoint or ONNX file) with data=")
    results, curve = tpr_at_fpr(emb, lab, targets, curve_bins=curve_bins, group=group)
    report = _report(out, results, curve, summary, group)
    return FaceEvalResult(results, summary, report, bin_acc)


def image_submission(*, model: str | Path, images: str | Path, filelist: str | Path, out: str | Path,
                     expected_rows: int | None = None, batch: int = 128, progress=None, providers=None) -> Path:
    """``visrec eval faces M --data IMAGES --filelist filelist.txt --submission out.bin``: the LFR
    image-track feature binary (``visrec.evaluate.lfr.write_image_submission``): ``IMAGES`` is the folder the
    file list's paths are relative to (the DeepGlint test set's aligned crops), rows in file-list order,
    each the flip-summed embedding L2-normalised, float32. ``providers``: as :func:`evaluate_faces`'s."""
    check_apart(out, {"the model": checkpoint_file(model), "the images folder": images, "the file list": filelist},
                what="the submission")
    entries = image_submission_entries(images, filelist, expected_rows)  # bad data fail before the model loads
    loaded = _load(model, providers)
    size = tuple(loaded.contract.input_size or (112, 112))
    return write_image_submission(loaded.embed, images, filelist, out, input_size=size, batch=batch,
                                  expected_rows=expected_rows, progress=progress, entries=entries)


@dataclass
class IJBRun:
    """``visrec eval ijb``: per pooling setting (``PoolOptions.label``), the 1:1 results of both rules
    (``visrec.evaluate.ijb.ijb_verification``) and, when the 1:N files are present, the 1:N result."""

    root: Path
    target: str
    images: int
    templates: int
    genuine_pairs: int
    impostor_pairs: int
    results: dict = field(default_factory=dict)  # label -> {"options", "verification", "identification"}
    align: str = ""
    notes: list[str] = field(default_factory=list)


def ijb_embeddings(model: str | Path, layout, five, *, batch: int = 64, progress=None, providers=None):
    """Embeddings of every IJB image (in meta-file order) and of its mirror: each ``loose_crop`` image is
    aligned with its five points to the model's input size (the model's alignment method; ``lstsq``, the
    ArcFace template, when it names none). Returns (plain, mirrored, align description). ``providers``: the
    onnxruntime execution providers of an ONNX model."""
    loaded = _load(model, providers)
    h, w = tuple(loaded.contract.input_size or (112, 112))
    if h != w:
        raise VisrecError(f"{model}: input {w}x{h}; the ArcFace five-point alignment makes square crops")
    method = loaded.contract.align_method if loaded.contract.align_method in align.ALIGN_METHODS else "lstsq"
    plain, mirrored = [], []
    names = five.image_names
    for start in range(0, len(names), batch):
        crops = []
        for i in range(start, min(len(names), start + batch)):
            img = read_image(layout.images / names[i])
            crop, _ = align.align_face(img, five.points[i], size=h, method=method)
            crops.append(crop)
        arr = np.stack(crops)
        plain.append(np.asarray(loaded.embed(arr), np.float32))
        mirrored.append(np.asarray(loaded.embed(mirror(arr)), np.float32))
        if progress:
            progress(len(crops))
    return np.concatenate(plain), np.concatenate(mirrored), f"{method} five-point similarity to {h}x{h}"


def evaluate_ijb(root: str | Path, model: str | Path, *, target: str | None = None, options=None,
                 all_options: bool = False, far_targets=None, fpir_targets=None, ranks=None, batch: int = 64,
                 progress=None, providers=None) -> IJBRun:
    """IJB-B/C 1:1 (both rules) and 1:N (when its CSVs are present) for ``model`` on the release at ``root``
    (``visrec.evaluate.ijb`` states the files, the pooling and the rules). ``options``: one
    :class:`~visrec.evaluate.ijb.PoolOptions` (default InsightFace's F1 N1 D1); ``all_options`` evaluates
    all eight settings from the same embeddings. ``providers``: the onnxruntime execution providers of an ONNX
    model (``visrec._onnx``; None: the CPU)."""
    from itertools import product

    layout = ijb.IJBLayout.find(root, target)
    meta, five = ijb.read_layout(layout)
    pairs = ijb.read_template_pairs(layout.pairs)
    tids = np.unique(meta.templates)
    for which, ids in (("first", pairs[0]), ("second", pairs[1])):
        missing = ~np.isin(ids, tids)
        if missing.any():
            k = int(np.argmax(missing))
            raise DataError(f"the {which} template {int(ids[k])} has no image in {layout.tid_mid.name}",
                            path=layout.pairs, record=f"pair {k + 1}")
    gallery = probe = split = None
    if layout.has_1n:
        gallery, split, probe = ijb.read_1n(layout, meta)
    settings = [ijb.PoolOptions(*f) for f in product((True, False), repeat=3)] if all_options else \
        [options or ijb.PoolOptions()]
    if any(opt.detector_score for opt in settings):
        ijb.check_detector_scores(meta, five, layout.five_points)
    # every check above runs before the model loads: embedding a real release takes hours
    plain, mirrored, align = ijb_embeddings(model, layout, five, batch=batch, progress=progress, providers=providers)
    run = IJBRun(layout.root, layout.prefix.upper(), len(meta.image_names), len(tids), int(pairs[2].sum()),
                 int((~pairs[2]).sum()), align=align)
    if gallery is None:
        run.notes.append("1:N skipped: " + ", ".join(p.name for p in (*layout.galleries, layout.probes)) + " not all present")
    for opt in settings:
        feats = ijb.image_features(plain, mirrored, five.scores, opt)
        entry = {"options": opt,
                 "verification": ijb.ijb_verification(feats, meta, pairs, tuple(far_targets or ijb.FAR_TARGETS),
                                                      norm_first=False, path=layout.pairs),
                 "identification": None}
        if gallery is not None:
            entry["identification"] = ijb.ijb_identification(
                feats, meta, gallery, probe, tuple(ranks or ijb.RANKS), tuple(fpir_targets or ijb.FPIR_TARGETS),
                norm_first=False, galleries=split)
        run.results[opt.label] = entry
    return run


def evaluate_videos(model, video_list, fusions=("mean",), targets=(1e-4,), device="cpu",
                    submission: str | Path | None = None, filelist: str | Path | None = None, progress=None):
    """A face model on a video list (its file, or the items ``read_video_list`` read from it): a torch module (a
    quality_fusion model for ``learned``) or a loaded model with ``embed`` (an ONNX export); fused features
    (:func:`visrec.models.inference.video_features`) scored by :func:`visrec.evaluate.video.score_videos`."""
    feats, labels, ids = video_features(model, video_list, fusions, device, progress=progress)
    return score_videos(feats, labels, ids, fusions, targets, submission, filelist)


def evaluate_video_model(model: str | Path, video_list: str | Path, fusions=("mean",), targets=(1e-4,),
                         submission: str | Path | None = None, filelist: str | Path | None = None,
                         progress=None, providers=None):
    """``visrec eval faces --video``: a visrec checkpoint, an ONNX export (on the onnxruntime ``providers``) or
    an adapter on a video list; ``learned`` fusion needs a quality_fusion checkpoint (its quality head is not
    in an ONNX export, which holds the frame embedder)."""
    import torch

    from visrec.data.video import read_video_list

    items = read_video_list(video_list)  # a bad list fails before the model loads
    if submission is not None:
        check_apart(submission, {"the model": checkpoint_file(model), "the video list": video_list,
                                 "the file list": filelist}, what="the submission")
    summary = {}
    loaded = _load(model, providers, summary)
    net = loaded.module
    if "learned" in fusions and not hasattr(net, "frame_outputs"):
        what = f"a model {loaded.runtime} runs" if net is None else \
            f"a {dict(loaded.contract.arch or {'name': loaded.name})['name']!r} backbone"
        raise ConfigError(f"--fusion learned needs a quality_fusion checkpoint (its quality head); {model} is "
                          f"{what} (train one with configs/faces/video-quality.yaml)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = evaluate_videos(net if net is not None else loaded, items, tuple(fusions), tuple(targets), device,
                          submission, filelist, progress)
    res.summary.update({"model": str(model), "videos list": str(video_list), **summary})
    return res


def evaluate_landmarks(model: str | Path, data: str | Path, out: str | Path = "eval-landmarks",
                       points: int | None = None, size: int | None = None, margin: float | None = None,
                       coordinates: str = "integer", providers=None) -> LandmarkEval:
    """A landmark model (visrec checkpoint or ONNX, via ``visrec.models.load_model``) on a JD-landmark
    directory (face-box crops). ``points``, ``size`` and ``margin`` (crop enlargement per side) default to
    the model's contract: the crop it was trained on; giving other values evaluates on other crops.
    ``points`` must be the model's point count, and a model whose contract names a point scheme must name the
    data's (``jd106`` for 106 points, the ``visrec.data.schemes`` scheme of the count): another order would
    be scored point by point against the wrong points. Both are checked before the model runs.
    The challenge submission goes to ``out/submission`` with ``coordinates`` as ``write_submission`` takes
    them (integer by default, as the challenge asked; the folder is replaced whole, and refused when it holds
    anything but an earlier submission); the metrics use the unrounded predictions. ``providers``:
    the onnxruntime execution providers of an ONNX model (``visrec._onnx``; None: the CPU)."""
    import torch

    check_submission_folder(Path(out) / "submission")  # before the model runs
    info = {"model": str(model), "data": str(data)}
    loaded = _runs_on(load_model(model, providers=providers), model, providers, info)
    c = loaded.contract
    if c.task != "landmarks" or c.crop_size is None:
        raise DataError(f"not a visrec landmark model (its contract says task {c.task!r})", path=model)
    if points is not None and c.num_points is not None and int(points) != c.num_points:
        raise DataError(f"the model predicts {c.num_points} points; {points} were asked for (--points) on {data}",
                        path=model)
    points = int(points or c.num_points or 106)
    scheme = next((s.name for s in SCHEMES.values() if s.num_points == points), None)
    if c.point_scheme is not None and scheme is not None and c.point_scheme != scheme:
        raise DataError(f"the model's points are in the {c.point_scheme!r} order (its contract), the data {data} "
                        f"in the {scheme!r} order: scoring one against the other compares different points",
                        path=model)
    size = int(size or c.crop_size)
    margin = float(c.crop_margin if margin is None else margin)
    ds = JDCrops(Path(data), points, size, margin, augment=False)
    preds, gts = [], []
    for start in range(0, len(ds), 64):
        items = [ds[i] for i in range(start, min(len(ds), start + 64))]
        preds.append(loaded.predict_crops(torch.stack([it[0] for it in items]).numpy()) * size)
        gts.append(np.stack([it[1].numpy() for it in items]) * size)
    pred = np.concatenate(preds) if preds else np.zeros((0, points, 2), np.float32)
    gt = np.concatenate(gts) if gts else np.zeros((0, points, 2), np.float32)
    metrics = landmark_metrics(pred, gt, sources=[_landmark_file(Path(data), p) for p in ds.paths])
    images = [ds.crop(i)[0] for i in range(min(12, len(ds)))]
    info.update({"faces": str(len(ds)), "crop": f"margin {margin:g} per side, {size} px"})
    with staged_files(out) as stage:  # the report renamed in after the submission: never one run's beside another's
        write_landmark_report(stage, pred, gt, images, metrics, info)
        write_submission(Path(out) / "submission", ds, pred, coordinates)
    return LandmarkEval(metrics, Path(out) / "report.html", len(ds))


def _landmark_file(root: Path, picture) -> Path:
    """The ground-truth file of a JD-landmark picture (``landmark/<name>.txt``, else ``landmark/<stem>.txt``, as
    ``visrec.data.landmarks.read_jd_dir`` reads it), for error messages."""
    f = root / "landmark" / f"{Path(picture).name}.txt"
    return f if f.exists() else root / "landmark" / f"{Path(picture).stem}.txt"
