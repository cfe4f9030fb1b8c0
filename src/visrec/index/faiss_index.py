"""A FAISS index over L2-normalised float32 descriptors, searched by inner product (= cosine).

``factory`` is a FAISS ``index_factory`` string: ``"Flat"`` (exact, the default), ``"IVF4096,Flat"``,
``"IVF16384,PQ64"``, ``"PCA256,IVF4096,PQ32"``... Indexes that need training are trained on the vectors
given to ``build`` (or a random sample of ``train_size`` of them). ``nprobe`` sets how many IVF lists a
search visits (accuracy vs speed). Catalogue ids are kept beside the index (FAISS stores row numbers).

An index file from elsewhere is untrusted, and FAISS's reader allocates each array from the size the file
declares (up to 2^40 elements) before reading it: a 700-byte file made a process touch 8 GB. So
:meth:`FaissIndex.load` first reads the file in a child process whose address space is capped at a few times
the file's size (:func:`_probe_read`); only a file that reads within that bound is read here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from visrec._files import check_regular_file, replacing
from visrec._optional import require
from visrec.errors import ConfigError, DataError, StorageError


class FaissIndex:
    def __init__(self, dim: int, factory: str = "Flat", nprobe: int | None = None):
        faiss = require("faiss", "index", "faiss-cpu")
        self.dim, self.factory, self.nprobe = int(dim), factory, nprobe
        try:
            self.index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"FAISS cannot build index {factory!r} for dimension {dim}: {exc}") from None
        self._apply_nprobe()

    def _apply_nprobe(self) -> None:
        if self.nprobe is not None:
            faiss = require("faiss", "index", "faiss-cpu")
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", int(self.nprobe))

    def build(self, vectors: np.ndarray, train_size: int = 262_144, seed: int = 0) -> "FaissIndex":
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"vectors shaped {x.shape}, index dimension {self.dim}")
        if not self.index.is_trained:
            sample = x if len(x) <= train_size else x[np.random.default_rng(seed).choice(len(x), train_size, False)]
            try:
                self.index.train(sample)
            except RuntimeError as exc:
                raise ConfigError(f"training {self.factory!r} on {len(sample)} vectors failed: {exc}") from None
        self.index.add(x)
        return self

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row numbers) shaped (queries, k), best first; rows are -1 where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"queries shaped {q.shape}, index dimension {self.dim}")
        return self.index.search(q, int(k))

    def save(self, path: str | Path) -> None:
        faiss = require("faiss", "index", "faiss-cpu")
        with replacing(path) as tmp:
            try:
                faiss.write_index(self.index, str(tmp))
            except RuntimeError as exc:  # FAISS says why a write failed only inside its own message
                reason = re.search(r"write error in .*\((.+)\)\s*$", str(exc))
                if reason is None:
                    raise
                raise StorageError(reason.group(1), path=path) from None

    @classmethod
    def load(cls, path: str | Path, nprobe: int | None = None) -> "FaissIndex":
        faiss = require("faiss", "index", "faiss-cpu")
        path = Path(path)
        if not path.exists():
            raise DataError("FAISS index file not found", path=path)
        check_regular_file(path)
        _probe_read(path)
        self = cls.__new__(cls)
        try:
            self.index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise DataError(f"not a FAISS index: {exc}", path=path) from None
        self.dim, self.factory, self.nprobe = int(self.index.d), "loaded", nprobe
        self._apply_nprobe()
        return self


# The child measures its own address space after importing faiss, caps it at that plus the allowance, then
# reads the file: an allocation beyond what the file could hold fails there, not in the caller.
_PROBE = """
import resource, sys
import faiss
path, allowance = sys.argv[1], int(sys.argv[2])
with open("/proc/self/status") as fh:
    size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + allowance, size + allowance))
try:
    faiss.read_index(path)
except BaseException as exc:
    print(f"{type(exc).__name__}: {str(exc)[:300]}")
    sys.exit(3)
"""


def _probe_read(path: Path) -> None:
    """Raise :class:`DataError` unless FAISS reads ``path`` within 4x its size + 256 MiB of new address space.

    Linux only (it reads /proc); elsewhere the file is read unprobed."""
    if not sys.platform.startswith("linux"):
        return
    allowance = 4 * path.stat().st_size + (256 << 20)
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(allowance)], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        raise DataError("reading this FAISS index took over 10 minutes; refused", path=path) from None
    if done.returncode != 0:
        why = (done.stdout.strip() or done.stderr.strip()[-300:] or f"exit code {done.returncode}")
        raise DataError(f"not a FAISS index that fits its file ({path.stat().st_size:,} bytes): {why}", path=path)
