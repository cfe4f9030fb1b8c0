"""IJB-B / IJB-C templates: the meta files, media-then-template pooling, 1:1 TAR@FAR and 1:N.

Files, as the IJB release (and InsightFace's IJB evaluation) lays them out, whitespace separated:
  ``ijbc_face_tid_mid.txt``          image_name template_id media_id   (one line per face image)
  ``ijbc_template_pair_label.txt``   template_a template_b label       (1 = same subject)
1:N (``ijbc_1N_gallery_G1.csv`` / ``_G2.csv`` / ``ijbc_1N_probe_mixed.csv``): CSV with a header holding
TEMPLATE_ID and SUBJECT_ID columns (further columns ignored).
Pooling: inside a template, the features of images from the same media (a video's frames, or one
photo) are averaged first, then the media features are averaged, so a long video does not outweigh
the still photos; each feature is L2-normalised before it is averaged (``norm_first=True``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec.data.text import read_lines, read_text
from visrec.errors import DataError


@dataclass
class TemplateMeta:
    image_names: list[str]
    templates: np.ndarray  # per image
    medias: np.ndarray     # per image


def read_tid_mid(path: str | Path) -> TemplateMeta:
    path = Path(path)
    names, tids, mids = [], [], []
    lines = read_lines(path)  # UTF-8; a bad byte or an unreadable file is a DataError naming it
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 3:
            raise DataError("expected 'image_name template_id media_id'", path=path, record=f"line {lineno}")
        try:
            tids.append(int(parts[1]))
            mids.append(int(parts[2]))
        except ValueError:
            raise DataError(f"template/media ids must be integers: {line!r}", path=path,
                            record=f"line {lineno}") from None
        names.append(parts[0])
    return TemplateMeta(names, np.asarray(tids), np.asarray(mids))


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = Path(path)
    rows = []
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 3:
            raise DataError("expected 'template_a template_b label'", path=path, record=f"line {lineno}")
        try:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        except ValueError:
            raise DataError(f"not integers: {line!r}", path=path, record=f"line {lineno}") from None
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2].astype(bool)


def read_1n_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of a 1:N gallery or probe CSV, one row per template (deduplicated)."""
    path = Path(path)
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().upper(): c for c in reader.fieldnames or []}
        if "TEMPLATE_ID" not in cols or "SUBJECT_ID" not in cols:
            raise DataError("needs TEMPLATE_ID and SUBJECT_ID columns", path=path)
        seen: dict[int, int] = {}
        for row in reader:
            seen.setdefault(int(row[cols["TEMPLATE_ID"]]), int(row[cols["SUBJECT_ID"]]))
    return np.fromiter(seen.keys(), np.int64), np.fromiter(seen.values(), np.int64)


def pool_templates(features: np.ndarray, meta: TemplateMeta, *, norm_first: bool = True):
    """Media-then-template average pooling. Returns (template ids sorted, (T, D) L2-normalised features)."""
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) != len(meta.templates):
        raise DataError(f"{len(feats)} features for {len(meta.templates)} images in the meta file")
    if norm_first:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    tids = np.unique(meta.templates)
    out = np.zeros((len(tids), feats.shape[1]))
    for k, t in enumerate(tids):
        rows = meta.templates == t
        medias = [feats[rows & (meta.medias == m)].mean(0) for m in np.unique(meta.medias[rows])]
        out[k] = np.mean(medias, axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return tids, out.astype(np.float32)


def ijb_verification(features, meta: TemplateMeta, pairs, targets=(1e-6, 1e-5, 1e-4, 1e-3)):
    """1:1 TAR@FAR over the template pair list (the strict rule of ``tpr_at_fpr``)."""
    from visrec.evaluate.verification import tpr_at_fpr_pairs

    tids, tfeats = pool_templates(features, meta)
    a, b, same = pairs
    ia, ib = np.searchsorted(tids, a), np.searchsorted(tids, b)
    unknown = (ia >= len(tids)) | (tids[np.minimum(ia, len(tids) - 1)] != a) | \
              (ib >= len(tids)) | (tids[np.minimum(ib, len(tids) - 1)] != b)
    if unknown.any():
        k = int(np.argmax(unknown))
        raise DataError(f"pair {k} names template {a[k] if ia[k] >= len(tids) or tids[ia[k]] != a[k] else b[k]} "
                        f"that has no image in the meta file")
    return tpr_at_fpr_pairs(tfeats, same, targets, pairs=np.stack([ia, ib], 1))


def ijb_identification(features, meta: TemplateMeta, gallery: tuple, probe: tuple, ranks=(1, 5),
                       fpir_targets=(1e-2, 1e-1)):
    """1:N with templates: CMC (closed set over mated probes) and TPIR@FPIR (open set)."""
    from visrec.evaluate.identification import cmc, tpir_at_fpir

    tids, tfeats = pool_templates(features, meta)
    index = {t: i for i, t in enumerate(tids)}
    g_t, g_s = gallery
    p_t, p_s = probe
    g = tfeats[[index[t] for t in g_t]]
    p = tfeats[[index[t] for t in p_t]]
    result = {"cmc": cmc(p, p_s, g, g_s, ranks)}
    if not np.isin(p_s, g_s).all():
        result["tpir"] = tpir_at_fpir(p, p_s, g, g_s, fpir_targets)
    return result
