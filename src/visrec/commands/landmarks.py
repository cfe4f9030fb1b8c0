"""``visrec landmarks IMAGE --model M``: one face's points, drawn and printed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


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
