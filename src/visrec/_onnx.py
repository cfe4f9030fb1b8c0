"""One way to open an ONNX file with onnxruntime (CPU by default), with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from visrec._optional import require
from visrec.errors import DataError


DEFAULT_THREADS: list[int | None] = [None]  # what set_default_threads set; None: onnxruntime's own default


def set_default_threads(threads: int | None) -> None:
    """Intra-op threads of every session opened from now on without ``threads`` (a service sets one per request
    worker, so concurrent requests do not oversubscribe the cores)."""
    DEFAULT_THREADS[0] = None if threads is None else int(threads)


def open_session(path: Path, providers: Sequence[str] | None = None, what: str = "ONNX", threads: int | None = None):
    """``onnxruntime.InferenceSession`` for ``path``; a missing or unreadable file raises DataError saying which
    (``what`` names the kind of model in the message, e.g. "face detector"). ``threads``: intra-op threads
    (when None: :func:`set_default_threads`'s value, else onnxruntime's default)."""
    threads = threads or DEFAULT_THREADS[0]
    ort = require("onnxruntime", "export")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} model not found", path=path)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise DataError(f"onnxruntime cannot load it: {str(exc).splitlines()[0][:200]}", path=path) from None


class OnnxEmbedder:
    """Runs an exported model with onnxruntime on the CPU: float32 NCHW array -> (N, D) embeddings."""

    def __init__(self, path: str | Path, threads: int | None = None, session=None):
        self.path = Path(path)
        self.session = session if session is not None else open_session(self.path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
