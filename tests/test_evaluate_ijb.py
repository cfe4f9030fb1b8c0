"""IJB meta files, InsightFace's template pooling options, the two TAR@FAR rules, 1:N; and the 10-fold
protocol vs a plain reference."""

import itertools

import numpy as np
import pytest

from visrec.errors import DataError
from visrec.evaluate.bin_protocol import evaluate_bin_pairs
from visrec.evaluate.ijb import (PoolOptions, TemplateMeta, ijb_identification, ijb_verification, image_features,
                                 one_to_n, pool_templates, read_1n_csv, read_five_points, read_template_pairs,
                                 read_tid_mid)
from visrec.evaluate.verification import tpr_at_fpr_nearest, tpr_at_fpr_pairs


def write_ijb(tmp_path, rng):
    """6 subjects x 2 templates; template 10s+k holds a video (3 frames, one media) and a photo."""
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


def insightface_pooling(plain, mirrored, scores, templates, medias, flip, norm_score, detector_score):
    """InsightFace's image2template_feature with its F/N/D switches, as its ijb_11.py describes them, in loops."""
    out = {}
    feats = [plain[i] + mirrored[i] if flip else plain[i].copy() for i in range(len(plain))]
    if not norm_score:
        feats = [f / np.sqrt((f * f).sum()) for f in feats]
    if detector_score:
        feats = [f * scores[i] for i, f in enumerate(feats)]
    for t in sorted(set(templates.tolist())):
        media_feats = []
        for m in sorted(set(medias[templates == t].tolist())):
            rows = [i for i in range(len(feats)) if templates[i] == t and medias[i] == m]
            media_feats.append(sum(feats[i] for i in rows) / len(rows))
        v = sum(media_feats)
        out[t] = v / np.sqrt((v * v).sum())
    return out


@pytest.mark.parametrize("flip,norm_score,detector_score", list(itertools.product((True, False), repeat=3)))
def test_pooling_options_equal_insightface(flip, norm_score, detector_score):
    rng = np.random.default_rng(7)
    n = 40
    templates = rng.integers(0, 6, n)
    medias = rng.integers(0, 4, n) + 10 * templates  # some media repeat inside a template (videos)
    plain, mirrored = rng.standard_normal((n, 16)) * rng.uniform(0.5, 3, (n, 1)), rng.standard_normal((n, 16))
    scores = rng.uniform(0.3, 1, n)
    meta = TemplateMeta([f"{i}.jpg" for i in range(n)], templates, medias)
    opt = PoolOptions(flip, norm_score, detector_score)
    tids, pooled = pool_templates(image_features(plain, mirrored, scores, opt), meta, norm_first=False)
    ref = insightface_pooling(plain, mirrored, scores, templates, medias, flip, norm_score, detector_score)
    assert list(tids) == sorted(ref)
    for t, v in zip(tids, pooled):
        assert np.allclose(v, ref[t], atol=1e-6)


def test_pooling_is_media_then_template(tmp_path):
    feats = write_ijb(tmp_path, np.random.default_rng(0))
    meta = read_tid_mid(tmp_path / "tid_mid.txt")
    tids, pooled = pool_templates(feats, meta)
    assert len(tids) == 12 and np.allclose(np.linalg.norm(pooled, axis=1), 1)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rows = np.flatnonzero(meta.templates == 0)  # 3 video frames then 1 photo
    expected = (unit[rows[:3]].mean(0) + unit[rows[3]]) / 2  # the video counts once, like the photo
    assert np.allclose(pooled[0], expected / np.linalg.norm(expected), atol=1e-6)


def published_nearest(scores, labels, target):
    """The published IJB tables' reading (InsightFace ijb_11.py): scikit-learn's ROC, flipped, then the
    first point of smallest |FPR - target|."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(zip(abs(fpr - target), range(len(fpr))))
    return tpr[i], fpr[i]


def test_nearest_rule_equals_the_published_reading():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(20, 400))
        labels = rng.uniform(size=n) < 0.3
        if labels.all() or not labels.any():
            continue
        scores = np.round(rng.standard_normal(n) + 1.5 * labels, int(rng.integers(1, 4))).astype(np.float32)
        targets = (1e-3, 1e-2, 0.05, 0.1, 0.3)
        got = tpr_at_fpr_nearest(scores, labels, targets)
        for t in targets:
            tpr, fpr = published_nearest(scores, labels, t)
            assert (got[t].tpr, got[t].fpr) == (pytest.approx(tpr), pytest.approx(fpr)), (trial, t)


def test_strict_and_nearest_differ_where_they_should():
    # 10 impostors, 4 genuine; target FAR 0.16: strict allows floor(1.6) = 1 false accept; the nearest ROC
    # point has FAR 0.2 (0.04 away, FAR 0.1 is 0.06 away) and, among the points at FAR 0.2, the highest TAR
    imp = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4])
    gen = np.array([0.95, 0.85, 0.7, 0.5])
    scores = np.r_[gen, imp].astype(np.float32)
    same = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    strict = tpr_at_fpr_pairs(scores, same, [0.16])[0.16]
    near = tpr_at_fpr_nearest(scores, same, [0.16])[0.16]
    assert strict.fpr == 0.1 and strict.tpr == 0.5  # accepts 0.95, 0.85 and the impostor at 0.9
    assert near.fpr == pytest.approx(0.2) and near.tpr == 1.0 and near.fpr > 0.16  # above the target


def test_1to1_both_rules_and_1toN(tmp_path):
    feats = write_ijb(tmp_path, np.random.default_rng(1))
    meta = read_tid_mid(tmp_path / "tid_mid.txt")
    res = ijb_verification(feats, meta, read_template_pairs(tmp_path / "pairs.txt"), targets=[0.2])
    assert res["strict"][0.2].genuine_count == 6 and res["strict"][0.2].impostor_count == 6
    assert res["strict"][0.2].tpr == 1.0 and res["nearest"][0.2].tpr == 1.0
    (tmp_path / "g.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" +
                                    "\n".join(f"{10 * s},{s},x.jpg\n{10 * s},{s},y.jpg" for s in range(6)))
    (tmp_path / "p.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" +
                                    "\n".join(f"{10 * s + 1},{s},y.jpg" for s in range(6)))
    gallery = read_1n_csv(tmp_path / "g.csv")
    assert list(gallery[0]) == [0, 10, 20, 30, 40, 50]  # one entry per template
    out = ijb_identification(feats, meta, gallery, read_1n_csv(tmp_path / "p.csv"), fpir_targets=[0.5])
    assert out.cmc[1] == 1.0 and out.probes == 6 and out.gallery == 6
    assert out.strict[0.5]["fpir"] <= 0.5 and out.insightface[0.5]["estimable"]


def test_one_to_n_rules_on_a_crafted_case():
    gallery = np.eye(3, dtype=np.float32)
    g_subj = np.array([7, 8, 9])
    # probe k's mated score and its non-mated scores, by construction (unit vectors in the x-y-z frame)
    probe = np.array([[0.9, 0.3, 0.0], [0.6, 0.7, 0.0], [0.0, 0.5, 0.4], [0.2, 0.0, 0.8]], np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    p_subj = np.array([7, 8, 9, 9])
    sims = probe @ gallery.T
    res = one_to_n(probe, p_subj, gallery, g_subj, ranks=(1, 2), targets=(0.25, 0.5))
    mated = sims[[0, 1, 2, 3], [0, 1, 2, 2]]
    rank = [(sims[i] > mated[i]).sum() + 1 for i in range(4)]
    assert res.cmc == {1: np.mean(np.array(rank) <= 1), 2: np.mean(np.array(rank) <= 2)}
    assert rank == [1, 1, 2, 1]
    mask = np.ones_like(sims, bool)
    mask[[0, 1, 2, 3], [0, 1, 2, 2]] = False
    non = np.sort(sims[mask])[::-1]
    # insightface rule at 0.5: threshold = the ceil(0.5 * 4) = 2nd largest non-mated score, accept > it
    assert res.insightface[0.5]["threshold"] == pytest.approx(non[1])
    assert res.insightface[0.5]["tpir"] == np.mean(mated > non[1])
    # strict rule at 0.5: at most 2 non-mated scores >= t: t just above the 3rd largest
    assert res.strict[0.5]["fpir"] <= 0.5 and res.strict[0.5]["tpir"] == np.mean(mated > non[2])
    assert res.strict[0.25]["fpir"] <= 0.25 and res.strict[0.25]["tpir"] == np.mean(mated > non[1])
    with pytest.raises(DataError, match="no gallery template"):
        one_to_n(probe, np.array([7, 8, 9, 99]), gallery, g_subj)
    with pytest.raises(DataError, match="2 gallery templates"):
        one_to_n(probe, p_subj, gallery, np.array([7, 7, 9]))


def test_bad_meta_lines(tmp_path):
    cases = {
        "tid.txt": (read_tid_mid, "a.jpg 1 2\nb.jpg x 2\n", "line 2"),
        "tid2.txt": (read_tid_mid, "a.jpg 1 2\nb.jpg 1\n", "line 2"),
        "tid3.txt": (read_tid_mid, "a.jpg 1 2\nb.jpg 1 99999999999\n", "outside"),
        "tid4.txt": (read_tid_mid, "../../etc/passwd 1 2\n", "not a path inside"),
        "five.txt": (read_five_points, "a.jpg 1 2 3 4 5 6 7 8 9 10 0.9\nb.jpg 1 2 3 4 5 6 7 8 9 nan 0.9\n", "line 2"),
        "five2.txt": (read_five_points, "a.jpg 1 2 3 4 5 6 7 8 9 10\n", "12 fields"),
        "pairs.txt": (read_template_pairs, "1 2 1\n1 2 3\n", "0 or 1"),
        "bad.csv": (read_1n_csv, "A,B\n1,2\n", "TEMPLATE_ID"),
        "bad2.csv": (read_1n_csv, "TEMPLATE_ID,SUBJECT_ID\n1,2\n1,3\n", "line 3"),
        "bad3.csv": (read_1n_csv, "TEMPLATE_ID,SUBJECT_ID\n1,2\nx,3\n", "line 3"),
    }
    for name, (reader, text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match) as info:
            reader(tmp_path / name)
        assert name in str(info.value)


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


def test_mutated_meta_files_fail_only_as_data_errors(tmp_path):
    from visrec.data.synth_ijb import write_synthetic_ijb
    from visrec.evaluate.ijb import IJBLayout, read_layout

    layout = IJBLayout.find(write_synthetic_ijb(tmp_path / "IJB_C", 3, 2, seed=4))
    files = {layout.tid_mid: lambda: read_layout(layout), layout.five_points: lambda: read_layout(layout),
             layout.pairs: lambda: read_template_pairs(layout.pairs),
             layout.probes: lambda: read_1n_csv(layout.probes)}
    rng = np.random.default_rng(0)
    alphabet = b" \n\r\t,.-0123456789eE+xn\xff\x00"
    failures = 0
    for path, read in files.items():
        original = path.read_bytes()
        for _ in range(60):
            data = bytearray(original)
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(0, len(data)))
                op = rng.integers(3)
                if op == 0:
                    data[pos] = alphabet[int(rng.integers(len(alphabet)))]
                elif op == 1:
                    del data[pos:pos + int(rng.integers(1, 8))]
                else:
                    data[pos:pos] = bytes(rng.choice(list(alphabet), int(rng.integers(1, 6))))
            path.write_bytes(bytes(data))
            try:
                read()
            except DataError as exc:
                failures += 1
                assert path.name in str(exc) or "record" in str(exc), str(exc)
        path.write_bytes(original)
    assert failures > 100  # most mutations break a line; every break is a DataError naming the file
