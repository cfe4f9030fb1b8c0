"""tpr_at_fpr against a brute-force reference of the definition: exact counts, ties, edge cases, sharding, and
the fast product's filter (bfloat16 or float32) that never changes the answer."""

import math
import os

import numpy as np
import pytest
import torch

from conftest import free_port
from visrec.errors import VisrecError
from visrec.evaluate import tpr_at_fpr, tpr_at_fpr_pairs
from visrec.evaluate.verification import exact_scores, filter_margin, normalise


def exact_matrix(e):
    """Every pair's exact score as the engine defines it: float64 products of the float32 rows, rounded once."""
    e = np.asarray(e, np.float64)
    return (e @ e.T).astype(np.float32)


def brute_force(emb, labels, target):
    """Straight from the definition: every candidate threshold (each score, and +inf), accept score >= t,
    keep those with FPR <= target, take the highest TPR (smallest t on ties)."""
    s = exact_matrix(normalise(emb).numpy())
    i, j = np.triu_indices(len(s), 1)
    scores, same = s[i, j], labels[i] == labels[j]
    gen, imp = np.sort(scores[same]), np.sort(scores[~same])
    candidates = np.unique(scores)  # every score is a candidate threshold (ascending)
    fa = len(imp) - np.searchsorted(imp, candidates, side="left")  # impostors with score >= t
    ta = len(gen) - np.searchsorted(gen, candidates, side="left")
    valid = fa <= target * len(imp)
    if not valid.any():
        return (0, 0), len(gen), len(imp)  # only t = +inf qualifies
    best = np.flatnonzero(valid & (ta == ta[valid].max()))[0]  # highest TPR, then the smallest t
    return (int(ta[best]), int(fa[best])), len(gen), len(imp)


def clustered(n, ids, dim=16, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, ids, n)
    centres = rng.standard_normal((ids, dim))
    return (centres[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32), labels


@pytest.mark.parametrize("n,ids,seed,block", [(7, 3, 0, 2), (7, 3, 0, 4096), (60, 6, 1, 5), (60, 6, 1, 64),
                                              (300, 20, 2, 37), (300, 20, 2, 4096), (500, 100, 3, 64),
                                              (500, 100, 3, 100), (500, 100, 3, 4096)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_equals_brute_force(n, ids, seed, block, precision):
    emb, labels = clustered(n, ids, seed=seed)
    emb[1] = emb[0]  # a duplicate image: a pair at score 1 (impostor or genuine as the labels fall)
    targets = [0.3, 1e-1, 1e-2, 1e-3]
    res = tpr_at_fpr(emb, labels, targets, block_size=block, device="cpu", filter_precision=precision)
    for t in targets:
        (ta, fa), g, i = brute_force(emb, labels, t)
        r = res[t]
        if not r.estimable:
            assert t * i < 1
            continue
        assert (r.true_accepts, r.false_accepts) == (ta, fa)  # exact, whatever the fast product
        assert r.genuine_count == g and r.impostor_count == i
        assert r.fpr <= t and r.tpr == ta / g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filter_margin_bounds_the_fast_product(dtype):
    """The filter's margin is an upper bound on |fast product - exact score| (it keeps a safety factor of 2:
    the bound itself must hold), on random rows and on rows built to round badly."""
    rng = np.random.default_rng(11)
    for dim in (8, 128, 512):
        rows = [rng.standard_normal((150, dim)), np.abs(rng.standard_normal((150, dim))),  # all-positive: no
                np.ones((150, dim)) + 2.0 ** -9 * rng.integers(0, 2, (150, dim)),         # cancellation;
                np.eye(dim)[rng.integers(0, dim, 150)] + 1e-3 * rng.standard_normal((150, dim))]  # midpoints
        e = normalise(np.concatenate(rows).astype(np.float32))
        products = [(e.to(dtype) @ e.to(dtype).T).float()]
        if dtype == torch.float32:  # the scan's other CPU product: numpy's BLAS (another summation order)
            products.append(torch.from_numpy(e.numpy() @ e.numpy().T))
        i, j = torch.triu_indices(len(e), len(e), 1)
        for fast in products:
            err = (fast[i, j] - exact_scores(e[i], e[j])).abs().max().item()
            assert err <= filter_margin(dtype, dim, torch.device("cpu")) / 2, (dim, err)


def test_the_answer_does_not_depend_on_the_product_or_the_blocks():
    emb, labels = clustered(2500, 120, dim=32, spread=1.4, seed=4)
    emb[10:14] = emb[20]  # duplicates: ties at the top of the impostor scores
    targets = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    runs = [tpr_at_fpr(emb, labels, targets, block_size=b, device="cpu", filter_precision=p)
            for p in ("fp32", "bf16") for b in (257, 1024, 4096)]
    for t in targets:
        got = {(r[t].threshold, r[t].true_accepts, r[t].false_accepts, r[t].near_threshold_pairs) for r in runs}
        assert len(got) == 1, (t, got)


@pytest.mark.parametrize("blas", ["torch", "numpy"])
def test_the_answer_does_not_depend_on_which_blas_makes_the_cpu_product(monkeypatch, blas):
    """The float32 block products through torch's BLAS or numpy's: the same thresholds, counts and
    near-threshold pairs as brute force and as each other (the margin bounds any summation order)."""
    from visrec.evaluate import verification

    calls = []
    monkeypatch.setattr(verification, "CPU_BLAS", blas)
    real = verification._numpy_product
    monkeypatch.setattr(verification, "_numpy_product", lambda a, b: calls.append(1) or real(a, b))
    emb, labels = clustered(900, 60, dim=32, spread=1.4, seed=6)
    emb[3:6] = emb[7]  # ties at the top of the impostor scores
    targets = [1e-2, 1e-3, 1e-4]
    got = tpr_at_fpr(emb, labels, targets, block_size=200, device="cpu", filter_precision="fp32")
    assert (len(calls) > 0) == (blas == "numpy")  # 15 blocks i <= j of 200 rows: each through numpy's BLAS
    for t in targets:
        (ta, fa), g, i = brute_force(emb, labels, t)
        assert (got[t].true_accepts, got[t].false_accepts) == (ta, fa)
    monkeypatch.setattr(verification, "CPU_BLAS", "torch" if blas == "numpy" else "numpy")
    other = tpr_at_fpr(emb, labels, targets, block_size=200, device="cpu", filter_precision="fp32")
    for t in targets:
        assert (got[t].threshold, got[t].near_threshold_pairs) == (other[t].threshold, other[t].near_threshold_pairs)


def test_auto_times_the_two_blas_only_for_a_large_float32_scan_and_holds_numpy_to_torchs_threads(monkeypatch):
    from threadpoolctl import threadpool_info

    from visrec.evaluate import verification

    timed = []
    monkeypatch.setattr(verification, "_numpy_blas_is_faster", lambda dim, threads: timed.append((dim, threads)) or True)
    small = normalise(np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32))
    assert verification._block_product(small)[0] is verification._torch_product and not timed
    assert verification._block_product(small.to(torch.bfloat16))[0] is verification._torch_product
    monkeypatch.setattr(verification, "BLAS_PROBE_MIN_ROWS", 50)
    product, threads = verification._block_product(small)
    assert product is verification._numpy_product and timed == [(8, torch.get_num_threads())]
    with threads():  # numpy's BLAS on torch's thread count while the scan runs
        assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {torch.get_num_threads()}
    assert torch.allclose(product(small, small[:30]), small @ small[:30].T, atol=1e-6)
    monkeypatch.setattr(verification, "CPU_BLAS", "openblas")
    with pytest.raises(VisrecError, match="CPU_BLAS must be 'auto', 'torch' or 'numpy'"):
        verification._block_product(small)
    # the real timing: a yes or a no, remembered per (dim, threads)
    monkeypatch.undo()
    verification._NUMPY_BLAS_FASTER.pop((8, 1), None)
    first = verification._numpy_blas_is_faster(8, 1)
    assert verification._NUMPY_BLAS_FASTER[(8, 1)] is first


def test_the_default_block_size_follows_the_device(monkeypatch):
    """None (the default) is 4096 rows on a CPU; on CUDA it grows with the card (a block's host synchronisations
    cost the same whatever its size), read from the card's total memory so every rank agrees."""
    from types import SimpleNamespace

    from visrec.evaluate.verification import default_block_size

    assert default_block_size(torch.device("cpu")) == 4096
    for gib, want in ((141, 32768), (40, 32768), (24, 16384), (16, 16384), (12, 8192)):
        card = SimpleNamespace(total_memory=gib * 2 ** 30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, card=card: card)
        assert default_block_size(torch.device("cuda", 0)) == want, gib
    emb, labels = clustered(300, 20, dim=16, spread=1.2, seed=1)
    a = tpr_at_fpr(emb, labels, [1e-3], device="cpu")[1e-3]
    b = tpr_at_fpr(emb, labels, [1e-3], device="cpu", block_size=4096)[1e-3]
    assert (a.threshold, a.true_accepts, a.false_accepts) == (b.threshold, b.true_accepts, b.false_accepts)
    for bad in (0, -5, 2.5, "big"):
        with pytest.raises(VisrecError, match="block_size must be a positive integer or None"):
            tpr_at_fpr(emb, labels, [1e-3], device="cpu", block_size=bad)


def test_one_in_a_hundred_million():
    """FPR 1e-8 needs 1e8 impostor pairs: 15,000 embeddings, against a reference that keeps only the two largest
    impostor scores of each band of rows (exact scores in float64, as the engine defines them)."""
    emb, labels = clustered(15_000, 1500, dim=8, spread=1.0, seed=8)
    e = normalise(emb).numpy().astype(np.float64)
    order = np.argsort(labels, kind="stable")
    e, labels = e[order], labels[order]
    best, genuine = [], []
    for r in range(0, len(e), 2000):
        s = (e[r:r + 2000] @ e.T).astype(np.float32)
        rows = np.arange(r, min(len(e), r + 2000))[:, None]
        same = labels[rows] == labels[None, :]
        upper = np.arange(len(e))[None, :] > rows
        genuine.append(s[same & upper])
        imp = s[~same & upper]
        best.append(np.partition(imp, len(imp) - 2)[-2:])
    g = np.concatenate(genuine)
    impostors = len(e) * (len(e) - 1) // 2 - len(g)
    k = int(1e-8 * impostors)
    assert k == 1
    kth = np.sort(np.concatenate(best))[::-1][k]
    threshold = np.nextafter(kth, np.float32(np.inf))
    for precision in ("fp32", "bf16"):
        r = tpr_at_fpr(emb, labels[np.argsort(order)], [1e-8], device="cpu", filter_precision=precision)[1e-8]
        assert r.threshold == threshold and r.true_accepts == int((g >= threshold).sum())
        assert r.false_accepts <= 1


def test_filter_precision_is_checked():
    emb, labels = clustered(20, 4)
    with pytest.raises(VisrecError, match="filter_precision"):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", filter_precision="fp16")


def test_ties_are_resolved_by_the_strict_rule():
    # unit vectors with entries in {0, +-1/2}: every dot product is exact in float32, and scores tie a lot
    rng = np.random.default_rng(5)
    n = 200
    emb = np.zeros((n, 8), np.float32)
    for row in emb:
        idx = rng.choice(8, 4, replace=False)
        row[idx] = rng.choice([-0.5, 0.5], 4)
    labels = (emb[:, :2] > 0).astype(int) @ np.array([1, 2])  # identities correlate with the vectors
    for precision in ("fp32", "bf16"):
        res = tpr_at_fpr(emb, labels, [0.5, 0.2, 0.05, 0.01], block_size=32, device="cpu",
                         filter_precision=precision)
        for t, r in res.items():
            (ta, fa), g, i = brute_force(emb, labels, t)
            assert (r.true_accepts, r.false_accepts) == (ta, fa), t
            assert r.false_accepts <= t * r.impostor_count


@pytest.mark.parametrize("dim", [None, 512])
def test_pair_list_equals_all_pairs(dim):
    """Counts and the threshold itself: the pair list scores each pair as the all-pairs engine does (its exact
    score), not by a float32 sum whose last bit differs at 512-d."""
    if dim is None:
        emb, labels = clustered(120, 10, seed=7)
    else:
        rng = np.random.default_rng(3)
        labels = np.repeat(np.arange(30), 4)
        emb = (rng.standard_normal((30, dim))[labels] + 1.5 * rng.standard_normal((120, dim))).astype(np.float32)
    i, j = np.triu_indices(120, 1)
    targets = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
    all_pairs = tpr_at_fpr(emb, labels, targets, device="cpu")
    listed = tpr_at_fpr_pairs(emb, labels[i] == labels[j], targets, pairs=np.stack([i, j], 1))
    for t in all_pairs:
        assert (listed[t].true_accepts, listed[t].false_accepts, listed[t].threshold) == \
               (all_pairs[t].true_accepts, all_pairs[t].false_accepts, all_pairs[t].threshold), t


def test_not_estimable_below_one_over_target():
    emb, labels = clustered(30, 5)
    r = tpr_at_fpr(emb, labels, [1e-8], device="cpu")[1e-8]
    assert not r.estimable and r.tpr is None and "cannot be resolved" in r.reason


def test_edge_cases():
    emb, _ = clustered(10, 2)
    one_id = tpr_at_fpr(emb, np.zeros(10), [0.1], device="cpu")[0.1]
    assert not one_id.estimable and one_id.impostor_count == 0
    singletons = tpr_at_fpr(emb, np.arange(10), [0.1], device="cpu")[0.1]
    assert singletons.estimable and singletons.genuine_count == 0 and singletons.tpr is None
    same = np.ones((20, 4), np.float32)  # every score is 1.0: the only threshold with FPR <= f accepts none
    r = tpr_at_fpr(same, np.arange(20) % 4, [0.1], device="cpu")[0.1]
    assert r.true_accepts == 0 and r.false_accepts == 0 and r.threshold > 1.0
    tiny = tpr_at_fpr(emb[:2], [0, 1], [0.5], device="cpu")[0.5]  # one pair
    assert tiny.impostor_count == 1 and tiny.genuine_count == 0
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(VisrecError, match="row 3.*NaN"):
        tpr_at_fpr(bad, np.arange(10), device="cpu")
    bad[3] = 0
    with pytest.raises(VisrecError, match="row 3.*zero vector"):
        tpr_at_fpr(bad, np.arange(10), device="cpu")
    with pytest.raises(VisrecError, match="labels"):
        tpr_at_fpr(emb, np.arange(9), device="cpu")


def test_curves_come_from_the_same_pass():
    emb, labels = clustered(200, 10, seed=3)
    res, curve = tpr_at_fpr(emb, labels, [1e-2], curve_bins=200, device="cpu")
    assert curve.genuine_hist.sum() == res[1e-2].genuine_count
    assert curve.impostor_hist.sum() == res[1e-2].impostor_count
    assert np.all(np.diff(curve.fpr) <= 0) and curve.tpr[0] == pytest.approx(1.0)


def _worker(rank, world, port, emb, labels, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = tpr_at_fpr(emb, labels, [1e-1, 1e-2, 1e-3], block_size=16, device="cpu", group=dist.group.WORLD)
    torch.save({t: (r.true_accepts, r.false_accepts, r.threshold) for t, r in res.items()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()
    # results written: skip the interpreter's shutdown, where gloo's threads can abort the process (SIGABRT,
    # "terminate called without an active exception"; seen in CI on 2 busy cores): test_distributed._exit_cleanly
    os._exit(0)


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    emb, labels = clustered(150, 12, seed=9)
    single = tpr_at_fpr(emb, labels, [1e-1, 1e-2, 1e-3], block_size=16, device="cpu")
    mp.spawn(_worker, args=(2, free_port(), emb, labels, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        for t, r in single.items():
            assert got[t] == (r.true_accepts, r.false_accepts, r.threshold)


def test_only_pairs_near_a_threshold_are_scored_exactly(monkeypatch):
    """A high FPR target keeps many impostors above its threshold: they are counted, not re-scored (the
    band around the threshold is). Guards the design, not a time."""
    import visrec.evaluate.verification as verification

    scored = []
    real = verification.exact_scores
    monkeypatch.setattr(verification, "exact_scores", lambda a, b: scored.append(len(a)) or real(a, b))
    emb, labels = clustered(2000, 100, dim=32, spread=1.5, seed=12)
    r = tpr_at_fpr(emb, labels, [1e-2], device="cpu", filter_precision="fp32")[1e-2]
    (ta, fa), _, _ = brute_force(emb, labels, 1e-2)
    assert (r.true_accepts, r.false_accepts) == (ta, fa)
    assert fa > 10_000 and sum(scored) < fa / 20  # ~19,000 impostors above the threshold, a few hundred scored


def _watch_guesses(monkeypatch):
    """Record (start bar, whether it held) for every scan."""
    import visrec.evaluate.verification as verification

    seen = []
    real = verification._Candidates.holds_every_pair_that_matters

    def watched(self):
        held = real(self)
        seen.append((self.start_bar, held))
        return held

    monkeypatch.setattr(verification._Candidates, "holds_every_pair_that_matters", watched)
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_large_k_starts_from_a_sampled_bar_and_gets_the_same_answer(monkeypatch, precision):
    import visrec.evaluate.verification as verification

    # the sample's limits sized for a test: a guess is made on 1,500 embeddings (about 1.1M pairs)
    monkeypatch.setattr(verification, "SAMPLE_MIN_ABOVE", 50)
    monkeypatch.setattr(verification, "SAMPLE_MAX_SHARE", 0.5)
    seen = _watch_guesses(monkeypatch)
    emb, labels = clustered(1500, 60, dim=16, spread=1.2, seed=21)
    emb[7] = emb[3]  # a duplicate
    targets = [3e-2, 1e-2, 1e-3]
    ticks = []
    res = tpr_at_fpr(emb, labels, targets, block_size=256, device="cpu", filter_precision=precision,
                     progress=ticks.append)
    assert len(seen) == 1 and seen[0][0] > -1 and seen[0][1]  # a guess was made, and it held
    assert sum(ticks) == len(range(0, 1500, 256))
    for t in targets:
        (ta, fa), _, _ = brute_force(emb, labels, t)
        assert (res[t].true_accepts, res[t].false_accepts) == (ta, fa), t


@pytest.mark.parametrize("guess", [0.95, -0.95])
def test_a_wrong_sampled_bar_still_gets_the_exact_answer(monkeypatch, guess):
    import visrec.evaluate.verification as verification

    monkeypatch.setattr(verification, "_sampled_bar", lambda *a: guess)
    seen = _watch_guesses(monkeypatch)
    emb, labels = clustered(600, 30, dim=16, spread=1.2, seed=22)
    targets = [1e-1, 1e-2, 1e-3]
    ticks = []
    res = tpr_at_fpr(emb, labels, targets, block_size=128, device="cpu", filter_precision="fp32",
                     progress=ticks.append)
    if guess > 0:  # too high: fewer than K pairs above it, so the scan ran again without a guess
        assert seen == [(guess, False), (-math.inf, True)]
    else:  # too low: every pair above it kept, the guess holds (and costs memory, not correctness)
        assert seen == [(guess, True)]
    assert sum(ticks) == len(range(0, 600, 128))  # the repeated scan does not count twice
    for t in targets:
        (ta, fa), _, _ = brute_force(emb, labels, t)
        assert (res[t].true_accepts, res[t].false_accepts) == (ta, fa), t
