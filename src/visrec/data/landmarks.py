"""Landmark annotation formats: JD-landmark (106), 300W ``.pts`` (68), WFLW lines (98).

JD-landmark layout:  ``picture/<name>.jpg`` (any image suffix, in any case: ``.jpg``, ``.JPG``, ``.png``...;
                     ``list_pictures``), ``landmark/<name>.jpg.txt`` or ``landmark/<name>.txt``
                     (first line the point count, e.g. ``106``, then one ``x y`` per line) and
                     ``rect/<name>.jpg.rect`` or ``rect/<name>.rect`` (one line ``x1 y1 x2 y2``: the face box;
                     without one the box is the points' extent). Points and boxes are pixels of the upright
                     picture, as ``visrec.data.images.read_image`` returns it (EXIF orientation applied;
                     ``image_size`` gives its size). Every file of ``landmark/``, ``rect/`` and ``pose/``
                     belongs to a picture: one that belongs to none (its picture is missing) is a
                     ``DataError``, so a set is never scored smaller than it is. The challenge submission uses the
                     same text format per image (origin top-left), with integer coordinates as the ICME
                     2019 challenge asked (``write_submission_txt``).
                     Optional head pose (visrec's extension, written by ``write_synthetic_jd``, needed by
                     the PFLD loss): ``pose/<name>.jpg.txt`` or ``pose/<name>.txt``, one line
                     ``yaw pitch roll`` in degrees. yaw > 0: the face turns so that the nose moves towards
                     image right; pitch > 0: the face looks down; roll > 0: the face is rotated counter-
                     clockwise as displayed (the image-right eye is higher). A horizontal flip negates yaw
                     and roll. Either every picture has a pose file or there is no ``pose/`` directory.
                     A point line is exactly two numbers and the count line exactly one (a third field, or
                     a decimal comma split into ``24 5 63 0``, is an error, never dropped).
300W ``.pts``:       ``version: 1`` / ``n_points: 68`` / ``{`` / 68 ``x y`` lines / ``}``, nothing else.
WFLW line:           98 x y pairs (196 numbers), the box x1 y1 x2 y2, six 0/1 attributes (pose, expression,
                     illumination, make-up, occlusion, blur), then the image name.
The point count is data, not a constant. Bad annotations raise DataError naming file and line. Each reader
bounds the bytes it reads by its format (``MAX_*_FILE_BYTES``): a larger file is refused from its size before
it is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.data.augment import check_box
from visrec.data.images import IMAGE_SUFFIXES, image_size
from visrec.data.text import read_text, split_lines
from visrec.errors import DataError

# Points per face any reader or model takes (a model contract's num_points too: visrec.models.contract)
MAX_POINTS = 10_000
MAX_OUTSIDE = 0.5  # a point further outside the image than this share of its size is an annotation error
MAX_BOX_OUTSIDE = 4  # image sides a face box may reach outside its image (box_on_image)
_F32_MAX = float(np.finfo(np.float32).max)

# Bytes an annotation file of each kind may hold, checked from its size before it is read (a sparse 3 GB
# ``.rect`` was read whole and ended the run in a MemoryError).
# A point file (JD ``.txt``, 300W ``.pts``): a line per point, MAX_POINTS (the most a model contract holds)
# lines of up to 100 bytes each; a 106-point file is about 2 KB.
MAX_POINT_FILE_BYTES = 100 * MAX_POINTS + 1024
# A ``.rect`` or pose file: one line of three or four numbers (with room for blank lines and long decimals).
MAX_LINE_FILE_BYTES = 4096
# A WFLW list holds a whole data set, a line per face (about 2 KB for 98 points): WFLW's own train + test
# lists (10,000 faces) are about 20 MB; 256 MiB holds over 100,000 faces of 98 points and still bounds the
# memory of reading it (the text, its lines and the records: about four times this).
MAX_WFLW_FILE_BYTES = 256 << 20


def _f32(value: float) -> float:
    """``value`` as coordinates are kept (float32): beyond its range it is inf, reported as such by the
    callers' NaN/inf checks (instead of a numpy overflow warning in the cast)."""
    return value if abs(value) <= _F32_MAX or value != value else math.copysign(math.inf, value)


def check_points(points: np.ndarray, path=None, *, lines: list[int] | None = None, record: str | None = None,
                 image_size: tuple[int, int] | None = None, image: str | Path | None = None) -> None:
    """Refuse (``DataError`` naming ``path`` and the record) a NaN or infinite point and, with ``image_size``
    (width, height in pixels of the upright picture), a point further outside the picture than
    :data:`MAX_OUTSIDE` of its width / height: the one rule of every annotation reader and of
    ``visrec data prepare landmarks``. ``lines[i]`` is the file line of point i (else ``record`` names where
    the points come from); ``image`` names the picture in the message when it is not ``path``."""
    def where(i: int):
        return record if lines is None else f"line {lines[i]}"

    if not np.isfinite(points).all():
        bad = int(np.argwhere(~np.isfinite(points))[0][0])
        raise DataError(f"point {bad} is NaN or inf", path=path, record=where(bad))
    if image_size is not None:
        w, h = image_size
        lo = np.array([-MAX_OUTSIDE * w, -MAX_OUTSIDE * h])
        hi = np.array([(1 + MAX_OUTSIDE) * w, (1 + MAX_OUTSIDE) * h])
        out = ((points < lo) | (points > hi)).any(axis=1)
        if out.any():
            bad = int(np.argmax(out))
            named = f" {image}" if image is not None else ""
            raise DataError(f"point {bad} {points[bad].tolist()} lies far outside the {w}x{h} image{named} (more "
                            f"than {MAX_OUTSIDE:g} of its size)", path=path, record=where(bad))


def _lines(path, max_bytes: int) -> list[str]:
    """The lines of a UTF-8 text file of at most ``max_bytes`` bytes (``visrec.data.text``; a larger one is a
    ``DataError`` naming it and the bound, before it is read): index i is line i + 1."""
    return split_lines(read_text(path, max_bytes))


def _numbered(path, max_bytes: int) -> list[tuple[int, str]]:
    """(1-based line, text) of the non-blank lines of a UTF-8 text file of at most ``max_bytes`` bytes."""
    return [(i, line) for i, line in enumerate(_lines(path, max_bytes), start=1) if line.strip()]


def _xy(line: str, path, lineno: int) -> tuple[float, float]:
    """A point line: exactly two numbers ``x y`` (a third field, or a decimal comma that split ``24,5 63,0``
    into four, is an error: reading the first two would move the point without a word)."""
    parts = line.split()
    try:
        if len(parts) != 2:
            raise ValueError
        return _f32(float(parts[0])), _f32(float(parts[1]))
    except ValueError:
        raise DataError(f"expected 'x y' (two numbers), got {line.strip()[:80]!r}", path=path,
                        record=f"line {lineno}") from None


def read_landmark_txt(path: str | Path, expected: int | None = None,
                      image_size: tuple[int, int] | None = None) -> np.ndarray:
    """JD-landmark text: count line, then count ``x y`` lines -> float32 (count, 2)."""
    path = Path(path)
    lines = _numbered(path, MAX_POINT_FILE_BYTES)
    try:
        count = int(lines[0][1].strip())  # the count alone: "106 points" is not a count line
        if count < 0:
            raise ValueError
    except (IndexError, ValueError):
        shown = f", got {lines[0][1].strip()[:80]!r}" if lines else ""
        raise DataError(f"first line must be the point count (one integer){shown}", path=path,
                        record=f"line {lines[0][0] if lines else 1}") from None
    if expected is not None and count != expected:
        raise DataError(f"{count} points, expected {expected}", path=path, record=f"line {lines[0][0]}")
    if len(lines) - 1 != count:  # checked before anything is sized by the count
        raise DataError(f"header says {count} points but {len(lines) - 1} follow", path=path,
                        record=f"line {lines[0][0]}")
    pts = np.array([_xy(line, path, i) for i, line in lines[1:]], np.float32).reshape(count, 2)
    check_points(pts, path, lines=[i for i, _ in lines[1:]], image_size=image_size)
    return pts


def write_landmark_txt(path: str | Path, points: np.ndarray) -> Path:
    """JD-landmark / challenge-submission text (count, then ``x y`` lines, origin top-left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = np.asarray(points, np.float64)
    path.write_text(f"{len(pts)}\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in pts))
    return path


# The ICME 2019 JD-landmark challenge asked for "the number of key points along with the coordinates for
# each point (with integer format)": "Information of ICME2019 GC facial landmarks localization", the
# "Details" document linked from https://facial-landmarks-localization-challenge.github.io/ (the same
# sentence is in every version of that document in the challenge site's repository).
SUBMISSION_COORDINATES = ("integer", "decimal")


def write_submission_txt(path: str | Path, points: np.ndarray, coordinates: str = "integer") -> Path:
    """One picture's challenge submission file: the point count, then ``x y`` per line in pixels of the
    picture, origin top-left (the JD annotation format, read back by ``read_landmark_txt``).

    ``coordinates="integer"`` (the default, as the ICME 2019 JD-landmark challenge asked: the count "along
    with the coordinates for each point (with integer format)", per its "Details" document linked from
    facial-landmarks-localization-challenge.github.io) writes each coordinate rounded to the nearest integer
    (``numpy.rint``: halves to even); ``"decimal"`` writes three decimals, as ``write_landmark_txt`` does.
    A NaN or infinite point raises ``DataError`` naming the file and the point (the challenge wanted no file
    for a face that was not found; a caller must not write one), and so does, for integer coordinates, one
    beyond +-2**53 (where float64 stops holding every integer; an int64 cast would wrap silently). Bounding
    points by their picture is the caller's (``visrec.evaluate.landmark_report.write_submission``).
    """
    if coordinates not in SUBMISSION_COORDINATES:
        raise DataError(f"coordinates must be one of {SUBMISSION_COORDINATES}, got {coordinates!r}", path=path)
    path = Path(path)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if not np.isfinite(pts).all():
        bad = int(np.argwhere(~np.isfinite(pts))[0][0])
        raise DataError(f"point {bad} is NaN or inf: no submission line can hold it", path=path,
                        record=f"point {bad}")
    if coordinates == "decimal":
        return write_landmark_txt(path, pts)
    if (np.abs(pts) > 2.0 ** 53).any():
        bad = int(np.argwhere(np.abs(pts) > 2.0 ** 53)[0][0])
        raise DataError(f"point {bad} {pts[bad].tolist()} is beyond +-2**53: no integer line holds it exactly",
                        path=path, record=f"point {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ints = np.rint(pts).astype(np.int64)
    path.write_text(f"{len(ints)}\n" + "".join(f"{x} {y}\n" for x, y in ints))
    return path


def read_pts(path: str | Path, image_size=None) -> np.ndarray:
    """300W ``.pts``: ``version: 1`` / ``n_points: N`` / ``{`` / N ``x y`` lines / ``}`` -> float32 (N, 2).

    Nothing else: before ``{`` only the ``version:`` line and one ``n_points:`` line (blank lines aside), after
    ``}`` only blank lines; anything more is a ``DataError`` naming the file and the line."""
    path = Path(path)
    text = _lines(path, MAX_POINT_FILE_BYTES)
    start = next((i for i, l in enumerate(text) if l.strip() == "{"), None)
    n = None
    for i, line in enumerate(text[:start] if start is not None else text):
        key, colon, value = line.strip().partition(":")
        if not line.strip() or (key.strip() == "version" and colon):
            continue
        if key.strip() != "n_points" or not colon:
            raise DataError(f"a .pts header holds 'version: 1' and 'n_points: N' only, got {line.strip()[:80]!r}",
                            path=path, record=f"line {i + 1}")
        if n is not None:
            raise DataError("a second 'n_points:' line", path=path, record=f"line {i + 1}")
        try:
            n = int(value.strip())
            if n < 0:
                raise ValueError
        except ValueError:
            raise DataError(f"'n_points:' needs a count, got {line.strip()[:80]!r}", path=path,
                            record=f"line {i + 1}") from None
    if n is None or start is None:
        raise DataError("not a .pts file (needs 'n_points: N' and '{')", path=path)
    start += 1
    rows = text[start:start + n]
    if len(rows) != n or start + n >= len(text) or text[start + n].strip() != "}":
        raise DataError(f"expected {n} point lines between braces", path=path, record=f"line {start + 1}")
    extra = next((i for i in range(start + n + 1, len(text)) if text[i].strip()), None)
    if extra is not None:
        raise DataError(f"text after the closing '}}': {text[extra].strip()[:80]!r}", path=path,
                        record=f"line {extra + 1}")
    pts = np.array([_xy(r, path, start + 1 + i) for i, r in enumerate(rows)], np.float32).reshape(n, 2)
    check_points(pts, path, lines=list(range(start + 1, start + 1 + n)), image_size=image_size)
    if n >= 2:  # a face annotation: its points' extent is the face box where no other is given
        points_box(pts, path)
    return pts


def points_box(points: np.ndarray, path=None) -> list[float]:
    """The points' extent ``[x1, y1, x2, y2]`` as a face box, refused (``check_box``: ``DataError`` naming
    ``path``) when the points span less than a pixel in x or y (identical points, a line): no face to crop."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    return list(check_box([*pts.min(0), *pts.max(0)], path=path,
                          what=f"the extent of the {len(pts)} points (the face box when none is given)"))


def write_pts(path: str | Path, points: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{x:.3f} {y:.3f}\n" for x, y in np.asarray(points, np.float64))
    path.write_text(f"version: 1\nn_points: {len(points)}\n{{\n{body}}}\n")
    return path


@dataclass
class WflwRecord:
    """One face of a WFLW list: points and box in pixels of the upright picture ``image``; ``source`` and
    ``line`` (1-based) say where it was read, for errors found later (a point far outside its picture)."""

    points: np.ndarray
    box: np.ndarray
    attributes: np.ndarray
    image: str
    source: str | None = None
    line: int | None = None


def read_wflw(path: str | Path, points: int = 98) -> list[WflwRecord]:
    """WFLW annotation lines -> records; a bad line raises ``DataError`` naming the file and the line. Points
    are checked finite here; against their picture (``check_points``) by whoever reads the picture."""
    path = Path(path)
    if points < 1:
        raise DataError(f"a WFLW line needs at least one point, asked for {points}", path=path)
    need = 2 * points + 4 + 6 + 1
    out = []
    for lineno, line in _numbered(path, MAX_WFLW_FILE_BYTES):
        parts = line.split()
        if len(parts) != need:
            raise DataError(f"{len(parts)} fields, a {points}-point WFLW line has {need}", path=path,
                            record=f"line {lineno}")
        try:
            nums = np.array([_f32(float(v)) for v in parts[:-1]], np.float64)
        except ValueError:
            raise DataError("non-numeric field", path=path, record=f"line {lineno}") from None
        pts = nums[:2 * points].reshape(points, 2).astype(np.float32)
        box = nums[2 * points:2 * points + 4]
        attrs = nums[2 * points + 4:]
        if not np.isfinite(pts).all():
            raise DataError("a point is NaN or inf", path=path, record=f"line {lineno}")
        if not np.isfinite(box).all():
            raise DataError("the box x1 y1 x2 y2 holds NaN or inf", path=path, record=f"line {lineno}")
        check_box(box, path=path, record=f"line {lineno}", what="the box x1 y1 x2 y2")
        if not np.isin(attrs, (0, 1)).all():
            raise DataError(f"the six attributes must be 0 or 1, got {' '.join(parts[-7:-1])}", path=path,
                            record=f"line {lineno}")
        out.append(WflwRecord(pts, box.astype(np.float32), attrs.astype(np.int64), parts[-1], str(path), lineno))
    return out


def write_wflw(path: str | Path, records: list[WflwRecord]) -> Path:
    path = Path(path)
    with open(path, "w") as fh:
        for r in records:
            nums = [*np.asarray(r.points).reshape(-1), *np.asarray(r.box)]
            fh.write(" ".join(f"{v:.3f}" for v in nums) + " " + " ".join(str(int(a)) for a in r.attributes)
                     + f" {r.image}\n")
    return path


def write_pose_txt(path: str | Path, pose) -> Path:
    """One ``yaw pitch roll`` line, degrees (signs in the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    yaw, pitch, roll = (float(v) for v in pose)
    path.write_text(f"{yaw:.4f} {pitch:.4f} {roll:.4f}\n")
    return path


def read_pose_txt(path: str | Path) -> np.ndarray:
    """A pose file -> float32 (3,) ``(yaw, pitch, roll)`` in degrees; bad content raises DataError."""
    path = Path(path)
    lines = _numbered(path, MAX_LINE_FILE_BYTES)
    if len(lines) != 1:
        raise DataError(f"expected one 'yaw pitch roll' line (degrees), found {len(lines)}", path=path,
                        record=f"line {lines[1][0]}" if lines else None)
    lineno, line = lines[0]
    try:
        pose = np.array([_f32(float(v)) for v in line.split()], np.float32)
    except ValueError:
        pose = np.zeros(0, np.float32)
    if pose.shape != (3,) or not np.isfinite(pose).all():
        raise DataError(f"expected 'yaw pitch roll' in degrees, got {line.strip()[:80]!r}", path=path,
                        record=f"line {lineno}")
    if (np.abs(pose) > 180).any():
        raise DataError(f"angles must lie in [-180, 180] degrees, got {line.strip()!r}", path=path,
                        record=f"line {lineno}")
    return pose


def _picture_file(folder: Path, picture: Path, owner: dict[str, Path], suffix: str = ".txt") -> Path | None:
    """``folder/<name><suffix>``, else ``folder/<stem><suffix>``, of ``picture`` (None when neither exists): how
    ``landmark/`` and ``pose/`` (``.txt``) and ``rect/`` (``.rect``) files are found. ``owner`` (file name -> the
    picture that took it, kept by the caller over one folder): a second picture falling back to a file another
    took (a.jpg and a.png both to a.txt: one face's data for two pictures) is a ``DataError`` naming both."""
    f = folder / f"{picture.name}{suffix}"
    if not f.exists():
        f = folder / f"{picture.stem}{suffix}"
    if not f.exists():
        return None
    first = owner.setdefault(f.name, picture)
    if first != picture:
        raise DataError(f"pictures {first.name} and {picture.name} both take {folder.name}/{f.name}: name it "
                        f"{folder.name}/{picture.name}{suffix} (or {first.name}{suffix}) for each", path=f)
    return f


MAX_NAMED_STRAYS = 5  # files named in the error for annotation files that belong to no picture


def _refuse_strays(folder: Path, owner: dict[str, Path], suffix: str) -> None:
    """Every visible entry of ``folder`` (``landmark/``, ``rect/``, ``pose/``) must be a file some picture took
    (``owner``, filled by :func:`_picture_file`): one that belongs to no picture (its picture was deleted, a
    name mistyped) is a ``DataError`` naming the first ones and the count, so a set is never read (and scored)
    smaller than its annotations say without a word. Hidden entries (``.name``) are left out, as in picture/."""
    if not folder.is_dir():
        return
    try:
        names = sorted(e.name for e in folder.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list: {exc.strerror or exc}", path=folder) from None
    strays = [n for n in names if n not in owner]
    if strays:
        shown = ", ".join(strays[:MAX_NAMED_STRAYS]) + (", ..." if len(strays) > MAX_NAMED_STRAYS else "")
        raise DataError(f"{len(strays)} file(s) in {folder.name}/ belong to no picture of picture/ (each picture "
                        f"<name> takes {folder.name}/<name>{suffix}, else {folder.name}/<stem>{suffix}): {shown}; "
                        f"restore their pictures or remove them", path=folder / strays[0])


def read_jd_poses(root: str | Path, pictures) -> np.ndarray | None:
    """(N, 3) ``(yaw, pitch, roll)`` degrees for the pictures of a JD-landmark directory (as
    ``read_jd_dir`` lists them), or None when it has no ``pose/`` directory."""
    pose_dir = Path(root) / "pose"
    if not pose_dir.is_dir():
        return None
    out, owner = [], {}
    for p in pictures:
        p = Path(p)
        f = _picture_file(pose_dir, p, owner)
        if f is None:
            raise DataError(f"no pose file for this picture ({pose_dir}/{p.name}.txt); a pose/ directory "
                            f"must cover every picture", path=p)
        out.append(read_pose_txt(f))
    return np.stack(out) if out else np.zeros((0, 3), np.float32)


def read_rect(path: str | Path, image_size: tuple[int, int] | None = None) -> list[float]:
    """A JD-landmark ``.rect`` file: ``x1 y1 x2 y2`` (four finite numbers, nothing else) on its one non-blank
    line (a second line is a ``DataError``), a face box ``visrec.data.augment.check_box`` takes (not inverted,
    at least a pixel wide and high).
    With ``image_size`` (width, height) the box must also overlap the image and lie no further than
    :data:`MAX_BOX_OUTSIDE` image sides outside it (a face box may overhang its image, as the service's
    ``box`` field may); else a crop of it is all padding."""
    path = Path(path)
    lines = _numbered(path, MAX_LINE_FILE_BYTES)
    if len(lines) > 1:
        raise DataError(f"a .rect holds one 'x1 y1 x2 y2' line, found {len(lines)}", path=path,
                        record=f"line {lines[1][0]}")
    lineno, line = lines[0] if lines else (1, "")
    fields = line.split()
    try:
        if len(fields) != 4:
            raise ValueError
        box = [float(v) for v in fields]
        if not all(math.isfinite(_f32(v)) for v in box):
            raise ValueError
    except ValueError:
        raise DataError(f"expected 'x1 y1 x2 y2' (four numbers), got {line.strip()[:80]!r}", path=path,
                        record=f"line {lineno}") from None
    box = list(check_box(box, path=path, record=f"line {lineno}"))
    if image_size is not None and not box_on_image(box, *image_size):
        w, h = image_size
        raise DataError(f"box {[round(v, 2) for v in box]} does not overlap the {w}x{h} image, or lies more "
                        f"than {MAX_BOX_OUTSIDE} image sides outside it", path=path, record=f"line {lineno}")
    return box


def box_on_image(box, width: int, height: int) -> bool:
    """Whether face box ``x1, y1, x2, y2`` (pixels) overlaps a ``width`` x ``height`` image and lies no further
    than :data:`MAX_BOX_OUTSIDE` image sides outside it: a face box may overhang its image, never by light-years
    (a crop of it would be all padding). A NaN or infinite coordinate is not on the image. The rule of a
    ``.rect`` file, ``visrec landmarks --box`` and the service's ``box`` field."""
    side = max(width, height)
    reach = MAX_BOX_OUTSIDE * side
    x1, y1, x2, y2 = box
    return x1 < width and y1 < height and x2 > 0 and y2 > 0 and all(-reach <= v <= reach + side for v in box)


def list_pictures(root: str | Path) -> list[Path]:
    """The pictures of a JD-landmark directory: every file of ``root/picture`` whose suffix is an image's
    (``visrec.data.images.IMAGE_SUFFIXES``, any case: ``.jpg``, ``.JPG``, ``.png``, ...), in name order. Hidden
    entries (``.name``) are left out; anything else there (another file, a folder, a broken link, a device or
    a pipe) is a ``DataError`` naming it, so no picture is dropped without a word."""
    import stat

    folder = Path(root) / "picture"
    if not folder.is_dir():
        raise DataError("no picture/ folder (the JD-landmark layout: picture/, landmark/, rect/)", path=root)
    pics = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list: {exc.strerror or exc}", path=folder) from None
    for p in entries:
        if p.name.startswith("."):
            continue
        try:
            mode = p.stat().st_mode
        except OSError as exc:
            raise DataError(f"cannot read ({'a broken link' if p.is_symlink() else exc.strerror or exc}): "
                            f"picture/ holds only pictures", path=p) from None
        if not stat.S_ISREG(mode):
            raise DataError("not a picture (a folder, device or pipe): picture/ holds only pictures", path=p)
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"not a picture (suffix {p.suffix or 'none'}; images are "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}): picture/ holds only pictures", path=p)
        pics.append(p)
    if not pics:
        raise DataError("no pictures in picture/", path=root)
    return pics


def read_jd_dir(root: str | Path, expected: int | None = 106):
    """(image paths, (N, P, 2) points, (N, 4) boxes) of a JD-landmark directory: the pictures of
    :func:`list_pictures`, each with its landmark file (``landmark/<name>.txt``, else ``landmark/<stem>.txt``);
    the box is ``rect/<name>.rect``, else ``rect/<stem>.rect`` (``read_rect``), else the points' extent
    (``points_box``); a box that frames no face is a ``DataError`` naming its file. Points and boxes are pixels
    of the upright picture (``read_image``'s, whose size ``image_size`` gives). A file of ``landmark/``,
    ``rect/`` or ``pose/`` that belongs to no picture is a ``DataError`` (:func:`_refuse_strays`)."""
    root = Path(root)
    pics = list_pictures(root)

    pts, boxes, owner, rect_owner, pose_owner = [], [], {}, {}, {}
    poses = (root / "pose").is_dir()
    for p in pics:
        ann = _picture_file(root / "landmark", p, owner)
        if ann is None:
            raise DataError("no landmark file for this picture", path=p)
        size = image_size(p)  # the header only (EXIF orientation applied): the size for the far-outside check
        pts.append(read_landmark_txt(ann, expected, image_size=size))
        rect = _picture_file(root / "rect", p, rect_owner, ".rect")
        if rect is not None:
            boxes.append(read_rect(rect, size))
        else:
            boxes.append(points_box(pts[-1], ann))
        if poses:  # read by read_jd_poses; found here to tell the files no picture takes
            _picture_file(root / "pose", p, pose_owner)
    _refuse_strays(root / "landmark", owner, ".txt")
    _refuse_strays(root / "rect", rect_owner, ".rect")
    _refuse_strays(root / "pose", pose_owner, ".txt")
    return pics, np.stack(pts), np.asarray(boxes, np.float32)
