"""Image folders (one sub-folder per identity) and CSV lists (``path,label``)."""

from __future__ import annotations

import csv
import io
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from visrec.data.images import IMAGE_SUFFIXES, encode_jpeg, not_an_image_reason, read_image
from visrec.data.text import listed_place, read_text
from visrec.errors import DataError


@dataclass
class ImageList:
    """Paths with integer labels; ``class_names[label]`` is the folder name (or the CSV label text)."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # what an image folder passes over by design (hidden entries, loose files in the root that are not images),
    # with the reason: a trainer ignores them; ``visrec data prepare`` lists them in its report
    ignored: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image(self, i: int) -> np.ndarray:
        return read_image(self.paths[i])

    def where(self, i: int) -> dict:
        """Where the i-th image comes from, as ``DataError``'s keywords (its file)."""
        return {"path": self.paths[i]}


SKIP_BAD_HINT = "remove it (a train config's data.skip_bad: true leaves such entries out and counts them)"


def _check_image(path: Path, skip_bad: bool, skipped: list) -> bool:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        if skip_bad:
            skipped.append((path, not_an_image_reason(path)))
            return False
        raise DataError(f"{not_an_image_reason(path)}; {SKIP_BAD_HINT}", path=path)
    return True


HIDDEN = "hidden (its name starts with '.'): not read"


def _entry_kind(path: Path) -> tuple[str, str]:
    """("dir" | "file" | "bad", why) of a folder entry, links followed; nothing is opened (a device or a pipe
    would never end)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if path.is_symlink():
            return "bad", "a broken or looping link"
        return "bad", f"cannot read: {exc.strerror or exc}"
    except ValueError as exc:
        return "bad", f"cannot read: {exc}"
    if stat.S_ISDIR(mode):
        return "dir", ""
    if stat.S_ISREG(mode):
        return "file", ""
    return "bad", "not a regular file (a device or a pipe)"


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list: {exc.strerror or exc}", path=folder) from None


def _refuse(path: Path, why: str, skip_bad: bool, skipped: list) -> None:
    if not skip_bad:
        raise DataError(f"{why}; {SKIP_BAD_HINT}", path=path)
    skipped.append((path, why))


def _entries(folder: Path, skip_bad: bool, skipped: list, ignored: list):
    """(path, "dir" | "file") of ``folder``'s visible entries, sorted; hidden ones are passed over (listed in
    ``ignored``) and the rest (broken links, devices, pipes) refused, or with ``skip_bad`` listed in ``skipped``."""
    for p in _listing(folder):
        if p.name.startswith("."):
            ignored.append((p, HIDDEN))
            continue
        kind, why = _entry_kind(p)
        if kind == "bad":
            _refuse(p, why, skip_bad, skipped)
        else:
            yield p, kind


def read_image_folder(root: str | Path, *, skip_bad: bool = False, verify: bool = False) -> ImageList:
    """Index ``root/<identity>/<image>``; labels follow the sorted folder names. ``verify`` decodes every
    image up front (otherwise a bad image is reported when it is read).

    What is read, and what is not: each sub-folder of ``root`` is an identity and holds image files (a suffix
    of ``visrec.data.images.IMAGE_SUFFIXES``, any case), links to them included. Hidden entries (a name
    starting with ``.``: ``.DS_Store``, ``.cache/``, ``.x.jpg``) are ignored everywhere, as are regular files
    directly in ``root`` that are not images (a README, a labels list); both are listed in ``ignored``.
    Anything else is a ``DataError`` naming it: an image file directly in ``root`` (it belongs to no
    identity), a folder inside an identity folder (nested folders are not read), a file that is not an image,
    a broken or looping link, a device or a pipe (never opened), an identity folder without images. With
    ``skip_bad`` (a train config's ``data.skip_bad``) those entries are left out and listed in ``skipped``
    with the reason instead."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("image folder not found", path=root)
    paths, labels, names, skipped, ignored = [], [], [], [], []
    folders = []
    for p, kind in _entries(root, skip_bad, skipped, ignored):
        if kind == "dir":
            folders.append(p)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            _refuse(p, "an image directly in the image folder belongs to no identity (put it in "
                       "<folder>/<identity>/)", skip_bad, skipped)
        else:
            ignored.append((p, "a file directly in the image folder that is not an image: not read"))
    for folder in folders:
        files = []
        for p, kind in _entries(folder, skip_bad, skipped, ignored):
            if kind == "dir":
                _refuse(p, "a folder inside an identity folder (nested folders are not read)", skip_bad, skipped)
            elif _check_image(p, skip_bad, skipped):
                files.append(p)
        if verify:
            good = []
            for p in files:
                try:
                    read_image(p)
                    good.append(p)
                except DataError as exc:
                    if not skip_bad:
                        raise
                    skipped.append((p, exc.message))
            files = good
        if not files:
            if skip_bad:
                skipped.append((folder, "empty identity"))
                continue
            raise DataError("identity folder holds no images", path=folder)
        names.append(folder.name)
        paths += files
        labels += [len(names) - 1] * len(files)
    if not names:
        raise DataError("no identity sub-folders", path=root)
    return ImageList(paths, np.asarray(labels, np.int64), names, skipped, ignored)


def _label_key(label: str):
    """Integer labels (ASCII digits) first, in numeric order, then names in text order; no int() of an
    untrusted string (it may be thousands of digits long, or Unicode digits int() refuses)."""
    if label.isascii() and label.isdigit():
        digits = label.lstrip("0")
        return (0, len(digits), digits, label)
    return (1, 0, "", label)


def read_csv_list(path: str | Path, *, skip_bad: bool = False, each_image_once: bool = False) -> ImageList:
    """``path,label`` rows (header optional); relative paths resolve against the CSV's folder. Labels may be
    integers or names; names are numbered in sorted order. The file is UTF-8 (``visrec.data.text``); errors
    name the file and the line. ``each_image_once``: a path listed twice is an error naming both lines (a data
    set scored over all its pairs would count the two rows as a genuine pair of one image, scored 1; training
    may list an image twice to draw it more often)."""
    path = Path(path)
    if not path.exists():
        raise DataError("CSV list not found", path=path)
    rows, skipped, first = [], [], {}
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"not CSV: {exc}", path=path, record=f"line {reader.line_num}") from None
        lineno = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:  # a third field would be ignored without a word (a path with a comma is quoted)
            raise DataError(f"expected 'path,label', got {len(row)} field{'s' if len(row) != 1 else ''}",
                            path=path, record=f"line {lineno}")
        if lineno == 1 and row[0].strip().lower() == "path":
            continue
        name, label = row[0].strip(), row[1].strip()
        if not name or not label or "\x00" in name:
            raise DataError(f"expected 'path,label', got {','.join(row)[:80]!r}", path=path, record=f"line {lineno}")
        img = Path(name)
        img = img if img.is_absolute() else path.parent / img
        if each_image_once:
            key = listed_place(img)
            if key in first:
                raise DataError(f"{name[:200]!r} is listed twice (first on line {first[key]}): in a data set scored "
                                f"over all pairs its two rows would be a genuine pair of one image", path=path,
                                record=f"line {lineno}")
            first[key] = lineno
        if not _check_image(img, skip_bad, skipped):
            continue
        rows.append((img, label))
    if not rows:
        raise DataError("no rows", path=path)
    keys = sorted({lab for _, lab in rows}, key=_label_key)
    index = {k: i for i, k in enumerate(keys)}
    return ImageList([p for p, _ in rows], np.asarray([index[l] for _, l in rows], np.int64), keys, skipped)


def write_image_folder(root: str | Path, items: Iterable[tuple[np.ndarray, int | str]], *,
                       quality: int = 95) -> Path:
    """Write (RGB image, label) items as ``root/<label>/<n>.jpg`` (integer labels are zero-padded)."""
    root = Path(root)
    counts: dict[str, int] = {}
    for image, label in items:
        name = f"{label:06d}" if isinstance(label, (int, np.integer)) else str(label)
        n = counts.get(name, 0)
        counts[name] = n + 1
        out = root / name / f"{n:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encode_jpeg(image, quality))
    return root


def write_csv_list(path: str | Path, rows: Iterable[tuple[str | Path, int | str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p, label in rows:
            w.writerow([str(p), label])
    return path
