import numpy as np

from visrec.index.postprocess import DBA, AlphaQE


def test_dba_and_qe_known_answers():
    cat = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    out = DBA(k=2, alpha=0.0).apply(cat)
    # row 0: mean of itself and its nearest neighbour (0.6, 0.8), normalised
    expected0 = np.array([1.6, 0.8]) / np.linalg.norm([1.6, 0.8])
    assert np.allclose(out[0], expected0)
    q = np.array([[1.0, 0.0]])
    qe = AlphaQE(k=1, alpha=1.0).fit(cat).apply(q)
    assert np.allclose(qe[0], [1.0, 0.0])  # neighbour is (1,0) itself -> unchanged direction


import pytest

from visrec.errors import ConfigError
from visrec.index.postprocess import Chain, Diffusion, PCAWhitening


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_whitening_gives_identity_covariance_and_applies_the_same_map_to_queries():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8))
    cat = (rng.normal(size=(2000, 8)) * np.linspace(5, 0.2, 8)) @ mix
    w = PCAWhitening().fit(cat)
    white = w.transform(cat, normalise=False)
    assert np.allclose(np.cov(white, rowvar=False, bias=True), np.eye(8), atol=1e-3)
    assert np.allclose(white.mean(0), 0, atol=1e-4)
    q = rng.normal(size=(3, 8))
    assert np.allclose(w.queries(q), _l2n((q - w.mean) @ w.projection), atol=1e-6)
    reduced = PCAWhitening(dim=3).fit(cat)
    assert reduced.queries(q).shape == (3, 3)
    # the kept components are the 3 of largest variance: their whitened variances are 1, order by eigenvalue
    assert np.allclose(np.var(reduced.transform(cat, normalise=False), axis=0), 1, atol=1e-3)
    with pytest.raises(ConfigError, match="dim"):
        PCAWhitening(dim=9).fit(cat)


def test_alpha_qe_weights_neighbours_by_similarity_power():
    # five vectors, so k=2 stays within the k <= n/2 rule; the query's two nearest are rows 0 and 1
    cat = _l2n(np.array([[1.0, 0.0, 0.0, 0, 0], [0.8, 0.6, 0.0, 0, 0], [0.0, 0.0, 1.0, 0, 0],
                         [0, 0, 0, 1.0, 0], [0, 0, 0, 0, 1.0]]))
    q = _l2n(np.array([[0.9, 0.3, 0.1, 0, 0]]))
    s = (q @ cat.T)[0]
    alpha = 2.0
    expected = _l2n(q + s[0] ** alpha * cat[0] + s[1] ** alpha * cat[1])  # k=2: the two nearest
    from visrec.index.postprocess import AlphaQE
    got = AlphaQE(k=2, alpha=alpha).fit(cat).queries(q)
    assert np.allclose(got, expected, atol=1e-6)


def test_dba_with_alpha_weights_and_k_including_self():
    from visrec.index.postprocess import DBA
    cat = _l2n(np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
    out = DBA(k=3, alpha=1.0).catalogue(cat)
    sims = cat @ cat.T
    expected = _l2n(np.maximum(sims, 0) @ cat)  # every row's 3 neighbours = all rows
    assert np.allclose(out, expected, atol=1e-6)


def test_diffusion_solves_its_linear_system_on_the_mutual_knn_graph():
    rng = np.random.default_rng(1)
    cat = _l2n(rng.normal(size=(40, 6)))
    q = _l2n(rng.normal(size=(3, 6)))
    d = Diffusion(k=5, query_k=4, alpha=0.9, gamma=3.0, iterations=200, tol=1e-9).fit(cat)
    a = d.graph.to_dense().numpy()
    assert np.allclose(a, a.T, atol=1e-7) and np.all(np.diag(a) == 0)
    # rebuild the definition densely: mutual 5-NN (self excluded), affinities sim^3, symmetric normalisation
    sims = cat @ cat.T
    np.fill_diagonal(sims, -np.inf)
    nn_ = np.argsort(-sims, axis=1)[:, :5]
    w = np.zeros((40, 40))
    for i in range(40):
        w[i, nn_[i]] = np.maximum(sims[i, nn_[i]], 0) ** 3
    mutual = np.where((w > 0) & (w.T > 0), w, 0)
    deg = mutual.sum(1)
    s = mutual / np.sqrt(np.outer(np.maximum(deg, 1e-12), np.maximum(deg, 1e-12)))
    assert np.allclose(a, s, atol=1e-5)
    qs = q @ cat.T
    y = np.zeros((3, 40))
    for j in range(3):
        top = np.argsort(-qs[j])[:4]
        y[j, top] = np.maximum(qs[j, top], 0) ** 3
    f = np.linalg.solve(np.eye(40) - 0.9 * s, y.T).T
    assert np.allclose(d.scores(q), f, atol=1e-4)
    scores, idx = d.rank(q, 7)
    assert np.array_equal(idx, np.argsort(-f, axis=1)[:, :7])


def test_chain_order_rules_persistence_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    cat = _l2n(rng.normal(size=(100, 16)))
    q = _l2n(rng.normal(size=(5, 16)))
    specs = [{"name": "whiten", "dim": 8}, {"name": "dba", "k": 3}, {"name": "qe", "k": 2}, {"name": "diffusion", "k": 5}]
    chain = Chain.from_config(specs)
    index_vectors = chain.fit(cat)
    assert index_vectors.shape == (100, 8) and chain.reranker is not None
    chain.save(tmp_path / "chain.pt")
    again = Chain.from_config(specs).load(tmp_path / "chain.pt")
    assert np.allclose(again.queries(q), chain.queries(q))
    assert np.allclose(again.reranker.scores(chain.queries(q)), chain.reranker.scores(chain.queries(q)), atol=1e-6)
    with pytest.raises(ConfigError, match="last stage"):
        Chain.from_config([{"name": "diffusion"}, {"name": "qe"}])
    with pytest.raises(ConfigError, match="unknown post-processing stage 'nope'"):
        Chain.from_config([{"name": "nope"}])
    with pytest.raises(ConfigError, match="qe"):
        Chain.from_config([{"name": "qe", "kk": 2}])


def test_a_stage_from_another_package_keeps_its_fitted_arrays_through_chain_pt(tmp_path):
    """A registered Stage that declares no shapes (one file plus one registry line) gets back every array
    Chain.save wrote for it, checked finite; a NaN in one is a DataError naming chain.pt and the key."""
    import torch

    from visrec.errors import DataError
    from visrec.index.postprocess import STAGES, Stage

    @STAGES.register("centre_test")
    class Centre(Stage):
        def __init__(self):
            self.centre = None

        def fit(self, catalogue):
            self.centre = catalogue.mean(0)
            return self

        def catalogue(self, x):
            return x - self.centre

        queries = catalogue

    try:
        x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
        chain = Chain.from_config([{"name": "centre_test"}])
        chain.fit(x)
        chain.save(tmp_path / "chain.pt")
        loaded = Chain.from_config([{"name": "centre_test"}]).load(tmp_path / "chain.pt", 4, 20)
        assert np.array_equal(loaded.stages[0].centre, chain.stages[0].centre) and loaded.out_dim == 4
        state = torch.load(tmp_path / "chain.pt", weights_only=True)
        state["0.centre"][1] = float("nan")
        torch.save(state, tmp_path / "chain.pt")
        with pytest.raises(DataError, match=r"chain.pt.*0\.centre.*not finite"):
            Chain.from_config([{"name": "centre_test"}]).load(tmp_path / "chain.pt", 4, 20)
    finally:
        STAGES._items.pop("centre_test", None)
