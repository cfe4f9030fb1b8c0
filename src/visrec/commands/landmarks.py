"""``visrec landmarks IMAGE --model M``: one face's points, drawn and printed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

DEFAULT_OUT = Path("landmarks.png")


def landmarks(image: Path = typer.Argument(..., help="an image"),
              model: Path = typer.Option(..., "--model", help="landmark model: checkpoint, run dir or .onnx"),
              box: Optional[str] = typer.Option(None, "--box", help="x1,y1,x2,y2 face box in pixels, top-left "
                                                "corner first, at least 1 pixel wide and high (default: the whole "
                                                "image)"),
              out: Optional[Path] = typer.Option(None, "--out", help="the image to draw the points into (.png, .jpg, "
                                                 ".bmp, ...; a file named here is replaced; default landmarks.png "
                                                 "in the current folder, which is never replaced)")):
    """Predict and draw the landmarks of one face; prints the points (pixels, origin top-left)."""
    import cv2

    from visrec.data.augment import check_box
    from visrec.data.images import read_image
    from visrec.data.text import check_output
    from visrec.errors import DataError, VisrecError
    from visrec.models.loading import checkpoint_file, load_model

    target = check_output(DEFAULT_OUT if out is None else out, kind="file",
                          reads={"IMAGE": image, "--model": checkpoint_file(model)})
    _check_image_suffix(target)
    replaces = target.exists()
    if out is None and replaces:
        raise DataError("exists, and the default --out never replaces a file: name an output with --out "
                        "(naming this file replaces it)", path=target)
    img = read_image(image)
    h, w = img.shape[:2]
    if box:
        parts = box.split(",")
        if len(parts) != 4:
            raise VisrecError(f"--box must be x1,y1,x2,y2, got {box!r}")
        try:
            corners = check_box([float(v) for v in parts], what="--box")
        except ValueError:
            raise VisrecError(f"--box must be four numbers x1,y1,x2,y2, got {box!r}") from None
        _check_box_on_image(corners, w, h, image)
    else:
        corners = check_box((0, 0, w - 1, h - 1), path=image, what="the whole image as the face box (no --box)")
    loaded = load_model(model)
    if loaded.contract.task != "landmarks":
        raise VisrecError(f"{model} is a {loaded.contract.task} model, not a landmark model")
    pts = np.asarray(loaded.predict(img, corners), np.float64)  # crops with the margin / size of the model's contract
    drawn = img[:, :, ::-1].copy()
    # only points on the picture are drawn: others would be invisible, and far ones overflow cv2's int coordinates
    on = np.isfinite(pts).all(axis=1) & (pts[:, 0] > -1) & (pts[:, 0] < w) & (pts[:, 1] > -1) & (pts[:, 1] < h)
    for px, py in pts[on]:
        cv2.circle(drawn, (int(round(px)), int(round(py))), 1, (0, 0, 255), -1)
    write_image(target, drawn)
    t = Table(title=f"{len(pts)} points of {image}")
    t.add_column("i")
    t.add_column("x")
    t.add_column("y")
    for i, (px, py) in enumerate(pts):
        t.add_row(str(i), f"{px:.1f}", f"{py:.1f}")
    Console().print(t)
    Console().print(f"drawn into {target}" + (" (replaced the file that was there)" if replaces else ""))
    if not on.all():
        Console().print(f"{int((~on).sum())} of {len(pts)} points lie outside the {w}x{h} image and are not drawn")


def _check_box_on_image(corners, w: int, h: int, image: Path) -> None:
    """``--box`` as a ``.rect`` file's box (``visrec.data.landmarks.box_on_image``): else the crop is all padding."""
    from visrec.data.landmarks import MAX_BOX_OUTSIDE, box_on_image
    from visrec.errors import DataError

    if not box_on_image(corners, w, h):
        raise DataError(f"--box {','.join(f'{v:g}' for v in corners)} does not overlap the {w}x{h} image, or lies "
                        f"more than {MAX_BOX_OUTSIDE} image sides outside it", path=image)


def _check_image_suffix(path: Path) -> None:
    """An output name OpenCV can encode (by its suffix), checked before any work."""
    import cv2

    from visrec.data.images import IMAGE_SUFFIXES
    from visrec.errors import DataError

    if path.suffix.lower() not in IMAGE_SUFFIXES or not cv2.haveImageWriter(str(path)):
        raise DataError(f"--out must name an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); no image writer "
                        f"for the suffix {path.suffix or '(none)'!s}", path=path)


def write_image(path: Path, bgr) -> Path:
    """Encode a BGR image by ``path``'s suffix and write it whole (``write_bytes_atomic``); a failure of either
    is a ``DataError`` naming the path."""
    import cv2

    from visrec.data.text import write_bytes_atomic
    from visrec.errors import DataError

    try:
        ok, buf = cv2.imencode(path.suffix.lower(), bgr)
    except cv2.error as exc:
        raise DataError(f"cannot encode the image: {str(exc).strip().splitlines()[-1]}", path=path) from None
    if not ok:
        raise DataError("cannot encode the image", path=path)
    return write_bytes_atomic(path, buf.tobytes())

