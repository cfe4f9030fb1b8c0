"""The Perfect-500K layout (ACM MM'19 "AI Meets Beauty"): catalogue and query folders, ground truth, submissions.

Layout of a data set root::

    <root>/catalogue/<id>.jpg     catalogue (shop) images, one product photo per file; id = file stem
    <root>/query/<qid>.jpg        real-world query photos; qid = file stem
    <root>/val.csv                ground truth, one line per query: ``qid,gt1,gt2,...``

A submission CSV has one line per query: ``qid,id1,...,id7`` — the query id then exactly ``k`` (7)
catalogue ids, best first, no duplicates within a row (scored with mAP@7). visrec writes it with no
header and ``\n`` line ends.

The organisers' files as distributed. The AI Meets Beauty validation ground truth (``val_2020.csv``, as
redistributed in the FangxiangFeng/AI-Meets-Beauty-2020 repository on GitHub) starts with a UTF-8
byte-order mark, then the header line ``Validation Image ID,Training Image ID``, then one
``query,gt1,gt2,...`` row per query with a variable number of ground-truth ids; lines end with ``\r\n``
and fields are separated by a bare comma. The readers here take that file as it is, and also what a
spreadsheet or hand edit makes of it:

- a leading UTF-8 BOM is dropped and lines may end with ``\n``, ``\r\n`` or ``\r``
  (``visrec.data.text``);
- fields are stripped of surrounding whitespace, so ``", "`` (comma-space) separators read like ``","``;
- trailing empty fields (``q1,a,b,,,`` — the padding a spreadsheet adds to short rows) are dropped; an
  empty field before a non-empty one is an error;
- the first non-blank line is a header, and skipped, when its first field names a column rather than
  holding an id (``_is_header``: e.g. ``Validation Image ID``, ``query_id``, ``qid``, ``image id``).
  It is decided by content, never by position: a file without a header reads its first row as data, and
  a header-like line anywhere else is data (and then usually an error). A ground truth whose header-like
  first field is also a query of its root (``<root>/query/id.jpg`` beside ``id,p0001,...``) is refused
  naming line 1: that line may be the query's row, and dropping it would shrink every metric unnoticed;
- blank lines are skipped.

Ids are compared as strings after stripping surrounding whitespace and may not contain commas.
A catalogue or query image's id (its file stem) must be a valid id as it stands (``id_problem``): UTF-8,
non-empty, no comma, CR or LF, no surrounding whitespace, not in quotes — a file named otherwise could not
be written to ids.txt or a CSV and read back, so ``list_images`` refuses the folder naming the file. Fields
are not quoted, as in the organisers' plain comma-separated files: a field in quotes (``"q1","a"``) is an
error rather than an id that would name no image (a ``"`` inside an id is part of it). The writers refuse
what their reader would read back differently. Errors are ``DataError`` naming the file and the 1-based
line (``record="line N"``).

Images in memory are HxWx3 RGB uint8 (``visrec.data.images``). ``preprocess_product`` turns one into the
network input: float32 CHW, ImageNet-normalised.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from visrec._files import replacing
from visrec.data.images import MAX_IMAGE_FILE_BYTES, check_encoded, decode_image
from visrec.data.text import read_bytes, read_lines
from visrec.errors import DataError, shown

CATALOGUE_DIR = "catalogue"
QUERY_DIR = "query"
GROUND_TRUTH = "val.csv"
PRODUCT_LABELS = "catalogue_products.csv"   # ``catalogue_id,product_id`` (written by the synthetic generator)
SUBMISSION_K = 7
PRODUCT_SUFFIXES = (".jpg", ".jpeg", ".png")

# ImageNet channel statistics for RGB in [0, 1]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------------------- images

def _is_quoted(field: str) -> bool:
    return len(field) >= 2 and field[0] == field[-1] == '"'


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` is not a valid id (module docstring), or None when it is."""
    if not image_id:
        return "an empty id"
    if image_id != image_id.strip():
        return "surrounding whitespace"
    if any(c in image_id for c in ",\r\n"):
        return "a comma or line break"
    if _is_quoted(image_id):
        return "quotes around it"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "bytes that are not UTF-8"
    return None


def list_images(folder: str | Path) -> list[tuple[str, Path]]:
    """``(id, path)`` for every .jpg/.jpeg/.png file (suffix case-insensitive) directly in ``folder``,
    sorted by id (the file stem). Other files are ignored. Raises ``DataError`` when the folder is missing,
    two files share an id (``a.jpg`` and ``a.png``) or a stem is not a valid id (``id_problem``: the file is
    named, before any image is read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("image folder not found", path=folder)
    seen: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() not in PRODUCT_SUFFIXES or not p.is_file():
            continue
        why = id_problem(p.stem)
        if why is not None:
            raise DataError(f"file name {p.name!r} does not make a valid image id (its stem holds {why}; ids are "
                            "UTF-8 without commas, line breaks, quotes around them or surrounding whitespace): "
                            "rename the file", path=folder, record=f"file {p.name!r}")
        if p.stem in seen:
            a, b = sorted([seen[p.stem].name, p.name])
            raise DataError(f"duplicate image id {p.stem!r}: both {a} and {b}", path=folder)
        seen[p.stem] = p
    return sorted(seen.items())


def read_image_checked(image_id: str, path: str | Path) -> np.ndarray:
    """Decode one image to HxWx3 RGB uint8; a missing or undecodable file raises ``DataError`` naming
    the path and the id."""
    path = Path(path)
    try:
        data = read_bytes(path, MAX_IMAGE_FILE_BYTES)
    except DataError as exc:
        raise DataError(f"cannot read image: {exc.message}", path=path, record=f"id {image_id}") from None
    return decode_image(data, source=path, record=f"id {image_id}")


def _check_decodable(path: Path) -> str | None:
    """None when ``path`` decodes, else the reason. Decodes at 1/8 scale (cheap for JPEG)."""
    import cv2

    try:
        data = read_bytes(path, MAX_IMAGE_FILE_BYTES)
    except DataError as exc:
        return exc.message
    if not data:
        return "empty file"
    try:
        check_encoded(data)
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8)
    except DataError as exc:
        return exc.message
    except cv2.error:
        arr = None
    if arr is None or arr.size == 0:
        return f"not a decodable image ({len(data)} bytes)"
    return None


def scan_catalogue(folder_or_items: str | Path | Iterable[tuple[str, Path]], *, strict: bool = False
                   ) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """Check that every image decodes, without keeping any in memory.

    ``folder_or_items`` is a folder (listed with ``list_images``) or ``(id, path)`` pairs. Returns
    ``(ok_items, bad_items)``: ``ok_items`` the ``(id, path)`` pairs that decode, ``bad_items``
    ``(id, reason)`` for the rest. With ``strict=True`` the first bad image raises ``DataError`` instead.
    """
    items = list_images(folder_or_items) if isinstance(folder_or_items, (str, Path)) else list(folder_or_items)
    ok: list[tuple[str, Path]] = []
    bad: list[tuple[str, str]] = []
    for image_id, path in items:
        reason = _check_decodable(Path(path))
        if reason is None:
            ok.append((image_id, Path(path)))
        elif strict:
            raise DataError(reason, path=path, record=f"id {image_id}")
        else:
            bad.append((image_id, reason))
    return ok, bad


def load_catalogue_images(items: Iterable[tuple[str, str | Path]], *, strict: bool = False,
                          bad: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Lazily yield ``(id, RGB uint8 image)`` for ``(id, path)`` pairs, one image in memory at a time.

    A missing/undecodable image is skipped and ``(id, reason)`` appended to ``bad`` (when given);
    with ``strict=True`` it raises ``DataError`` naming the id and path instead.
    """
    for image_id, path in items:
        try:
            img = read_image_checked(image_id, path)
        except DataError as exc:
            if strict:
                raise
            if bad is not None:
                bad.append((image_id, exc.message))
            continue
        yield image_id, img


# ----------------------------------------------------------------------------------------- CSV files

def _atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


# A column name, once lower-cased with "_"/"-" read as spaces: an optional role word, an optional
# "image", then "id"/"ids"/"name" — or a bare "query"/"qid". Perfect-500K ids are file stems such as
# v000101 / n0292431, which never match.
_HEADER_FIRST_FIELD = re.compile(
    r"(?:(?:validation|val|query|test|train|training|catalogue|catalog)\s*)?(?:image\s*)?(?:id|ids|name)"
    r"|query|qid")


def _is_header(fields: Sequence[str]) -> bool:
    """True when ``fields`` (a row's stripped fields) are a header: the first field names a column
    (``Validation Image ID``, ``query_id``, ``QueryId``, ``qid``, ``image id``, ``id``), not an id."""
    first = re.sub(r"[\s_\-]+", " ", fields[0].lower()).strip() if fields else ""
    return bool(first) and _HEADER_FIRST_FIELD.fullmatch(first) is not None


def _read_rows(path: str | Path, *, header: bool = True,
               check_header: Callable[[int, list[str]], None] | None = None) -> Iterator[tuple[int, list[str]]]:
    """``(1-based line, stripped fields)`` for each non-blank line, trailing empty fields dropped; with
    ``header`` the first non-blank line is skipped when ``_is_header`` says it names columns (module doc), after
    ``check_header(line, fields)`` (which raises to refuse the skip) when given."""
    first = True
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        while len(fields) > 1 and not fields[-1]:  # spreadsheet padding of a short row
            fields.pop()
        if first and header and _is_header(fields):
            if check_header is not None:
                check_header(lineno, fields)
            first = False
            continue
        first = False
        yield lineno, fields


def _query_image_named(root: Path, image_id: str) -> str | None:
    """The name of the image file of query ``image_id`` in ``root/query`` (as ``list_images`` reads the folder:
    a .jpg / .jpeg / .png suffix in any case), or None when there is none (or no such folder)."""
    try:
        with os.scandir(root / QUERY_DIR) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if stem == image_id and suffix.lower() in PRODUCT_SUFFIXES and entry.is_file():
                    return entry.name
    except OSError:  # no query folder beside the file: nothing a header line could be mistaken for
        return None
    return None


def _refuse_a_header_naming_a_query(path: str | Path, lineno: int, fields: Sequence[str]) -> None:
    """A ground-truth file's header-like first line whose first field is also a query of the data set root the
    file sits in (``root/query/<that id>.jpg``, module doc's layout): it may be that query's row, and skipping
    it would drop the query from every metric unnoticed, so it is a DataError naming the line."""
    name = _query_image_named(Path(path).parent, fields[0])
    if name is None:
        return
    raise DataError(f"the first line reads as a header (its first field {fields[0]!r} names a column) but "
                    f"{QUERY_DIR}/{name} is a query of this data set: it cannot be told from that query's row. Put a "
                    "header line first (e.g. 'Validation Image ID,Training Image ID'), so this line is read as "
                    "data, or rename the query", path=path, record=f"line {lineno}")


def _check_row(fields: Sequence[str], *, path, record, what: str) -> None:
    """Query id + ids: none empty or quoted, no duplicate ids."""
    for i, f in enumerate(fields):
        name = "query id" if i == 0 else f"{what} id #{i}"
        if not f:
            raise DataError(f"empty {name}", path=path, record=record)
        if _is_quoted(f):
            raise DataError(f"{name} {f} is in quotes: the file is plain comma-separated (no quoting); write "
                            "the id without them", path=path, record=record)
    seen: set[str] = set()
    for f in fields[1:]:
        if f in seen:
            raise DataError(f"duplicate {what} id {f!r} for query {fields[0]!r}", path=path, record=record)
        seen.add(f)


def read_ground_truth(path: str | Path, lines: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Read ``qid,gt1,gt2,...`` lines into ``{qid: [gt ids in file order]}``; the organisers' ``val.csv`` as
    distributed (BOM, header line, CRLF) reads as is (module docstring). ``lines``, when given, is filled with
    each query's 1-based line (for errors found later, e.g. a ground-truth id that names no catalogue image).

    Errors (``DataError`` with the file and ``line N``): a line with no ground-truth id, an empty or quoted
    id, a duplicate id within a line, a query id seen on an earlier line, a header-like first line whose first
    field is a query image of the root the file sits in (``<root>/query/<id>.jpg``: it may be that query's row).
    """
    gt: dict[str, list[str]] = {}
    first: dict[str, int] = lines if lines is not None else {}
    for lineno, fields in _read_rows(path, check_header=lambda n, f: _refuse_a_header_naming_a_query(path, n, f)):
        record = f"line {lineno}"
        _check_row(fields, path=path, record=record, what="ground-truth")
        if len(fields) < 2:
            raise DataError(f"query {fields[0]!r} has no ground-truth ids", path=path, record=record)
        if fields[0] in gt:
            raise DataError(f"duplicate query id {fields[0]!r} (first on line {first[fields[0]]})",
                            path=path, record=record)
        gt[fields[0]] = fields[1:]
        first[fields[0]] = lineno
    return gt


def _validate_mapping(rows: Mapping[str, Sequence[str]], path, what: str) -> None:
    """What a writer may write: rows its reader reads back exactly (every id valid: ``id_problem``; no
    duplicate; a first row the reader would not take for a header), else a DataError naming the id."""
    for n, (qid, ids) in enumerate(rows.items()):
        qid = str(qid)
        fields = [qid, *(str(i) for i in ids)]
        for f in fields:
            why = id_problem(f)
            if why is not None:
                raise DataError(f"id {shown(f)} for query {shown(qid)} holds {why}: the file would not read back "
                                "as written", path=path, record=f"query {shown(qid)}")
        if n == 0 and _is_header(fields):
            raise DataError(f"query id {qid!r} reads as a column name (a header line, which the reader skips): "
                            "the first row would be lost", path=path, record=f"query {qid}")
        _check_row(fields, path=path, record=f"query {qid}", what=what)


def write_ground_truth(path: str | Path, gt: Mapping[str, Sequence[str]]) -> None:
    """Write ``{qid: [gt ids]}`` as ``qid,gt1,gt2,...`` lines (insertion order), atomically."""
    _validate_mapping(gt, path, "ground-truth")
    for qid, ids in gt.items():
        if not ids:
            raise DataError(f"query {qid!r} has no ground-truth ids", path=path, record=f"query {qid}")
    _atomic_write_text(path, "".join(",".join([str(q), *map(str, ids)]) + "\n" for q, ids in gt.items()))


def write_submission(path: str | Path, ranked: Mapping[str, Sequence[str]], k: int = SUBMISSION_K) -> None:
    """Write ``qid,id1,...,idk`` per query (insertion order): the first ``k`` ids of each ranked list,
    best first. A list shorter than ``k`` or with a duplicate among its first ``k`` raises ``DataError``
    naming the query. Written atomically (temp file in the same folder + ``os.replace``)."""
    rows = {str(q): [str(i) for i in list(ids)[:k]] for q, ids in ranked.items()}
    for qid, ids in rows.items():
        if len(ids) < k:
            raise DataError(f"query {qid!r} has {len(ids)} ranked ids, a submission row needs {k}",
                            path=path, record=f"query {qid}")
    _validate_mapping(rows, path, "ranked")
    _atomic_write_text(path, "".join(",".join([q, *ids]) + "\n" for q, ids in rows.items()))


def read_submission(path: str | Path, k: int = SUBMISSION_K) -> dict[str, list[str]]:
    """Read a submission: ``{qid: [k ids, best first]}``. Each non-blank line must hold a query id and
    exactly ``k`` non-empty, distinct ids; a query may appear once. A header line, BOM, CRLF line ends and
    ``", "`` separators are accepted as for the ground truth (module docstring). Errors name the file and
    line."""
    out: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for lineno, fields in _read_rows(path):
        record = f"line {lineno}"
        if len(fields) - 1 != k:
            raise DataError(f"{len(fields) - 1} ids after the query id, expected {k}", path=path, record=record)
        _check_row(fields, path=path, record=record, what="ranked")
        if fields[0] in out:
            raise DataError(f"duplicate query id {fields[0]!r} (first on line {first[fields[0]]})",
                            path=path, record=record)
        out[fields[0]] = fields[1:]
        first[fields[0]] = lineno
    return out


# ----------------------------------------------------------------------------------------- preprocessing

# the largest square pad_to_square makes (2^26 pixels: 192 MiB of RGB): the bound applies to the square, as a
# 1 x 900,000 image passes every per-image pixel limit and would pad to 2.4 TB
MAX_SQUARE_PIXELS = 1 << 26


def pad_to_square(img: np.ndarray, fill: int = 255) -> np.ndarray:
    """Pad the shorter side of an HxW(xC) image equally on both sides (the odd pixel goes to the
    bottom/right) with ``fill`` (white by default), giving a max(H, W) square; content is unchanged. A square
    above :data:`MAX_SQUARE_PIXELS` is a ``DataError`` (an extreme aspect ratio), before it is allocated."""
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    if side * side > MAX_SQUARE_PIXELS:
        raise DataError(f"a {w}x{h} image pads to a {side}x{side} square, above the {MAX_SQUARE_PIXELS:,} pixels a "
                        f"padded product image may have (an extreme aspect ratio)")
    top, left = (side - h) // 2, (side - w) // 2
    out = np.full((side, side) + img.shape[2:], fill, dtype=img.dtype)
    out[top:top + h, left:left + w] = img
    return out


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape[0] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def _normalise(img: np.ndarray) -> np.ndarray:
    x = (img.astype(np.float32) * (1.0 / 255.0) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def product_pixels(img: np.ndarray, size: int) -> np.ndarray:
    """``preprocess_product`` up to its normalisation: the (size, size, 3) uint8 square, padded and resized.
    :func:`normalise_product_pixels` finishes it, on any device."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    return _resize(pad_to_square(img, 255), int(size))


def normalise_product_pixels(pixels):
    """(N, S, S, 3) uint8 tensor -> (N, 3, S, S) float32 tensor on the same device: the float32 operations of
    ``preprocess_product``'s normalisation in the same order (scale by 1/255, less the ImageNet mean, over its
    std), so the values are the same bits wherever they run. Done on the network's device, the copy there is
    a quarter of the float batch's and the loader threads skip the float work."""
    import torch

    mean = torch.from_numpy(IMAGENET_MEAN).to(pixels.device).view(1, 3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).to(pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    return ((x * np.float32(1.0 / 255.0) - mean) / std).contiguous()


def preprocess_product(img: np.ndarray, size: int = 224, multiscale: Sequence[float] | None = None
                       ) -> np.ndarray | list[np.ndarray]:
    """Network input for an HxWx3 RGB uint8 product image.

    Pad to a square with white (``pad_to_square``), resize to ``size`` x ``size`` pixels
    (``cv2.INTER_AREA`` when shrinking, ``INTER_LINEAR`` when growing), scale to [0, 1] and normalise
    per channel with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); returns
    float32 (3, size, size), channel order RGB.

    With ``multiscale`` (e.g. ``(1.0, 0.707, 1.414)``) returns a list, one array per scale ``s`` of
    shape (3, round(size*s), round(size*s)), in the order given.
    """
    if multiscale is None:
        return _normalise(product_pixels(img, size))
    return [_normalise(product_pixels(img, max(1, int(round(size * float(s)))))) for s in multiscale]


# ----------------------------------------------------------------------------------------- product labels

def write_product_labels(path: str | Path, labels: Mapping[str, str]) -> None:
    """Write ``{catalogue_id: product_id}`` as ``catalogue_id,product_id`` lines (no header), atomically.
    This is the class label a trainer uses for metric-learning fine-tuning on the catalogue."""
    for cid, pid in labels.items():
        if not str(cid).strip() or not str(pid).strip() or "," in f"{cid}{pid}":
            raise DataError(f"bad label pair ({cid!r}, {pid!r})", path=path, record=f"id {cid}")
    _atomic_write_text(path, "".join(f"{c},{p}\n" for c, p in labels.items()))


def read_product_labels(path: str | Path) -> dict[str, str]:
    """Read ``catalogue_id,product_id`` lines into ``{catalogue_id: product_id}``; errors name file and line."""
    out: dict[str, str] = {}
    for lineno, fields in _read_rows(path, header=False):
        record = f"line {lineno}"
        if len(fields) != 2 or not all(fields):
            raise DataError("expected 'catalogue_id,product_id'", path=path, record=record)
        if fields[0] in out:
            raise DataError(f"duplicate catalogue id {fields[0]!r}", path=path, record=record)
        out[fields[0]] = fields[1]
    return out
