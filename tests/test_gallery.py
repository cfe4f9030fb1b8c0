"""Galleries: enroll / remove / list / search / export / import, templates and fusion, the model guard,
idempotency, threshold calibration, and the Milvus Lite and FAISS backends agreeing on the same data."""

import numpy as np
import pytest

pytest.importorskip("faiss", reason="galleries need visrec[index]")

from conftest import milvus_opener  # noqa: E402
from visrec.errors import ConfigError, DataError, VisrecError  # noqa: E402
from visrec.index.gallery import GalleryMismatchError, IdentityExistsError, calibrate, open_gallery  # noqa: E402


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def people(n=30, per=3, dim=32, noise=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n, dim)))
    return {f"id{i:03d}": unit(centres[i] + noise * unit(rng.normal(size=(per, dim)))) for i in range(n)}, centres


@pytest.fixture
def milvus(open_milvus):
    return open_milvus


GALLERY_DIM = 32  # the conftest's `gallery` fixture (every backend) opens galleries of this size


def test_fused_scores_follow_their_definitions(gallery):
    t = unit(np.eye(4, 32)[:3] + 0.1)  # three templates of one identity
    other = unit(np.eye(4, 32)[3:] - 0.2)
    gallery.enroll("a", t)
    gallery.enroll("b", other)
    probe = unit(np.eye(1, 32) + 0.05)
    best = gallery.search(probe, top_k=2)[0]
    assert [m.identity for m in best] == ["a", "b"]
    assert best[0].score == pytest.approx(float((t @ probe[0]).max()), abs=1e-5)  # max fusion
    assert best[1].score == pytest.approx(float((other @ probe[0])[0]), abs=1e-5)
    assert not best[0].accepted  # no threshold yet
    assert gallery.search(probe, top_k=1, threshold=0.5)[0][0].accepted


def test_mean_fusion_is_the_mean_cosine(tmp_path, milvus):
    t = unit(np.random.default_rng(1).normal(size=(4, 16)))
    probe = unit(np.random.default_rng(2).normal(size=(1, 16)))
    for g in (open_gallery("faiss", fusion="mean"), milvus(tmp_path, fusion="mean")):
        g.enroll("x", t)
        g.enroll("y", -t[:1])
        got = {m.identity: m.score for m in g.search(probe, 2)[0]}
        assert got["x"] == pytest.approx(float((t @ probe[0]).mean()), abs=1e-5)
        assert got["y"] == pytest.approx(float(-t[0] @ probe[0]), abs=1e-5)
        g.close()


def test_enroll_is_idempotent_and_remove_list_count(gallery):
    x = unit(np.random.default_rng(0).normal(size=(2, 32)))
    ids = gallery.enroll("alice", x, hashes=["h1", "h2"], metadata={"team": "red"})
    assert gallery.enroll("alice", x[:1], hashes=["h1"]) == ids[:1]  # same (identity, hash): same template
    assert gallery.count() == 2
    gallery.enroll("alice", x[1:] * 3, hashes=["h3"], metadata={"desk": 4})  # a new image, metadata merged
    gallery.enroll("bob", x[:1])
    assert gallery.list() == [{"identity": "alice", "templates": 3, "metadata": {"desk": 4, "team": "red"}},
                              {"identity": "bob", "templates": 1, "metadata": {}}]
    assert gallery.remove("alice") == 3 and gallery.remove("alice") == 0
    assert gallery.count() == 1 and [r["identity"] for r in gallery.list()] == ["bob"]
    assert [m.identity for m in gallery.search(x, top_k=3)[0]] == ["bob"]  # fewer identities than top_k
    gallery.remove("bob")
    assert gallery.search(x, top_k=3) == [[], []]


def test_refuses_another_model_or_dimension_and_bad_input(gallery):
    x = unit(np.ones((1, 32)))
    gallery.enroll("a", x, model_name="m")
    with pytest.raises(GalleryMismatchError, match="model 'm'"):
        gallery.enroll("b", x, model_name="other")
    with pytest.raises(GalleryMismatchError, match="32-d"):
        gallery.enroll("b", np.ones((1, 16)))
    with pytest.raises(GalleryMismatchError, match="32-d"):
        gallery.search(np.ones((1, 16)))
    with pytest.raises(DataError, match="NaN"):
        gallery.enroll("b", np.full((1, 32), np.nan))
    with pytest.raises(DataError, match="all zeros"):
        gallery.enroll("b", np.zeros((1, 32)))
    for bad in ("", " a", "x" * 201, "\u00e9" * 129, "tab\there", "new\nline", None):
        with pytest.raises(DataError, match="identity"):
            gallery.enroll(bad, x)
    assert gallery.count() == 1


def test_milvus_and_faiss_return_the_same_top_k(tmp_path, milvus):
    data, centres = people()
    probes = unit(centres + 0.4 * unit(np.random.default_rng(9).normal(size=centres.shape)))
    for fusion in ("max", "mean"):
        f = open_gallery("faiss", fusion=fusion)
        m = milvus(tmp_path / fusion, fusion=fusion)
        for name, x in data.items():
            f.enroll(name, x)
            m.enroll(name, x)
        rf, rm = f.search(probes, top_k=5), m.search(probes, top_k=5)
        assert [[h.identity for h in row] for row in rf] == [[h.identity for h in row] for row in rm]
        np.testing.assert_allclose([[h.score for h in row] for row in rf], [[h.score for h in row] for row in rm],
                                   atol=1e-5)
        top1 = np.mean([row[0].identity == f"id{i:03d}" for i, row in enumerate(rf)])
        assert top1 > 0.9, (fusion, top1)
        m.close()


def test_max_fusion_is_exact_when_one_identity_holds_many_top_templates():
    rng = np.random.default_rng(3)
    probe = unit(rng.normal(size=(1, 8)))
    g = open_gallery("faiss")
    g.enroll("crowd", unit(probe + 0.01 * rng.normal(size=(100, 8))))  # 100 templates all near the probe
    g.enroll("far", unit(-probe + 0.3 * rng.normal(size=(1, 8))))
    g.enroll("mid", unit(rng.normal(size=(1, 8))))
    hits = g.search(probe, top_k=3)[0]
    assert [h.identity for h in hits][0] == "crowd" and {h.identity for h in hits} == {"crowd", "far", "mid"}
    assert hits[1].score >= hits[2].score


def test_max_fusion_on_faiss_finds_1000_identities_past_milvus_search_limit():
    """Milvus caps one search at 16,384 results; FAISS has no such cap, so top_k 1000 (the service's bound) over
    1,000 people of 17 templates each is answered (it was refused with Milvus's limit on every backend)."""
    rng = np.random.default_rng(4)
    probe = np.eye(8, dtype=np.float32)[:1]

    def person(i):  # every template of person i scores cos(angle_i), above all of person i + 1's: the 1000th
        angle = 0.1 + 1.2 * i / 1000  # person's best template ranks 16,984th
        side = rng.normal(size=(17, 8))
        side[:, 0] = 0
        return np.cos(angle) * probe + np.sin(angle) * side / np.linalg.norm(side, axis=1, keepdims=True)

    g = open_gallery("faiss")
    g.enroll_many([(f"p{i:04d}", person(i)) for i in range(1000)])
    hits = g.search(probe, top_k=1000)[0]
    assert [h.identity for h in hits] == [f"p{i:04d}" for i in range(1000)]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_an_export_replaces_only_an_earlier_export(tmp_path):
    """gallery export --out onto the gallery's own database or its config replaced it with a zip and said it
    exported; onto a folder it was a bare IsADirectoryError."""
    g = open_gallery("faiss")
    g.enroll("ann", unit(np.random.default_rng(0).normal(size=(2, 8))))
    mine = tmp_path / "serve.yaml"
    mine.write_text("faces: {model: runs/m}\n")
    with pytest.raises(DataError, match=r"serve\.yaml.*not a gallery export"):
        g.export(mine)
    assert mine.read_text() == "faces: {model: runs/m}\n"
    with pytest.raises(DataError, match="folder"):
        g.export(tmp_path)
    first = g.export(tmp_path / "g.npz")
    g.enroll("bob", unit(np.random.default_rng(1).normal(size=(1, 8))))
    assert g.export(first) == first and open_gallery("faiss").import_(first) == 3  # an earlier export: replaced
    assert g.export(mine, overwrite=True) == mine  # asked for


def test_search_refuses_a_top_k_that_is_no_whole_number():
    g = open_gallery("faiss")
    g.enroll("ann", unit(np.random.default_rng(0).normal(size=(1, 8))))
    for bad in (1.5, True, "3", 0):
        with pytest.raises(VisrecError, match="top_k must be a whole number"):
            g.search(unit(np.ones((1, 8))), bad)
    assert g.search(unit(np.ones((1, 8))), np.int64(1))[0][0].identity == "ann"


def test_export_import_round_trip_and_reopen(tmp_path, milvus):
    data, centres = people(n=5)
    g = milvus(tmp_path, model_name="m")
    for name, x in data.items():
        g.enroll(name, x, metadata={"n": name})
    g.set_threshold(0.3, 1e-3)
    path = g.export(tmp_path / "out" / "gallery.npz")
    before = g.search(centres, 3)
    g.close()
    reopened = milvus(tmp_path, model_name="m")  # a Milvus Lite gallery persists in its file
    assert reopened.count() == 15 and reopened.threshold == pytest.approx(0.3)
    assert [[h.identity for h in r] for r in reopened.search(centres, 3)] == [[h.identity for h in r] for r in before]
    reopened.close()
    f = open_gallery("faiss")
    assert f.import_(path) == 15 and f.import_(path) == 0  # idempotent
    assert f.threshold == pytest.approx(0.3) and f.info["model_name"] == "m"
    assert f.list()[0] == {"identity": "id000", "templates": 3, "metadata": {"n": "id000"}}
    other = open_gallery("faiss", model_name="another")
    with pytest.raises(GalleryMismatchError):
        other.import_(path)
    with pytest.raises(DataError, match="not a visrec gallery export"):
        (tmp_path / "junk.npz").write_bytes(b"not numpy")
        f.import_(tmp_path / "junk.npz")


def test_calibrate_picks_the_threshold_at_the_target_fpr():
    from visrec.evaluate.verification import tpr_at_fpr

    rng = np.random.default_rng(5)
    centres = unit(rng.normal(size=(40, 24)))
    x = unit(np.repeat(centres, 5, 0) + 0.5 * unit(rng.normal(size=(200, 24))))
    labels = np.repeat(np.arange(40), 5)
    g = open_gallery("faiss")
    out = calibrate(g, x, labels, target_fpr=1e-3)
    ref = tpr_at_fpr(x, labels, targets=(1e-3,), device="cpu")[1e-3]
    assert g.threshold == out["threshold"] == ref.threshold and out["tpr"] == ref.tpr
    s = x @ x.T
    iu = np.triu_indices(len(x), 1)
    impostor = s[iu][labels[iu[0]] != labels[iu[1]]]
    assert (impostor >= g.threshold).mean() <= 1e-3  # the stored threshold keeps FPR at the target
    with pytest.raises(VisrecError, match="cannot calibrate"):
        calibrate(g, x[:10], labels[:10], target_fpr=1e-6)


def test_euclidean_metric_scores_by_negated_distance_on_both_backends(tmp_path, milvus):
    """A distance model's gallery (metric="euclidean", e.g. dlib-resnet): raw vectors, score = -|p - t|;
    max fusion = the nearest template, mean fusion = the distance to the mean template; Milvus and FAISS
    agree; the metric is recorded, survives export/import and a reopen, and another metric is refused."""
    rng = np.random.default_rng(11)
    data = {f"p{i}": 1.4 * unit(rng.normal(size=(3, 16))) * rng.uniform(0.8, 1.2, (3, 1)) for i in range(6)}
    probes = np.stack([x[0] + 0.05 * rng.normal(size=16) for x in data.values()]).astype(np.float32)
    for fusion in ("max", "mean"):
        f = open_gallery("faiss", metric="euclidean", fusion=fusion)
        m = milvus(tmp_path / fusion, metric="euclidean", fusion=fusion)
        for name, x in data.items():
            f.enroll(name, x)
            m.enroll(name, x)
        for g in (f, m):
            assert g.metric == "euclidean"
            for probe, row in zip(probes, g.search(probes, top_k=6)):
                want = {n: -np.linalg.norm(x - probe, axis=1).min() if fusion == "max"
                        else -np.linalg.norm(x.mean(0) - probe) for n, x in data.items()}
                assert [h.identity for h in row] == sorted(want, key=lambda n: -want[n])
                for h in row:
                    assert h.score == pytest.approx(want[h.identity], abs=1e-4)
        assert f.score(probes[0], data["p0"][0]) == pytest.approx(-np.linalg.norm(probes[0] - data["p0"][0]), abs=1e-5)
        m.close()
    path = f.export(tmp_path / "e.npz")
    again = milvus(tmp_path / "max")  # reopened without saying: keeps its own metric
    assert again.metric == "euclidean"
    again.close()
    with pytest.raises(GalleryMismatchError, match="by euclidean; got a model compared by cosine"):
        milvus(tmp_path / "max", metric="cosine")
    fresh = open_gallery("faiss")  # an empty gallery takes the export's metric, as it takes its model and dim
    assert fresh.import_(path) == 18 and fresh.metric == "euclidean"
    with pytest.raises(GalleryMismatchError, match="by cosine; got a model compared by euclidean"):
        open_gallery("faiss", model_name=None, dim=16).import_(path)


def test_calibrate_a_euclidean_gallery_on_negated_distances():
    """Calibration of a distance model's gallery thresholds negated distances by the engine's strict rule:
    at most floor(FPR x impostors) impostor pairs at or above the threshold, every genuine pair above it
    counted."""
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(40, 24))
    x = (np.repeat(centres, 5, 0) + 0.6 * rng.normal(size=(200, 24))).astype(np.float32)
    labels = np.repeat(np.arange(40), 5)
    g = open_gallery("faiss", metric="euclidean")
    out = calibrate(g, x, labels, target_fpr=1e-3)
    iu = np.triu_indices(len(x), 1)
    d = -np.linalg.norm(x[iu[0]].astype(np.float64) - x[iu[1]], axis=1)
    same = labels[iu[0]] == labels[iu[1]]
    imp, gen = np.sort(d[~same])[::-1], d[same]
    k = int(np.floor(1e-3 * len(imp)))
    assert out["impostor_pairs"] == len(imp) and out["genuine_pairs"] == len(gen)
    assert g.threshold == out["threshold"] and imp[k] < g.threshold <= imp[k] + 1e-5
    assert (imp >= g.threshold).sum() <= k
    assert out["tpr"] == pytest.approx((gen >= g.threshold).mean(), abs=1 / len(gen))
    assert g.threshold < 0


# --- approximate indexes ---------------------------------------------------------------------------------------
def _clustered(n=3000, dim=32, seed=7):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(40, dim)))
    x = unit(centres[rng.integers(0, 40, n)] + 0.6 * unit(rng.normal(size=(n, dim))))
    probes = unit(x[:200] + 0.1 * rng.normal(size=(200, dim)).astype(np.float32))
    return x, probes


@pytest.mark.parametrize("backend, index", [
    ("faiss", {"index": "HNSW32", "search_params": {"efSearch": 64}}),
    ("faiss", {"index": "IVF16,Flat", "search_params": {"nprobe": 4}}),
    ("milvus-lite", {"index": "IVF_FLAT", "index_params": {"nlist": 16}, "search_params": {"nprobe": 4}}),
    ("milvus-server", {"index": "IVF_FLAT", "index_params": {"nlist": 16}, "search_params": {"nprobe": 4}}),
    ("milvus-server", {"index": "HNSW", "index_params": {"M": 16, "efConstruction": 100}, "search_params": {"ef": 64}}),
])
def test_an_approximate_index_finds_what_exact_search_finds(request, tmp_path, backend, index):
    x, probes = _clustered()
    exact = open_gallery("faiss")
    cleanup = None
    if backend == "faiss":
        g = open_gallery("faiss", **index)
    else:
        opener, cleanup = milvus_opener(backend, request, tmp_path)
        g = opener(tmp_path, **index)
    try:
        for gal in (exact, g):
            for start in range(0, len(x), 1000):
                gal.enroll_many([(f"p{i}", x[i:i + 1]) for i in range(start, start + 1000)])
        truth = [[m.identity for m in row] for row in exact.search(probes, 10)]
        got = [[m.identity for m in row] for row in g.search(probes, 10)]
        recall_at_1 = np.mean([a[0] == b[0] for a, b in zip(got, truth)])
        recall_at_10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
        assert recall_at_1 >= 0.95 and recall_at_10 >= 0.9, (recall_at_1, recall_at_10)
        gone = truth[0][0]
        assert g.remove(gone) == 1 and gone not in [m.identity for m in g.search(probes[:1], 10)[0]]
        if backend != "faiss":  # reopened without naming the index: keeps it; naming another is refused
            g.close()
            g = opener(tmp_path)
            assert g.index["index"] == index["index"] and g.count() == len(x) - 1
            with pytest.raises(ConfigError, match="cannot change"):
                opener(tmp_path, index="FLAT")
    finally:
        g.close()
        if cleanup is not None:
            cleanup()


def test_an_untrained_ivf_gallery_searches_exactly_until_it_can_train():
    x, probes = _clustered(n=600)
    exact, ivf = open_gallery("faiss"), open_gallery("faiss", index="IVF64,Flat")  # trains at 40 x 256 rows
    for g in (exact, ivf):
        g.enroll_many([(f"p{i}", x[i:i + 1]) for i in range(len(x))])
    assert ivf.search(probes, 5) == exact.search(probes, 5)
    assert not ivf._ann["templates"].index.is_trained


@pytest.mark.parametrize("backend, kwargs, message", [
    ("faiss", {"index": "NoSuchIndex7"}, "not a factory string"),
    ("faiss", {"index": "HNSW32", "search_params": {"efSearch": 0}}, "efSearch=0"),
    ("faiss", {"index": "HNSW32", "search_params": {"probe": 4}}, "'probe'"),
    ("milvus", {"index": "DISKANN"}, "expected one of"),
    ("milvus", {"index": "HNSW", "index_params": {"M": 10 ** 9}}, "M=1000000000"),
    ("milvus", {"index": "IVF_FLAT", "search_params": {"ef": 8}}, "'ef'"),
])
def test_index_settings_are_checked(tmp_path, backend, kwargs, message):
    if backend == "milvus":
        pytest.importorskip("pymilvus")
        kwargs = {"uri": str(tmp_path / "g.db"), **kwargs}
    with pytest.raises(ConfigError, match=message):
        open_gallery(backend, **kwargs)


def test_enroll_folder_writes_in_batches_and_reports_each_photo(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from visrec.data.images import encode_jpeg
    from visrec.index.enroll import enroll_folder

    rng = np.random.default_rng(3)
    for name, n in (("ann", 3), ("bob", 2), (" bad ", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i}.jpg").write_bytes(encode_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    (tmp_path / "bob" / "blank.jpg").write_bytes(encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    (tmp_path / "ann" / "big.jpg").write_bytes(encode_jpeg(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)))

    def faces(img):  # a stand-in detector: a blank photo has no face; the crop is the photo
        return [] if not img.any() else [SimpleNamespace(crop=img)]

    class Embedder:  # a stand-in model: 8 pixels of the crop as its embedding
        name = "m"

        def __call__(self, crops):
            return unit(crops.reshape(len(crops), -1)[:, :8].astype(np.float32) + 1.0)

    # the pipeline's pixel limit holds here as on every other path (a 9000x9000 photo was decoded whole)
    pipeline = SimpleNamespace(faces=faces, embedder=Embedder(), max_pixels=300)
    g = open_gallery("faiss")
    calls = []
    real = type(g).enroll_many
    monkeypatch.setattr(type(g), "enroll_many", lambda self, items, **kw: calls.append(len(items)) or real(self, items, **kw))
    report = enroll_folder(pipeline, g, tmp_path, batch=2)
    assert sorted(report.enrolled) == ["ann/0.jpg", "ann/1.jpg", "ann/2.jpg", "bob/0.jpg", "bob/1.jpg"]
    assert report.no_face == ["bob/blank.jpg"] and [p for p, _ in report.errors] == [" bad /0.jpg", "ann/big.jpg"]
    assert "320 pixels, above the limit of 300" in report.errors[1][1]
    assert calls == [2, 2, 1] and g.count() == 5 and report.identities == 2
    assert enroll_folder(pipeline, g, tmp_path, batch=2).enrolled and g.count() == 5  # again: nothing added


def test_enroll_folder_stages_thumbnails_inside_each_write(tmp_path):
    """A crop that cannot be staged undoes its batch (nothing enrolled that the caller was told failed); staged
    crops are published only after the write; a folder name with an invisible character is that photo's
    error, not its batch's."""
    from types import SimpleNamespace

    from visrec.data.images import encode_jpeg
    from visrec.index.enroll import enroll_folder

    rng = np.random.default_rng(4)
    for name in ("ann", "bob", "eve\u200b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.jpg").write_bytes(encode_jpeg(rng.integers(1, 256, (16, 16, 3), dtype=np.uint8)))
    class Embedder:  # a stand-in model: 8 pixels of the crop as its embedding
        name = "m"

        def __call__(self, crops):
            return unit(crops.reshape(len(crops), -1)[:, :8].astype(np.float32) + 1.0)

    pipeline = SimpleNamespace(faces=lambda img: [SimpleNamespace(crop=img)], embedder=Embedder())

    class Thumbs:
        def __init__(self, fail_on=None):
            self.fail_on, self.events = fail_on, []

        def stage(self, name, tids, crops):
            if name == self.fail_on:
                raise OSError(28, "No space left on device")
            self.events.append(("stage", name, g.identity(name) is not None))  # seen inside the write
            return [(name, tids[0])]

        def publish(self, staged):
            self.events.append(("publish", [n for n, _ in staged]))

        def discard(self, staged):
            self.events.append(("discard", [n for n, _ in staged]))

    g = open_gallery("faiss")
    thumbs = Thumbs(fail_on="bob")
    with pytest.raises(OSError, match="No space left"):
        enroll_folder(pipeline, g, tmp_path, batch=2, thumbnails=thumbs)
    assert g.count() == 0 and thumbs.events == [("stage", "ann", True), ("discard", ["ann"])]
    thumbs = Thumbs()
    report = enroll_folder(pipeline, g, tmp_path, batch=2, thumbnails=thumbs)
    assert sorted(report.enrolled) == ["ann/0.jpg", "bob/0.jpg"] and g.count() == 2
    assert [p for p, _ in report.errors] == ["eve\u200b/0.jpg"] and "U+200B" in report.errors[0][1]
    assert thumbs.events == [("stage", "ann", True), ("stage", "bob", True), ("publish", ["ann", "bob"])]


@pytest.mark.parametrize("durable", [False, True])
def test_one_call_holding_one_image_twice_is_refused_naming_both_rows(tmp_path, durable):
    """One (identity, image hash) twice in a call would be one template answered as two ids: refused before any
    write, naming both rows (as the service refuses the same photo twice in one request)."""
    g = open_gallery("faiss", path=tmp_path / "g.sqlite" if durable else None, model_name="m", dim=32)
    x = unit(np.random.default_rng(5).normal(size=(3, 32)))
    first = g.enroll("ann", x[:1], hashes=["a"])
    with pytest.raises(DataError, match=r"row 2 of the embeddings for 'ann' has the same image hash 'b' as row 1 "):
        g.enroll("ann", x, hashes=["a", "b", "b"])  # 'a' is already stored: that alone is fine
    with pytest.raises(DataError, match=r"row 1 of the embeddings for 'bob' has the same image hash 'z' as row 0 "):
        g.enroll_and_count("bob", x[:2], hashes=["z", "z"])
    with pytest.raises(DataError, match="item 2 row 0 of the embeddings for 'Zo\u00eb' has the same image hash 'h' "
                                        "as item 0 row 1 "):  # one name typed two ways (NFC, NFD) is one person
        g.enroll_many([("Zo\u00eb", x[:2], ["g", "h"]), ("cy", x[2:], ["h"]), ("Zoe\u0308", x[2:], ["h"])])
    with pytest.raises(DataError, match="row 1 of the embeddings for 'dan' has the same image hash .* as row 0 "):
        g.enroll("dan", np.stack([x[0], x[0]]))  # no hashes given: each row's hash is of its embedding
    assert g.count() == 1 and g.names() == ["ann"] and g.identity("ann")["templates"] == 1
    # an image stored by an earlier call, new images, one hash under two people: one id per template stored
    ids = g.enroll_many([("ann", x[:2], ["a", "c"]), ("cy", x[2:], ["a"])])
    assert ids[0][0] == first[0] and len({i for group in ids for i in group}) == 3 and g.count() == 3
    g.close()


def test_enroll_folder_lists_a_copied_photo_once_with_the_photo_it_repeats(tmp_path):
    """A photo copied under another name (the same aligned face, the same person) is one template: it is left
    out and reported beside the photo it repeats, in a later batch too; the same photo in another person's
    folder is that person's own template, reported as a likely labelling mistake. ``enrolled`` matches what was
    stored one to one."""
    from types import SimpleNamespace

    from visrec.data.images import encode_jpeg
    from visrec.index.enroll import enroll_folder

    rng = np.random.default_rng(6)
    photos = [encode_jpeg(rng.integers(1, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    for rel, data in (("ann/0.jpg", photos[0]), ("ann/1.jpg", photos[1]), ("ann/2-copy.jpg", photos[0]),
                      ("ann/3-copy.jpg", photos[0]), ("bob/0.jpg", photos[0])):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(data)

    class Embedder:  # a stand-in model: 8 pixels of the crop as its embedding
        name = "m"

        def __call__(self, crops):
            return unit(crops.reshape(len(crops), -1)[:, :8].astype(np.float32) + 1.0)

    pipeline = SimpleNamespace(faces=lambda img: [SimpleNamespace(crop=img)], embedder=Embedder())
    g = open_gallery("faiss")
    for _ in range(2):  # again: the same report, nothing added
        report = enroll_folder(pipeline, g, tmp_path, batch=2)
        assert sorted(report.enrolled) == ["ann/0.jpg", "ann/1.jpg", "bob/0.jpg"] and g.count() == 3
        assert report.duplicates == [("ann/2-copy.jpg", "ann/0.jpg"), ("ann/3-copy.jpg", "ann/0.jpg")]
        assert report.other_person == [("bob/0.jpg", "ann/0.jpg")]
        assert not report.errors and not report.no_face and report.identities == 2
    assert {r["identity"]: r["templates"] for r in g.list()} == {"ann": 2, "bob": 1}


def test_mean_fusion_builds_the_centroid_index_when_first_searched_and_keeps_it_current():
    x, probes = _clustered(n=1500)
    exact, ann = open_gallery("faiss", fusion="mean"), open_gallery("faiss", fusion="mean", index="HNSW32")
    for g in (exact, ann):
        g.enroll_many([(f"p{i % 500}", x[i:i + 1]) for i in range(len(x))])  # three templates each
    assert "identities" not in ann._ann  # max fusion never needs it; mean fusion builds it at its first search
    top = lambda g: [row[0].identity for row in g.search(probes, 1)]  # noqa: E731
    assert np.mean([a == b for a, b in zip(top(ann), top(exact))]) >= 0.95 and "identities" in ann._ann
    for g in (exact, ann):  # a changed centroid is searched as it now is
        g.enroll("p0", -probes[:1])
    assert np.mean([a == b for a, b in zip(top(ann), top(exact))]) >= 0.95


def test_enroll_and_count_takes_the_count_from_the_write(gallery):
    x = unit(np.random.default_rng(4).normal(size=(3, 32)))
    assert gallery.enroll_and_count("ann", x[:2], hashes=["a", "b"]) == (gallery.enroll("ann", x[:2], hashes=["a", "b"]), 2)
    ids, n = gallery.enroll_and_count("ann", x[1:], hashes=["b", "c"])  # one new template, one already there
    assert n == 3 and len(ids) == 2


def test_the_read_write_lock_shares_reads_and_makes_writes_wait():
    import threading

    from visrec.index.gallery.base import ReadWriteLock

    lock, events = ReadWriteLock(), []
    both_reading = threading.Barrier(2, timeout=5)  # broken (an error) if the two readers cannot overlap

    def reader(name):
        with lock.reading():
            both_reading.wait()
            events.append(f"read {name}")

    readers = [threading.Thread(target=reader, args=(k,)) for k in "ab"]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert sorted(events) == ["read a", "read b"]

    # a writer waits for the reader inside; a reader arriving while the writer waits goes after the writer
    events.clear()
    inside, writer_waits = threading.Event(), threading.Event()

    def first_reader():
        with lock.reading():
            inside.set()
            writer_waits.wait(5)
            threading.Event().wait(0.2)  # the late reader is queued behind the writer by now
            events.append("first reader leaves")

    def writer():
        inside.wait(5)
        writer_waits.set()
        with lock:
            events.append("writer")
            with lock, lock.reading():  # reentrant, and the writer may read
                events.append("writer reads")

    def late_reader():
        writer_waits.wait(5)
        threading.Event().wait(0.1)
        with lock.reading():
            events.append("late reader")

    threads = [threading.Thread(target=f) for f in (first_reader, writer, late_reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert events == ["first reader leaves", "writer", "writer reads", "late reader"]


@pytest.mark.parametrize("index", ["Flat", "IVF16,Flat", "HNSW32"])
def test_faiss_searches_run_together_while_writes_come_and_go(index):
    """Shared reads: searches overlap each other (a barrier two searches must meet inside the gallery), and
    enrollments and removals interleaved with four searching threads give no error and leave the gallery right."""
    import threading

    x, probes = _clustered(n=1200)
    g = open_gallery("faiss", index=index, search_params={"nprobe": 4} if "IVF" in index else {})
    g.enroll_many([(f"p{i}", x[i:i + 1]) for i in range(1000)])
    inner, meet = g._search_templates, threading.Barrier(2, timeout=5)

    def meeting(q, limit):
        meet.wait()
        return inner(q, limit)

    g._search_templates = meeting
    threads = [threading.Thread(target=g.search, args=(probes[:1], 3)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not meet.broken  # both searches were inside at once
    g._search_templates = inner

    errors, seen, stop = [], set(), threading.Event()

    def search():
        try:
            while not stop.is_set():
                for row in g.search(probes[:8], 5):
                    seen.update(m.identity for m in row)
        except Exception as exc:  # noqa: BLE001 - the test reports it below
            errors.append(exc)

    workers = [threading.Thread(target=search) for _ in range(4)]
    for w in workers:
        w.start()
    for i in range(1000, 1200):  # enrol the rest, removing one early identity per step (tombstones, rebuilds)
        g.enroll(f"p{i}", x[i:i + 1])
        g.remove(f"p{i - 1000}")
    stop.set()
    for w in workers:
        w.join(10)
    assert not errors and seen
    assert g.count() == 1000 and {r["identity"] for r in g.list()} == {f"p{i}" for i in range(200, 1200)}
    found = [m.identity for row in g.search(x[200:1200:50], 1) for m in row]
    assert found == [f"p{i}" for i in range(200, 1200, 50)]  # every remaining identity finds itself


def test_a_durable_faiss_gallery_file_is_open_in_one_place_at_a_time(tmp_path):
    """The gallery searches what it loaded, so a second writer would leave the first serving stale rows: a
    second open (here or in another process) is refused naming the file, until the first closes or dies."""
    import subprocess
    import sys

    path = tmp_path / "g.sqlite"
    g = open_gallery("faiss", path=path, model_name="m")
    g.enroll("ann", unit(np.ones((1, 8))))
    with pytest.raises(DataError, match=r"g\.sqlite.*open elsewhere"):
        open_gallery("faiss", path=path)
    other = subprocess.run([sys.executable, "-c", "from visrec.index.gallery import open_gallery\n"
                            f"open_gallery('faiss', path={str(path)!r})"], capture_output=True, text=True)
    assert other.returncode != 0 and "open elsewhere" in other.stderr
    g.close()
    with pytest.raises(GalleryMismatchError):  # a refused open releases the file at once
        open_gallery("faiss", path=path, model_name="another")
    again = open_gallery("faiss", path=path)
    assert [r["identity"] for r in again.list()] == ["ann"]
    again.close()


def test_import_streams_the_vectors_a_batch_at_a_time(gallery, tmp_path, monkeypatch):
    """An export whose identities' templates lie scattered through the file, imported in blocks of three rows:
    the gallery ends as the exported one (templates, metadata, threshold), no block holds more than
    three vectors, and the progress callback counts up to every template."""
    from visrec._npz import NpyRows
    from visrec.index.gallery import base

    rng = np.random.default_rng(11)
    src = open_gallery("faiss", model_name="m")
    for k in range(4):  # each identity enrolled in four rounds: its rows are spread over the export
        src.enroll_many([(f"id{i}", unit(rng.normal(size=(1, 32))), None, {"round": k}) for i in range(5)])
    src.set_threshold(0.42, 1e-3)
    path = src.export(tmp_path / "g.npz")

    blocks, real = [], NpyRows.blocks

    def spy(self, rows):
        for start, block in real(self, rows):
            blocks.append(len(block))
            yield start, block

    monkeypatch.setattr(NpyRows, "blocks", spy)
    monkeypatch.setattr(base, "IMPORT_BATCH", 3)
    seen = []
    assert gallery.import_(path, progress=lambda done, total: seen.append((done, total))) == 20
    assert max(blocks) == 3 and sum(blocks) == 20 and seen[-1] == (20, 20) and len(seen) == len(blocks)
    assert gallery.threshold == pytest.approx(0.42)
    assert [(r["identity"], r["templates"], r["metadata"]) for r in gallery.list()] == \
        [(f"id{i}", 4, {"round": 3}) for i in range(5)]
    probes = unit(rng.normal(size=(6, 32)))
    for row, q in zip(gallery.search(probes, 5), probes):  # every score is the best of the source's templates
        for m in row:
            assert m.score == pytest.approx(max(float(v @ q) for v in src._templates_of(m.identity).values()), abs=1e-5)
    assert gallery.import_(path) == 0  # idempotent


def test_export_streams_the_vectors_a_batch_at_a_time_and_refuses_a_gallery_that_changes_under_it(
        gallery, tmp_path, monkeypatch):
    """Every backend hands its templates to the export in batches (three here): the file holds each template
    once with its identity, hash and exact vector, and imports back into the same gallery; a backend whose rows
    change while they are read gives a clear error, and no file."""
    from visrec.index.gallery import base

    rng = np.random.default_rng(12)
    for k in range(3):
        gallery.enroll_many([(f"id{i}", unit(rng.normal(size=(1, 32))), None, {"k": k}) for i in range(4)])
    sizes, real = [], type(gallery)._template_batches

    def spy(self, rows):
        for batch in real(self, rows):
            sizes.append(len(batch))
            yield batch

    monkeypatch.setattr(type(gallery), "_template_batches", spy)
    monkeypatch.setattr(base, "IMPORT_BATCH", 3)
    path = gallery.export(tmp_path / "g.npz")
    assert max(sizes) <= 3 and sum(sizes) == 12
    data = np.load(path)
    assert len(set(data["template_ids"])) == 12 and sorted(set(data["identities"])) == [f"id{i}" for i in range(4)]
    for tid, who, vec in zip(data["template_ids"], data["identities"], data["vectors"]):
        assert np.array_equal(gallery._templates_of(str(who))[str(tid)], vec)
    copy = open_gallery("faiss", model_name=gallery.info["model_name"])
    assert copy.import_(path) == 12 and copy.list() == gallery.list()

    def shrinking(self, rows):
        yield from list(real(self, rows))[:-1]

    monkeypatch.setattr(type(gallery), "_template_batches", shrinking)
    with pytest.raises(VisrecError, match="the gallery changed while it was exported .* export again"):
        gallery.export(tmp_path / "h.npz")
    assert not (tmp_path / "h.npz").exists() and not list(tmp_path.glob(".h.npz*"))


def test_concurrent_exact_searches_are_answered_together_with_the_answers_they_get_alone():
    """Exact FAISS searches arriving while one runs are run as one batch (fewer FAISS calls than searches),
    each caller gets what it gets searching alone, and an error in a batch reaches every caller in it."""
    import threading

    x, probes = _clustered(n=3000)
    g = open_gallery("faiss")
    g.enroll_many([(f"p{i}", x[i:i + 1]) for i in range(len(x))])
    alone = [[(m.identity, m.score) for m in g.search(p[None], 3)[0]] for p in probes[:64]]
    calls, inner = [], g._knn
    slow = threading.Event()

    def counted(kind, q, k):
        calls.append(len(q))
        slow.wait(0.02)  # long enough for the other threads to queue behind the running search
        return inner(kind, q, k)

    g._knn = counted
    got = [None] * 64

    def worker(j):
        for i in range(j, 64, 8):
            got[i] = [(m.identity, m.score) for m in g.search(probes[i][None], 3)[0]]

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in alone]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in alone],
                               atol=2e-5)  # a batch is one matrix product: the same scores to float32 rounding
    assert sum(calls) == 64 and len(calls) < 64 and max(calls) > 1  # batches formed

    def failing(kind, q, k):
        slow.wait(0.02)
        raise RuntimeError(f"injected ({len(q)} queries)")

    g._knn, errors = failing, []

    def search_expecting_error():
        try:
            g.search(probes[:1], 3)
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=search_expecting_error) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 6 and all(e.startswith("injected") for e in errors)


def test_every_searching_thread_gives_faiss_the_threads_the_service_set(monkeypatch):
    """OpenMP's thread count is per thread: a search from a fresh worker thread applies the service's setting
    before it runs (exact and approximate), and leaves FAISS alone when none is set."""
    import threading

    import faiss

    from visrec.index.gallery import faiss as backend

    x, probes = _clustered(n=1200)
    seen = {}
    for index in ("Flat", "IVF16,Flat"):
        g = open_gallery("faiss", index=index)
        g.enroll_many([(f"p{i}", x[i:i + 1]) for i in range(len(x))])
        for setting in (1, None):
            monkeypatch.setattr(backend, "_search_threads", setting)
            calls = []
            monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: calls.append(n))
            t = threading.Thread(target=g.search, args=(probes[:1], 3))
            t.start()
            t.join(10)
            seen[(index, setting)] = calls
    assert seen == {("Flat", 1): [1], ("Flat", None): [], ("IVF16,Flat", 1): [1], ("IVF16,Flat", None): []}


def test_pages_of_identities_are_sorted_searchable_and_follow_writes(gallery):
    """page(): sorted names, offset/limit, a case-insensitive name filter and the number of matches; an enroll,
    rename or removal through the gallery is seen by the next page (the kept name list is dropped)."""
    vecs, _ = people(n=12, per=1)
    for name, x in vecs.items():
        gallery.enroll(name, x)
    gallery.enroll("Zoë Smith", unit(np.ones((1, 32))))
    by_name = sorted([*vecs, "Zoë Smith"], key=str.casefold)  # ignoring case: "Zoë" after "id..."
    rows, total = gallery.page(0, 5)
    assert total == 13 and [r["identity"] for r in rows] == by_name[:5]
    rows, total = gallery.page(10, 5)
    assert total == 13 and [r["identity"] for r in rows] == by_name[10:] and by_name[-1] == "Zoë Smith"
    assert gallery.page(0, 5, "ZOË")[0][0]["identity"] == "Zoë Smith"
    assert gallery.page(0, 50, "id00") == ([{"identity": f"id00{i}", "templates": 1, "metadata": {}} for i in range(10)],
                                           10)
    gallery.enroll("aaron", unit(np.ones((2, 32)) + np.eye(2, 32)))
    assert gallery.page(0, 1) == ([{"identity": "aaron", "templates": 2, "metadata": {}}], 14)
    gallery.remove("aaron")
    assert gallery.page(0, 1)[0][0]["identity"] == "id000" and gallery.page(0, 1)[1] == 13
    with pytest.raises(DataError, match="limit"):
        gallery.page(0, 0)


def test_rename_keeps_templates_hashes_and_metadata_and_refuses_a_taken_name(gallery):
    vecs, _ = people(n=3, per=2)
    gallery.enroll("id000", vecs["id000"], hashes=["photo-a", "photo-b"], metadata={"team": "red"})
    gallery.enroll("id001", vecs["id001"])
    probe = vecs["id000"][:1]
    before = gallery.search(probe, top_k=1)[0][0]
    assert gallery.rename("id000", "Ada Lovelace") == 2
    assert gallery.identity("id000") is None
    assert gallery.identity("Ada Lovelace") == {"identity": "Ada Lovelace", "templates": 2, "metadata": {"team": "red"}}
    after = gallery.search(probe, top_k=1)[0][0]
    assert after.identity == "Ada Lovelace" and after.score == pytest.approx(before.score, abs=1e-5)
    assert gallery.count() == 4
    gallery.enroll("Ada Lovelace", vecs["id000"][:1], hashes=["photo-a"])  # the same photo: no new template
    assert gallery.identity("Ada Lovelace")["templates"] == 2
    with pytest.raises(IdentityExistsError, match="already enrolled"):
        gallery.rename("Ada Lovelace", "id001")
    assert gallery.identity("id001")["templates"] == 2 and gallery.identity("Ada Lovelace")["templates"] == 2
    assert gallery.rename("nobody", "somebody") == 0
    assert [r["identity"] for r in gallery.page(0, 10)[0]] == ["Ada Lovelace", "id001"]


def test_the_milvus_server_helper_takes_known_settings_and_refuses_unknown_ones(tmp_path):
    """The benchmark's server settings (tests/milvus_server.py) reach milvus.yaml; a misspelt key is an error,
    not a setting the package drops without a word."""
    pytest.importorskip("milvus", reason="the Milvus server helper needs the milvus package (visrec[dev])")
    from milvus_server import MilvusServer

    with pytest.raises(KeyError, match="sealProportio'"):
        MilvusServer(tmp_path / "a", {"dataCoord.segment.sealProportio": 1})
    server = MilvusServer(tmp_path / "b", {"dataCoord.segment.sealProportion": 1,
                                           "dataCoord.compaction.enableAutoCompaction": "false"})
    yaml = server.server.config.update_extra_configs(server.server.config.template_text)
    assert "    sealProportion: 1\n" in yaml.replace("\r\n", "\n")
    assert "    enableAutoCompaction: false\n" in yaml.replace("\r\n", "\n")
    assert "maxSize: 512" in yaml  # untouched settings stay
