"""``visrec eval ijb`` end to end on a synthetic IJB-C release (visrec.data.synth_ijb): the command's numbers
equal an independent recomputation from the files (plain parsing, alignment, InsightFace's pooling, brute-force
strict rule, scikit-learn ROC for the nearest-point rule)."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from visrec.cli import app
from visrec.data.images import read_image
from visrec.data.synth_ijb import write_synthetic_ijb
from visrec.errors import DataError
from visrec.models import build_backbone


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("ijb")
    write_synthetic_ijb(d / "IJB_C", num_subjects=6, templates_per_subject=3, seed=1)
    torch.manual_seed(0)
    torch.save({"model_config": {"name": "mbf", "embedding_size": 64},
                "backbone": build_backbone("mbf", embedding_size=64).state_dict()}, d / "model.pt")
    return d


def run(*args):
    return CliRunner().invoke(app, ["eval", "ijb", *map(str, args)])


def recompute(root, model_path):
    """Everything from the files, written plainly: F1 N1 D1 template features and the pair list."""
    from visrec.faces.align import align_face
    from visrec.models.loading import load_model

    meta = root / "meta"
    rows = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    tid_mid = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    model = load_model(model_path)
    crops = [align_face(read_image(root / "loose_crop" / r[0]), np.array(r[1:11], float).reshape(5, 2))[0]
             for r in rows]
    crops = np.stack(crops)
    feats = model.embed(crops).astype(np.float64) + model.embed(np.ascontiguousarray(crops[:, :, ::-1]))
    feats *= np.array([float(r[11]) for r in rows])[:, None]
    templates = {}
    for (name, t, m), f in zip(tid_mid, feats):
        templates.setdefault(int(t), {}).setdefault(int(m), []).append(f)
    tf = {}
    for t, medias in templates.items():
        v = sum(np.mean(fs, axis=0) for fs in medias.values())
        tf[t] = v / np.linalg.norm(v)
    pairs = [tuple(map(int, line.split())) for line in (meta / "ijbc_template_pair_label.txt").read_text().splitlines()]
    scores = np.array([tf[a] @ tf[b] for a, b, _ in pairs])
    labels = np.array([lab for _, _, lab in pairs], bool)
    return tf, scores, labels


def test_eval_ijb_end_to_end(release, tmp_path):
    res = run(release / "model.pt", "--data", release / "IJB_C", "--out", tmp_path / "r.json",
              "--target-fpr", "0.1", "--target-fpr", "0.3", "--target-fpir", "0.1", "--target-fpir", "0.5")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "strict: the highest TAR" in text and "nearest: the ROC point" in text and "CMC rank-1" in text
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["target"] == "IJBC" and list(out["pooling"]) == ["F1 N1 D1"]
    got = out["pooling"]["F1 N1 D1"]
    tf, scores, labels = recompute(release / "IJB_C", release / "model.pt")
    assert out["templates"] == len(tf) == 18
    gen, imp = scores[labels], np.sort(scores[~labels])[::-1]
    assert out["genuine_pairs"] == len(gen) and out["impostor_pairs"] == len(imp)
    for target in (0.1, 0.3):
        k = int(np.floor(target * len(imp)))  # strict: at most k impostors at or above t
        ref_tar = np.mean(gen > imp[k])
        strict = got["tar_at_far"]["strict"][str(target)]
        assert strict["tpr"] == pytest.approx(ref_tar) and strict["fpr"] <= target
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(labels, scores)
        fpr, tpr = fpr[::-1], tpr[::-1]
        _, i = min(zip(abs(fpr - target), range(len(fpr))))
        near = got["tar_at_far"]["nearest_roc_point"][str(target)]
        assert near["tpr"] == pytest.approx(tpr[i]) and near["fpr"] == pytest.approx(fpr[i])
    # 1:N: gallery G1 + G2 = each subject's first template; rank-1 recomputed from the template features
    import csv

    def rows(name):
        with open(release / "IJB_C" / "meta" / name) as fh:
            return {(int(r["TEMPLATE_ID"]), int(r["SUBJECT_ID"])) for r in csv.DictReader(fh)}

    gallery = sorted(rows("ijbc_1N_gallery_G1.csv") | rows("ijbc_1N_gallery_G2.csv"))
    probes = sorted(rows("ijbc_1N_probe_mixed.csv"))
    g = np.stack([tf[t] for t, _ in gallery])
    hits = [gallery[int(np.argmax(g @ tf[t]))][1] == s for t, s in probes]
    ident = got["identification"]
    assert ident["probes"] == len(probes) and ident["gallery"] == len(gallery)
    assert ident["cmc"]["1"] == pytest.approx(np.mean(hits))
    assert set(ident["tpir_at_fpir"]) == {"strict", "insightface"}
    # open set on G1 alone: the probes of subjects enrolled in G2 are non-mated there
    g1 = sorted(rows("ijbc_1N_gallery_G1.csv"))
    g1f = np.stack([tf[t] for t, _ in g1])
    best = {t: (g1[int(np.argmax(g1f @ tf[t]))][1], float(np.max(g1f @ tf[t]))) for t, _ in probes}
    enrolled = {s for _, s in g1}
    non = sorted((best[t][1] for t, s in probes if s not in enrolled), reverse=True)
    mated = [(best[t], s) for t, s in probes if s in enrolled]
    k = int(np.floor(0.5 * len(non)))  # at most k non-mated probes at or above t
    ref = np.mean([who == s and score > non[k] for (who, score), s in mated])
    open_g1 = ident["open_set_strict"]["G1"]["0.5"]
    assert open_g1["tpir"] == pytest.approx(ref) and open_g1["fpir"] <= 0.5


def test_all_options_and_missing_1n(release, tmp_path):
    root = tmp_path / "IJB_C"
    shutil.copytree(release / "IJB_C", root)
    (root / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    res = run(release / "model.pt", "--data", root, "--all-options", "--out", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "r.json").read_text())
    assert len(out["pooling"]) == 8 and "F0 N0 D0" in out["pooling"]
    assert all("identification" not in v for v in out["pooling"].values())
    assert any("1:N skipped" in n for n in out["notes"])
    # the eight settings pool the same embeddings differently: their template scores, hence TARs, differ
    tars = {label: v["tar_at_far"]["strict"]["0.1"]["tpr"] for label, v in out["pooling"].items()}
    assert len(set(tars.values())) > 1, tars


def test_five_points_align_faces_onto_the_template(release):
    from visrec.evaluate.ijb import read_five_points
    from visrec.faces.align import ARCFACE_112, alignment_transform

    five = read_five_points(release / "IJB_C" / "meta" / "ijbc_name_5pts_score.txt")
    for p in five.points:
        m = alignment_transform(p)
        err = np.linalg.norm(p @ m[:, :2].T + m[:, 2] - ARCFACE_112, axis=1)
        # the least-squares residual of the renderer's face proportions, not a misplaced point (a swapped or
        # shifted point lands tens of pixels off)
        assert err.max() < 10


def test_malformed_release_is_a_data_error_naming_file_and_line(release, tmp_path):
    root = tmp_path / "IJB_C"
    shutil.copytree(release / "IJB_C", root)
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]  # drop the detector score of line 3
    path.write_text("\n".join(lines) + "\n")
    res = run(release / "model.pt", "--data", root)
    assert isinstance(res.exception, DataError)
    assert "ijbc_name_5pts_score.txt" in str(res.exception) and "line 3" in str(res.exception)
    lines = [line for line in (release / "IJB_C" / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    lines[0], lines[1] = lines[1], lines[0]  # the two lists no longer describe the same images in order
    path.write_text("\n".join(lines) + "\n")
    res = run(release / "model.pt", "--data", root)
    assert isinstance(res.exception, DataError) and "record 1" in str(res.exception)
    res = run(release / "model.pt", "--data", tmp_path)
    assert isinstance(res.exception, DataError) and "not an IJB root" in str(res.exception)
