"""Catalogue search queries/s: visrec's CatalogueIndex search path vs raw FAISS, same vectors, same run;
and catalogue extraction throughput: images/s from JPEG files on disk to vectors in the index, with the time a
Perfect-500K-sized catalogue (520,000 images) takes at that rate, against the goal of 5 minutes.

The visrec path is what ``visrec products search`` runs after the network: the post-processing chain's
query side (none configured here), the FAISS search, and the row -> catalogue id mapping. Raw FAISS is
``IndexFlatIP.search`` on the same index. Both are exact (Flat) unless --factory says otherwise.

Extraction (``--extract N``): N JPEG files -- synthetic products (``visrec.data.synth_products``,
``--distinct`` renders of ``--render-size`` px, copied to N files; decoding costs the same for a copy), or the
first N images of ``--catalogue-dir`` -- indexed by the path ``visrec products index`` runs
(``build_catalogue_index``: loader threads read, decode and preprocess batches ahead of the descriptor, the
descriptor, the shards, descriptors.npy, FAISS Flat), once per ``--device`` (the descriptor in PyTorch) and per
``--providers`` (its ONNX export in ONNX Runtime: cpu, cuda, tensorrt, auto). A provider this onnxruntime lacks
(onnxruntime-gpu absent) is a row saying it was not measured. The descriptor (random weights: the rate does not
depend on them) is loaded first and its load time shown apart; a warm-up index of two batches runs before the
timed one (CUDA context, cuDNN, a TensorRT engine build). N is rounded up to whole batches. Rate = N / the timed
index build; 520,000 images at that rate = 520,000 / rate, plus nothing for the fixed costs. Without FAISS the
timed path ends at the descriptors on disk (the row says so; a Flat index adds 520K vectors in a memory copy).
Two more lines say which side bounds the rate: the loader threads alone (every batch read, decoded and
preprocessed, no descriptor) and, per runtime, the descriptor alone (one prepared batch described over and
over: the copy to the device, the network, the copy back); on CUDA also that rate in NCHW (extraction runs
NHWC: what the layout buys) and with bfloat16 autocast on top of NHWC, which extraction does not use.

    python benchmarks/products_search.py --catalogue 500000 --dims 512 2048 --queries 2000
    python benchmarks/products_search.py --dims --extract 8192 --backbone resnet50 --size 224 --batch 256 \
        --device cuda --providers cuda tensorrt          # --dims with no value: extraction only
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def search_bench(n: int, d: int, queries: int, k: int, factory: str, repeats: int) -> tuple[float, float]:
    import faiss

    from visrec.index.faiss_index import FaissIndex
    from visrec.index.postprocess import Chain

    cat, q = unit(n, d, 0), unit(queries, d, 1)
    index = FaissIndex(d, factory).build(cat)
    ids = [f"id{i:07d}" for i in range(n)]
    chain = Chain([])

    def visrec_search():
        scores, rows = index.search(chain.queries(q), k)
        return [[ids[r] for r in row if r >= 0] for row in rows]

    def faiss_search():
        return index.index.search(q, k)

    assert faiss.omp_get_max_threads() >= 1
    best = {}
    for name, fn in (("faiss", faiss_search), ("visrec", visrec_search)) * repeats:
        t = time.perf_counter()
        fn()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
    return queries / best["visrec"], queries / best["faiss"]


PERFECT_500K = 520_000  # catalogue images of Perfect-500K (the ACM MM'19 AI Meets Beauty challenge)
GOAL_MINUTES = 5.0


def write_catalogue(folder, images: int, distinct: int, render_size: int, source=None) -> int:
    """``images`` JPEG files in ``folder``: the first of ``source`` (a catalogue folder, linked), else ``distinct``
    synthetic product renders (visrec.data.synth_products) copied round robin. Returns how many are there."""
    import math
    import os
    from pathlib import Path

    from visrec.data.products import list_images
    from visrec.data.synth_products import write_product_dataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        found = list_images(source)[:images]
        for image_id, path in found:
            os.symlink(Path(path).resolve(), folder / path.name)
        return len(found)
    synth = folder.parent / (folder.name + "-distinct")
    shutil.rmtree(synth, ignore_errors=True)  # this benchmark's own scratch set: synth refuses a held data set
    per_family = 4 * 3  # products per family x catalogue variants
    write_product_dataset(synth, families=math.ceil(min(distinct, images) / per_family), products_per_family=4,
                          variants=3, queries_per_product=0, size=render_size)
    blobs = [p.read_bytes() for _, p in list_images(synth / "catalogue")][:distinct]
    for i in range(images):
        (folder / f"c{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    return images


def save_descriptor(work, backbone: str, size: int, dim: int | None):
    """A product descriptor with random weights as a visrec checkpoint ``work/model.pt``."""
    import torch

    from visrec._torchfile import atomic_save
    from visrec.models import build_backbone
    from visrec.models.model_file import default_contract

    cfg = {"name": "product", "backbone": backbone, **({"dim": dim} if dim else {})}
    torch.manual_seed(0)
    net = build_backbone(**cfg).eval()
    contract = default_contract(net, cfg, image_size=size)
    atomic_save({"model_config": cfg, "backbone": net.state_dict(), "contract": contract.to_dict()}, work / "model.pt")
    return work / "model.pt"


def load_descriptor(work, checkpoint, runtime: str, choice: str):
    """(module, model config, what runs it, seconds to load) for PyTorch on ``choice`` (a device) or ONNX
    Runtime on ``choice`` (providers; the checkpoint exported to ``work/model.onnx`` on first use)."""
    import torch

    from visrec.errors import ConfigError
    from visrec.index.catalogue import OnnxDescriptor
    from visrec.models.model_file import load_backbone

    t = time.perf_counter()
    if runtime == "torch":
        device = ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {choice}: torch.cuda.is_available() is False on this machine")
        model, cfg = load_backbone(checkpoint)
        model.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return model, cfg, device, f"PyTorch on {device}", time.perf_counter() - t
    _has_provider(choice)
    onnx_path = work / "model.onnx"
    if not onnx_path.exists():
        from visrec.export import export_checkpoint

        export_checkpoint(checkpoint, onnx_path)
        t = time.perf_counter()
    model = OnnxDescriptor(onnx_path, choice)
    return model, model.model_config, "cpu", model.runtime, time.perf_counter() - t


def _has_provider(choice: str) -> None:
    """A ConfigError in one line when ``choice`` names a GPU provider this onnxruntime lacks."""
    from visrec._onnx import CUDA, TENSORRT, available_providers, parse_providers
    from visrec.errors import ConfigError

    spec = parse_providers(choice)
    wanted = [{"cuda": CUDA, "tensorrt": TENSORRT}.get(spec.word)] if spec.word else list(spec.names)
    missing = [p for p in wanted if p is not None and p not in available_providers()]
    if missing:
        import onnxruntime

        raise ConfigError(f"onnxruntime {onnxruntime.__version__} here has no {missing[0]}: onnxruntime-gpu is "
                          f"absent (pip install 'visrec[gpu]' in place of onnxruntime)")


def time_index(catalogue, out, model, cfg, opts, device) -> tuple[float, int, bool]:
    """(seconds, images indexed, whether FAISS built the index) of indexing ``catalogue`` into ``out``."""
    import importlib.util

    from visrec.data.products import list_images
    from visrec.index.catalogue import build_catalogue_index, extract_descriptors

    t = time.perf_counter()
    if importlib.util.find_spec("faiss") is not None:
        count = build_catalogue_index(catalogue, out, model, cfg, opts, device=device)["count"]
        return time.perf_counter() - t, count, True
    ids, vectors, _ = extract_descriptors(model, list_images(catalogue), out, opts, device=device)
    np.save(out / "descriptors.npy", vectors.astype(opts.dtype))
    return time.perf_counter() - t, len(ids), False


def extract_bench(a) -> list[dict]:
    """One row per --device and --providers: the timed index build of --extract JPEG files (module doc); each
    row's line is printed as soon as it is measured (a step killed by its time limit keeps the rows before)."""
    import shutil
    import tempfile
    from pathlib import Path

    from visrec.errors import VisrecError
    from visrec.index.catalogue import IndexOptions, loader_threads

    n = -(-a.extract // a.batch) * a.batch
    opts = IndexOptions(size=a.size, batch_size=a.batch, shard_size=a.batch * max(1, 1024 // a.batch),
                        workers=a.workers)
    rows = []
    with tempfile.TemporaryDirectory(prefix="visrec-extract-", dir=a.work) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        n = write_catalogue(work / "catalogue", n, a.distinct, a.render_size, a.catalogue_dir)
        source = f"the first images of {a.catalogue_dir}" if a.catalogue_dir else (
            f"{a.distinct} synthetic {a.render_size} px product renders copied round robin")
        print(f"JPEG files: {n:,}, {source}; {time.perf_counter() - t:.1f} s to write them (not timed)", flush=True)
        warm = work / "warm"
        warm.mkdir()
        for p in sorted((work / "catalogue").iterdir())[:2 * a.batch]:
            shutil.copyfile(p, warm / p.name)
        checkpoint = save_descriptor(work, a.backbone, a.size, a.dim)
        plan = [("torch", d) for d in a.device] + [("onnxruntime", p) for p in a.providers]
        for i, (runtime, choice) in enumerate(plan):
            row = {"runtime": runtime, "choice": choice, "images": n, "workers": loader_threads(opts),
                   "batch": a.batch}
            try:
                model, cfg, device, row["ran_on"], row["load_s"] = load_descriptor(work, checkpoint, runtime, choice)
                time_index(warm, work / f"warm-{i}", model, cfg, opts, device)
                row["seconds"], row["indexed"], row["faiss"] = time_index(work / "catalogue", work / f"index-{i}",
                                                                          model, cfg, opts, device)
            except (VisrecError, ImportError) as exc:  # no such provider / device, no onnx to export with
                row["skipped"] = str(exc).splitlines()[0]
            rows.append(row)
            print(row_line(row), flush=True)
            shutil.rmtree(work / f"index-{i}", ignore_errors=True)
            if "skipped" not in row:
                print(f"  bound: the descriptor alone ({row['ran_on']}): "
                      f"{descriptor_alone(model, work / 'catalogue', opts, device):,.1f} images/s", flush=True)
                if runtime == "torch" and str(device).startswith("cuda"):
                    descriptor_levers(model, work / "catalogue", opts, device)
        print(f"  bound: the {loader_threads(opts)} loader threads alone (read, decode, preprocess; no descriptor): "
              f"{loader_alone(work / 'catalogue', opts):,.1f} images/s", flush=True)
    return rows


def loader_alone(catalogue, opts) -> float:
    """Images/s of the loader threads over every batch of ``catalogue``, nothing consuming them but this loop."""
    from visrec.data.products import list_images
    from visrec.index.catalogue import _batches_ahead

    items = list_images(catalogue)
    t = time.perf_counter()
    done = sum(len(ids) for ids, _, _ in _batches_ahead([items[b:b + opts.batch_size]
                                                         for b in range(0, len(items), opts.batch_size)], opts))
    return done / (time.perf_counter() - t)


def descriptor_levers(model, catalogue, opts, device) -> None:
    """On CUDA, the descriptor alone in the other layout (NCHW; extraction runs NHWC, ``for_inference``) and with
    bfloat16 autocast on top of NHWC (measurements only: extraction does not autocast). The model is put back
    in NHWC after."""
    import torch

    model.to(memory_format=torch.contiguous_format)
    try:
        print(f"  lever: the descriptor alone in NCHW (extraction runs NHWC): "
              f"{descriptor_alone(model, catalogue, opts, device):,.1f} images/s", flush=True)
    finally:
        model.to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print(f"  lever: the descriptor alone in NHWC + bf16 autocast: "
              f"{descriptor_alone(model, catalogue, opts, device):,.1f} images/s", flush=True)


def descriptor_alone(model, catalogue, opts, device, repeats: int = 8) -> float:
    """Images/s of ``describe`` on one prepared batch of ``catalogue``, ``repeats`` times (after one untimed)."""
    from visrec.data.products import list_images
    from visrec.index.catalogue import _load_batch
    from visrec.models.inference import describe

    _, prepared, _ = _load_batch(list_images(catalogue)[:opts.batch_size], opts)
    describe(model, prepared, opts.size, opts.multiscale, device)
    t = time.perf_counter()
    for _ in range(repeats):
        describe(model, prepared, opts.size, opts.multiscale, device)  # returns NumPy: synchronised each time
    return repeats * len(prepared.scales[0]) / (time.perf_counter() - t)


def row_figures(r: dict) -> tuple[float, float, str, str]:
    """(images/s, minutes for PERFECT_500K images, met | not met, where it ran) of a measured row."""
    rate = r["indexed"] / r["seconds"]
    minutes = PERFECT_500K / rate / 60
    where = r["ran_on"] + ("" if r["faiss"] else " (FAISS absent: to descriptors on disk)")
    return rate, minutes, "met" if minutes < GOAL_MINUTES else "not met", where


def row_line(r: dict) -> str:
    if "skipped" in r:
        return f"extraction {r['runtime']} {r['choice']}: not measured: {r['skipped']}"
    rate, minutes, met, where = row_figures(r)
    return (f"extraction {r['runtime']} {r['choice']} ({where}, {r['indexed']:,} JPEGs, {r['workers']} loader "
            f"threads, batch {r['batch']}): {rate:,.1f} images/s; {PERFECT_500K:,} images in {minutes:,.1f} min "
            f"(goal < {GOAL_MINUTES:g} min: {met}); descriptor load {r['load_s']:.1f} s, not extrapolated")


def report_extraction(rows: list[dict], a) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"catalogue extraction: JPEG files on disk -> vectors in the index ({a.backbone} at {a.size} px, "
                    f"batch {a.batch}); {PERFECT_500K:,} images (Perfect-500K) extrapolated, goal < "
                    f"{GOAL_MINUTES:g} min end to end")
    for col in ("runtime", "asked", "ran on", "images", "loader threads", "seconds", "images/s",
                f"{PERFECT_500K:,} images", f"goal < {GOAL_MINUTES:g} min"):
        t.add_column(col, justify="right" if col in ("images", "seconds", "images/s") else "left")
    for r in rows:
        if "skipped" in r:
            t.add_row(r["runtime"], escape(r["choice"]), "not measured", "", "", "", "", "", escape(r["skipped"]))
            continue
        rate, minutes, met, where = row_figures(r)
        t.add_row(r["runtime"], escape(r["choice"]), escape(where), f"{r['indexed']:,}", str(r["workers"]),
                  f"{r['seconds']:.2f}", f"{rate:,.1f}", f"{minutes:,.1f} min", met)
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalogue", type=int, default=500_000)
    ap.add_argument("--dims", type=int, nargs="*", default=[512, 2048], help="search benchmark dims (none: skip it)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extract", type=int, default=0, help="JPEG files for the extraction benchmark (0 = skip)")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--dim", type=int, default=None, help="descriptor FC size (default: the backbone's channels)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="loader threads (default: the cores, at most 16)")
    ap.add_argument("--device", nargs="*", default=["cpu"], help="PyTorch devices to time: cpu cuda auto ...")
    ap.add_argument("--providers", nargs="*", default=[], help="ONNX Runtime choices to time: cpu cuda tensorrt auto")
    ap.add_argument("--distinct", type=int, default=240, help="distinct synthetic renders")
    ap.add_argument("--render-size", type=int, default=512, help="side of the synthetic JPEGs, pixels")
    ap.add_argument("--catalogue-dir", default=None, help="take the JPEGs from this catalogue folder instead")
    ap.add_argument("--work", default=None, help="folder for the temporary catalogue and indexes")
    a = ap.parse_args()
    for d in a.dims:
        v, f = search_bench(a.catalogue, d, a.queries, a.k, a.factory, a.repeats)
        print(f"search {a.catalogue:,} x {d}-d {a.factory}, {a.queries} queries, k={a.k}: visrec {v:,.0f} q/s, "
              f"raw FAISS {f:,.0f} q/s, ratio {v / f:.3f}")
    if a.extract:
        report_extraction(extract_bench(a), a)


if __name__ == "__main__":
    main()
