"""``visrec eval landmarks`` and ``visrec landmarks IMAGE``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def eval_landmarks(model: Path = typer.Option(..., "--model", help="checkpoint or .onnx"),
                   data: Path = typer.Option(..., "--data", help="JD-landmark directory"),
                   points: Optional[int] = typer.Option(None, "--points", help="default: the model's contract"),
                   out: Path = typer.Option(Path("eval-landmarks"), "--out"),
                   coordinates: str = typer.Option(
                       "integer", "--coordinates",
                       help="submission coordinates: integer (what the ICME 2019 JD-landmark challenge asked for, "
                            "'with integer format', in its Details document on "
                            "facial-landmarks-localization-challenge.github.io) or decimal (3 decimals)")):
    """NME (four normalisations), AUC@0.08, failure rate; report.html with the CED and overlays."""
    from visrec.data.landmarks import SUBMISSION_COORDINATES
    from visrec.faces.evaluation import evaluate_landmarks

    if coordinates not in SUBMISSION_COORDINATES:
        raise typer.BadParameter(f"must be one of {', '.join(SUBMISSION_COORDINATES)}", param_hint="--coordinates")
    res = evaluate_landmarks(model, data, out, points=points, coordinates=coordinates)
    t = Table(title=f"landmarks: {res.faces} faces")
    t.add_column("normalisation")
    for key in next(iter(res.metrics.values())):
        t.add_column(key)
    for norm, m in res.metrics.items():
        t.add_row(norm, *(f"{v:.5f}" for v in m.values()))
    Console().print(t)
    Console().print(f"report: {res.report}\nchallenge submission (one .txt per picture, {coordinates} coordinates): "
                    f"{res.report.parent / 'submission'}")


def landmarks(image: Path = typer.Argument(..., help="an image"),
              model: Path = typer.Option(..., "--model", help="landmark model: checkpoint, run dir or .onnx"),
              box: Optional[str] = typer.Option(None, "--box", help="x1,y1,x2,y2 face box (default: whole image)"),
              out: Path = typer.Option(Path("landmarks.png"), "--out", help="where to draw the points")):
    """Predict and draw the landmarks of one face; prints the points (pixels, origin top-left)."""
    import cv2

    from visrec.data.images import read_image
    from visrec.errors import VisrecError
    from visrec.models.loading import load_model

    img = read_image(image)
    h, w = img.shape[:2]
    try:
        x1, y1, x2, y2 = (float(v) for v in box.split(",")) if box else (0, 0, w - 1, h - 1)
    except ValueError:
        raise VisrecError(f"--box must be x1,y1,x2,y2, got {box!r}") from None
    loaded = load_model(model)
    if loaded.contract.task != "landmarks":
        raise VisrecError(f"{model} is a {loaded.contract.task} model, not a landmark model")
    pts = loaded.predict(img, (x1, y1, x2, y2))  # crops with the margin / size of the model's contract
    drawn = img[:, :, ::-1].copy()
    for px, py in pts:
        cv2.circle(drawn, (int(round(px)), int(round(py))), 1, (0, 0, 255), -1)
    cv2.imwrite(str(out), drawn)
    t = Table(title=f"{len(pts)} points of {image} (drawn into {out})")
    t.add_column("i")
    t.add_column("x")
    t.add_column("y")
    for i, (px, py) in enumerate(pts):
        t.add_row(str(i), f"{px:.1f}", f"{py:.1f}")
    Console().print(t)
