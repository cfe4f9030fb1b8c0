"""IJB-B / IJB-C: the meta files, template pooling with InsightFace's options, 1:1 TAR@FAR and 1:N.

Layout (as InsightFace's ``recognition/_evaluation_/ijb`` scripts read the release; ``p`` = ``ijbc`` or
``ijbb``), under the root ``IJB_C`` (or ``IJB_B``):

  ``loose_crop/<image>``                the face images (loosely cropped around the face)
  ``meta/<p>_face_tid_mid.txt``         ``image template_id media_id``, one line per face image
  ``meta/<p>_name_5pts_score.txt``      ``image x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score``: the five alignment
                                        points (left eye, right eye, nose, left and right mouth corners,
                                        loose_crop pixels) and the detector's faceness score; line i
                                        describes the same image as line i of ``face_tid_mid`` (checked)
  ``meta/<p>_template_pair_label.txt``  ``template_a template_b label`` (1 = same subject), the 1:1 pairs
  ``meta/<p>_1N_gallery_G1.csv``, ``_G2.csv`` (IJB-B: ``_S1``, ``_S2``), ``meta/<p>_1N_probe_mixed.csv``:
                                        CSV with a header; TEMPLATE_ID and SUBJECT_ID columns (one row per
                                        image of the template; further columns ignored)

Fields are separated by whitespace; a line with the wrong number of fields or a value that does not parse
is a ``DataError`` naming the file and line. Ids must lie in [0, 2^31); the
number of records is bounded by the file's length (every record is one line); coordinates lie in
[-1e6, 1e6], detector scores in [0, 1e6] (a negative score would flip the image's feature). Each of these
is a ``DataError`` naming the file and line too, as each would silently change the result: an image listed
twice (it would weigh twice in its media mean), five points that coincide (no alignment exists), a pair
listed twice (in either order) or a template paired with itself, a pair list without both labels, and,
across the 1:N files (:func:`read_1n`), a template with no image, a template in both galleries, a subject
with two gallery templates, a probe template that is also a gallery template and a probe subject with no
gallery template. ``visrec.faces.evaluation.evaluate_ijb`` runs them all before the model loads.

Template features (InsightFace's ``image2template_feature`` with its three switches; :class:`PoolOptions`):

1. an image's feature is the embedding of its aligned 112x112 crop, plus that of the crop's mirror when
   ``flip`` (F1, the default);
2. ``norm_score`` (N1, the default) keeps the raw feature, whose norm acts as a quality weight; off (N0),
   each image feature is L2-normalised first;
3. ``detector_score`` (D1, the default) multiplies each image feature by its detector score;
4. inside a template, the features of one media (the frames of one video, or one photo) are averaged;
   the media features are summed and the sum L2-normalised (so a long video counts once, like a photo).

A template pair's score is the cosine of the two template features.

1:1 TAR@FAR is reported by two rules side by side (:func:`ijb_verification`):
- ``strict`` (visrec's, ``visrec.evaluate.verification.tpr_at_fpr_pairs``): the highest TAR over the
  thresholds whose achieved FAR <= target (accept score >= t);
- ``nearest`` (what the published IJB tables report, InsightFace's ``ijb_11.py``): the ROC point (scikit-learn's
  ``roc_curve``) whose FAR is nearest the target, which may lie above it
  (``visrec.evaluate.verification.tpr_at_fpr_nearest``).

1:N (:func:`ijb_identification`), gallery = G1 + G2 templates (S1 + S2 for IJB-B), probes = the mixed probe
templates, as InsightFace's ``ijb_1n.py``: every probe subject must have exactly one gallery template.
- CMC rank-k: share of probes whose gallery template is among the k best-scoring ones;
- TPIR at FPIR = f, with FPIR counted as InsightFace does: the non-mated (probe, gallery template) scores
  at or above the threshold, divided by the number of probes; TPIR = share of probes whose mated score
  passes the threshold. Two rules side by side: ``strict`` (the highest TPIR with achieved FPIR <= f,
  accept score >= t) and ``insightface`` (t = the ceil(f * probes)-th largest non-mated score, accept
  score > t, InsightFace's ``evaluation``).
- Open set per gallery (G1 and G2 apart, the IJB protocol's own reading; strict rule only): a probe whose
  subject is not enrolled in that gallery is non-mated; FPIR = share of non-mated probes whose best score
  is >= t; TPIR = share of mated probes whose best-scoring gallery subject is theirs with score >= t.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visrec.data.schemes import MIN_POINT_SPREAD, degenerate_points
from visrec.data.text import read_lines, read_text
from visrec.errors import DataError
from visrec.evaluate.identification import tpir_at_fpir
from visrec.evaluate.verification import _next_up, tpr_at_fpr_nearest, tpr_at_fpr_pairs

MAX_ID = 2 ** 31
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (1e-2, 1e-1)
RANKS = (1, 5, 10)


@dataclass
class TemplateMeta:
    image_names: list[str]
    templates: np.ndarray  # per image
    medias: np.ndarray     # per image


@dataclass
class FivePoints:
    image_names: list[str]
    points: np.ndarray  # (N, 5, 2) float32, loose_crop pixels
    scores: np.ndarray  # (N,) float32 detector (faceness) scores


@dataclass(frozen=True)
class PoolOptions:
    """InsightFace's template-pooling switches (module docstring); the defaults are its published setting
    (F1 N1 D1)."""

    flip: bool = True
    norm_score: bool = True
    detector_score: bool = True

    @property
    def label(self) -> str:
        return f"F{int(self.flip)} N{int(self.norm_score)} D{int(self.detector_score)}"

    def describe(self) -> str:
        return ", ".join([
            "flip: image + mirror embeddings summed" if self.flip else "no flip",
            "raw feature norms kept" if self.norm_score else "image features L2-normalised first",
            "weighted by detector score" if self.detector_score else "no detector-score weighting"])


def _id(text: str, path, lineno: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise DataError(f"{what} must be an integer, got {text[:40]!r}", path=path, record=f"line {lineno}") from None
    if not 0 <= v < MAX_ID:
        raise DataError(f"{what} {v} outside [0, 2^31)", path=path, record=f"line {lineno}")
    return v


MAX_COORD = 1e6  # pixels: no image decodes larger (visrec.data.images bounds pixel counts)


def _float(text: str, path, lineno: int, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{what} must be a number, got {text[:40]!r}", path=path, record=f"line {lineno}") from None
    if not abs(v) <= MAX_COORD:  # also NaN and inf
        raise DataError(f"{what} is {v}, outside [-1e6, 1e6]", path=path, record=f"line {lineno}")
    return v


def _check_name(name: str, path, lineno: int) -> str:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\0" in name or len(name) > 1024:
        raise DataError(f"image name {name[:80]!r} is not a path inside loose_crop", path=path, record=f"line {lineno}")
    return name


def _not_repeated(first: dict[str, int], name: str, path, lineno: int) -> None:
    """An image listed twice would weigh twice in its media mean (and a five-point row describes one image);
    ``1.jpg``, ``./1.jpg`` and ``a/../1.jpg`` are one image."""
    key = posixpath.normpath(name)
    if first.setdefault(key, lineno) != lineno:
        raise DataError(f"image {name[:80]!r} repeats line {first[key]}", path=path, record=f"line {lineno}")


def read_tid_mid(path: str | Path) -> TemplateMeta:
    """``<p>_face_tid_mid.txt``: ``image template_id media_id`` per line (module docstring)."""
    path = Path(path)
    names, tids, mids = [], [], []
    first: dict[str, int] = {}
    for lineno, line in enumerate(read_lines(path), start=1):  # UTF-8; a bad byte is a DataError naming it
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise DataError(f"expected 'image_name template_id media_id', got {len(parts)} fields", path=path,
                            record=f"line {lineno}")
        _not_repeated(first, parts[0], path, lineno)
        names.append(_check_name(parts[0], path, lineno))
        tids.append(_id(parts[1], path, lineno, "template id"))
        mids.append(_id(parts[2], path, lineno, "media id"))
    if not names:
        raise DataError("no images listed", path=path)
    return TemplateMeta(names, np.asarray(tids, np.int64), np.asarray(mids, np.int64))


def read_five_points(path: str | Path) -> FivePoints:
    """``<p>_name_5pts_score.txt``: ``image`` + 10 coordinates + detector score (>= 0) per line; five points
    an alignment cannot use (``visrec.data.schemes.degenerate_points``) are a ``DataError`` naming the line."""
    path = Path(path)
    names, pts, scores, linenos = [], [], [], []
    first: dict[str, int] = {}
    for lineno, line in enumerate(read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 12:
            raise DataError(f"expected 'image x1 y1 ... x5 y5 score' (12 fields), got {len(parts)}", path=path,
                            record=f"line {lineno}")
        _not_repeated(first, parts[0], path, lineno)
        names.append(_check_name(parts[0], path, lineno))
        pts.append([_float(v, path, lineno, f"coordinate {k + 1}") for k, v in enumerate(parts[1:11])])
        scores.append(_float(parts[11], path, lineno, "detector score"))
        if scores[-1] < 0:  # D1 multiplies the feature by it: a negative score would flip the feature
            raise DataError(f"detector score {scores[-1]} is negative", path=path, record=f"line {lineno}")
        linenos.append(lineno)
    if not names:
        raise DataError("no images listed", path=path)
    points = np.asarray(pts, np.float32).reshape(-1, 5, 2)
    bad = degenerate_points(points)
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"the five points of {names[k][:80]!r} coincide (within {MIN_POINT_SPREAD:g} px, or its "
                        f"two eyes do): no alignment maps them to the template", path=path,
                        record=f"line {linenos[k]}")
    return FivePoints(names, points, np.asarray(scores, np.float32))


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<p>_template_pair_label.txt``: ``template_a template_b label`` (label 0 or 1) per line; a template
    paired with itself, a pair listed twice (in either order: the score is symmetric) and a list without
    both labels are ``DataError``s naming the file (and the lines)."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(read_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise DataError(f"expected 'template_a template_b label', got {len(parts)} fields", path=path,
                            record=f"line {lineno}")
        label = _id(parts[2], path, lineno, "label")
        if label not in (0, 1):
            raise DataError(f"label must be 0 or 1, got {label}", path=path, record=f"line {lineno}")
        a, b = _id(parts[0], path, lineno, "template id"), _id(parts[1], path, lineno, "template id")
        if a == b:
            raise DataError(f"template {a} is paired with itself", path=path, record=f"line {lineno}")
        rows.append((a, b, label, lineno))
    if not rows:
        raise DataError("no template pairs", path=path)
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    # a repeated pair would count twice in TAR and FAR; sorted keys find one among 15.6M pairs without a dict
    key = np.minimum(arr[:, 0], arr[:, 1]) * MAX_ID + np.maximum(arr[:, 0], arr[:, 1])
    order = np.argsort(key, kind="stable")
    dup = key[order[1:]] == key[order[:-1]]
    if dup.any():
        j = int(np.argmin(np.where(dup, order[1:], len(arr))))  # the earliest repeat, after its first listing
        first, again = arr[order[j]], arr[order[j + 1]]
        raise DataError(f"pair {int(again[0])} {int(again[1])} repeats line {int(first[3])}", path=path,
                        record=f"line {int(again[3])}")
    same = arr[:, 2].astype(bool)
    if same.all() or not same.any():
        raise DataError(f"all {len(arr)} pairs are labelled {int(same[0])}: TAR@FAR needs genuine (1) and impostor "
                        f"(0) pairs", path=path)
    return arr[:, 0], arr[:, 1], same


def read_1n_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of a 1:N gallery or probe CSV, one entry per template in first-seen
    order; a template listed with two subjects is a ``DataError``."""
    tids, subjects, _ = _read_1n_rows(path)
    return tids, subjects


def _read_1n_rows(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``read_1n_csv`` and, per template, the line that first lists it. A header naming a needed column twice,
    a quote left open (it would swallow every later row into one field) and a field over the csv module's
    limit are ``DataError``s naming the line."""
    path = Path(path)
    seen: dict[int, tuple[int, int]] = {}  # template -> (subject, line)
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.reader(fh, strict=True)  # strict: a quote open at the end of the file is an error
        lineno = 1
        try:
            header = next(reader, None) or []
            names = [c.strip().upper() for c in header]
            cols = {c: i for i, c in enumerate(names)}
            for c in ("TEMPLATE_ID", "SUBJECT_ID"):
                if c not in cols:
                    raise DataError("needs TEMPLATE_ID and SUBJECT_ID columns in its header", path=path,
                                    record="line 1")
                if names.count(c) > 1:
                    raise DataError("the header names this column twice", path=path, record="line 1", field=c)
            ti, si = cols["TEMPLATE_ID"], cols["SUBJECT_ID"]
            for row in reader:
                start, lineno = lineno + 1, reader.line_num
                if lineno != start:  # one row over several lines: a quoted field holds a line break
                    raise DataError(f"a quoted field runs over lines {start}-{lineno} (a quote left open?)",
                                    path=path, record=f"line {start}")
                if not any(c.strip() for c in row):
                    continue
                if len(row) <= max(ti, si):
                    raise DataError(f"{len(row)} fields, the header names {len(header)}", path=path,
                                    record=f"line {lineno}")
                t = _id(row[ti].strip(), path, lineno, "TEMPLATE_ID")
                s = _id(row[si].strip(), path, lineno, "SUBJECT_ID")
                if seen.setdefault(t, (s, lineno))[0] != s:
                    raise DataError(f"template {t} listed for subjects {seen[t][0]} and {s}", path=path,
                                    record=f"line {lineno}")
        except csv.Error as exc:  # a field over the csv module's limit, a quote open at the end of the file
            raise DataError(f"not a CSV row: {exc}", path=path, record=f"line {lineno + 1}") from None
    if not seen:
        raise DataError("no templates", path=path)
    values = np.array(list(seen.values()), np.int64).reshape(-1, 2)
    return np.fromiter(seen.keys(), np.int64, len(seen)), values[:, 0], values[:, 1]


@dataclass
class IJBLayout:
    """The files of one IJB release under ``root`` (module docstring)."""

    root: Path
    prefix: str  # ijbc | ijbb

    @classmethod
    def find(cls, root: str | Path, target: str | None = None) -> "IJBLayout":
        root = Path(root)
        prefixes = [target.lower().replace("-", "")] if target else ["ijbc", "ijbb"]
        for p in prefixes:
            if (root / "meta" / f"{p}_face_tid_mid.txt").is_file():
                return cls(root, p)
        want = " or ".join(f"meta/{p}_face_tid_mid.txt" for p in prefixes)
        raise DataError(f"not an IJB root: {want} not found (expected the layout of InsightFace's IJB release: "
                        f"loose_crop/ and meta/)", path=root)

    def meta(self, suffix: str) -> Path:
        return self.root / "meta" / f"{self.prefix}_{suffix}"

    @property
    def tid_mid(self) -> Path:
        return self.meta("face_tid_mid.txt")

    @property
    def five_points(self) -> Path:
        return self.meta("name_5pts_score.txt")

    @property
    def pairs(self) -> Path:
        return self.meta("template_pair_label.txt")

    @property
    def images(self) -> Path:
        return self.root / "loose_crop"

    @property
    def galleries(self) -> list[Path]:
        names = ("G1", "G2") if self.prefix == "ijbc" else ("S1", "S2")
        return [self.meta(f"1N_gallery_{n}.csv") for n in names]

    @property
    def probes(self) -> Path:
        return self.meta("1N_probe_mixed.csv")

    @property
    def has_1n(self) -> bool:
        return all(p.is_file() for p in (*self.galleries, self.probes))


def read_layout(layout: IJBLayout) -> tuple[TemplateMeta, FivePoints]:
    """The per-image meta (templates, medias) and the five points + scores, checked to list the same images
    in the same order."""
    meta, five = read_tid_mid(layout.tid_mid), read_five_points(layout.five_points)
    if len(meta.image_names) != len(five.image_names):
        raise DataError(f"{len(five.image_names)} images, {layout.tid_mid.name} lists {len(meta.image_names)}",
                        path=layout.five_points)
    for k, (a, b) in enumerate(zip(meta.image_names, five.image_names)):
        if a != b:
            raise DataError(f"image {b!r}, but {layout.tid_mid.name} has {a!r} at the same record", path=layout.five_points,
                            record=k + 1)
    return meta, five


def read_1n(layout: IJBLayout, meta: TemplateMeta) -> tuple[tuple, dict[str, tuple], tuple]:
    """The 1:N files of ``layout`` (``has_1n``), checked against each other and the meta file as the protocol
    needs them (module docstring), each failure a ``DataError`` naming the file and line: (gallery = the
    galleries' (template ids, subject ids) concatenated, {gallery name: (template ids, subject ids)}, probe)."""
    known = np.unique(meta.templates)
    enrolled: dict[int, tuple[str, int]] = {}  # gallery template -> (file name, line)
    subjects: dict[int, tuple[str, int]] = {}  # enrolled subject -> (file name, line)
    split = {}
    for path in layout.galleries:
        t, s, lines = _read_1n_rows(path)
        for tid, sid, line in zip(t.tolist(), s.tolist(), lines.tolist()):
            if tid in enrolled:
                raise DataError(f"template {tid} is also in {enrolled[tid][0]} (line {enrolled[tid][1]})", path=path,
                                record=f"line {line}")
            if sid in subjects:
                raise DataError(f"subject {sid} has a gallery template in {subjects[sid][0]} (line "
                                f"{subjects[sid][1]}) already; the protocol enrols one per subject", path=path,
                                record=f"line {line}")
            enrolled[tid], subjects[sid] = (path.name, line), (path.name, line)
        _known(t, lines, known, path, layout.tid_mid.name)
        split[path.stem.rsplit("_", 1)[-1]] = (t, s)  # G1, G2 (S1, S2)
    p_t, p_s, p_lines = _read_1n_rows(layout.probes)
    _known(p_t, p_lines, known, layout.probes, layout.tid_mid.name)
    for tid, sid, line in zip(p_t.tolist(), p_s.tolist(), p_lines.tolist()):
        if tid in enrolled:  # it would score 1 against itself
            raise DataError(f"probe template {tid} is also a gallery template ({enrolled[tid][0]} line "
                            f"{enrolled[tid][1]})", path=layout.probes, record=f"line {line}")
        if sid not in subjects:
            raise DataError(f"the subject {sid} of probe template {tid} has no gallery template (every probe "
                            f"subject is enrolled once, in {' or '.join(p.name for p in layout.galleries)})",
                            path=layout.probes, record=f"line {line}")
    gallery = (np.concatenate([x[0] for x in split.values()]), np.concatenate([x[1] for x in split.values()]))
    return gallery, split, (p_t, p_s)


def _known(tids: np.ndarray, lines: np.ndarray, known: np.ndarray, path: Path, meta_name: str) -> None:
    missing = ~np.isin(tids, known)
    if missing.any():
        k = int(np.argmax(missing))
        raise DataError(f"template {int(tids[k])} has no image in {meta_name}", path=path,
                        record=f"line {int(lines[k])}")


def check_detector_scores(meta: TemplateMeta, five: FivePoints, path: Path) -> None:
    """With detector-score weighting (D1), a template whose images all score 0 would pool to a zero feature:
    a ``DataError`` naming the template and the five-point file (``path``)."""
    tids, index = np.unique(meta.templates, return_inverse=True)
    best = np.zeros(len(tids), np.float32)
    np.maximum.at(best, index.reshape(-1), five.scores)
    if (best <= 0).any():
        k = int(np.argmax(best <= 0))
        i = int(np.argmax(index.reshape(-1) == k))
        raise DataError(f"every image of template {int(tids[k])} has detector score 0: weighted by its scores (D1) "
                        f"its feature is zero (its first image, {five.image_names[i][:80]!r})",
                        path=path, record=i + 1)


def image_features(plain: np.ndarray, mirrored: np.ndarray | None, scores: np.ndarray | None,
                   options: PoolOptions = PoolOptions()) -> np.ndarray:
    """Steps 1-3 of the pooling (module docstring): per-image features before the template pooling."""
    feats = np.asarray(plain, np.float64)
    if options.flip:
        if mirrored is None:
            raise DataError("the flip option needs the embeddings of the mirrored crops")
        feats = feats + np.asarray(mirrored, np.float64)
    if not options.norm_score:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if options.detector_score:
        if scores is None or len(scores) != len(feats):
            raise DataError("detector-score weighting needs one detector score per image")
        feats = feats * np.asarray(scores, np.float64)[:, None]
    return feats


def pool_templates(features: np.ndarray, meta: TemplateMeta, *, norm_first: bool = True):
    """Step 4 (module docstring): media means, summed per template, L2-normalised. ``norm_first`` L2-normalises
    each image feature first (N0). Returns (template ids sorted, (T, D) float32 unit features; a template whose
    features sum to zero stays zero)."""
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) != len(meta.templates):
        raise DataError(f"{len(feats)} features for {len(meta.templates)} images in the meta file")
    if norm_first:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    tids, t_index = np.unique(meta.templates, return_inverse=True)
    # media means: group rows by (template, media)
    keys = np.stack([t_index, meta.medias], 1)
    groups, g_index, g_count = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    g_index = g_index.reshape(-1)
    media = np.zeros((len(groups), feats.shape[1]))
    np.add.at(media, g_index, feats)
    media /= g_count[:, None]
    out = np.zeros((len(tids), feats.shape[1]))
    np.add.at(out, groups[:, 0], media)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return tids, out.astype(np.float32)


def _rows(tids: np.ndarray, wanted: np.ndarray, what: str, path=None) -> np.ndarray:
    idx = np.searchsorted(tids, wanted)
    bad = (idx >= len(tids)) | (tids[np.minimum(idx, len(tids) - 1)] != wanted)
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"{what} {k + 1} names template {int(wanted[k])}, which has no image in the meta file",
                        path=path)
    return idx


def template_pair_scores(tids: np.ndarray, tfeats: np.ndarray, pairs, path=None, chunk: int = 65536) -> np.ndarray:
    """Cosine (float32) of each template pair's features."""
    a, b, _ = pairs
    ia, ib = _rows(tids, a, "pair", path), _rows(tids, b, "pair", path)
    out = np.empty(len(ia), np.float32)
    for s in range(0, len(ia), chunk):  # IJB-C has 15.6M pairs: never gather all their features at once
        out[s:s + chunk] = (tfeats[ia[s:s + chunk]] * tfeats[ib[s:s + chunk]]).sum(axis=1, dtype=np.float32)
    return out


def ijb_verification(features, meta: TemplateMeta, pairs, targets=FAR_TARGETS, *, norm_first: bool = True,
                     path=None) -> dict:
    """1:1 TAR@FAR over the template pair list, both rules: ``{"strict": {target: TprResult},
    "nearest": {target: NearestResult}, "scores": (P,) float32}``. ``features`` are per-image features
    (``image_features``); ``norm_first`` as in ``pool_templates``."""
    tids, tfeats = pool_templates(features, meta, norm_first=norm_first)
    scores = template_pair_scores(tids, tfeats, pairs, path)
    same = pairs[2]
    return {"strict": tpr_at_fpr_pairs(scores, same, targets), "nearest": tpr_at_fpr_nearest(scores, same, targets),
            "scores": scores}


@dataclass
class IdentificationResult:
    cmc: dict[int, float]
    strict: dict[float, dict]
    insightface: dict[float, dict]
    probes: int = 0
    gallery: int = 0
    open_set: dict[str, dict] = field(default_factory=dict)  # gallery name -> {fpir target: result}
    notes: list[str] = field(default_factory=list)


def one_to_n(probe: np.ndarray, probe_subjects: np.ndarray, gallery: np.ndarray, gallery_subjects: np.ndarray,
             ranks=RANKS, targets=FPIR_TARGETS) -> IdentificationResult:
    """CMC and TPIR@FPIR (both rules) of unit probe features against unit gallery features, one gallery
    template per subject, every probe subject enrolled (module docstring)."""
    probe_subjects, gallery_subjects = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    uniq, counts = np.unique(gallery_subjects, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"subject {int(uniq[np.argmax(counts > 1)])} has {int(counts.max())} gallery templates; "
                        f"the protocol enrols one per subject")
    order = np.argsort(gallery_subjects)
    pos = np.searchsorted(gallery_subjects[order], probe_subjects)
    pos = np.minimum(pos, len(order) - 1)
    if (gallery_subjects[order][pos] != probe_subjects).any():
        k = int(np.argmax(gallery_subjects[order][pos] != probe_subjects))
        raise DataError(f"probe {k + 1}'s subject {int(probe_subjects[k])} has no gallery template")
    mate = order[pos]
    sims = np.asarray(probe, np.float32) @ np.asarray(gallery, np.float32).T  # (P, G)
    p = len(sims)
    mated = sims[np.arange(p), mate]
    rank = (sims > mated[:, None]).sum(axis=1) + 1  # ties count in the probe's favour
    cmc = {k: float((rank <= k).mean()) for k in ranks}
    mask = np.ones_like(sims, dtype=bool)
    mask[np.arange(p), mate] = False
    non = np.sort(sims[mask])[::-1]  # every non-mated (probe, gallery template) score, descending
    strict, insight = {}, {}

    for f in sorted(targets):
        k = math.floor(f * p + 1e-9)  # accepted non-mated scores allowed
        if k < 1:
            strict[f] = {"estimable": False, "reason": f"{p} probes < 1/FPIR = {1 / f:g}"}
        else:
            t = _next_up(non[k]) if k < len(non) else float(min(non[-1], mated.min()))  # FPIR 1: accept all
            strict[f] = {"estimable": True, "tpir": float((mated >= t).mean()), "threshold": t,
                         "fpir": float((non >= t).sum() / p)}
        need = math.ceil(f * p - 1e-9)
        if need < 1 or need > len(non):
            insight[f] = {"estimable": False, "reason": f"needs the {need}-th largest of {len(non)} non-mated scores"}
        else:
            th = float(non[need - 1])
            insight[f] = {"estimable": True, "tpir": float((mated > th).mean()), "threshold": th,
                          "fpir": float((non > th).sum() / p)}
    return IdentificationResult(cmc, strict, insight, p, len(gallery))


def ijb_identification(features, meta: TemplateMeta, gallery: tuple, probe: tuple, ranks=RANKS,
                       fpir_targets=FPIR_TARGETS, *, norm_first: bool = True,
                       galleries: dict[str, tuple] | None = None) -> IdentificationResult:
    """1:N with templates (module docstring): ``gallery`` and ``probe`` are (template ids, subject ids).

    ``galleries`` (name -> (template ids, subject ids), e.g. G1 and G2 apart) adds the open-set reading of
    the IJB protocol per gallery: a probe whose subject is not enrolled in that gallery is non-mated; FPIR =
    share of non-mated probes whose best score is >= t, TPIR = share of mated probes whose best gallery
    subject is theirs with score >= t, strict rule (``visrec.evaluate.identification.tpir_at_fpir``)."""
    tids, tfeats = pool_templates(features, meta, norm_first=norm_first)
    g_t, g_s = gallery
    p_t, p_s = probe
    g = tfeats[_rows(tids, np.asarray(g_t), "gallery template")]
    pr = tfeats[_rows(tids, np.asarray(p_t), "probe template")]
    result = one_to_n(pr, p_s, g, g_s, ranks, fpir_targets)
    for name, (t, subj) in (galleries or {}).items():
        enrolled = np.isin(p_s, subj)
        if enrolled.all() or not enrolled.any():
            result.notes.append(f"open set on {name} skipped: it needs enrolled and non-enrolled probe subjects")
            continue
        gf = tfeats[_rows(tids, np.asarray(t), f"{name} template")]
        result.open_set[name] = tpir_at_fpir(pr, p_s, gf, subj, fpir_targets)
    return result
