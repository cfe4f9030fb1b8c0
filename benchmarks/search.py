"""Searched architectures against the hand-designed families at the same budget, the same data and the same
training steps (CPU-sized).

For each task: synthetic data are written (the real formats), an architecture search runs on the training set
scored on a *search* held-out set, then every contender — the search's best, and each hand-designed family
scaled to the budget by ``budget fit`` (the same budget code) — trains ``--steps`` steps with each of
``--seeds`` seeds and is scored on a separate *test* set the search never saw (so the searched network gets no
selection advantage from its own held-out data).

- faces: ``write_face_dataset`` 100 identities x 10 (seed 11) to train; search held-out 20 x 8 (seed 13), test
  40 x 10 (seed 12: 1,800 genuine / 78,000 impostor pairs); TPR at FPR = 1e-2 over all test pairs (exact).
  Budget ``--face-gflops`` (LFR rule). Families: mobilefacenet (scale 1, its stage depths as the knob: its
  smallest member at scale 1 is 0.44 GFLOPs with the default depths) and effnet_face (width x depth).
- landmarks: ``write_synthetic_jd`` 300 faces (seed 11) to train; search held-out 60 (seed 13), test 100
  (seed 12); NME (sqrt_area). Budget: the icme21-landmarks protocol (<= 0.1 GFLOPs, < 2 MB). Families: pfld and
  heatmap_lite (width multiplier). Each contender's speed: ms and images/s at batch 1 on one ONNX Runtime
  thread of this machine.

Every contender trains with the same settings (``visrec.search.proxy.DEFAULT_TRAINING``: faces ArcFace s=32
m=0.3, SGD lr 0.1, batch 64; landmarks Wing, AdamW lr 0.005, cosine, batch 32). The search's cost is its wall
time and this process's CPU time.

    python benchmarks/search.py --task faces --trials 10 --search-steps 40 --steps 120 --seeds 3
    python benchmarks/search.py --task landmarks --trials 10 --search-steps 60 --steps 150 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from visrec.data.synth import write_face_dataset, write_synthetic_jd  # noqa: E402
from visrec.models import build_backbone  # noqa: E402
from visrec.protocols import Protocol  # noqa: E402
from visrec.search.fit import fit_to_budget  # noqa: E402
from visrec.search.proxy import DEFAULT_TRAINING, onnx_latency_ms, scorer_for, trial_config  # noqa: E402
from visrec.search.space import model_cost  # noqa: E402
from visrec.search.study import (SearchSettings, load_search_study, resolve_budget, run_worker,  # noqa: E402
                                 summarise)
from visrec.train.trainer import Observer, train  # noqa: E402

MBF_DEPTHS = [(1, 1, 1, 1), (1, 1, 2, 1), (1, 2, 2, 1), (1, 2, 3, 1), (1, 2, 4, 1), (1, 3, 4, 1), (1, 3, 4, 2),
              (1, 4, 6, 2)]


class FinalScore(Observer):
    def __init__(self, scorer):
        self.scorer, self.value = scorer, None

    def on_validate(self, step, backbone):
        import torch

        self.value = self.scorer(backbone, torch.device("cpu"))
        return {"test": self.value}


def write_data(task: str, root: Path) -> dict[str, Path]:
    paths = {k: root / k for k in ("train", "search-val", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    if task == "faces":
        write_face_dataset(paths["train"], 100, 10, seed=11)
        write_face_dataset(paths["search-val"], 20, 8, seed=13, first_identity=40_000, format="folder")
        write_face_dataset(paths["test"], 40, 10, seed=12, first_identity=50_000, format="folder")
    else:
        write_synthetic_jd(paths["train"], 300, seed=11)
        write_synthetic_jd(paths["search-val"], 60, seed=13)
        write_synthetic_jd(paths["test"], 100, seed=12)
    return paths


def contenders(task: str, best_spec: dict, face_gflops: float) -> list[tuple[str, str, dict]]:
    """(label, registry name, kwargs) at the budget: the searched best and each family fitted by budget fit."""
    out = [("searched (best trial)", "searched", {"spec": best_spec})]
    if task == "faces":
        proto = Protocol(name=f"faces-{face_gflops:g}", max_gflops=face_gflops, embedding_dim=512)
        mbf = fit_to_budget("mobilefacenet", proto, knobs={"scale": [1], "blocks": MBF_DEPTHS})
        eff = fit_to_budget("effnet_face", proto)
        out += [("mobilefacenet (budget fit)", "mobilefacenet", mbf.best_kwargs),
                ("effnet_face (budget fit)", "effnet_face", eff.best_kwargs)]
    else:
        for family in ("pfld", "heatmap_lite"):
            fit = fit_to_budget(family, "icme21-landmarks")
            out.append((f"{family} (budget fit)", family, fit.best_kwargs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["faces", "landmarks"], required=True)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--search-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=120, help="training steps of every compared model")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--face-gflops", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=Path("bench-search"))
    ap.add_argument("--reuse-search", action="store_true", help="keep a finished search in --out")
    ap.add_argument("--space", type=Path, default=None, help="search space YAML (default: the shipped one)")
    ap.add_argument("--only-searched", action="store_true",
                    help="train the searched best only (the families' rows of an earlier run with the same data, "
                         "steps and seeds stand)")
    args = ap.parse_args()

    root = args.out / args.task
    data = write_data(args.task, root / "data")
    run_dir = root / ("search" if args.space is None else f"search-{args.space.stem}")
    if args.task == "faces":
        budget = resolve_budget(None, args.face_gflops, None, None)
    else:
        budget = resolve_budget("icme21-landmarks", None, None, None)
    settings = SearchSettings(task=args.task, data=data["train"], val=data["search-val"], out=run_dir, budget=budget,
                              trials=args.trials, steps=args.search_steps, evaluations=2, seed=0,
                              space_file=args.space)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if not (args.reuse_search and (run_dir / "study.journal").exists()):
        shutil.rmtree(run_dir, ignore_errors=True)
        run_worker(settings, progress=False)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_min = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / 60
    study, desc = load_search_study(None, run_dir)
    result = summarise(study, desc)
    counts = {}
    for r in result.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    print(f"search: {counts}, wall {wall / 60:.1f} min, CPU {cpu_min:.1f} min; best trial {result.best.number} "
          f"{result.score_name} {result.best.score:.4f} at {result.best.gflops:.4f} GFLOPs", flush=True)

    test_scorer = scorer_for(args.task, data["test"], target_fpr=1e-2, training=DEFAULT_TRAINING[args.task])
    rows = []
    chosen = contenders(args.task, result.best.spec, args.face_gflops)
    for label, name, kwargs in chosen[:1] if args.only_searched else chosen:
        full = {**kwargs, "num_points": 106} if args.task == "landmarks" else kwargs
        cost = model_cost(name, full)
        ms = onnx_latency_ms(build_backbone(name, **full)) if args.task == "landmarks" else None
        scores = []
        for seed in range(args.seeds):
            out = root / "runs" / f"{name}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = trial_config(args.task, DEFAULT_TRAINING[args.task], {}, data=data["train"], steps=args.steps,
                               evaluations=1, output=out, seed=seed)
            cfg.model = cfg.model.model_validate({"name": name, **kwargs})
            observer = FinalScore(test_scorer)
            t1 = time.perf_counter()
            train(cfg, progress=False, observer=observer)
            scores.append(observer.value)
            print(f"  {label} seed {seed}: {test_scorer.score.name} {observer.value:.4f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
        rows.append({"model": label, "kwargs": kwargs if name != "searched" else "see spec", "gflops": cost.gflops,
                     "mb": cost.mb, "ms": ms, "img_per_s": None if ms is None else 1000 / ms, "scores": scores,
                     "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0})
    print(f"\n{args.task}: test {test_scorer.score.name} after {args.steps} steps, {args.seeds} seeds "
          f"(search: {args.trials} trials of {args.search_steps} steps, {counts.get('rejected', 0)} rejected over "
          f"budget, {wall / 60:.1f} min wall, {cpu_min:.1f} CPU min)")
    print("| model | GFLOPs (LFR) | MB fp32 | " + ("ms / img/s (ORT, 1 thread) | " if args.task == "landmarks" else "")
          + f"test {test_scorer.score.name} mean +- std | per seed |")
    for r in rows:
        speed = f"{r['ms']:.2f} / {r['img_per_s']:.0f} | " if r["ms"] is not None else ""
        print(f"| {r['model']} {r['kwargs'] if r['kwargs'] != 'see spec' else ''} | {r['gflops']:.4f} | "
              f"{r['mb']:.2f} | {speed}{r['mean']:.4f} +- {r['std']:.4f} | "
              f"{', '.join(f'{s:.4f}' for s in r['scores'])} |")
    (run_dir / "results.json").write_text(json.dumps({"search": {"counts": counts, "wall_min": wall / 60,
                                                              "cpu_min": cpu_min, "best_trial": result.best.number,
                                                              "best_spec": result.best.spec},
                                                   "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
