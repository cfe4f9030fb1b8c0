"""Post-processing measured, not assumed: the ablation table and the ill-posed-fit rule. The shipped synthetic
config's chain against no chain on its own trained descriptor is in test_products_e2e.py, beside the other test
of that descriptor (one file: one worker trains it once)."""

import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from visrec.errors import ConfigError
from visrec.index.postprocess import DBA, AlphaQE, Chain, Diffusion, PCAWhitening, PostprocessWarning


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_whitening_on_too_few_vectors_is_shrunk_with_a_warning_naming_the_numbers():
    rng = np.random.default_rng(0)
    cat = _l2n(rng.normal(size=(120, 128)))
    with pytest.warns(PostprocessWarning, match=r"whiten: keeping 128 of 128 dimensions .* 120 vectors .*dim=30"):
        w = PCAWhitening().fit(cat)
    assert w.dim == 30 and w.projection.shape == (128, 30)
    # the shrunk whitening no longer multiplies null directions by eps^-0.5: all kept variances are 1
    assert np.allclose(np.var(w.transform(cat, normalise=False), axis=0), 1, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PCAWhitening(dim=30).fit(cat)                   # exactly at the rule: no warning
        PCAWhitening(dim=8).fit(_l2n(rng.normal(size=(40, 16))))
    with pytest.raises(ConfigError, match="3 vectors"):
        PCAWhitening(dim=1).fit(cat[:3])


@pytest.mark.parametrize("stage,attr,name", [(DBA(k=10), "k", "dba"), (AlphaQE(k=10), "k", "qe"),
                                             (Diffusion(k=10, query_k=3), "k", "diffusion")])
def test_neighbour_counts_above_half_the_catalogue_are_shrunk(stage, attr, name):
    cat = _l2n(np.random.default_rng(1).normal(size=(9, 4)))
    with pytest.warns(PostprocessWarning, match=rf"{name}: {attr}=10 neighbours .* 9 vectors .*{attr}=4"):
        stage.fit(cat)
    assert getattr(stage, attr) == 4 and len(stage.adjustments) == 1


def test_chain_collects_adjustments_and_stagewise_matches_the_chain():
    rng = np.random.default_rng(2)
    cat, q = _l2n(rng.normal(size=(20, 16))), _l2n(rng.normal(size=(3, 16)))
    chain = Chain.from_config([{"name": "whiten"}, {"name": "dba", "k": 2}, {"name": "qe", "k": 15}])
    with pytest.warns(PostprocessWarning):
        fitted = chain.fit(cat)
    assert [m.split(":")[0] for m in chain.adjustments] == ["post-processing stage whiten", "post-processing stage qe"]
    steps = chain.stagewise(cat, q)
    assert len(steps) == 4 and np.allclose(steps[0][0], cat) and np.allclose(steps[0][1], q)
    assert np.allclose(steps[-1][0], fitted) and np.allclose(steps[-1][1], chain.queries(q))
    assert steps[1][0].shape == (20, 5)                  # whiten shrunk to 20 // 4 dimensions


def test_eval_products_ablation_cli_table_report_and_library(tmp_path):
    from visrec.cli import app
    from visrec.data.synth_products import write_product_dataset
    from visrec.index.evaluation import evaluate_products, postprocess_ablation

    root = tmp_path / "p"
    write_product_dataset(root, families=3, products_per_family=2, variants=2, queries_per_product=1, seed=3, size=64)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {name: product, backbone: resnet18, pooling: gem, dim: 32}\nschedule: {max_steps: 1}\n"
                   "index: {size: 64, postprocess: [{name: whiten, dim: 2}, {name: dba, k: 2}, {name: qe, k: 2},"
                   " {name: diffusion, k: 3, query_k: 3}]}\n")
    run = CliRunner().invoke
    torch.manual_seed(0)
    r = run(app, ["products", "index", str(root / "catalogue"), "--config", str(cfg), "--out", str(tmp_path / "idx")])
    assert r.exit_code == 0, r.output
    r = run(app, ["eval", "products", str(tmp_path / "idx"), "--data", str(root), "--out", str(tmp_path / "ev"),
                  "--ablation"])
    assert r.exit_code == 0, r.output
    assert "post-processing ablation" in r.output and "none" in r.output and "whiten(dim=2)" in r.output
    rows = postprocess_ablation(tmp_path / "idx", root)
    assert [row.chain for row in rows] == ["none", "whiten(dim=2)", "whiten(dim=2) -> dba(k=2)",
                                           "whiten(dim=2) -> dba(k=2) -> qe(k=2)",
                                           "whiten(dim=2) -> dba(k=2) -> qe(k=2) -> diffusion(k=3, query_k=3)"]
    res = evaluate_products(tmp_path / "idx", root, tmp_path / "ev2", samples=0, ablation=True)
    # the last row is the whole chain as the index searches it (diffusion re-ranks), the first the raw descriptors
    assert rows[-1].metrics == pytest.approx(res.metrics)
    for a, b in zip(res.ablation, rows, strict=True):
        assert a.chain == b.chain and a.metrics == pytest.approx(b.metrics)
    assert all(f"{row.metrics['map@7_hits']:.4f}" in r.output for row in rows)
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "Post-processing ablation" in page and "whiten(dim=2) -&gt; dba(k=2)" in page
    # without --ablation: no table, and the library says so with None
    assert evaluate_products(tmp_path / "idx", root, tmp_path / "ev3", samples=0).ablation is None


def test_the_chain_benchmark_scores_no_chain_as_the_evaluation_does_and_prints_every_chain(tmp_path, capsys):
    """benchmarks/products_chain.py on one catalogue and 4 training steps: its "none" row is the product
    evaluation's metrics of the same index (built without a chain), its dba(k=3) row those of an index the CLI
    builds with that chain, and its table has a row per chain with the change against none."""
    import importlib.util
    from pathlib import Path

    from visrec.index.catalogue import index_catalogue
    from visrec.index.evaluation import evaluate_products

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "products_chain.py"
    spec = importlib.util.spec_from_file_location("products_chain", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root, index = bench.trained_index(0, tmp_path, steps=4)
    found = bench.chain_metrics(root, index)
    assert found["none"] == pytest.approx(evaluate_products(index, root, tmp_path / "ev", samples=0).metrics)
    index_catalogue(root / "catalogue", tmp_path / "dba", checkpoint=index.parent / "run",
                    overrides={"index.size": 64, "index.postprocess": [{"name": "dba", "k": 3}]})
    assert found["dba(k=3)"] == pytest.approx(evaluate_products(tmp_path / "dba", root, tmp_path / "ev2", samples=0).metrics)
    assert found["dba(k=3)"] != found["none"]

    bench.main(["--seeds", "0", "--steps", "4", "--out", str(tmp_path),      # reuses the run and the index
                "--threads", str(torch.get_num_threads())])
    table = capsys.readouterr().out
    for name in bench.CHAINS:
        row = next(line for line in table.splitlines() if line.startswith(f"│ {name} "))
        assert row.count(" / ") == (1 if name == "none" else 2), row
