"""Product catalogue index: images -> descriptors (resumable) -> post-processing chain -> FAISS -> search.

An index directory holds:
  manifest.json        model config, descriptor dimension, options, counts, unreadable images by id, and
                       ``files``: the name, size and digest of every file below it was written with
  descriptor.pt        the descriptor network ({model_config, backbone}, the visrec checkpoint layout), or
  descriptor.onnx      the ONNX descriptor the catalogue was described with (``visrec export`` of a product
                       checkpoint), which ONNX Runtime runs on the queries too
  shards/              extraction shards ``shard-NNNNN.npz`` (ids, vectors, and the record of what made them);
                       a crash mid-catalogue keeps every finished shard and the next run reuses a shard only
                       when its record matches that run: the descriptor (SHA-256 of its weights and
                       structure, or of its ONNX file), the options that change a descriptor (``size``,
                       ``multiscale``, ``dtype``) and each image file (name, size, mtime_ns), and only when it
                       holds each of its images' ids once and a finite vector per described id. Anything else,
                       a shard without a record included, is described again
  descriptors.npy      raw catalogue descriptors (float16 or float32, rows = ids.txt), L2-normalised
  ids.txt              catalogue ids, one per line, row order
  chain.pt             the fitted post-processing stages (tensors only); a stage the catalogue could not
                       support was shrunk, and manifest.json lists why under ``postprocess_adjustments``
  index.faiss          the FAISS index over the post-processed catalogue

A build writes the index files into a temporary folder inside the index directory, checks them, and moves
them in only once every one is written, ``manifest.json`` last: a build that fails (a bad option, an
unreadable catalogue, FAISS refusing the vectors) leaves the previous index as it was. The options are checked
(the FAISS factory string included) before any image is read. :class:`CatalogueIndex` refuses a folder whose
files are not the ones its manifest records (a build killed while it moved them in, a file changed by hand).

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
import math
import os
import shutil
import tempfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visrec._files import check_regular_file, replacing, writing_into
from visrec._npz import load_npz
from visrec._onnx import describe_providers, parse_providers
from visrec._structured import MAX_METADATA_FILE_BYTES, loads_json
from visrec._torchfile import atomic_save
from visrec.config import load_config, set_dotted, validate_section
from visrec.data.products import (PRODUCT_SUFFIXES, id_problem, list_images, load_catalogue_images,
                                  read_image_checked, write_submission)
from visrec.data.text import FolderClaim, check_apart, check_output, read_text
from visrec.errors import ConfigError, DataError, shown
from visrec.index.faiss_index import FaissIndex
from visrec.index.postprocess import FINITE_CHECK_ROWS, Chain, PCAWhitening
from visrec.models import build_backbone
from visrec.models.embed import for_inference
from visrec.models.inference import PreparedBatch, describe, prepare_batch
from visrec.models.loading import load_model
from visrec.models.contract import MAX_EMBEDDING_DIM, MAX_INPUT_SIDE
from visrec.models.model_file import default_contract, load_backbone, load_checkpoint
from visrec.distributed import broadcast_module, from_rank_zero, gather_objects, on_every_rank, rank_and_size

MANIFEST = "manifest.json"


MAX_MULTISCALE = 8  # scales per image: each is a forward pass per catalogue image and query
MAX_NPROBE = 1 << 20  # IVF lists a search visits: no factory string worth building has more lists


class IndexOptions(BaseModel):
    """The ``index`` section of a products config (and ``options`` of an index's manifest.json, which is
    untrusted: every size is bounded, the post-processing stages and their parameters are checked)."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(224, gt=0, le=MAX_INPUT_SIDE, description="input side in pixels after white square padding "
                      f"(at most {MAX_INPUT_SIDE}, the model contract's bound)")
    multiscale: list[float] | None = Field(None, min_length=1, max_length=MAX_MULTISCALE,
                                           description="e.g. [1.0, 0.707, 1.414]: finite positive scales, each "
                                           f"making a side round(size * scale) in 1..{MAX_INPUT_SIDE}")
    batch_size: int = Field(32, gt=0, le=1 << 16)
    dtype: str = Field("float16", pattern="^(float16|float32)$", description="stored raw descriptors")
    factory: str = Field("Flat", description="FAISS index_factory string (Flat = exact)")
    nprobe: int | None = Field(None, gt=0, le=MAX_NPROBE)
    shard_size: int = Field(1024, gt=0, le=1 << 24, description="images per extraction shard (resume granularity)")
    postprocess: list[dict] = Field(default_factory=list, description="ordered stages: whiten, dba, qe, diffusion")
    strict: bool = Field(False, description="fail on the first unreadable catalogue image")
    workers: int | None = Field(None, ge=0, le=256, description="threads that read, decode and preprocess "
                                "catalogue images ahead of the network (default: the cores, at most 16; 0: in "
                                "the calling thread); how the index is built, not what it is: not in the manifest")

    @field_validator("postprocess")
    @classmethod
    def _stages(cls, specs: list[dict]) -> list[dict]:
        try:  # each stage's name and parameters (postprocess.build_stage), before any image is read
            Chain.from_config(specs)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return specs

    @model_validator(mode="after")
    def _scales(self) -> "IndexOptions":
        for s in self.multiscale or ():
            if not (math.isfinite(s) and s > 0 and 1 <= int(round(self.size * s)) <= MAX_INPUT_SIDE):
                raise ValueError(f"multiscale: scale {s} makes a side of round({self.size} x {s}) px; each scale "
                                 f"must be finite and positive with a side in 1..{MAX_INPUT_SIDE}")
        return self


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
                              f"fixes them), the index options make {sorted(sizes)} px: leave index.size unset (the "
                              f"model's own side is the default) or set it to {self.input_size[0]}, without "
                              "index.multiscale; or index with the checkpoint (a PyTorch descriptor takes any size)")

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
                        rank: int = 0, world_size: int = 1, digest: str | None = None, stats: dict | None = None
                        ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Descriptors of every readable catalogue image, in shards under ``out_dir/shards`` (see module doc).

    Returns ``(ids, vectors float32, bad)``; ``bad`` lists ``(id, reason)`` of unreadable images (with
    ``opts.strict`` the first one raises). A finished shard is reused only when the record it was written with
    matches this call (:func:`_shard_record`: the model's :func:`model_digest`, the options that change a
    descriptor, each image file's name, size and mtime_ns), so a rerun after a crash only computes what is
    missing and a rerun with another model, other options or replaced images computes it again. ``digest``:
    the model's :func:`model_digest` when the caller already has it. ``stats``: filled with ``reused`` and
    ``described`` shard counts and ``why`` (reason -> shards described). ``progress(n)`` is called with images
    done. With ``world_size`` > 1 only the shards s with s % world_size == rank are computed (or reused) and
    returned; :func:`join_shards` reads all of them back once every rank is done. Images are read, decoded and
    preprocessed by loader threads ahead of the network (module doc).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    shard_dir = Path(out_dir) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for_inference(model, device)
    digest = digest or model_digest(model)
    dim = getattr(model, "dim", None)
    mine = []  # (shard path, its items, its record, the finished shard to reuse or None)
    tally = {"reused": 0, "described": 0, "why": {}}
    for s, start in enumerate(range(0, len(items), opts.shard_size)):
        if s % world_size != rank:
            continue
        chunk = list(items[start:start + opts.shard_size])
        path = shard_dir / f"shard-{s:05d}.npz"
        record = _shard_record(digest, opts, chunk)
        z, why = _reusable_shard(path, chunk, record, opts, dim)
        if z is None:
            tally["described"] += 1
            tally["why"][why] = tally["why"].get(why, 0) + 1
        else:
            tally["reused"] += 1
        mine.append((path, chunk, record, z))
    if stats is not None:
        stats.update(tally)
    size = opts.batch_size
    batches = _batches_ahead([chunk[b:b + size] for _, chunk, _, z in mine if z is None
                              for b in range(0, len(chunk), size)], opts)
    ids_all, vecs_all, bad_all = [], [], []
    try:
        for path, chunk, record, z in mine:
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
            with replacing(path, suffix=".npz") as tmp:  # a shard exists complete or not at all
                np.savez(tmp, requested=np.array([i for i, _ in chunk]), ids=np.array(ids, dtype=str),
                         vectors=vectors.astype(opts.dtype), bad_ids=np.array([b[0] for b in bad], dtype=str),
                         bad_reasons=np.array([b[1] for b in bad], dtype=str),
                         record=np.array(json.dumps(record, sort_keys=True)))
            ids_all += ids
            vecs_all.append(vectors.astype(opts.dtype).astype(np.float32))
            bad_all += bad
    finally:
        batches.close()
    return _joined(ids_all, vecs_all, bad_all)


SHARD_RECORD_VERSION = 1  # raise it when preprocessing or the shard layout changes what a shard holds


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 naming what a descriptor computes: an ONNX descriptor's file; a PyTorch one's class, structure
    (``repr``: layers and their settings, e.g. the pooling) and every parameter and buffer (name, dtype, shape,
    bytes; the memory layout does not count). Two models with one digest give the same descriptors."""
    h = hashlib.sha256()
    if isinstance(model, OnnxDescriptor):
        h.update(b"onnx\0" + _sha256_file(model.path).encode())
        return h.hexdigest()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\0{model!r}\0".encode())
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(f"{name}\0{value!r}\0".encode())
    return h.hexdigest()


def _image_identity(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}"
    return f"{st.st_size}\t{st.st_mtime_ns}"


def _shard_record(digest: str, opts: IndexOptions, chunk: Sequence[tuple[str, Path]]) -> dict:
    """What a shard of ``chunk`` is made of: the model's digest, the options that change a descriptor (not
    ``batch_size``, ``workers`` or the device: they change how fast, or the last float bits at most), and a
    digest of each image's id, file name, size and mtime_ns (a replaced file differs in one of them)."""
    images = hashlib.sha256("".join(f"{i}\t{p.name}\t{_image_identity(Path(p))}\n" for i, p in chunk).encode())
    return {"version": SHARD_RECORD_VERSION, "model": digest,
            "options": {"size": opts.size, "multiscale": opts.multiscale, "dtype": opts.dtype},
            "images": images.hexdigest()}


def _stored_record(z: dict) -> dict | None:
    """The record a shard was written with, or None (a shard of an older visrec, or an unreadable record)."""
    if "record" not in z:
        return None
    try:
        record = loads_json(str(z["record"].item() if z["record"].ndim == 0 else ""))
    except (ValueError, TypeError):
        return None
    return record if isinstance(record, dict) else None


_RECORD_WHY = (("version", "written by another visrec"), ("model", "another model"),
               ("options", "other options (size, multiscale, dtype)"), ("images", "image files changed"))


def _record_mismatch(stored: dict | None, expected: dict) -> str | None:
    """Why a shard's stored record does not match the expected one, or None when it does."""
    if stored is None:
        return "no record of its model, options and files (older shard)"
    for key, why in _RECORD_WHY:
        if stored.get(key) != expected[key]:
            return why
    return None


def _shard_content_problem(z: dict, chunk, opts: IndexOptions, dim: int | None) -> str | None:
    """Why a finished shard's arrays cannot stand for ``chunk``, or None when they can. Its record names what
    made it, not what it holds, so the contents are checked too: ``requested`` is ``chunk``'s ids in order;
    ``ids`` (described) and ``bad_ids`` (unreadable) together hold each requested id exactly once (an id twice
    would make ids.txt unreadable, one missing would drop an image from the index unnoticed); ``bad_reasons``
    has a reason per bad id; ``vectors`` is (len(ids), ``dim``) of ``opts.dtype`` (the stored raw descriptors'
    type) with finite values only (NaN or inf would score NaN against every query)."""
    requested = [i for i, _ in chunk]
    arrays = {key: z[key] for key in ("requested", "ids", "bad_ids", "bad_reasons")}
    for key, value in arrays.items():
        if value.ndim != 1 or (value.size and value.dtype.kind != "U"):
            return f"{key} is not a list of ids ({value.dtype}, shape {value.shape})"
    if arrays["requested"].tolist() != requested:
        return "other images"
    ids, bad = arrays["ids"].tolist(), arrays["bad_ids"].tolist()
    if len(arrays["bad_reasons"]) != len(bad):
        return f"{len(bad)} unreadable ids but {len(arrays['bad_reasons'])} reasons"
    held = ids + bad
    if len(held) != len(set(held)):
        twice = next(i for i, n in Counter(held).items() if n > 1)
        return f"it holds id {twice!r} twice"
    if set(held) != set(requested):
        missing, extra = sorted(set(requested) - set(held)), sorted(set(held) - set(requested))
        return (f"it lacks {len(missing)} of its images' ids, e.g. {missing[0]!r}" if missing else
                f"it holds {len(extra)} ids of no image of it, e.g. {extra[0]!r}")
    vectors = z["vectors"]
    if vectors.dtype != np.dtype(opts.dtype) or vectors.ndim != 2 or len(vectors) != len(ids) \
            or (dim and vectors.shape[1] != dim):
        return (f"its vectors are {vectors.dtype} {vectors.shape}, expected {opts.dtype} ({len(ids)}, "
                f"{dim or 'D'})")
    if not np.isfinite(vectors).all():
        row = int(np.argmax(~np.isfinite(vectors).all(axis=1)))
        return f"its vector of {ids[row]!r} holds NaN or inf"
    return None


def _reusable_shard(path: Path, chunk, record: dict, opts: IndexOptions, dim: int | None
                    ) -> tuple[dict | None, str]:
    """(the finished shard at ``path``, "reused") when it can stand for ``chunk`` in this run, else (None, why
    it is described again). A shard whose contents are not what this run would write
    (:func:`_shard_content_problem`) is described again, never joined: the reason says what was wrong."""
    if not path.exists():
        return None, "new"
    z = _finished_shard(path)
    if z is None:
        return None, "unfinished or unreadable"
    if z["requested"].ndim != 1 or z["requested"].tolist() != [i for i, _ in chunk]:
        return None, "other images"
    why = _record_mismatch(_stored_record(z), record)
    if why is not None:
        return None, why
    problem = _shard_content_problem(z, chunk, opts, dim)
    if problem is not None:
        return None, f"broken contents ({problem})"
    if opts.strict and len(z["bad_ids"]):
        return None, "index.strict and it holds unreadable images"
    return z, "reused"


def join_shards(items: Sequence[tuple[str, Path]], out_dir: str | Path, opts: IndexOptions, *,
                model: torch.nn.Module | None = None, digest: str | None = None
                ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Every extraction shard of ``items`` read back in catalogue order — what :func:`extract_descriptors`
    returns in one process. Each shard must be finished, hold exactly its images' ids (each once, described or
    unreadable) with finite vectors of one dimension and ``opts.dtype`` (:func:`_shard_content_problem`) and carry
    the record of these options and image files and of ``model`` (its ``digest``; with neither, of one model
    for every shard): a missing or other one is an error naming it (the ranks of a sharded run must write into
    one folder they all see)."""
    shard_dir = Path(out_dir) / "shards"
    if digest is None and model is not None:
        digest = model_digest(model)
    dim = int(getattr(model, "dim", 0) or 0) or None  # no model: the first shard's, which every other must share
    ids_all, vecs_all, bad_all = [], [], []
    for s, start in enumerate(range(0, len(items), opts.shard_size)):
        path = shard_dir / f"shard-{s:05d}.npz"
        chunk = list(items[start:start + opts.shard_size])
        z = _finished_shard(path) if path.exists() else None
        if z is None or z["requested"].ndim != 1 or z["requested"].tolist() != [i for i, _ in chunk]:
            state = "missing" if not path.exists() else "unfinished or not of these images"
            raise DataError(f"extraction shard {state} after every rank finished: the ranks must write into one "
                            "--out folder that all of them see (a shared filesystem)", path=path)
        stored = _stored_record(z)
        if digest is None and stored is not None and isinstance(stored.get("model"), str):
            digest = stored["model"]  # no model given: the first shard's, which every other must share
        why = _record_mismatch(stored, _shard_record(digest or "", opts, chunk))
        if why is not None:
            raise DataError(f"extraction shard not made for this run ({why}) after every rank finished: the ranks "
                            "must run the same model and options on the same catalogue files", path=path)
        problem = _shard_content_problem(z, chunk, opts, dim)
        if problem is not None:
            raise DataError(f"extraction shard does not hold what its images make ({problem}) after every rank "
                            "finished: build the index again (the next run describes it again)", path=path)
        dim = dim or (z["vectors"].shape[1] or None)
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
    """Index every image of ``catalogue`` (a folder of ``<id>.jpg``) into ``out_dir``; returns the manifest,
    with ``shards`` added (not stored): ``reused`` and ``described`` extraction shards, and ``why`` (reason ->
    shards described), over every rank.

    The options are checked before anything is read or written; the index files replace a previous index in
    ``out_dir`` only once all of them are written (module doc), so a failure leaves that index as it was.
    ``group``: run as the ranks of this torch.distributed process group (module doc); every rank calls this
    with the same catalogue and options, each describes its shards (``progress`` hears this rank's images),
    rank 0 builds the index, and every rank returns its manifest."""
    rank, world = rank_and_size(group)
    out = Path(out_dir)
    chain = Chain.from_config(opts.postprocess)  # config errors before hours of extraction
    if isinstance(model, OnnxDescriptor):
        model.check_options(opts)
    _check_faiss_options(model, opts, chain)
    items = list_images(catalogue)
    if not items:
        raise DataError("no catalogue images (.jpg/.jpeg/.png)", path=catalogue)
    _refuse_a_folder_of_other_files(out)
    out.mkdir(parents=True, exist_ok=True)
    # one build at a time in a folder (its shards and staging folders are this build's; rank 0 holds the claim)
    claim = on_every_rank("claiming the output folder", lambda: FolderClaim(out, "catalogue index build")
                          if rank == 0 else None, group)
    try:
        return _build(catalogue, out, model, model_config, opts, chain, items, device, progress, group, rank, world)
    finally:
        if claim is not None:
            claim.close()


def _build(catalogue, out: Path, model, model_config: dict, opts: IndexOptions, chain: Chain, items, device,
           progress, group, rank: int, world: int) -> dict:
    if world > 1:
        _same_catalogue_everywhere(items, opts, group)
        broadcast_module(model, group)  # rank 0's weights everywhere (a random head differs per rank otherwise)
    digest = model_digest(model)  # after the broadcast: every rank's shards carry rank 0's weights

    stats: dict = {}
    if world == 1:
        extracted = extract_descriptors(model, items, out, opts, device=device, progress=progress, digest=digest,
                                        stats=stats)
        return {**_finish(catalogue, out, model, model_config, opts, chain, extracted), "shards": stats}
    on_every_rank("describing the catalogue", lambda: extract_descriptors(
        model, items, out, opts, device=device, progress=progress, rank=rank, world_size=world, digest=digest,
        stats=stats), group)
    total = {"reused": 0, "described": 0, "why": {}}
    for theirs in gather_objects(stats, group):
        total["reused"] += theirs.get("reused", 0)
        total["described"] += theirs.get("described", 0)
        for why, n in theirs.get("why", {}).items():
            total["why"][why] = total["why"].get(why, 0) + n
    manifest = from_rank_zero("building the catalogue index", lambda: _finish(
        catalogue, out, model, model_config, opts, chain,
        join_shards(items, out, opts, model=model, digest=digest)), group)
    return {**manifest, "shards": total}


def _check_faiss_options(model: torch.nn.Module, opts: IndexOptions, chain: Chain) -> None:
    """``index.factory`` and ``index.nprobe`` must make a FAISS index of the dimension the chain will give
    (the descriptor's, or the last whitening's ``dim``): a ConfigError naming them, before any work."""
    dim = int(getattr(model, "dim", 0) or 0)
    for stage in chain.stages:
        if isinstance(stage, PCAWhitening) and stage.dim:
            dim = int(stage.dim)
    if dim <= 0:
        return
    try:
        FaissIndex(dim, opts.factory, opts.nprobe)
    except ConfigError as exc:
        raise ConfigError(f"index.factory={opts.factory!r}: {exc}") from None
    except RuntimeError as exc:  # FAISS refusing nprobe for an index without inverted lists (Flat, HNSW, ...)
        raise ConfigError(f"index.nprobe={opts.nprobe} does not apply to index.factory={opts.factory!r} (nprobe "
                          f"is the IVF lists a search visits; drop it for this factory): {exc}") from None


def _save_descriptor(model: torch.nn.Module, model_config: dict, opts: IndexOptions, out: Path) -> str:
    """``descriptor.pt`` (a PyTorch descriptor) or ``descriptor.onnx`` (a copy of an ONNX one) into ``out``:
    what :class:`CatalogueIndex` runs on the queries. Returns the file's name."""
    if isinstance(model, OnnxDescriptor):
        shutil.copyfile(model.path, out / "descriptor.onnx")
        return "descriptor.onnx"
    contract = default_contract(model, model_config, image_size=opts.size, origin="visrec-checkpoint")
    atomic_save({"model_config": model_config, "backbone": model.state_dict(), "contract": contract.to_dict()},
                out / "descriptor.pt")
    return "descriptor.pt"


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


INDEX_FILES = ("descriptor.pt", "descriptor.onnx", "descriptors.npy", "ids.txt", "chain.pt", "index.faiss")
STAGING_PREFIX = ".building-"


def _finish(catalogue, out: Path, model: torch.nn.Module, model_config: dict, opts: IndexOptions, chain: Chain,
            extracted) -> dict:
    """From the joined descriptors: the descriptor file, descriptors.npy, ids.txt, the fitted chain, the FAISS
    index and the manifest, written into a temporary folder inside ``out`` and moved into ``out`` once every
    one is written, the manifest (which records each file's size and digest) last: any failure before that
    leaves the index already in ``out`` as it was."""
    ids, raw, bad = extracted
    if not ids:
        raise DataError("no catalogue image could be read", path=catalogue)
    for left in out.glob(STAGING_PREFIX + "*"):  # what a build killed (kill -9) before cleaning up left behind
        shutil.rmtree(left, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        with writing_into(out, stage):  # a full disk: a StorageError naming the index, not a file of the stage
            return _write_index(stage, catalogue, out, model, model_config, opts, chain, ids, raw, bad)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_index(stage: Path, catalogue, out: Path, model: torch.nn.Module, model_config: dict, opts: IndexOptions,
                 chain: Chain, ids, raw, bad) -> dict:
    """:func:`_finish`'s files, written into ``stage``, then moved into ``out``; the manifest."""
    names = [_save_descriptor(model, model_config, opts, stage), "descriptors.npy", "ids.txt", "chain.pt",
             "index.faiss"]
    np.save(stage / "descriptors.npy", raw.astype(opts.dtype))
    (stage / "ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    processed = chain.fit(raw)  # may shrink an ill-posed stage, with a PostprocessWarning (postprocess module doc)
    chain.save(stage / "chain.pt")
    FaissIndex(processed.shape[1], opts.factory, opts.nprobe).build(processed).save(stage / "index.faiss")
    manifest = {"model_config": model_config, "dim": int(raw.shape[1]), "index_dim": int(processed.shape[1]),
                "count": len(ids), "unreadable": [{"id": i, "reason": r} for i, r in bad],
                "catalogue": str(Path(catalogue).resolve()), "options": opts.model_dump(exclude={"workers"}),
                "postprocess_adjustments": chain.adjustments,
                "files": {name: _file_record(stage / name) for name in names}}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _file_record(stage / MANIFEST)  # fsynced like the others
    _swap_in(stage, out, names)
    return manifest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


DIGEST_BLOCK = 1 << 20
DIGEST_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones by DIGEST_SAMPLES blocks
DIGEST_SAMPLES = 16


def _file_digest(path: Path, fsync: bool = False) -> str:
    """SHA-256 of a file's size and content: the whole file up to ``DIGEST_WHOLE`` bytes, else of
    ``DIGEST_SAMPLES`` evenly spaced 1 MiB blocks (the first and the last among them). What it must catch is a
    file of another build (a build killed among its renames), which differs almost everywhere; reading
    every byte of a Perfect-500K index's gigabytes at each open would cost seconds for nothing more."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as fh:
        if size <= DIGEST_WHOLE:
            while block := fh.read(DIGEST_BLOCK):
                h.update(block)
        else:
            for k in range(DIGEST_SAMPLES):
                fh.seek((size - DIGEST_BLOCK) * k // (DIGEST_SAMPLES - 1))
                h.update(fh.read(DIGEST_BLOCK))
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    """``{"bytes", "digest"}`` (:func:`_file_digest`) of a file just written, which is fsynced on the way (so
    the rename that publishes it cannot outrun its data)."""
    return {"bytes": path.stat().st_size, "digest": _file_digest(path, fsync=True)}


def _swap_in(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Move the files of ``stage`` into ``out``, the manifest last. An old manifest without ``files`` (an index
    of an older visrec) is removed first: it could not tell its own files from these, and a build killed among
    the renames must leave a folder the reader refuses rather than one it misreads."""
    old = out / MANIFEST
    if old.exists() and not _records_files(old):
        old.unlink()
    for name in names:
        os.replace(stage / name, out / name)
    for name in ("descriptor.pt", "descriptor.onnx"):
        if name not in names:  # the other runtime's descriptor of an earlier build
            (out / name).unlink(missing_ok=True)
    os.replace(stage / MANIFEST, out / MANIFEST)
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _records_files(manifest_path: Path) -> bool:
    try:
        return isinstance(_manifest_json(manifest_path).get("files"), dict)
    except (DataError, ValueError, AttributeError):  # DataError: unreadable, too long, a pipe or a device
        return False


def _manifest_json(path: Path):
    """A manifest.json's JSON: a regular file of at most MAX_METADATA_FILE_BYTES (else a DataError naming it),
    nested within ``visrec._structured``'s bound (else a ValueError)."""
    return loads_json(read_text(path, MAX_METADATA_FILE_BYTES))


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
    None: the CPU). ``runtime`` says which.

    Every file the manifest records (``files``) must have the size and digest recorded there (``_file_digest``:
    small files read whole, large ones sampled), or the index is refused with a DataError naming the file: its files would not belong
    together. A manifest of an older visrec records none; its counts and dimensions are still checked against
    the files."""

    def __init__(self, index_dir: str | Path, device="cpu", providers=None):
        self.dir = Path(index_dir)
        if not (self.dir / MANIFEST).exists():
            raise DataError("not a catalogue index (no manifest.json); build one with visrec products index",
                            path=self.dir)
        try:
            self.manifest = _manifest_json(self.dir / MANIFEST)
        except ValueError as exc:  # a JSONDecodeError, or nested too deep
            raise DataError(f"not a readable catalogue index manifest: {exc}", path=self.dir / MANIFEST) from None
        self.opts = _check_manifest(self.manifest, self.dir / MANIFEST)
        files = self.manifest.get("files")
        if files is not None:
            self._check_files(files)
            onnx = "descriptor.onnx" in files
        else:  # an index of an older visrec
            onnx = (self.dir / "descriptor.onnx").is_file() and not (self.dir / "descriptor.pt").exists()
        if onnx:
            self.model = OnnxDescriptor(self.dir / "descriptor.onnx", providers)
            self.device = "cpu"
            self.runtime = self.model.runtime
        else:
            self.model, _ = load_backbone(self.dir / "descriptor.pt")
            self.device = device
            for_inference(self.model, device)
            self.runtime = f"PyTorch on {device}"
        self.ids = _read_ids(self.dir / "ids.txt")
        self._check_counts()
        self.chain = Chain.from_config(self.opts.postprocess).load(self.dir / "chain.pt", self.manifest.get("dim"),
                                                                   len(self.ids))
        try:
            self.faiss = FaissIndex.load(self.dir / "index.faiss", self.opts.nprobe)
        except RuntimeError as exc:  # FAISS refusing nprobe for this index
            raise DataError(f"options.nprobe={self.opts.nprobe} does not apply to index.faiss: {exc}",
                            path=self.dir / MANIFEST, field="options.nprobe") from None
        if len(self.faiss) != len(self.ids):
            raise DataError(f"index holds {len(self.faiss)} vectors but ids.txt {len(self.ids)}", path=self.dir)
        if self.chain.out_dim is not None and self.chain.out_dim != self.faiss.dim:
            raise DataError(f"index.faiss is {self.faiss.dim}-d but chain.pt makes {self.chain.out_dim}-d vectors: "
                            "the files do not belong together; build the index again", path=self.dir / "index.faiss")
        _check_finite_index(self.faiss, self.dir / "index.faiss")
        self._check_index_dim()

    def _check_files(self, files) -> None:
        """Each file the manifest records has its recorded size and digest (class doc)."""
        where = self.dir / MANIFEST
        descriptors = [n for n in ("descriptor.pt", "descriptor.onnx") if isinstance(files, dict) and n in files]
        if (not isinstance(files, dict) or set(files) - set(INDEX_FILES) or len(descriptors) != 1
                or not {"descriptors.npy", "ids.txt", "chain.pt", "index.faiss"} <= set(files)):
            raise DataError(f"not a readable catalogue index manifest: 'files' must name descriptors.npy, ids.txt, "
                            f"chain.pt, index.faiss and one of descriptor.pt / descriptor.onnx, got "
                            f"{sorted(files) if isinstance(files, dict) else type(files).__name__}", path=where)
        for name, rec in files.items():
            path = self.dir / name
            if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("digest"), str)):
                raise DataError(f"not a readable catalogue index manifest: files.{name} must be "
                                f"{{bytes, digest}}", path=where)
            try:
                size = check_regular_file(path).stat().st_size  # a pipe would block the digest's read
                same = size == rec["bytes"] and _file_digest(path) == rec["digest"]
            except OSError as exc:
                raise DataError(f"{name} of this index cannot be read ({exc.strerror or exc}): the index is "
                                "incomplete; build it again with visrec products index", path=path) from None
            if not same:
                raise DataError(f"{name} is not the file this index's manifest.json was written with (its size or "
                                "digest differs): the folder mixes files of different builds (a build killed "
                                "while it moved its files in, or a file changed by hand); build it again with "
                                "visrec products index", path=path)

    def _check_counts(self) -> None:
        """The manifest's count and dimensions against the files (an index of any visrec)."""
        m = self.manifest
        if isinstance(m.get("count"), int) and m["count"] != len(self.ids):
            raise DataError(f"manifest.json counts {m['count']} catalogue images but ids.txt holds {len(self.ids)}: "
                            "the files do not belong together; build the index again", path=self.dir)
        dim = getattr(self.model, "dim", None)
        if isinstance(m.get("dim"), int) and dim is not None and int(dim) != m["dim"]:
            name = "descriptor.onnx" if isinstance(self.model, OnnxDescriptor) else "descriptor.pt"
            raise DataError(f"{name} makes {int(dim)}-d descriptors but manifest.json says {m['dim']}: the files do "
                            "not belong together; build the index again", path=self.dir / name)

    def _check_index_dim(self) -> None:
        m = self.manifest
        if isinstance(m.get("index_dim"), int) and self.faiss.dim != m["index_dim"]:
            raise DataError(f"index.faiss is {self.faiss.dim}-d but manifest.json says index_dim {m['index_dim']}: "
                            "the files do not belong together; build the index again", path=self.dir / "index.faiss")

    def search_vectors(self, descriptors: np.ndarray, k: int = 7) -> tuple[list[list[str]], np.ndarray]:
        """Ranked catalogue ids (best first) and scores for raw query descriptors: at most ``k`` a query, and at
        most the catalogue (a ``k`` beyond it asks FAISS for rows it does not have: ``-k 1000000000`` made it
        allocate 12 GB a query and the kernel killed the command)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be a whole number >= 1, got {shown(k)}")
        k = min(int(k), max(len(self.ids), 1))
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
            raw = np.load(check_regular_file(path), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the catalogue descriptors: {exc}", path=path) from None
        if raw.dtype.kind != "f" or raw.ndim != 2 or len(raw) != len(self.ids):
            raise DataError(f"descriptors.npy holds {raw.shape} but ids.txt {len(self.ids)} ids", path=self.dir)
        if isinstance(self.manifest.get("dim"), int) and raw.shape[1] != self.manifest["dim"]:
            raise DataError(f"descriptors.npy holds {raw.shape[1]}-d descriptors but manifest.json says "
                            f"{self.manifest['dim']}", path=path)
        out = np.empty(raw.shape, np.float32)
        for s in range(0, len(raw), FINITE_CHECK_ROWS):  # a block at a time: one row-block of the file in memory
            out[s:s + FINITE_CHECK_ROWS] = raw[s:s + FINITE_CHECK_ROWS]
            _refuse_non_finite(out[s:s + FINITE_CHECK_ROWS], s, path)
        return out

    def search_items(self, items: Iterable[tuple[str, Path]], k: int = 7, progress=None
                     ) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
        """Search ``(query id, path)`` pairs; unreadable queries raise ``DataError`` naming them."""
        ranked, scores = {}, {}
        for batch in self._read_batches(items, progress):
            ids, sc = self.search_images([im for _, im in batch], k)
            for (qid, _), row, s in zip(batch, ids, sc):
                ranked[qid], scores[qid] = row, [float(v) for v in s[:len(row)]]
        return ranked, scores


MAX_UNREADABLE_REASON = 4096  # characters of one unreadable image's reason in manifest.json


def _refuse_non_finite(block: np.ndarray, start: int, path: Path) -> None:
    """A DataError naming ``path`` and the first row (``start`` + its position) of ``block`` holding NaN or
    inf: such a vector scores NaN against every query and silently drops out of (or swamps) every ranking."""
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        raise DataError("a vector holds NaN or inf: the file is corrupt; build the index again", path=path,
                        record=f"row {start + int(np.argmax(bad))}")


def _check_finite_index(index: FaissIndex, path: Path) -> None:
    """The vectors of ``index`` are finite (:func:`_refuse_non_finite`), checked a block at a time where the
    index type can give them back (Flat, IVF...); a compressed index that cannot is left as it is."""
    n = len(index)
    for s in range(0, n, FINITE_CHECK_ROWS):
        try:
            block = index.index.reconstruct_n(s, min(FINITE_CHECK_ROWS, n - s))
        except RuntimeError:  # this index type cannot reconstruct its vectors
            return
        _refuse_non_finite(np.asarray(block, np.float32), s, path)


def _read_ids(path: Path) -> list[str]:
    """ids.txt: one valid id (``visrec.data.products.id_problem``) a line, each ending with ``\n``, no id twice;
    else a DataError naming the file and the line."""
    try:  # a regular file only: an index of an older visrec records no files, so _check_files has not seen it
        text = check_regular_file(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the catalogue ids: {exc}", path=path) from None
    if text and not text.endswith("\n"):
        raise DataError("the last id has no line end: a torn or hand-edited file; build the index again", path=path)
    ids = text.split("\n")[:-1]
    first: dict[str, int] = {}
    for lineno, image_id in enumerate(ids, 1):
        why = id_problem(image_id)
        if why is not None:
            raise DataError(f"not a catalogue id: {why}", path=path, record=f"line {lineno}")
        if image_id in first:
            raise DataError(f"duplicate catalogue id {image_id!r} (first on line {first[image_id]})", path=path,
                            record=f"line {lineno}")
        first[image_id] = lineno
    return ids


def _check_manifest(m, path: Path) -> IndexOptions:
    """The manifest's options, validated as a config's (bounded: the manifest is untrusted), and the other
    fields a reader uses, with their types (``files`` is checked by ``_check_files``): a DataError naming
    manifest.json and the field."""
    if not isinstance(m, dict):
        raise DataError(f"not a readable catalogue index manifest: a JSON {type(m).__name__}, not an object",
                        path=path)

    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            got = f"{type(m[key]).__name__} {shown(m[key])}" if key in m else "missing"
            raise DataError(f"not a readable catalogue index manifest: {key} must be {what}, got {got}", path=path,
                            field=key)

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    need("options", isinstance(m.get("options"), dict), "an object")
    try:
        opts = load_index_options(m["options"], str(path))
    except ConfigError as exc:  # the manifest's options are data: bounded like a config's, refused as data
        raise DataError(f"not a readable catalogue index manifest: {exc}", path=path, field="options") from None
    need("catalogue", isinstance(m.get("catalogue"), str), "the catalogue folder (a string)")
    need("count", count(m.get("count")), "a count (an integer >= 0)")
    for key in ("dim", "index_dim"):
        need(key, key not in m or (count(m[key]) and 0 < m[key] <= MAX_EMBEDDING_DIM),
             f"an integer in 1..{MAX_EMBEDDING_DIM}")
    unreadable = m.get("unreadable", [])
    need("unreadable", isinstance(unreadable, list) and all(
        isinstance(u, dict) and isinstance(u.get("id"), str) and isinstance(u.get("reason"), str)
        and id_problem(u["id"]) is None and len(u["reason"]) <= MAX_UNREADABLE_REASON for u in unreadable),
        "a list of {id, reason} (valid ids)")
    adjustments = m.get("postprocess_adjustments", [])
    need("postprocess_adjustments", isinstance(adjustments, list) and all(isinstance(a, str) for a in adjustments),
         "a list of strings")
    return opts


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
    (defaults without one, changed by ``index.*`` keys of ``overrides``; with ``checkpoint`` and no
    ``index.size`` set, the size is the checkpoint's or ONNX file's own input side: :func:`_at_model_size`);
    returns the manifest, with ``runtime`` (what ran the descriptor; not stored). ``group``: shard the
    extraction across the ranks of this torch.distributed process group (module doc). ``providers`` asking for
    a GPU with a PyTorch descriptor, or a GPU ``device`` with an ONNX one, is a ConfigError saying which option
    applies."""
    if config is None and checkpoint is None:
        raise ConfigError("give --config (model + index options) or --model (a trained descriptor)")
    check_output(out, kind="dir")  # before a model loads: a file there, or a folder below one, is refused now
    cfg = load_config(config, overrides) if config else None
    raw = dict(cfg.index if cfg else _index_overrides(overrides))
    source = str(config or "defaults")
    opts = load_index_options(raw, source)  # checked before a model loads
    spec = parse_providers(providers)
    if checkpoint is not None and Path(checkpoint).suffix.lower() == ".onnx":
        if str(device) not in ("cpu", "auto"):
            raise ConfigError(f"--device {device} places a PyTorch descriptor; {checkpoint} is ONNX, run by ONNX "
                              f"Runtime on --providers (cpu, cuda, tensorrt, auto)")
        model = OnnxDescriptor(checkpoint, spec)
        opts = _at_model_size(raw, opts, source, model.input_size or model.loaded.contract.input_size)
        model.check_options(opts)
        model_config, device, runtime = model.model_config, "cpu", model.runtime
    else:
        if spec.explicit_gpu:
            raise ConfigError(f"--providers {spec.text} runs an ONNX descriptor (--model FILE.onnx: visrec export of "
                              f"the checkpoint); a checkpoint or config runs in PyTorch: --device cuda (or auto)")
        if checkpoint is not None:
            model, model_config, contract = load_checkpoint(checkpoint)
            opts = _at_model_size(raw, opts, source, contract.input_size)
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


def _at_model_size(raw: dict, opts: IndexOptions, source: str, input_size) -> IndexOptions:
    """``opts`` with ``size`` the trained descriptor's own input side (``input_size``: the (height, width) in
    pixels its contract or ONNX file states) when the options do not set ``size``: a network trained at 64 px
    describes at 64 px unless asked otherwise, as timm and cirtorch models default to their training
    resolution. A ``size`` the options set is kept: a PyTorch descriptor takes any side (and
    ``multiscale``: several), an ONNX one that fixes its side refuses another (:meth:`OnnxDescriptor.check_options`).
    """
    if "size" in raw or not input_size or input_size[0] != input_size[1] or not input_size[0] > 0:
        return opts
    return load_index_options({**raw, "size": int(input_size[0])}, f"{source} (index.size from the model)")


def _refuse_a_folder_of_other_files(out: Path) -> None:
    """A DataError naming ``out`` when it holds files but no index (no manifest.json, no shards/ of a build cut
    short): the index's files would replace any of the same name there (a manifest.json or ids.txt of the
    user's). Hidden entries are a killed build's temporary files and staging folders, cleared by the build."""
    if (out / MANIFEST).exists() or (out / "shards").is_dir() or not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if held:
        raise DataError(f"holds files and no catalogue index ({held[0]} and {len(held) - 1} more): the index's "
                        "files (manifest.json, ids.txt, index.faiss, ...) would replace any of the same name; "
                        "name a new or empty folder", path=out)


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
    runs (:func:`open_for_queries`). A folder without a .jpg / .jpeg / .png file is a DataError naming it,
    before the index opens or ``submission`` is touched."""
    query = Path(query)
    if not query.exists():
        raise DataError("query image or folder not found", path=query)
    if submission is not None:  # never over a query image or a file of the index (a Python caller passes no CLI check)
        check_apart(submission, {"the query": query, "the index": index_dir}, what="the submission")
    items = list_images(query) if query.is_dir() else [(query.stem, query)]
    if not items:  # before the index opens and ``submission`` is replaced: a run of no query is a mistake
        raise DataError(f"no query images: the folder holds no {' / '.join(PRODUCT_SUFFIXES)} file (the only "
                        "suffixes read, in any case)", path=query)
    ranked, scores = open_for_queries(index_dir, providers).search_items(items, k)
    if submission is not None:
        write_submission(submission, ranked, k)
    return ranked, scores
