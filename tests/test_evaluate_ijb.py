"""IJB meta files, media-then-template pooling, 1:1 and 1:N; the 10-fold protocol vs a plain reference."""

import numpy as np
import pytest

from visrec.errors import DataError
from visrec.evaluate.bin_protocol import evaluate_bin_pairs
from visrec.evaluate.ijb import (ijb_identification, ijb_verification, pool_templates, read_1n_csv,
                                 read_template_pairs, read_tid_mid)


def write_ijb(tmp_path, rng):
    """6 subjects x 2 templates; template 2s+k holds a video (3 frames, media 1) and a photo (media 2)."""
    lines, feats = [], []
    centres = rng.standard_normal((6, 32))
    for s in range(6):
        for k in range(2):
            tid = 10 * s + k
            for m, n in ((100 * tid + 1, 3), (100 * tid + 2, 1)):
                for f in range(n):
                    lines.append(f"img/{tid}_{m}_{f}.jpg {tid} {m}")
                    feats.append(centres[s] + 0.4 * rng.standard_normal(32))
    (tmp_path / "tid_mid.txt").write_text("\n".join(lines) + "\n")
    pairs = [(10 * s, 10 * s + 1, 1) for s in range(6)] + [(10 * s, 10 * ((s + 1) % 6) + 1, 0) for s in range(6)]
    (tmp_path / "pairs.txt").write_text("\n".join(f"{a} {b} {l}" for a, b, l in pairs) + "\n")
    return np.asarray(feats, np.float32)


def test_pooling_is_media_then_template(tmp_path):
    feats = write_ijb(tmp_path, np.random.default_rng(0))
    meta = read_tid_mid(tmp_path / "tid_mid.txt")
    tids, pooled = pool_templates(feats, meta)
    assert len(tids) == 12 and np.allclose(np.linalg.norm(pooled, axis=1), 1)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rows = np.flatnonzero(meta.templates == 0)  # 3 video frames then 1 photo
    expected = (unit[rows[:3]].mean(0) + unit[rows[3]]) / 2  # the video counts once, like the photo
    assert np.allclose(pooled[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_1to1_and_1toN(tmp_path):
    feats = write_ijb(tmp_path, np.random.default_rng(1))
    meta = read_tid_mid(tmp_path / "tid_mid.txt")
    res = ijb_verification(feats, meta, read_template_pairs(tmp_path / "pairs.txt"), targets=[0.2])
    assert res[0.2].genuine_count == 6 and res[0.2].impostor_count == 6 and res[0.2].tpr == 1.0
    (tmp_path / "g.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" +
                                    "\n".join(f"{10 * s},{s},x.jpg" for s in range(5)))
    (tmp_path / "p.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" +
                                    "\n".join(f"{10 * s + 1},{s},y.jpg" for s in range(6)))
    out = ijb_identification(feats, meta, read_1n_csv(tmp_path / "g.csv"), read_1n_csv(tmp_path / "p.csv"),
                             fpir_targets=[1.0])
    assert out["cmc"][1] == 1.0 and "tpir" in out  # subject 5 is not enrolled: open set


def test_bad_meta_lines(tmp_path):
    (tmp_path / "bad.txt").write_text("a.jpg 1 2\nb.jpg x 2\n")
    with pytest.raises(DataError, match="line 2"):
        read_tid_mid(tmp_path / "bad.txt")
    (tmp_path / "bad.csv").write_text("A,B\n1,2\n")
    with pytest.raises(DataError, match="TEMPLATE_ID"):
        read_1n_csv(tmp_path / "bad.csv")


def reference_10fold(emb, issame):
    """InsightFace's recipe written plainly: squared distance of unit vectors, thresholds 0:4:0.01,
    10 contiguous folds, best threshold on the other 9 (first on ties)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = ((e[0::2] - e[1::2]) ** 2).sum(1)
    n = len(issame)
    folds = np.array_split(np.arange(n), 10)
    accs = []
    for test in folds:
        train = [i for i in range(n) if i not in set(test)]
        best_t, best_acc = None, -1
        for t in np.arange(0, 4, 0.01):
            acc = np.mean([(dist[i] < t) == issame[i] for i in train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean([(dist[i] < best_t) == issame[i] for i in test]))
    return np.mean(accs), np.std(accs)


def test_10fold_matches_plain_reference():
    rng = np.random.default_rng(4)
    n = 120
    issame = np.arange(n) % 2 == 0
    a = rng.standard_normal((n, 16))
    b = np.where(issame[:, None], a + 0.8 * rng.standard_normal((n, 16)), rng.standard_normal((n, 16)))
    emb = np.empty((2 * n, 16))
    emb[0::2], emb[1::2] = a, b
    got = evaluate_bin_pairs(emb, issame)
    mean, std = reference_10fold(emb, issame)
    assert got.accuracy_mean == pytest.approx(mean) and got.accuracy_std == pytest.approx(std)
