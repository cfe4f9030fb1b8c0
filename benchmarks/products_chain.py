"""Post-processing chains on the synthetic products recipe, over several catalogues: how reliably a chain helps.

For each catalogue seed: the README's synthetic catalogue (10 families x 4 products x 3 variants, 2 queries per
product, 128 px) written with that seed, the descriptor of ``configs/products/synthetic.yaml`` trained on it as
shipped (seed 0, one torch thread: what ``tests/test_products_e2e.py`` trains for seed 0), an index built with
no chain, then every candidate chain fitted on that index's raw catalogue descriptors and searched exactly.
Prints mAP@7 in both forms (docs/metrics.md) per seed and chain, the change against no chain, and on how many
seeds each chain falls below no chain. One query is 1/80 = 0.0125 of mAP@7 here.

    python benchmarks/products_chain.py --seeds 0 1 2 3 4 5 --out /tmp/products-chain

Training takes about 100 s a seed on one core; runs and indexes are kept in ``--out`` and reused.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from visrec.config import load_config
from visrec.data.products import GROUND_TRUTH, read_ground_truth
from visrec.data.synth_products import write_product_dataset
from visrec.evaluate.products import query_items, retrieval_metrics
from visrec.index.catalogue import CatalogueIndex, index_catalogue
from visrec.index.postprocess import Chain, _topk
from visrec.train.trainer import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "products" / "synthetic.yaml"
CHAINS = {
    "none": [],
    "dba(k=2)": [{"name": "dba", "k": 2}],
    "dba(k=3)": [{"name": "dba", "k": 3}],
    "dba(k=4)": [{"name": "dba", "k": 4}],
    "dba(k=3, alpha=3)": [{"name": "dba", "k": 3, "alpha": 3.0}],
    "qe(k=2)": [{"name": "qe", "k": 2}],
    "qe(k=3)": [{"name": "qe", "k": 3}],
    "dba(k=3) -> qe(k=2)": [{"name": "dba", "k": 3}, {"name": "qe", "k": 2}],
    "dba(k=3) -> qe(k=3)": [{"name": "dba", "k": 3}, {"name": "qe", "k": 3}],
}
FORMS = ("map@7_hits", "map@7_min_gt")


def trained_index(seed: int, out: Path, steps: int) -> tuple[Path, Path]:
    """(data root, index dir) for one catalogue seed, trained and indexed unless ``out`` already holds them."""
    work = out / f"seed{seed}-steps{steps}"
    root, run, index = work / "products", work / "run", work / "index"
    if not (root / GROUND_TRUTH).exists():
        shutil.rmtree(root, ignore_errors=True)  # a set a killed run left half-written (synth refuses one)
        write_product_dataset(root, families=10, products_per_family=4, variants=3, queries_per_product=2,
                              seed=seed, size=128)
    if not (run / "model.pt").exists():
        cfg = load_config(CONFIG, {"output": str(run), "device": "cpu", "data.catalogue": str(root / "catalogue"),
                                   "data.labels": str(root / "catalogue_products.csv"), "data.val": str(root),
                                   "schedule.max_steps": steps})
        torch.manual_seed(0)
        train(cfg, progress=False)
    if not (index / "manifest.json").exists():
        index_catalogue(root / "catalogue", index, config=CONFIG, checkpoint=run, overrides={"index.postprocess": []})
    return root, index


def chain_metrics(root: Path, index_dir: Path) -> dict[str, dict[str, float]]:
    """mAP@7 of every chain in ``CHAINS`` on one index's raw descriptors, exact inner-product search."""
    index = CatalogueIndex(index_dir)
    gt = read_ground_truth(root / GROUND_TRUTH)
    qids, queries = index.describe_items(query_items(root, gt))
    catalogue = index.raw_catalogue()
    out = {}
    for name, specs in CHAINS.items():
        chain = Chain.from_config(specs)
        cat, q = chain.fit(catalogue), chain.queries(queries)
        ranked = {qid: [index.ids[j] for j in row if j >= 0] for qid, row in zip(qids, _topk(q, cat, 7)[1])}
        out[name] = retrieval_metrics(ranked, gt, 7)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="catalogue seeds")
    ap.add_argument("--steps", type=int, default=160, help="training steps (the config ships 160)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the test trains on one)")
    ap.add_argument("--out", type=Path, default=Path("products-chain"), help="data, runs and indexes (reused)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {seed: chain_metrics(*trained_index(seed, args.out, args.steps)) for seed in args.seeds}

    table = Table(title=f"mAP@7 hits / min_gt, synthetic products, {args.steps} steps, per catalogue seed; "
                        "last columns: mean change against no chain, seeds below no chain")
    for col in ["chain", *(f"seed {s}" for s in args.seeds), "mean change", "seeds below"]:
        table.add_column(col)
    for name in CHAINS:
        cells, deltas, below = [], {f: [] for f in FORMS}, 0
        for seed in args.seeds:
            m, base = results[seed][name], results[seed]["none"]
            cells.append(" / ".join(f"{m[f]:.4f}" for f in FORMS))
            for f in FORMS:
                deltas[f].append(m[f] - base[f])
            below += any(m[f] < base[f] for f in FORMS)
        mean = " / ".join(f"{sum(d) / len(d):+.4f}" for d in deltas.values())
        table.add_row(name, *cells, mean if name != "none" else "-", str(below) if name != "none" else "-")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
