import numpy as np
import pytest

from visrec.data import products as P
from visrec.data import synth_products as S
from visrec.errors import DataError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("p500k")
    summary = S.write_product_dataset(root, families=3, products_per_family=2, variants=2,
                                      queries_per_product=2, seed=3, size=96)
    return root, summary


def test_dataset_reads_back(dataset):
    root, summary = dataset
    cat = P.list_images(root / P.CATALOGUE_DIR)
    qry = P.list_images(root / P.QUERY_DIR)
    assert len(cat) == summary["catalogue_images"] == 12
    assert len(qry) == summary["queries"] == 12
    assert [i for i, _ in cat] == sorted(i for i, _ in cat)
    gt = P.read_ground_truth(root / P.GROUND_TRUTH)
    cat_ids = {i for i, _ in cat}
    assert set(gt) == {i for i, _ in qry}
    labels = P.read_product_labels(root / P.PRODUCT_LABELS)
    assert set(labels) == cat_ids
    for qid, ids in gt.items():
        assert len(ids) == 2 and set(ids) <= cat_ids
        assert len({labels[i] for i in ids}) == 1          # all variants of one product
    ok, bad = P.scan_catalogue(root / P.CATALOGUE_DIR)
    assert len(ok) == 12 and bad == []
    imgs = list(P.load_catalogue_images(cat))
    assert imgs[0][1].shape == (96, 96, 3) and imgs[0][1].dtype == np.uint8


def test_determinism_and_queries_differ(tmp_path, dataset):
    root, _ = dataset
    S.write_product_dataset(tmp_path / "a", families=1, products_per_family=2, variants=2,
                            queries_per_product=1, seed=3, size=96)
    S.write_product_dataset(tmp_path / "b", families=1, products_per_family=2, variants=2,
                            queries_per_product=1, seed=4, size=96)
    name = "p0001v1.jpg"
    same = (tmp_path / "a" / P.CATALOGUE_DIR / name).read_bytes()
    assert same == (root / P.CATALOGUE_DIR / name).read_bytes()
    assert same != (tmp_path / "b" / P.CATALOGUE_DIR / name).read_bytes()
    qname = "p0001q0.jpg"
    assert (tmp_path / "a" / P.QUERY_DIR / qname).read_bytes() == (root / P.QUERY_DIR / qname).read_bytes()

    p = S.make_product(0, 0, 0)
    cat = S.render_catalogue(p, 0, np.random.default_rng(0), size=128)
    assert cat.shape == (128, 128, 3) and cat.dtype == np.uint8
    assert (cat[0] == 255).all() and (cat[:, 0] == 255).all()     # white shop background
    for i in range(4):
        q = S.render_query(p, np.random.default_rng(i), size=128, difficulty=0.5)
        assert q.shape == cat.shape and q.dtype == np.uint8
        assert np.abs(q.astype(np.int16) - cat).mean() > 20


def test_family_shares_shape_not_colours():
    a, b = S.make_product(1, 2, 0), S.make_product(1, 2, 1)
    assert a.shape == b.shape and a.pattern == b.pattern and a.brand == b.brand
    assert a.product_id != b.product_id and (a.body != b.body or a.text != b.text)


@pytest.mark.parametrize("h,w", [(40, 100), (100, 40), (50, 50), (41, 100)])
def test_pad_to_square(h, w):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (h, w, 3), dtype=np.uint8)
    sq = P.pad_to_square(img)
    n = max(h, w)
    assert sq.shape == (n, n, 3)
    top, left = (n - h) // 2, (n - w) // 2
    assert np.array_equal(sq[top:top + h, left:left + w], img)
    pad = np.ones((n, n), bool)
    pad[top:top + h, left:left + w] = False
    assert (sq[pad] == 255).all()
    assert abs(top - (n - h - top)) <= 1 and abs(left - (n - w - left)) <= 1


def test_preprocess_product():
    img = np.full((60, 150, 3), 255, np.uint8)
    x = P.preprocess_product(img, size=64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], (1 - P.IMAGENET_MEAN) / P.IMAGENET_STD, rtol=1e-5)
    xs = P.preprocess_product(img, size=100, multiscale=(1.0, 0.707, 1.414))
    assert [a.shape for a in xs] == [(3, 100, 100), (3, 71, 71), (3, 141, 141)]
    assert all(a.dtype == np.float32 for a in xs)


def _expect(fn, path, line, match):
    with pytest.raises(DataError, match=match) as e:
        fn(path)
    assert e.value.path == str(path) and e.value.record == f"line {line}"
    assert str(path) in str(e.value)


def test_ground_truth_errors_and_blank_lines(tmp_path):
    f = tmp_path / "val.csv"
    f.write_text("q1,a,b\n\n  \nq2,c\n")
    assert P.read_ground_truth(f) == {"q1": ["a", "b"], "q2": ["c"]}
    f.write_text("q1,a\n\nq1,b\n")
    _expect(P.read_ground_truth, f, 3, "duplicate query")
    f.write_text("q1,a,b,a\n")
    _expect(P.read_ground_truth, f, 1, "duplicate ground-truth id 'a'")
    f.write_text("q1,a\nq2\n")
    _expect(P.read_ground_truth, f, 2, "no ground-truth")
    f.write_text("q1,a,,b\n")
    _expect(P.read_ground_truth, f, 1, "empty")
    P.write_ground_truth(f, {"x": ["1", "2"], "y": ["3"]})
    assert P.read_ground_truth(f) == {"x": ["1", "2"], "y": ["3"]}
    with pytest.raises(DataError):
        P.read_ground_truth(tmp_path / "missing.csv")


def test_submission_roundtrip_and_errors(tmp_path):
    f = tmp_path / "sub.csv"
    ranked = {"q1": [f"c{i}" for i in range(10)], "q2": list("abcdefg")}
    P.write_submission(f, ranked)
    assert P.read_submission(f) == {"q1": [f"c{i}" for i in range(7)], "q2": list("abcdefg")}
    assert not [p for p in tmp_path.iterdir() if p.name != "sub.csv"]        # no temp file left
    with pytest.raises(DataError, match="'q3'"):
        P.write_submission(tmp_path / "s2.csv", {"q3": list("abc")})
    with pytest.raises(DataError, match="duplicate"):
        P.write_submission(tmp_path / "s2.csv", {"q3": list("abcdefa")})
    assert not (tmp_path / "s2.csv").exists()
    f.write_text("q1,a,b,c,d,e,f,g\n\nq2,a,b,c\n")
    _expect(P.read_submission, f, 3, "3 ids")
    f.write_text("q1,a,b,c,d,e,f,g,h\n")
    _expect(P.read_submission, f, 1, "8 ids")
    f.write_text("q1,a,b,c,d,e,f,a\n")
    _expect(P.read_submission, f, 1, "duplicate")
    f.write_text("q1,a,b,c,d,e,f,g\nq1,a,b,c,d,e,f,g\n")
    _expect(P.read_submission, f, 2, "duplicate query")
    f.write_text("q1,a,b,c\n")
    assert P.read_submission(f, k=3) == {"q1": ["a", "b", "c"]}


def test_list_images_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        P.list_images(tmp_path / "nope")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"a\.jpg.*a\.png"):
        P.list_images(tmp_path)
    (tmp_path / "a.png").unlink()
    assert [i for i, _ in P.list_images(tmp_path)] == ["a"]


def test_corrupt_catalogue_image(tmp_path):
    S.write_product_dataset(tmp_path, families=1, products_per_family=2, variants=2,
                            queries_per_product=1, seed=0, size=64)
    cat = tmp_path / P.CATALOGUE_DIR
    (cat / "p0001v0.jpg").write_bytes(b"\x00garbage" * 50)
    ok, bad = P.scan_catalogue(cat)
    assert [i for i, _ in bad] == ["p0001v0"] and len(ok) == 3
    assert "decodable" in bad[0][1]
    with pytest.raises(DataError, match="p0001v0"):
        P.scan_catalogue(cat, strict=True)
    items = P.list_images(cat)
    errs = []
    got = [i for i, _ in P.load_catalogue_images(items, bad=errs)]
    assert got == ["p0000v0", "p0000v1", "p0001v1"] and [i for i, _ in errs] == ["p0001v0"]
    with pytest.raises(DataError, match="p0001v0"):
        list(P.load_catalogue_images(items, strict=True))
    with pytest.raises(DataError, match="p0009"):
        P.read_image_checked("p0009", cat / "p0009.jpg")


def test_opaque_ids_deterministic(tmp_path):
    a = [i for _, i, _, _ in S.iter_product_images(1, 1, 2, 1, seed=5, size=48, opaque_ids=True)]
    b = [i for _, i, _, _ in S.iter_product_images(1, 1, 2, 1, seed=5, size=48, opaque_ids=True)]
    assert a == b and len(set(a)) == 3 and all(len(i) == 12 for i in a)
