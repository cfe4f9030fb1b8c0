"""Product catalogue index: images -> descriptors (resumable) -> post-processing chain -> FAISS -> search.

An index directory holds:
  manifest.json        model config, descriptor dimension, options, counts, unreadable images by id
  descriptor.pt        the descriptor network ({model_config, backbone}, the visrec checkpoint layout), or
  descriptor.onnx      the ONNX descriptor the catalogue was described with (``visrec export`` of a product
                       checkpoint), which ONNX Runtime runs on the queries too
  shards/              extraction shards ``shard-NNNNN.npz`` (ids, vectors); a crash mid-catalogue keeps
                       every finished shard and the next run continues after the last one
  descriptors.npy      raw catalogue descriptors (float16 or float32, rows = ids.txt), L2-normalised
  ids.txt              catalogue ids, one per line, row order
  chain.pt             the fitted post-processing stages (tensors only); a stage the catalogue could not
                       support was shrunk, and manifest.json lists why under ``postprocess_adjustments``
  index.faiss          the FAISS index over the post-processed catalogue

Descriptors: ``preprocess_product`` (white square padding, resize to ``size``, ImageNet normalisation),
the network, and with ``multiscale`` the L2-normalised sum of the descriptors at each scale.

Extraction feeds the network from ``workers`` loader threads (``index.workers``; default: the cores, at most 16):
each reads, decodes and preprocesses a batch of ``batch_size`` consecutive catalogue images (OpenCV and NumPy
release the GIL), a few batches ahead of the network, across shard boundaries; the network sees one
:class:`~visrec.models.inference.PreparedBatch` per batch (uint8 squares: one copy to the device per batch and
scale, normalised there, one copy back). The network is a PyTorch descriptor on ``device`` (``cpu``, ``cuda``,
``cuda:N``, ``auto``), or an ONNX descriptor on ONNX Runtime's execution ``providers`` (:mod:`visrec._onnx`:
``cpu``, ``cuda``, ``tensorrt``, ``auto``). A batch is the ``batch_size`` images at those positions in the
shard, less the unreadable ones.

Across processes (``group``: a torch.distributed process group; ``visrec products index`` under torchrun):
rank r describes the extraction shards s with s % world == r — the shards, and the batches inside them, that
one process would form — and writes them into the same ``shards/`` folder (so ``--out`` must be a folder every
rank sees). Rank 0 then joins every shard in catalogue order, as a resumed single-process run does, and builds
the rest: the same ids in the same order and the same descriptor bits as one process (on CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from visrec._npz import load_npz
from visrec._onnx import describe_providers, parse_providers
from visrec._torchfile import atomic_save
from visrec.config import load_config, set_dotted, validate_section
from visrec.data.products import list_images, load_catalogue_images, read_image_checked, write_submission
from visrec.errors import ConfigError, DataError
from visrec.index.faiss_index import FaissIndex
from visrec.index.postprocess import Chain
from visrec.models import build_backbone
from visrec.models.embed import for_inference
from visrec.models.inference import PreparedBatch, describe, prepare_batch
from visrec.models.loading import load_model
from visrec.models.model_file import default_contract, load_backbone
from visrec.distributed import broadcast_module, from_rank_zero, gather_objects, on_every_rank, rank_and_size

MANIFEST = "manifest.json"


class IndexOptions(BaseModel):
    """The ``index`` section of a products config."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(224, gt=0, description="input side in pixels after white square padding")
    multiscale: list[float] | None = Field(None, description="e.g. [1.0, 0.707, 1.414]")
    batch_size: int = Field(32, gt=0)
    dtype: str = Field("float16", pattern="^(float16|float32)$", description="stored raw descriptors")
    factory: str = Field("Flat", description="FAISS index_factory string (Flat = exact)")
    nprobe: int | None = Field(None, gt=0)
    shard_size: int = Field(1024, gt=0, description="images per extraction shard (resume granularity)")
    postprocess: list[dict] = Field(default_factory=list, description="ordered stages: whiten, dba, qe, diffusion")
    strict: bool = Field(False, description="fail on the first unreadable catalogue image")
    workers: int | None = Field(None, ge=0, le=256, description="threads that read, decode and preprocess "
                                "catalogue images ahead of the network (default: the cores, at most 16; 0: in "
                                "the calling thread); how the index is built, not what it is: not in the manifest")


def loader_threads(opts: IndexOptions) -> int:
    """The loader threads of ``opts`` (``workers``; default the cores, at most 16)."""
    return opts.workers if opts.workers is not None else min(16, os.cpu_count() or 1)


class OnnxDescriptor(torch.nn.Module):
    """A product descriptor exported to ONNX (``visrec export`` of a product checkpoint, its contract in the
    file), run by ONNX Runtime where the extraction and search take a module: float32 (N, 3, S, S) on the CPU
    -> (N, D) float32. ``providers``: the execution providers (:mod:`visrec._onnx`). ``input_size``: the
    (height, width) the file fixes, or None when they are free. No parameters: nothing to broadcast."""

    def __init__(self, path: str | Path, providers=None):
        super().__init__()
        self.path = Path(path)
        loaded = load_model(self.path, providers=providers)
        if loaded.contract.task != "product-embedding" or not hasattr(loaded, "onnx"):
            raise DataError(f"a {loaded.contract.task} model, not a product descriptor (export a product "
                            f"checkpoint with visrec export)", path=self.path)
        self.loaded = loaded
        self.session = loaded.onnx.session
        shape = list(self.session.get_inputs()[0].shape)
        hw = [d if isinstance(d, int) else None for d in shape[2:]] if len(shape) == 4 else [None, None]
        self.input_size = tuple(hw) if None not in hw else None
        self.model_config = dict(loaded.contract.arch or {"name": f"onnx:{self.path.name}"})
        side = self.input_size or (64, 64)
        self.dim = int(loaded.contract.embedding_dim or self(torch.zeros(1, 3, *side)).shape[1])

    @property
    def runtime(self) -> str:
        return describe_providers(self.session)

    def check_options(self, opts: IndexOptions) -> None:
        """The file must take the inputs ``opts`` makes: ``size`` x ``size``, and every multiscale size."""
        if self.input_size is None:
            return
        sizes = {int(round(opts.size * s)) for s in (opts.multiscale or [1.0])}
        if sizes != {self.input_size[0]} or self.input_size[0] != self.input_size[1]:
            raise ConfigError(f"{self.path} takes {self.input_size[0]}x{self.input_size[1]} inputs (its export "
                              f"fixes them), the index options make {sorted(sizes)} px: set index.size="
                              f"{self.input_size[0]} without index.multiscale, or index with the checkpoint")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.loaded.onnx(x.detach().cpu().numpy()), np.float32))


def _load_batch(items: Sequence[tuple[str, Path]], opts: IndexOptions
                ) -> tuple[list[str], PreparedBatch | None, list[tuple[str, str]]]:
    """(ids, prepared batch or None when none was readable, unreadable (id, reason)) of one batch's items;
    with ``opts.strict`` the first unreadable image raises ``DataError`` naming it."""
    bad: list[tuple[str, str]] = []
    loaded = list(load_catalogue_images(items, strict=opts.strict, bad=bad))
    prepared = prepare_batch([im for _, im in loaded], opts.size, opts.multiscale) if loaded else None
    return [i for i, _ in loaded], prepared, bad


def _batches_ahead(batches: Sequence[Sequence[tuple[str, Path]]], opts: IndexOptions
                   ) -> Iterator[tuple[list[str], PreparedBatch | None, list[tuple[str, str]]]]:
    """:func:`_load_batch` of each batch, in order, made by :func:`loader_threads` threads at most that many
    batches (plus two) ahead of the caller; close the generator to stop them."""
    workers = loader_threads(opts)
    if workers == 0:
        for b in batches:
            yield _load_batch(b, opts)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="visrec-catalogue")
    try:
        todo = iter(batches)
        pending = deque(pool.submit(_load_batch, b, opts) for b in islice(todo, workers + 2))
        while pending:
            done = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_load_batch, nxt, opts))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract_descriptors(model: torch.nn.Module, items: Sequence[tuple[str, Path]], out_dir: str | Path,
                        opts: IndexOptions, *, device="cpu", progress: Callable[[int], None] | None = None,
                        rank: int = 0, world_size: int = 1) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Descriptors of every readable catalogue image, in shards under ``out_dir/shards`` (see module doc).

    Returns ``(ids, vectors float32, bad)``; ``bad`` lists ``(id, reason)`` of unreadable images (with
    ``opts.strict`` the first one raises). Finished shards whose id list matches are reused, so a rerun
    after a crash only computes what is missing. ``progress(n)`` is called with images done. With
    ``world_size`` > 1 only the shards s with s % world_size == rank are computed (or reused) and returned;
    :func:`join_shards` reads all of them back once every rank is done. Images are read, decoded and
    preprocessed by loader threads ahead of the network (module doc).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for_inference(model, device)
    mine = []  # (shard path, its items, the finished shard to reuse or None)
    for s, start in enumerate(range(0, len(items), opts.shard_size)):
        if s % world_size != rank:
            continue
        chunk = list(items[start:start + opts.shard_size])
        path = shard_dir / f"shard-{s:05d}.npz"
        z = _finished_shard(path) if path.exists() else None
        mine.append((path, chunk, z if z is not None and list(z["requested"]) == [i for i, _ in chunk] else None))
    size = opts.batch_size
    batches = _batches_ahead([chunk[b:b + size] for _, chunk, z in mine if z is None
                              for b in range(0, len(chunk), size)], opts)
    ids_all, vecs_all, bad_all = [], [], []
    try:
        for path, chunk, z in mine:
            if z is not None:
                ids_all += list(z["ids"])
                vecs_all.append(z["vectors"].astype(np.float32))
                bad_all += list(zip(z["bad_ids"].tolist(), z["bad_reasons"].tolist()))
                if progress:
                    progress(len(chunk))
                continue
            ids, vecs, bad = [], [], []
            for _ in range(0, len(chunk), size):
                batch_ids, prepared, batch_bad = next(batches)
                bad += batch_bad
                if prepared is not None:
                    vecs.append(describe(model, prepared, opts.size, opts.multiscale, device))
                    ids += batch_ids
                    if progress:
                        progress(len(batch_ids))
            if progress and bad:
                progress(len(bad))
            vectors = np.concatenate(vecs) if vecs else np.zeros((0, getattr(model, "dim", 0)), np.float32)
            tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, requested=np.array([i for i, _ in chunk]), ids=np.array(ids, dtype=str),
                     vectors=vectors.astype(opts.dtype), bad_ids=np.array([b[0] for b in bad], dtype=str),
                     bad_reasons=np.array([b[1] for b in bad], dtype=str))
            os.replace(tmp, path)  # a shard exists complete or not at all
            ids_all += ids
            vecs_all.append(vectors.astype(opts.dtype).astype(np.float32))
            bad_all += bad
    finally:
        batches.close()
    return _joined(ids_all, vecs_all, bad_all)


def join_shards(items: Sequence[tuple[str, Path]], out_dir: str | Path, opts: IndexOptions
                ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Every extraction shard of ``items`` read back in catalogue order — what :func:`extract_descriptors`
    returns in one process. Each shard must be finished and hold exactly its images' ids: a missing one is an
    error naming it (the ranks of a sharded run must write into one folder they all see)."""
    shard_dir = Path(out_dir) / "shards"
    ids_all, vecs_all, bad_all = [], [], []
    for s, start in enumerate(range(0, len(items), opts.shard_size)):
        path = shard_dir / f"shard-{s:05d}.npz"
        expected = [i for i, _ in items[start:start + opts.shard_size]]
        z = _finished_shard(path) if path.exists() else None
        if z is None or list(z["requested"]) != expected:
            state = "missing" if not path.exists() else "unfinished or not of these images"
            raise DataError(f"extraction shard {state} after every rank finished: the ranks must write into one "
                            "--out folder that all of them see (a shared filesystem)", path=path)
        ids_all += list(z["ids"])
        vecs_all.append(z["vectors"].astype(np.float32))
        bad_all += list(zip(z["bad_ids"].tolist(), z["bad_reasons"].tolist()))
    return _joined(ids_all, vecs_all, bad_all)


def _joined(ids_all, vecs_all, bad_all) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    dim = vecs_all[0].shape[1] if vecs_all else 0
    vectors = np.concatenate(vecs_all) if vecs_all else np.zeros((0, dim), np.float32)
    return [str(i) for i in ids_all], vectors, [(str(a), str(b)) for a, b in bad_all]


def build_catalogue_index(catalogue: str | Path, out_dir: str | Path, model: torch.nn.Module, model_config: dict,
                          opts: IndexOptions, *, device="cpu", progress=None, group=None) -> dict:
    """Index every image of ``catalogue`` (a folder of ``<id>.jpg``) into ``out_dir``; returns the manifest.

    ``group``: run as the ranks of this torch.distributed process group (module doc); every rank calls this
    with the same catalogue and options, each describes its shards (``progress`` hears this rank's images),
    rank 0 builds the index, and every rank returns its manifest."""
    rank, world = rank_and_size(group)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chain = Chain.from_config(opts.postprocess)  # config errors before hours of extraction
    if isinstance(model, OnnxDescriptor):
        model.check_options(opts)
    items = list_images(catalogue)
    if not items:
        raise DataError("no catalogue images (.jpg/.jpeg/.png)", path=catalogue)
    if world > 1:
        _same_catalogue_everywhere(items, opts, group)
        broadcast_module(model, group)  # rank 0's weights everywhere (a random head differs per rank otherwise)

    if rank == 0:
        _save_descriptor(model, model_config, opts, out)
    if world == 1:
        return _finish(catalogue, out, model_config, opts, chain,
                       extract_descriptors(model, items, out, opts, device=device, progress=progress))
    on_every_rank("describing the catalogue", lambda: extract_descriptors(
        model, items, out, opts, device=device, progress=progress, rank=rank, world_size=world), group)
    return from_rank_zero("building the catalogue index",
                          lambda: _finish(catalogue, out, model_config, opts, chain, join_shards(items, out, opts)),
                          group)


def _save_descriptor(model: torch.nn.Module, model_config: dict, opts: IndexOptions, out: Path) -> None:
    """``descriptor.pt`` (a PyTorch descriptor) or ``descriptor.onnx`` (a copy of an ONNX one) into ``out``, the
    other one removed: what :class:`CatalogueIndex` runs on the queries."""
    if isinstance(model, OnnxDescriptor):
        tmp = out / ".descriptor.onnx.tmp"
        shutil.copyfile(model.path, tmp)
        os.replace(tmp, out / "descriptor.onnx")
        (out / "descriptor.pt").unlink(missing_ok=True)
        return
    contract = default_contract(model, model_config, image_size=opts.size, origin="visrec-checkpoint")
    atomic_save({"model_config": model_config, "backbone": model.state_dict(), "contract": contract.to_dict()},
                out / "descriptor.pt")
    (out / "descriptor.onnx").unlink(missing_ok=True)


def _same_catalogue_everywhere(items, opts: IndexOptions, group) -> None:
    """Every rank must shard the same image list the same way, or the join would mix catalogues."""
    mine = (hashlib.sha256("\n".join(f"{i}\t{p.name}" for i, p in items).encode()).hexdigest(), len(items),
            opts.shard_size, opts.batch_size)
    every = gather_objects(mine, group)
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            raise DataError(f"rank {r} sees {theirs[1]} catalogue images (shard_size {theirs[2]}, batch_size "
                            f"{theirs[3]}) and rank 0 {every[0][1]} (shard_size {every[0][2]}, batch_size "
                            f"{every[0][3]}), or other ids: every rank must index the same catalogue with the same "
                            "options")


def _finish(catalogue, out: Path, model_config: dict, opts: IndexOptions, chain: Chain, extracted) -> dict:
    """From the joined descriptors: descriptors.npy, ids.txt, the fitted chain, the FAISS index, the manifest."""
    ids, raw, bad = extracted
    if not ids:
        raise DataError("no catalogue image could be read", path=catalogue)
    np.save(out / "descriptors.npy", raw.astype(opts.dtype))
    (out / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    processed = chain.fit(raw)  # may shrink an ill-posed stage, with a PostprocessWarning (postprocess module doc)
    chain.save(out / "chain.pt")
    FaissIndex(processed.shape[1], opts.factory, opts.nprobe).build(processed).save(out / "index.faiss")
    manifest = {"model_config": model_config, "dim": int(raw.shape[1]), "index_dim": int(processed.shape[1]),
                "count": len(ids), "unreadable": [{"id": i, "reason": r} for i, r in bad],
                "catalogue": str(Path(catalogue).resolve()), "options": opts.model_dump(exclude={"workers"}),
                "postprocess_adjustments": chain.adjustments}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _finished_shard(path: Path) -> dict | None:
    """A shard an earlier run finished, or None when it is unreadable or incomplete (it is computed again)."""
    try:
        z = load_npz(path, "catalogue shard")
    except DataError:
        return None
    return z if {"requested", "ids", "vectors", "bad_ids", "bad_reasons"} <= set(z) else None


class CatalogueIndex:
    """An index directory opened for search. Its descriptor runs the queries: ``descriptor.pt`` in PyTorch on
    ``device``, or ``descriptor.onnx`` in ONNX Runtime on the execution ``providers`` (:mod:`visrec._onnx`;
    None: the CPU). ``runtime`` says which."""

    def __init__(self, index_dir: str | Path, device="cpu", providers=None):
        self.dir = Path(index_dir)
        if not (self.dir / MANIFEST).exists():
            raise DataError("not a catalogue index (no manifest.json); build one with visrec products index",
                            path=self.dir)
        try:
            self.manifest = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
            self.opts = load_index_options(self.manifest["options"], str(self.dir / MANIFEST))
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise DataError(f"not a readable catalogue index manifest: {exc}", path=self.dir / MANIFEST) from None
        if (self.dir / "descriptor.onnx").is_file() and not (self.dir / "descriptor.pt").exists():
            self.model = OnnxDescriptor(self.dir / "descriptor.onnx", providers)
            self.device = "cpu"
            self.runtime = self.model.runtime
        else:
            self.model, _ = load_backbone(self.dir / "descriptor.pt")
            self.device = device
            for_inference(self.model, device)
            self.runtime = f"PyTorch on {device}"
        try:
            self.ids = (self.dir / "ids.txt").read_text(encoding="utf-8").split("\n")[:-1]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the catalogue ids: {exc}", path=self.dir / "ids.txt") from None
        self.chain = Chain.from_config(self.opts.postprocess).load(self.dir / "chain.pt")
        self.faiss = FaissIndex.load(self.dir / "index.faiss", self.opts.nprobe)
        if len(self.faiss) != len(self.ids):
            raise DataError(f"index holds {len(self.faiss)} vectors but ids.txt {len(self.ids)}", path=self.dir)

    def search_vectors(self, descriptors: np.ndarray, k: int = 7) -> tuple[list[list[str]], np.ndarray]:
        """Ranked catalogue ids (best first) and scores for raw query descriptors."""
        q = self.chain.queries(descriptors)
        if self.chain.reranker is not None:
            scores, rows = self.chain.reranker.rank(q, k)
        else:
            scores, rows = self.faiss.search(q, k)
        return [[self.ids[r] for r in row if r >= 0] for row in rows], scores

    def search_images(self, images: Sequence[np.ndarray], k: int = 7) -> tuple[list[list[str]], np.ndarray]:
        return self.search_vectors(describe(self.model, images, self.opts.size, self.opts.multiscale, self.device), k)

    def _read_batches(self, items: Iterable[tuple[str, Path]], progress=None):
        """``(query id, image)`` lists of at most ``opts.batch_size``, read as they are needed; ``progress``
        hears each batch's length once the caller has used it. Unreadable images raise ``DataError``
        naming them."""
        items = iter(items)
        while batch := [(qid, read_image_checked(qid, path)) for qid, path in islice(items, self.opts.batch_size)]:
            yield batch
            if progress:
                progress(len(batch))

    def describe_items(self, items: Iterable[tuple[str, Path]], progress=None) -> tuple[list[str], np.ndarray]:
        """Raw (before post-processing) descriptors of ``(query id, path)`` pairs, in the batches
        ``search_items`` uses; unreadable images raise ``DataError`` naming them."""
        ids, vecs = [], []
        for batch in self._read_batches(items, progress):
            vecs.append(describe(self.model, [im for _, im in batch], self.opts.size, self.opts.multiscale,
                                 self.device))
            ids.extend(q for q, _ in batch)
        return ids, (np.concatenate(vecs) if vecs else np.zeros((0, self.manifest.get("dim", 0)), np.float32))

    def raw_catalogue(self) -> np.ndarray:
        """The stored raw catalogue descriptors (float32, rows = ``self.ids``), as the chain was fitted on."""
        path = self.dir / "descriptors.npy"
        try:  # memory-mapped: a header declaring more than the file holds fails instead of allocating it
            raw = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the catalogue descriptors: {exc}", path=path) from None
        if raw.dtype.kind != "f" or raw.ndim != 2 or len(raw) != len(self.ids):
            raise DataError(f"descriptors.npy holds {raw.shape} but ids.txt {len(self.ids)} ids", path=self.dir)
        return raw.astype(np.float32)

    def search_items(self, items: Iterable[tuple[str, Path]], k: int = 7, progress=None
                     ) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
        """Search ``(query id, path)`` pairs; unreadable queries raise ``DataError`` naming them."""
        ranked, scores = {}, {}
        for batch in self._read_batches(items, progress):
            ids, sc = self.search_images([im for _, im in batch], k)
            for (qid, _), row, s in zip(batch, ids, sc):
                ranked[qid], scores[qid] = row, [float(v) for v in s[:len(row)]]
        return ranked, scores


class CatalogueImages:
    """The catalogue images behind an index, by id, for showing search results: only ids the index holds, only
    files directly in the catalogue folder (a link pointing outside it is refused), at most
    :data:`MAX_SHOWN_IMAGE_BYTES` each. The folder is listed once, on the first request."""

    MEDIA = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}

    def __init__(self, index: CatalogueIndex, folder: str | Path | None = None):
        self.folder = Path(folder if folder is not None else index.manifest.get("catalogue", ""))
        self._ids = set(index.ids)
        self._paths: dict[str, Path] | None = None

    def path(self, image_id: str) -> Path | None:
        """The file of catalogue image ``image_id``; None when the index holds no such id or the file is gone."""
        if image_id not in self._ids:
            return None
        if self._paths is None:
            try:
                self._paths = {i: p for i, p in list_images(self.folder) if i in self._ids}
            except DataError:
                self._paths = {}  # the folder moved: every image is missing, each request says so
        p = self._paths.get(image_id)
        if p is None or not p.is_file():
            return None
        root = self.folder.resolve()
        if p.resolve().parent != root:
            return None
        return p

    def read(self, image_id: str) -> tuple[bytes, str] | None:
        """(bytes, media type) of catalogue image ``image_id``, or None (see :meth:`path`)."""
        p = self.path(image_id)
        if p is None or p.stat().st_size > MAX_SHOWN_IMAGE_BYTES:
            return None
        return p.read_bytes(), self.MEDIA[p.suffix.lower()]


MAX_SHOWN_IMAGE_BYTES = 20_000_000


def load_index_options(raw: dict | None, source: str = "config") -> IndexOptions:
    return validate_section(IndexOptions, raw or {}, "index", source)


def index_catalogue(catalogue: str | Path, out: str | Path, *, config: str | Path | None = None,
                    checkpoint: str | Path | None = None, overrides: dict | None = None, device: str = "cpu",
                    providers=None, progress=None, group=None) -> dict:
    """``visrec products index``: the descriptor from ``checkpoint`` (a visrec run or model.pt, run in PyTorch
    on ``device``: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` = CUDA when there is one; or an ``.onnx`` export of a
    product checkpoint, run in ONNX Runtime on ``providers``: :mod:`visrec._onnx`) or from the config's ``model``
    section (random or local/hub weights as that section says), the ``index`` options from the config
    (defaults without one, changed by ``index.*`` keys of ``overrides``); returns the manifest, with
    ``runtime`` (what ran the descriptor; not stored). ``group``: shard the extraction across the ranks of this
    torch.distributed process group (module doc). ``providers`` asking for a GPU with a PyTorch descriptor,
    or a GPU ``device`` with an ONNX one, is a ConfigError saying which option applies."""
    if config is None and checkpoint is None:
        raise ConfigError("give --config (model + index options) or --model (a trained descriptor)")
    cfg = load_config(config, overrides) if config else None
    opts = load_index_options(cfg.index if cfg else _index_overrides(overrides), str(config or "defaults"))
    spec = parse_providers(providers)
    if checkpoint is not None and Path(checkpoint).suffix.lower() == ".onnx":
        if str(device) not in ("cpu", "auto"):
            raise ConfigError(f"--device {device} places a PyTorch descriptor; {checkpoint} is ONNX, run by ONNX "
                              f"Runtime on --providers (cpu, cuda, tensorrt, auto)")
        model = OnnxDescriptor(checkpoint, spec)
        model.check_options(opts)
        model_config, device, runtime = model.model_config, "cpu", model.runtime
    else:
        if spec.explicit_gpu:
            raise ConfigError(f"--providers {spec.text} runs an ONNX descriptor (--model FILE.onnx: visrec export of "
                              f"the checkpoint); a checkpoint or config runs in PyTorch: --device cuda (or auto)")
        if checkpoint is not None:
            model, model_config = load_backbone(checkpoint)
        else:
            model_config = cfg.model.as_dict()
            model = build_backbone(cfg.model.name, **cfg.model.kwargs)
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch.cuda.is_available() is False on this machine (cpu, or "
                              f"auto: CUDA when there is one)")
        runtime = f"PyTorch on {device}"
    if not hasattr(model, "dim"):
        raise ConfigError(f"model {model_config['name']!r} is not a product descriptor (use name: product)")
    manifest = build_catalogue_index(catalogue, out, model, model_config, opts, device=device, progress=progress,
                                     group=group)
    return {**manifest, "runtime": runtime}


def _index_overrides(overrides: dict | None) -> dict:
    """The ``index`` section made of ``index.*`` overrides alone (no config): any other key is an error."""
    raw: dict = {}
    for key, value in (overrides or {}).items():
        if not key.startswith("index."):
            raise ConfigError(f"--set {key}: without --config only the index options apply (index.batch_size=64, "
                              f"index.workers=8, ...)")
        set_dotted(raw, key.removeprefix("index."), value)
    return raw


def open_for_queries(index_dir: str | Path, providers=None) -> CatalogueIndex:
    """The index opened for a command's queries: an ONNX descriptor on ``providers``; ``providers`` asking for
    a GPU when the index's descriptor runs in PyTorch is a ConfigError (it would be ignored)."""
    index = CatalogueIndex(index_dir, providers=providers)
    spec = parse_providers(providers)
    if spec.explicit_gpu and not isinstance(index.model, OnnxDescriptor):
        raise ConfigError(f"--providers {spec.text}: {index_dir} holds a PyTorch descriptor (descriptor.pt); "
                          f"--providers applies to an index built from an ONNX descriptor (descriptor.onnx)")
    return index


def search_catalogue(index_dir: str | Path, query: str | Path, k: int = 7, submission: str | Path | None = None,
                     providers=None) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """``visrec products search``: one image or a folder of images -> ranked ids and scores per query id
    (the file stem); ``submission`` writes the challenge CSV. ``providers``: where an index's ONNX descriptor
    runs (:func:`open_for_queries`)."""
    query = Path(query)
    if not query.exists():
        raise DataError("query image or folder not found", path=query)
    items = list_images(query) if query.is_dir() else [(query.stem, query)]
    ranked, scores = open_for_queries(index_dir, providers).search_items(items, k)
    if submission is not None:
        write_submission(submission, ranked, k)
    return ranked, scores
