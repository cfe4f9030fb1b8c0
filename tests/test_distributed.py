"""Sharded runs across processes give the single-process answer bit for bit: the exact all-pairs TPR@FPR engine
over 2 gloo processes (ties, duplicate rows), ``visrec eval faces`` and ``visrec products index`` under torchrun
with 2 processes, and the collectives they share (visrec.distributed)."""

import datetime
import os
import pickle
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import free_port
from visrec.data.synth import write_face_dataset
from visrec.data.synth_products import write_product_dataset
from visrec.errors import DataError, VisrecError
from visrec.evaluate import tpr_at_fpr
from visrec.evaluate.verification import normalise

TARGETS = [1e-2, 5e-2]
BLOCK = 16


def _exit_cleanly():
    """End a worker whose work and results are complete without the interpreter's own shutdown: gloo's threads
    can abort it there ("terminate called without an active exception", SIGABRT, seen once in CI on 2 busy
    cores), which would fail a test whose results were all written. A worker that raised never gets here."""
    os._exit(0)


def _join(rank, world, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout: a rank left waiting fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    return dist


def tied_embeddings(n=240, dim=8, ids=24, seed=11):  # n >= 220
    """Unit vectors with entries in {0, +-1/2}: every dot product is exact in float32 and scores tie a lot; rows
    200-209 repeat rows 0-9 with their labels (genuine pairs scoring 1.0), rows 210-219 repeat rows 10-19 under
    other labels (impostor pairs scoring 1.0)."""
    rng = np.random.default_rng(seed)
    emb = np.zeros((n, dim), np.float32)
    for row in emb:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    labels = rng.integers(0, ids, n)
    emb[200:220] = emb[0:20]
    labels[200:210] = labels[0:10]
    labels[210:220] = (labels[10:20] + 1) % ids
    return emb, labels


def _pairs_worker(rank, world, port, emb, labels, out):
    dist = _join(rank, world, port)
    try:
        alone = None
        if rank == 0:  # a caller on one rank only (a trainer's validation): no collective, nobody waited for
            alone = tpr_at_fpr(emb, labels, TARGETS, block_size=BLOCK, device="cpu", curve_bins=64)
        blocks = []
        res, curve = tpr_at_fpr(emb, labels, TARGETS, block_size=BLOCK, device="cpu", curve_bins=64,
                                group=dist.group.WORLD, progress=blocks.append)
        with open(f"{out}/rank{rank}.pkl", "wb") as fh:
            pickle.dump({"alone": alone, "results": res, "gen": curve.genuine_hist, "imp": curve.impostor_hist,
                         "blocks": len(blocks)}, fh)
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


@pytest.mark.slow
def test_sharded_all_pairs_equals_one_process_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    emb, labels = tied_embeddings()
    single, curve = tpr_at_fpr(emb, labels, TARGETS, block_size=BLOCK, device="cpu", curve_bins=64)
    # the data exercises what it should: both targets resolvable, ties at the deciding impostor score
    e = normalise(emb).numpy()
    i, j = np.triu_indices(len(e), 1)
    scores, same = (e @ e.T)[i, j], labels[i] == labels[j]
    imp = np.sort(scores[~same])[::-1]
    for t in TARGETS:
        r = single[t]
        assert r.estimable and r.genuine_count > 0 and 0 < r.true_accepts < r.genuine_count
        kth = imp[int(t * len(imp))]
        assert (imp == kth).sum() > 1 and r.threshold > kth  # tied impostors at s_{K+1}, all rejected
        assert r.true_accepts == int((scores[same] >= r.threshold).sum())
        assert r.false_accepts == int((imp >= r.threshold).sum()) <= t * len(imp)

    mp.spawn(_pairs_worker, args=(2, free_port(), emb, labels, str(tmp_path)), nprocs=2, join=True)
    got = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    for g in got:
        assert g["results"] == single  # every field: threshold, TPR, FPR, counts, near-threshold pairs
        for t in TARGETS:
            a, b = g["results"][t], single[t]
            assert (a.threshold, a.tpr, a.true_accepts, a.false_accepts, a.genuine_count, a.impostor_count) == \
                   (b.threshold, b.tpr, b.true_accepts, b.false_accepts, b.genuine_count, b.impostor_count)
        np.testing.assert_array_equal(g["gen"], curve.genuine_hist)
        np.testing.assert_array_equal(g["imp"], curve.impostor_hist)
    # the row blocks were split between the ranks, not computed twice
    row_blocks = -(-len(emb) // BLOCK)
    assert got[0]["blocks"] + got[1]["blocks"] == row_blocks and min(got[0]["blocks"], got[1]["blocks"]) > 0
    alone, alone_curve = got[0]["alone"]
    assert alone == single


def _thread_gather(world):
    """An all-gather between threads: the ``gather=`` transport, in one process."""
    barrier, slots = threading.Barrier(world, timeout=30), [None] * world

    def for_rank(rank):
        def gather(t):
            slots[rank] = t.clone()
            barrier.wait()
            parts = [s.clone() for s in slots]
            barrier.wait()
            return parts
        return gather

    return for_rank


def _run_ranks(world, call):
    out, errors = [None] * world, [None] * world

    def run(r):
        try:
            out[r] = call(r)
        except Exception as exc:
            errors[r] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, errors


def test_gather_transport_merges_exactly_and_refuses_different_inputs():
    emb, labels = tied_embeddings()
    single = tpr_at_fpr(emb, labels, TARGETS, block_size=BLOCK, device="cpu")
    gather = _thread_gather(3)
    out, errors = _run_ranks(3, lambda r: tpr_at_fpr(emb, labels, TARGETS, block_size=BLOCK, device="cpu", rank=r,
                                                     world_size=3, gather=gather(r)))
    assert errors == [None] * 3 and out == [single] * 3
    # a rank given other labels: every rank stops with an error naming what differs, nothing is merged
    other = labels.copy()
    other[5] = (other[5] + 1) % 24
    gather = _thread_gather(2)
    _, errors = _run_ranks(2, lambda r: tpr_at_fpr(emb, other if r else labels, TARGETS, block_size=BLOCK,
                                                   device="cpu", rank=r, world_size=2, gather=gather(r)))
    assert all(isinstance(e, VisrecError) and "rank 1 was given different labels" in str(e) for e in errors)


def test_sharding_arguments_are_checked():
    emb, labels = tied_embeddings()
    with pytest.raises(VisrecError, match="group= .*or gather="):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", rank=0, world_size=2)  # the partial results had no way home
    with pytest.raises(VisrecError, match="together"):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", rank=0)
    with pytest.raises(VisrecError, match=r"rank must be in \[0, world_size\)"):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", rank=1, world_size=1)
    with pytest.raises(VisrecError, match="gather= needs rank"):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", gather=lambda t: [t])
    with pytest.raises(VisrecError, match="no torch.distributed process group is initialised"):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", group=object())
    with pytest.raises(VisrecError, match="block_size"):
        tpr_at_fpr(emb, labels, [0.1], device="cpu", block_size=0)
    # one rank of one: the plain answer
    assert tpr_at_fpr(emb, labels, [0.1], device="cpu", rank=0, world_size=1) == \
           tpr_at_fpr(emb, labels, [0.1], device="cpu")


def _helpers_worker(rank, world, port, out):
    from visrec.faces.evaluation import embed_all
    from visrec import distributed as vd

    dist = _join(rank, world, port)
    group = dist.group.WORLD
    found = {}
    try:
        torch.manual_seed(rank)  # different random weights on each rank ...
        layer = torch.nn.Linear(4, 3)
        vd.broadcast_module(layer, group)  # ... until rank 0's are copied everywhere
        found["weight"] = layer.weight.detach().clone()
        rows = np.arange(rank * 7, dtype=np.float64).reshape(rank * 7 // 7, 7)  # rank 0: no rows; rank 1: one
        found["rows"] = vd.all_gather_rows(rows, group)
        images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
        calls = []
        found["embedded"] = embed_all(lambda x: (calls.append(len(x)) or x.reshape(len(x), -1) * 2.0)
                                      .astype(np.float32), 10, images.__getitem__, 3, None, group=group)
        found["calls"] = calls
        try:
            vd.on_every_rank("reading", lambda: 1 / (rank - 1), group)  # rank 1 divides by zero
        except Exception as exc:
            found["error"] = (type(exc).__name__, str(exc))
        try:
            vd.from_rank_zero("building", lambda: (_ for _ in ()).throw(DataError("bad shard")), group)
        except Exception as exc:
            found["zero_error"] = (type(exc).__name__, str(exc))
        found["zero"] = vd.from_rank_zero("building", lambda: {"count": 3}, group)
        with open(f"{out}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(found, fh)
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


@pytest.mark.slow
def test_collectives_of_the_sharded_runs(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_helpers_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1))
    torch.manual_seed(0)
    assert torch.equal(r0["weight"], torch.nn.Linear(4, 3).weight.detach()) and torch.equal(r0["weight"], r1["weight"])
    for r in (r0, r1):
        assert [a.shape for a in r["rows"]] == [(0, 7), (1, 7)] and r["rows"][1].tolist() == [list(range(7))]
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    expected = (images.reshape(10, -1) * 2.0).astype(np.float32)
    np.testing.assert_array_equal(r0["embedded"], expected)
    np.testing.assert_array_equal(r1["embedded"], expected)
    assert r0["calls"] == [3, 3] and r1["calls"] == [3, 1]  # batches 0, 2 and 1, 3: those one process forms
    assert r1["error"][0] == "ZeroDivisionError"
    assert r0["error"][0] == "VisrecError" and "reading failed on rank 1: ZeroDivisionError" in r0["error"][1]
    assert r0["zero_error"][0] == "DataError"
    assert r1["zero_error"][0] == "VisrecError" and "building failed on rank 0: DataError: bad shard" in \
           r1["zero_error"][1]
    assert r0["zero"] == r1["zero"] == {"count": 3}


def _torchrun(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "visrec.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _exact_rows(report):
    """The rows of the report's exact TPR table (target, TPR, threshold, FPR, accepts, near)."""
    html = report.read_text()
    table = html.split("<h2>TPR at FPR")[1].split("</table>")[0]
    return re.findall(r"<tr><td>.*?</tr>", table)


@pytest.mark.slow
def test_eval_faces_under_torchrun_equals_one_process(tiny_face_model, tmp_path):
    from visrec.cli import app

    # 144 images: two embedding batches of 128 and 16, one per rank
    data = write_face_dataset(tmp_path / "faces", 18, 8, format="folder", seed=4)
    args = ["eval", "faces", str(tiny_face_model), "--data", str(data), "--target-fpr", "0.1",
            "--target-fpr", "0.01"]
    single = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    done = _torchrun([*args, "--out", str(tmp_path / "sharded")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("face verification (") == 1  # rank 0 prints, rank 1 does not
    sharded = (tmp_path / "sharded" / "report.html").read_text()
    assert "<th>processes</th><td>2 (" in sharded and "<th>processes</th>" not in \
        (tmp_path / "single" / "report.html").read_text()
    rows = _exact_rows(tmp_path / "single" / "report.html")
    assert len(rows) == 2 and all("not estimable" not in r for r in rows)
    assert _exact_rows(tmp_path / "sharded" / "report.html") == rows  # TPR, threshold, FPR, every count


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    write_product_dataset(root, families=3, products_per_family=2, variants=2, queries_per_product=0, seed=3,
                          size=64)
    (root / "catalogue" / "zz-broken.jpg").write_bytes(b"not a jpeg")  # unreadable: listed, not indexed
    cfg = root / "index.yaml"
    # 13 images in shards of 3 (ranks 0 and 1 take shards 0, 2, 4 and 1, 3), batches of 2 inside a shard;
    # float32 descriptors, so no float16 rounding could hide a difference
    cfg.write_text("model: {name: product, backbone: resnet18, pooling: gem, dim: 16}\nschedule: {max_steps: 1}\n"
                   "index: {size: 64, shard_size: 3, batch_size: 2, dtype: float32,\n"
                   "        postprocess: [{name: dba, k: 2}]}\n")
    return root


@pytest.mark.slow
def test_products_index_under_torchrun_equals_one_process(catalogue, tmp_path):
    from visrec.cli import app

    cat, cfg = catalogue / "catalogue", catalogue / "index.yaml"
    sharded = tmp_path / "sharded"
    done = _torchrun(["products", "index", str(cat), "--config", str(cfg), "--out", str(sharded)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("catalogue index") == 1
    assert sorted(p.name for p in (sharded / "shards").iterdir()) == [f"shard-{s:05d}.npz" for s in range(5)]
    # one process, the same descriptor weights (the ones rank 0 shared with rank 1 and saved)
    single = tmp_path / "single"
    r = CliRunner().invoke(app, ["products", "index", str(cat), "--config", str(cfg), "--model",
                                 str(sharded / "descriptor.pt"), "--out", str(single)])
    assert r.exit_code == 0, r.output
    ids = (single / "ids.txt").read_text().split()
    assert len(ids) == 12 and ids == sorted(ids) and "zz-broken" not in ids
    for name in ("ids.txt", "descriptors.npy", "index.faiss", "manifest.json"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes(), name
    raw = np.load(sharded / "descriptors.npy")
    assert raw.dtype == np.float32 and raw.shape == (12, 16) and np.unique(raw, axis=0).shape[0] == 12


def test_join_names_a_shard_no_rank_wrote(catalogue, tmp_path):
    from visrec.data.products import list_images
    from visrec.index.catalogue import IndexOptions, extract_descriptors, join_shards
    from visrec.models import build_backbone

    items = list_images(catalogue / "catalogue")[:5]
    opts = IndexOptions(size=32, shard_size=2, batch_size=2, dtype="float32")
    model = build_backbone("product", backbone="resnet18", pooling="gem", dim=8)
    part = extract_descriptors(model, items, tmp_path, opts, rank=1, world_size=2)  # shard 1 only
    assert part[0] == [i for i, _ in items[2:4]]
    with pytest.raises(DataError, match="shard-00000.npz.*missing after every rank finished"):
        join_shards(items, tmp_path, opts)
    extract_descriptors(model, items, tmp_path, opts, rank=0, world_size=2)
    joined = join_shards(items, tmp_path, opts)
    assert joined[0] == [i for i, _ in items] and joined[1].shape == (5, 8)


def test_single_process_commands_refuse_torchrun(monkeypatch, tmp_path):
    from visrec.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["products", "search", str(tmp_path), "--index", str(tmp_path)])
    assert isinstance(r.exception, VisrecError) and "runs in one process" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", "products", str(tmp_path), "--data", str(tmp_path)])
    assert isinstance(r.exception, VisrecError) and "WORLD_SIZE=2" in str(r.exception)
    r = CliRunner().invoke(app, ["products", "index", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--device", "cuda:1"])
    assert r.exit_code != 0 and "under torchrun give cpu or cuda" in r.output
