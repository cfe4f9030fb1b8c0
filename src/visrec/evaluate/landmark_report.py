"""Landmark metrics of predicted points, the challenge submission files and the HTML report (CED curve,
metric table, prediction overlays). A model is run on a data set by
``visrec.faces.evaluation.evaluate_landmarks``, which hands its points here. The report is ``report.html`` +
PNGs, relative paths, no scripts or CDN.
"""

from __future__ import annotations

import html
import os
import shutil
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.data.images import IMAGE_SUFFIXES, image_size
from visrec.data.landmarks import MAX_OUTSIDE, SUBMISSION_COORDINATES, write_submission_txt
from visrec.data.text import check_output, leftovers
from visrec.errors import DataError, VisrecError
from visrec.evaluate.landmarks import auc, ced_curve, failure_rate, nme, norms_for


@dataclass
class LandmarkEval:
    metrics: dict[str, dict[str, float]]  # norm -> {"nme", "auc@0.08", "fr@0.08"}
    report: Path
    faces: int


def landmark_metrics(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.08,
                     sources=None) -> dict[str, dict[str, float]]:
    """Per normalisation defined for the point count (``norms_for``): NME, AUC@alpha, failure rate@alpha.
    ``sources[i]`` (optional) names face i's ground-truth file in the error a zero normaliser raises."""
    out = {}
    for norm in norms_for(np.asarray(gt).shape[1]):
        n = nme(pred, gt, norm, sources)
        out[norm] = {"nme": float(n.mean()), f"auc@{alpha:g}": auc(n, alpha), f"fr@{alpha:g}": failure_rate(n, alpha)}
    return out


def write_landmark_report(out_dir: str | Path, pred: np.ndarray, gt: np.ndarray, images: list[np.ndarray],
                          metrics: dict, summary: dict[str, str], alpha: float = 0.08, grid: int = 12) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    for norm in metrics:
        x, y = ced_curve(nme(pred, gt, norm), alpha)
        ax.plot(x, y, label=f"{norm} (AUC {metrics[norm][f'auc@{alpha:g}']:.4f})")
    ax.set(xlabel="NME", ylabel="share of faces", title=f"CED up to {alpha:g}", xlim=(0, alpha), ylim=(0, 1))
    if ax.get_legend_handles_labels()[0]:  # an empty legend makes matplotlib warn
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ced.png", dpi=110)
    plt.close(fig)

    n = min(grid, len(images))
    cols = min(6, n)
    rows = int(np.ceil(n / cols)) if n else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k])
            ax.scatter(gt[k, :, 0], gt[k, :, 1], s=2, c="lime", label="ground truth")
            ax.scatter(pred[k, :, 0], pred[k, :, 1], s=2, c="red", label="predicted")
    fig.tight_layout()
    fig.savefig(out / "overlays.png", dpi=110)
    plt.close(fig)

    rows_html = "".join(
        f"<tr><td>{html.escape(norm)}</td>" + "".join(f"<td>{v:.5f}</td>" for v in m.values()) + "</tr>"
        for norm, m in metrics.items())
    head = "".join(f"<th>{html.escape(k)}</th>" for k in next(iter(metrics.values())))
    summ = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>visrec landmark report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px}}</style></head><body><h1>Landmarks</h1><table>{summ}</table>
<h2>Metrics (NME = mean point error / normaliser; AUC of the CED on [0, {alpha:g}] / {alpha:g}; FR = NME &gt; {alpha:g})</h2>
<table><tr><th>normalisation</th>{head}</tr>{rows_html}</table>
<h2>CED</h2><img src="ced.png" alt="CED curve">
<h2>Predicted (red) vs ground truth (green)</h2><img src="overlays.png" alt="overlays"></body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _is_submission_file(name: str) -> bool:
    """``<picture>.txt`` with a picture's suffix (``a.jpg.txt``): the only names ``write_submission`` writes."""
    return name.endswith(".txt") and Path(name[:-4]).suffix.lower() in IMAGE_SUFFIXES


def check_submission_folder(folder: str | Path) -> Path:
    """``folder`` if ``write_submission`` may (re)write it, checked before any work: absent, or a folder holding
    only regular ``<picture>.txt`` files (an earlier submission, which is replaced whole). Anything else there (a
    file named like the folder, another file, a subfolder, a link) is a ``DataError`` naming it: a user's files
    are never deleted, and a submission is never mixed with another run's files."""
    folder = check_output(folder, kind="dir", what="the submission folder")
    if not folder.exists():
        return folder
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list the submission folder: {exc.strerror or exc}", path=folder) from None
    for e in entries:
        if not (_is_submission_file(e.name) and stat.S_ISREG(e.stat(follow_symlinks=False).st_mode)):
            raise DataError("the submission folder holds a file that is not a submission's <picture>.txt (it is "
                            "replaced whole on each run): move it away or name another --out", path=e.path)
    return folder


def write_submission(folder: str | Path, ds, pred_crop: np.ndarray, coordinates: str = "integer") -> Path:
    """The challenge submission: one ``<picture name>.txt`` per image (the JD annotation format: the point
    count, then ``x y`` per line, pixels of the original picture upright, as ``read_image`` returns it and the
    annotations give their points: EXIF orientation applied, origin top-left), mapping each prediction from its
    face-box crop back to the picture (the inverse of ``visrec.data.augment.crop_face``).

    ``coordinates``: ``"integer"`` (default; the ICME 2019 JD-landmark challenge asked for integer
    coordinates, see ``visrec.data.landmarks.write_submission_txt`` for the source) or ``"decimal"``
    (three decimals).

    The folder is written fresh (``check_submission_folder``: only an earlier submission is replaced): into a
    temporary sibling, swapped in when every file is written, so no stale prediction of an earlier run stays. A
    predicted point that is not finite or lies further outside its picture than the annotation readers allow
    (``visrec.data.landmarks.MAX_OUTSIDE`` of its size) is a ``DataError`` naming the picture and the point,
    raised before anything is written."""
    if coordinates not in SUBMISSION_COORDINATES:
        raise VisrecError(f"coordinates must be one of {SUBMISSION_COORDINATES}, got {coordinates!r}")
    folder = check_submission_folder(folder)
    mapped = []
    for path, box, pts in zip(ds.paths, ds.boxes, pred_crop):
        x1, y1, x2, y2 = map(float, box)
        side = max(x2 - x1, y2 - y1) * (1 + 2 * ds.margin)
        s = ds.size / side
        offset = np.array([ds.size / 2 - s * (x1 + x2) / 2, ds.size / 2 - s * (y1 + y2) / 2])
        xy = (np.asarray(pts, np.float64) - offset) / s
        w, h = image_size(path)  # of the upright picture the crop was cut from (EXIF orientation applied)
        lo, hi = -MAX_OUTSIDE * np.array([w, h]), (1 + MAX_OUTSIDE) * np.array([w, h])
        bad = ~(np.isfinite(xy).all(axis=1) & (xy >= lo).all(axis=1) & (xy <= hi).all(axis=1))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"the model predicts point {i} at {xy[i].tolist()}, not finite or further outside the "
                            f"{w}x{h} picture than {MAX_OUTSIDE:g} of its size: no submission is written",
                            path=path, record=f"point {i}")
        mapped.append((Path(path).name, xy))
    folder.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("new", "old"):  # the hidden folders of a run killed between its renames
        for stale in leftovers(folder.parent, f".{folder.name}.{kind}-"):
            shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    new = folder.with_name(f".{folder.name}.new-{tag}")
    new.mkdir()  # not mkdtemp: the folder gets the user's usual permissions (umask), not 0700
    try:
        for name, xy in mapped:
            write_submission_txt(new / f"{name}.txt", xy, coordinates)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{tag}")
            folder.rename(old)  # then the new one takes its name; the old is removed below
            new.rename(folder)
            shutil.rmtree(old)
        else:
            new.rename(folder)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return folder
