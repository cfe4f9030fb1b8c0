"""The .bin protocol reports the 10-fold accuracy with and without the flip test, labelled; the flip figure
(the field's convention) is the headline of ``visrec eval faces`` and of the training validation, and equals
arcface_torch's published rule, ported here independently."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from visrec.data.synth import write_verification_pairs
from visrec.data.verification import read_verification_bin
from visrec.evaluate.bin_protocol import FLIP, NO_FLIP, evaluate_bin_both, mirror
from visrec.models import build_backbone


def arcface_torch_rule(embeddings, issame):
    """arcface_torch's verification as its description states it: unit rows; distance = squared L2 between
    the two rows of a pair; predicted same when distance < t; thresholds 0, 0.01, ..., 3.99; 10 folds over
    the pair list in order (KFold without shuffle: the first P % 10 folds one pair longer); on the other 9
    folds take the threshold of highest accuracy (the first on ties), apply it to the held-out fold; report
    the mean (and std) of the 10 fold accuracies."""
    e = np.asarray(embeddings, np.float64)
    e = e / np.sqrt((e * e).sum(axis=1))[:, None]
    n = len(issame)
    dist = [float(((e[2 * k] - e[2 * k + 1]) ** 2).sum()) for k in range(n)]
    sizes = [n // 10 + (1 if f < n % 10 else 0) for f in range(10)]
    starts = np.cumsum([0] + sizes)
    thresholds = [t / 100 for t in range(400)]

    def acc(idx, t):
        return sum((dist[i] < t) == bool(issame[i]) for i in idx) / len(idx)

    accs = []
    for f in range(10):
        test = list(range(starts[f], starts[f + 1]))
        train = [i for i in range(n) if not starts[f] <= i < starts[f + 1]]
        best_t, best = thresholds[0], -1.0
        for t in thresholds:
            a = acc(train, t)
            if a > best:
                best_t, best = t, a
        accs.append(acc(test, best_t))
    return float(np.mean(accs)), float(np.std(accs))


def pairs_where_flip_matters(seed=0, n=73, dim=24):
    """Embeddings of images and of their mirrors, where the mirror carries part of the identity signal."""
    rng = np.random.default_rng(seed)
    issame = rng.uniform(size=n) < 0.5
    centre_a = rng.standard_normal((n, dim))
    centre_b = np.where(issame[:, None], centre_a, rng.standard_normal((n, dim)))
    plain = np.empty((2 * n, dim))
    plain[0::2] = centre_a + 1.3 * rng.standard_normal((n, dim))
    plain[1::2] = centre_b + 1.3 * rng.standard_normal((n, dim))
    mirrored = np.empty_like(plain)
    mirrored[0::2] = centre_a + 1.3 * rng.standard_normal((n, dim))
    mirrored[1::2] = centre_b + 1.3 * rng.standard_normal((n, dim))
    return plain.astype(np.float32), mirrored.astype(np.float32), issame


@pytest.mark.parametrize("seed,n", [(0, 73), (1, 120), (2, 41)])
def test_flip_and_no_flip_equal_the_ported_rule(seed, n):
    plain, mirrored, issame = pairs_where_flip_matters(seed, n)
    both = evaluate_bin_both(plain, mirrored, issame)
    flip_ref = arcface_torch_rule(plain + mirrored, issame)
    plain_ref = arcface_torch_rule(plain, issame)
    assert (both.flip.accuracy_mean, both.flip.accuracy_std) == pytest.approx(flip_ref, abs=1e-12)
    assert (both.no_flip.accuracy_mean, both.no_flip.accuracy_std) == pytest.approx(plain_ref, abs=1e-12)
    assert both.headline is both.flip and both.label == FLIP
    assert set(both.as_dict()) == {FLIP, NO_FLIP}


def test_the_two_figures_differ_when_the_mirror_adds_information():
    plain, mirrored, issame = pairs_where_flip_matters(3, 400)
    both = evaluate_bin_both(plain, mirrored, issame)
    assert both.flip.accuracy_mean > both.no_flip.accuracy_mean + 0.02  # two views average out the noise


def test_mirrors_are_horizontal():
    img = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    assert np.array_equal(mirror(img)[1, 2, 0], img[1, 2, 3])
    assert np.array_equal(mirror(list(img)), mirror(img))


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("binflip")
    write_verification_pairs(d / "val.bin", 8, 30, seed=5)
    torch.manual_seed(0)
    small = {"embedding_size": 64, "scale": 1, "blocks": [1, 1, 1, 1]}  # a small mbf: only the flip rule is tested
    torch.save({"model_config": {"name": "mbf", **small}, "backbone": build_backbone("mbf", **small).state_dict()},
               d / "model.pt")
    return d


def test_eval_faces_on_a_bin_reports_both_and_the_headline_is_flip(small_bin):
    from visrec.faces.evaluation import evaluate_faces
    from visrec.models.loading import load_model

    res = evaluate_faces(data=small_bin / "val.bin", model=small_bin / "model.pt", targets=(0.1,), out=small_bin / "r")
    images, issame = read_verification_bin(small_bin / "val.bin")
    loaded = load_model(small_bin / "model.pt")
    flip_ref = arcface_torch_rule(loaded.embed(np.stack(images), flip=True), issame)
    plain_ref = arcface_torch_rule(loaded.embed(np.stack(images)), issame)
    both = res.extra["bin"]
    assert res.bin_accuracy == pytest.approx(flip_ref, abs=1e-9)
    assert both.no_flip.accuracy_mean == pytest.approx(plain_ref[0], abs=1e-9)
    labels = " ".join(res.summary)
    assert "(flip, headline" in labels and "(no flip)" in labels
    page = (small_bin / "r" / "report.html").read_text()
    assert "no flip" in page and "headline" in page


def test_training_validation_reports_both_and_uses_flip(small_bin):
    from visrec.train.faces_task import FaceData, FaceTask

    torch.manual_seed(1)
    net = build_backbone("mbf", embedding_size=64, scale=1, blocks=(1, 1, 1, 1)).eval()
    task = SimpleNamespace(data_opts=FaceData(train=small_bin, val=[small_bin / "val.bin"]),
                           ctx=SimpleNamespace(device="cpu"), _val_sets=None)
    metrics = FaceTask.validate(task, net)
    images, issame = read_verification_bin(small_bin / "val.bin")
    from visrec.models.embed import embed_images

    flip_ref = arcface_torch_rule(embed_images(net, images, flip=True), issame)[0]
    assert metrics["val/accuracy"] == metrics["val/accuracy_flip"] == pytest.approx(flip_ref, abs=1e-9)
    assert metrics["val/accuracy_no_flip"] == pytest.approx(arcface_torch_rule(embed_images(net, images), issame)[0],
                                                            abs=1e-9)
