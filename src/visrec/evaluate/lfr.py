"""LFR (ICCV'19 Lightweight Face Recognition) submission files.

Features: a binary file with the header ``struct.pack('4i', rows, cols, cols * 4, 5)`` (int32 little
endian: row count, feature dimension, bytes per row, and the type code 5 = float32), then the rows as
row-major float32, in the order of the protocol's ``filelist.txt`` (one image path per line; the video
track's ``video_filelist.txt`` likewise, one video per line).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from visrec.errors import DataError

_HEADER = struct.Struct("<4i")
FLOAT32_CODE = 5


def write_lfr_features(path: str | Path, features: np.ndarray) -> Path:
    feats = np.ascontiguousarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be (rows, cols), got {feats.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = feats.shape
    with open(path, "wb") as fh:
        fh.write(_HEADER.pack(rows, cols, cols * 4, FLOAT32_CODE))
        fh.write(feats.tobytes())
    return path


def read_lfr_features(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", path=path) from None
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
    return np.frombuffer(raw, dtype=np.float32, offset=_HEADER.size).reshape(rows, cols).copy()


def read_filelist(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise DataError("file list not found", path=path)
    from visrec.data.text import read_lines

    return [line.strip() for line in read_lines(path) if line.strip()]


def evaluate_submission(features_path: str | Path, filelist_path: str | Path, labels: dict[str, int | str],
                        targets=(1e-8,), **kwargs):
    """TPR at the protocol's FPR targets for a submission, given ground-truth labels by file-list entry."""
    from visrec.evaluate.verification import tpr_at_fpr

    feats = read_lfr_features(features_path)
    names = read_filelist(filelist_path)
    if len(names) != len(feats):
        raise DataError(f"{len(feats)} feature rows but {len(names)} file-list entries", path=features_path)
    missing = [n for n in names if n not in labels]
    if missing:
        raise DataError(f"{len(missing)} entries have no ground-truth label, e.g. {missing[0]!r}",
                        path=filelist_path)
    return tpr_at_fpr(feats, np.array([labels[n] for n in names]), targets, **kwargs)
