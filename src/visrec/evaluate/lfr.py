"""LFR (ICCV'19 Lightweight Face Recognition) submission files.

Features: a binary file with the header ``struct.pack('4i', rows, cols, cols * 4, 5)`` (four int32,
little endian as the organisers' x86 writers produce them: row count, feature dimension, bytes per row,
and the type code 5 = float32), then the rows as row-major little-endian float32, in the order of the
protocol's ``filelist.txt`` (the layout of ``write_bin`` in insightface's ``challenges/iccv19-lfr``
``gen_image_feature.py`` / ``gen_video_feature.py``).

File lists: one entry per line; the entry is the line's first whitespace-separated field (what the
organisers' video script takes; their image script takes the whole stripped line, the same thing for the
released lists, whose entries hold no whitespace). Blank lines are skipped.

Labels (``read_entry_labels``, for scoring a submission): a CSV of ``name,label`` lines, the name a file-list
entry, the label its identity (the text after the last comma); blank lines skipped, and a first line
``name,label`` taken as a header. A line without both fields, or a name listed twice, is an error naming the
file and the line(s). Scoring refuses a file list that names one entry twice (its two rows would be a genuine
pair of one image, scored 1) and entries without a label, naming them.

Image track (``write_image_submission``): the DeepGlint test set is a folder of aligned 112x112 crops and
a ``filelist.txt`` of 1,862,120 paths relative to that folder (:data:`DEEPGLINT_IMAGE_ROWS`). Row i is the
feature of entry i: the embedding of the image plus the embedding of its horizontal mirror (the flip test,
as the organisers' script computes it), L2-normalised, float32. The file always has exactly one row per
file-list entry.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import numpy as np

from visrec._files import replacing
from visrec.data.images import read_image
from visrec.data.text import read_bytes, read_lines
from visrec.errors import DataError
from visrec.evaluate.verification import tpr_at_fpr

_HEADER = struct.Struct("<4i")
FLOAT32_CODE = 5
DEEPGLINT_IMAGE_ROWS = 1_862_120  # entries of the DeepGlint image test set's filelist.txt
MAX_ENTRY_CHARS = 4096
MAX_LABEL_CHARS = 256


def write_lfr_features(path: str | Path, features: np.ndarray) -> Path:
    feats = np.ascontiguousarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be (rows, cols), got {feats.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = feats.shape
    # renamed in whole (visrec._files.replacing): a kill leaves an earlier file as it was, and its temporary
    # file is removed by the next writer
    with replacing(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_HEADER.pack(rows, cols, cols * 4, FLOAT32_CODE))
            fh.write(feats.astype("<f4", copy=False).tobytes())
    return path


def read_lfr_features(path: str | Path, entries: list[str] | None = None) -> np.ndarray:
    """The (rows, cols) float32 features of an LFR feature binary (module docstring). No rows, or a row that is
    not finite or is all zeros (it has no direction to score by), is a ``DataError`` naming the file and the row
    (1-based, as file-list entries are counted) and, given the file list's ``entries``, its entry."""
    path = Path(path)
    raw = read_bytes(path)  # a regular file only, read to its length (a device or a pipe would never end)
    if len(raw) < _HEADER.size:
        raise DataError("shorter than the 16-byte header", path=path)
    rows, cols, row_bytes, code = _HEADER.unpack_from(raw)
    if code != FLOAT32_CODE:
        raise DataError(f"type code {code} in the header, expected 5 (float32)", path=path, field="header[3]")
    if rows < 0 or cols <= 0 or row_bytes != cols * 4:
        raise DataError(f"inconsistent header rows={rows} cols={cols} row_bytes={row_bytes}", path=path)
    need = _HEADER.size + rows * cols * 4
    if len(raw) != need:
        raise DataError(f"{len(raw)} bytes, the header announces {need}", path=path)
    if rows == 0:
        raise DataError("no feature rows", path=path)
    feats = np.frombuffer(raw, dtype=np.float32, offset=_HEADER.size).reshape(rows, cols).copy()
    finite = np.isfinite(feats).all(axis=1)
    bad = ~finite | ~(feats != 0).any(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        entry = f" (file-list entry {entries[k][:200]!r})" if entries is not None and k < len(entries) else ""
        raise DataError(f"{'NaN or inf' if not finite[k] else 'all zeros'}{entry}: a feature needs a finite, "
                        f"non-zero direction", path=path, record=f"row {k + 1}")
    return feats


def read_filelist(path: str | Path) -> list[str]:
    """The entries of a file list: the first whitespace-separated field of each non-blank line (module
    docstring). A line longer than :data:`MAX_ENTRY_CHARS` is a ``DataError`` naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError("file list not found", path=path)

    out = []
    for lineno, line in enumerate(read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields[0]) > MAX_ENTRY_CHARS:
            raise DataError(f"entry of {len(fields[0])} characters (at most {MAX_ENTRY_CHARS})", path=path,
                            record=f"line {lineno}")
        out.append(fields[0])
    return out


def read_entry_labels(path: str | Path) -> dict[str, str]:
    """File-list entry -> identity label, from a ``name,label`` CSV (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError("labels file not found", path=path)
    table: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        name, comma, label = (part.strip() for part in line.rpartition(","))
        if lineno == 1 and (name.lower(), label.lower()) == ("name", "label"):
            continue
        if not comma or not name or not label:
            raise DataError(f"expected 'name,label', got {line[:200]!r}", path=path, record=f"line {lineno}")
        if len(name) > MAX_ENTRY_CHARS or len(label) > MAX_LABEL_CHARS:
            raise DataError(f"a name of {len(name)} or a label of {len(label)} characters (at most "
                            f"{MAX_ENTRY_CHARS} and {MAX_LABEL_CHARS})", path=path, record=f"line {lineno}")
        if name in lines:
            raise DataError(f"{name[:200]!r} is listed twice (first on line {lines[name]})", path=path,
                            record=f"line {lineno}")
        table[name], lines[name] = label, lineno
    if not table:
        raise DataError("no 'name,label' lines", path=path)
    return table


def labelled_rows(features_path: str | Path, filelist_path: str | Path, labels: dict) -> tuple[np.ndarray, np.ndarray]:
    """A submission's feature rows and, row by row, their labels: the rows are the file list's entries in order,
    each listed once and each with a label (else a ``DataError`` naming the file and the entries)."""
    names = read_filelist(filelist_path)
    feats = read_lfr_features(features_path, names)
    if len(names) != len(feats):
        raise DataError(f"{len(feats):,} feature rows but {len(names):,} file-list entries", path=features_path)
    first: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in first:
            raise DataError(f"entries {first[name]} and {i} are both {name[:200]!r}: its two rows would be a genuine "
                            f"pair of one image", path=filelist_path)
        first[name] = i
    missing = [n for n in names if n not in labels]
    if missing:
        raise DataError(f"{len(missing):,} entries have no ground-truth label, e.g. "
                        f"{', '.join(repr(n[:200]) for n in missing[:3])}", path=filelist_path)
    return feats, np.array([labels[n] for n in names])


def _entry_path(root: Path, entry: str, filelist: Path, index: int) -> Path:
    """``root / entry`` for a relative entry that stays inside ``root`` (no absolute path, no ``..``)."""
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts or "\0" in entry:
        raise DataError(f"entry {entry!r} is not a path inside the images folder", path=filelist,
                        record=f"entry {index + 1}")
    return root / rel


def image_submission_entries(images_root: str | Path, filelist: str | Path, expected_rows: int | None = None
                             ) -> list[str]:
    """The file list's entries, checked as :func:`write_image_submission` needs them (the images folder there,
    at least one entry, ``expected_rows`` of them when given): a caller checks its data before loading a model."""
    root, filelist = Path(images_root), Path(filelist)
    if not root.is_dir():
        raise DataError("images folder not found (the folder the file list's paths are relative to)", path=root)
    names = read_filelist(filelist)
    if not names:
        raise DataError("the file list has no entries", path=filelist)
    if expected_rows is not None and len(names) != expected_rows:
        raise DataError(f"{len(names):,} entries, the protocol's test set has {expected_rows:,}", path=filelist)
    return names


def write_image_submission(embed: Callable[[np.ndarray], np.ndarray], images_root: str | Path,
                           filelist: str | Path, out: str | Path, *, input_size: tuple[int, int] = (112, 112),
                           batch: int = 256, expected_rows: int | None = None, progress=None,
                           entries: list[str] | None = None) -> Path:
    """The LFR image-track feature binary (module docstring) of the images ``images_root/<entry>`` listed in
    ``filelist``, rows in file-list order.

    ``embed(images)`` maps (N, H, W, 3) RGB uint8 aligned crops to raw embeddings (N, D); it is called on
    the images and on their mirrors, and the two are summed, then L2-normalised. Every image must be
    ``input_size`` (height, width): the test set is already aligned, nothing is resized. ``expected_rows``
    (e.g. :data:`DEEPGLINT_IMAGE_ROWS`), when given, must equal the number of file-list entries. The file is
    written in batches (the whole test set's features are never held at once) to a temporary name, checked
    (header rows = file-list entries, size = 16 + rows * cols * 4 bytes) and then renamed to ``out``.
    ``entries``: what :func:`image_submission_entries` returned for these arguments (else it is called here)."""
    root, filelist, out = Path(images_root), Path(filelist), Path(out)
    names = entries if entries is not None else image_submission_entries(root, filelist, expected_rows)
    h, w = input_size
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = 0, None
    with replacing(out) as tmp:  # no half-written submission is left behind, nor one a kill left
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * _HEADER.size)  # the header is written once the dimension is known
            for start in range(0, len(names), batch):
                imgs = []
                for i in range(start, min(len(names), start + batch)):
                    img = read_image(_entry_path(root, names[i], filelist, i))
                    if img.shape[:2] != (h, w):
                        raise DataError(f"image is {img.shape[1]}x{img.shape[0]}, the model takes aligned {w}x{h} crops",
                                        path=root / names[i], record=f"{filelist.name} entry {i + 1}")
                    imgs.append(img)
                arr = np.stack(imgs)
                feats = np.asarray(embed(arr), np.float32) + np.asarray(embed(np.ascontiguousarray(arr[:, :, ::-1])),
                                                                         np.float32)
                if feats.ndim != 2 or len(feats) != len(imgs) or (cols is not None and feats.shape[1] != cols):
                    raise DataError(f"the model gave embeddings of shape {feats.shape} for {len(imgs)} images")
                cols = feats.shape[1]
                norms = np.linalg.norm(feats.astype(np.float64), axis=1)
                if not (np.isfinite(norms).all() and (norms > 0).all()):
                    k = int(np.argmax(~np.isfinite(norms) | (norms == 0)))
                    raise DataError("flip-summed embedding is zero or not finite: it cannot be L2-normalised",
                                    path=root / names[start + k], record=f"{filelist.name} entry {start + k + 1}")
                fh.write((feats / norms[:, None]).astype("<f4").tobytes())
                rows += len(imgs)
                if progress:
                    progress(len(imgs))
            fh.seek(0)
            fh.write(_HEADER.pack(rows, cols, cols * 4, FLOAT32_CODE))
        with open(tmp, "rb") as fh:
            header = _HEADER.unpack(fh.read(_HEADER.size))
        if header[0] != len(names) or tmp.stat().st_size != _HEADER.size + len(names) * cols * 4:
            raise DataError(f"wrote {rows} rows for {len(names)} file-list entries", path=out)
    return out


def evaluate_submission(features_path: str | Path, filelist_path: str | Path, labels: dict[str, int | str],
                        targets=(1e-8,), **kwargs):
    """TPR at the protocol's FPR targets for a submission, given ground-truth labels by file-list entry (a dict,
    or :func:`read_entry_labels` of a labels file)."""
    feats, rows = labelled_rows(features_path, filelist_path, labels)
    return tpr_at_fpr(feats, rows, targets, **kwargs)
