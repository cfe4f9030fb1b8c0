"""One way to open an ONNX file with onnxruntime, with errors that name the file; and the one place that
chooses the session's execution providers (CPU by default).

Provider choices (``--providers`` of ``visrec eval``, ``visrec products index|search`` and ``visrec serve``;
``providers:`` of a serve config; ``providers=`` of the library functions behind them):

- ``cpu`` (the default; None means the same): ``CPUExecutionProvider`` alone.
- ``cuda`` or ``cuda:N``: ``CUDAExecutionProvider`` on GPU N (default 0), the CPU for the nodes CUDA does not run.
- ``tensorrt`` or ``tensorrt:N``: ``TensorrtExecutionProvider``, then CUDA, then the CPU (TensorRT hands the
  nodes it cannot build to the next one). Engines are built in float32 (no fp16 or int8: embeddings must match
  the exported model's) and cached in :func:`tensorrt_cache_dir`, so only the first session of a model (and of a
  new range of batch sizes) waits for TensorRT to build them.
- ``auto``: the best that this onnxruntime offers among TensorRT > CUDA > CPU
  (``onnxruntime.get_available_providers()``), the CPU always last as the fallback. Never an error: what the
  session got is reported (``session.get_providers()``).
- a list of onnxruntime provider names (a Python sequence, or the names comma-separated), passed as given;
  ``cpu``, ``cuda`` and ``tensorrt`` may stand for their provider's name in the list.

An explicit GPU request (``cuda``, ``tensorrt``, or a list naming a provider this onnxruntime lacks) is a
:class:`~visrec.errors.ConfigError` when ``onnxruntime.get_available_providers()`` does not list it: the CPU
wheel ``onnxruntime`` has no GPU provider; ``pip install 'visrec[gpu]'`` installs ``onnxruntime-gpu`` in its
place (uninstall ``onnxruntime`` first: both provide the same module) and it needs an NVIDIA driver with the
CUDA / cuDNN (and, for TensorRT, TensorRT) libraries its release requires. ONNX Runtime itself falls back to the
CPU, with no more than a logged warning, when those libraries fail to load; :func:`open_session` reads
``session.get_providers()`` afterwards and makes that fallback an error for an explicit request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from visrec._onnx_check import FOLD_LIMIT_BYTES, check_graph
from visrec._optional import require
from visrec.errors import ConfigError, DataError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)  # the order "auto" prefers them in
CHOICES = ("cpu", "cuda", "tensorrt", "auto")
_WORDS = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
INSTALL_GPU = ("pip install 'visrec[gpu]' (onnxruntime-gpu in place of the onnxruntime CPU wheel: pip uninstall "
               "onnxruntime first, both provide the same module) on a machine with an NVIDIA driver and the CUDA "
               "and cuDNN libraries (TensorRT's too, for tensorrt) that the onnxruntime-gpu release requires")
CHOICES_HELP = ("cpu | cuda[:N] | tensorrt[:N] | auto (TensorRT > CUDA > CPU, whichever onnxruntime has) | "
                "onnxruntime provider names, comma-separated")

DEFAULT_THREADS: list[int | None] = [None]  # what set_default_threads set; None: onnxruntime's own default


def set_default_threads(threads: int | None) -> None:
    """Intra-op threads of every session opened from now on without ``threads`` (a service sets one per request
    worker, so concurrent requests do not oversubscribe the cores)."""
    DEFAULT_THREADS[0] = None if threads is None else int(threads)


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it holds a positive integer, else None. PyTorch takes its intra-op thread count
    from it and onnxruntime does not: a session follows it too, so that a process limited to N threads (torchrun
    sets 1 per process; a user sharing a machine sets it) is not given every core by its ONNX models."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass(frozen=True)
class ProviderChoice:
    """A parsed provider choice (module docstring). ``word``: ``cpu``, ``cuda``, ``tensorrt`` or ``auto``, or None
    for a list of provider ``names``; ``device_id``: the GPU of ``cuda:N`` / ``tensorrt:N``; ``text``: as given."""

    text: str
    word: str | None = None
    names: tuple[str, ...] = ()
    device_id: int = 0

    @property
    def explicit_gpu(self) -> bool:
        """True for a request that must run on a GPU provider or fail (``cuda``, ``tensorrt``, a list naming one)."""
        if self.word is not None:
            return self.word in ("cuda", "tensorrt")
        return any(n in GPU_PROVIDERS for n in self.names)

    @property
    def is_cpu(self) -> bool:
        return self.word == "cpu" or (self.word is None and self.names == (CPU,))


def parse_providers(choice: str | Sequence[str] | ProviderChoice | None) -> ProviderChoice:
    """The choice as a :class:`ProviderChoice`, checked for spelling only (no onnxruntime needed: a config is
    validated with it). An unknown name is a ConfigError naming it."""
    if isinstance(choice, ProviderChoice):
        return choice
    if choice is None:
        return ProviderChoice("cpu", "cpu")
    if isinstance(choice, str):
        text = choice.strip()
        tokens = [t.strip() for t in text.split(",")]
    else:
        tokens = [str(t).strip() for t in choice]
        text = ",".join(tokens)
    if not tokens or any(not t for t in tokens):
        raise ConfigError(f"providers {text!r}: an empty name; expected {CHOICES_HELP}")
    if len(tokens) == 1:
        word, _, device = tokens[0].lower().partition(":")
        if word in CHOICES and (not device or word in ("cuda", "tensorrt")):
            if device and not device.isdigit():
                raise ConfigError(f"providers {text!r}: the GPU number after {word}: must be a number (cuda:1)")
            return ProviderChoice(text, word, device_id=int(device or 0))
    names = []
    for t in tokens:
        if t.lower() in _WORDS:
            names.append(_WORDS[t.lower()])
        elif t.endswith("ExecutionProvider") and t.isidentifier():
            names.append(t)
        else:
            raise ConfigError(f"unknown execution provider {t!r} (in providers {text!r}): expected {CHOICES_HELP}, "
                              f"e.g. CUDAExecutionProvider,CPUExecutionProvider")
    return ProviderChoice(text, None, tuple(names))


def available_providers() -> list[str]:
    """``onnxruntime.get_available_providers()`` (the onnxruntime extra must be installed)."""
    return list(require("onnxruntime", "export").get_available_providers())


def resolve_providers(choice: str | Sequence[str] | ProviderChoice | None,
                      available: Sequence[str] | None = None) -> list[str]:
    """The onnxruntime provider names, in order, for ``choice`` (module docstring) given the ``available`` ones
    (default: this onnxruntime's). ``auto`` takes TensorRT > CUDA > CPU among them, the CPU last; ``cuda`` and
    ``tensorrt`` not available are a ConfigError saying how to get them; a list passes through, each name
    available."""
    spec = parse_providers(choice)
    have = list(available) if available is not None else available_providers()
    if spec.word == "cpu":
        return [CPU]
    if spec.word == "auto":
        return [p for p in GPU_PROVIDERS if p in have] + [CPU]
    if spec.word is not None:  # cuda | tensorrt
        wanted = _WORDS[spec.word]
        if wanted not in have:
            raise ConfigError(_unavailable(spec, wanted, have))
        return ([TENSORRT] if spec.word == "tensorrt" else []) + ([CUDA] if CUDA in have else []) + [CPU]
    for name in spec.names:
        if name not in have:
            raise ConfigError(_unavailable(spec, name, have))
    return list(spec.names)


def _unavailable(spec: ProviderChoice, name: str, have: Sequence[str]) -> str:
    how = INSTALL_GPU if name in GPU_PROVIDERS else "use one this onnxruntime has, or a build of onnxruntime with it"
    return (f"providers {spec.text!r}: this onnxruntime has no {name} (it has {', '.join(have) or 'none'}); {how}. "
            f"--providers cpu (or auto) runs on the CPU")


def tensorrt_cache_dir() -> Path:
    """Where TensorRT engines (and its timing cache) are kept between runs: ``$VISREC_TENSORRT_CACHE``, else
    ``$XDG_CACHE_HOME/visrec/tensorrt``, else ``~/.cache/visrec/tensorrt``. An engine is specific to the model,
    the GPU and the TensorRT version; deleting the folder only costs the next session the build time."""
    env = os.environ.get("VISREC_TENSORRT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "visrec" / "tensorrt"


def provider_options(names: Sequence[str], device_id: int = 0, cache_dir: str | Path | None = None) -> list[dict]:
    """onnxruntime's ``provider_options`` for ``names``: the GPU of CUDA and TensorRT; TensorRT in float32 with
    its engines and timing cache in ``cache_dir`` (default :func:`tensorrt_cache_dir`, created)."""
    out = []
    for name in names:
        if name == CUDA:
            out.append({"device_id": int(device_id)})
        elif name == TENSORRT:
            cache = Path(cache_dir) if cache_dir is not None else tensorrt_cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            out.append({"device_id": int(device_id), "trt_fp16_enable": False, "trt_int8_enable": False,
                        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)})
        else:
            out.append({})
    return out


def check_session_providers(session, choice: str | Sequence[str] | ProviderChoice | None, requested: Sequence[str],
                            path: str | Path | None = None, what: str = "ONNX") -> list[str]:
    """``session.get_providers()``, checked against what was ``requested`` for ``choice``: onnxruntime silently
    runs a session on the CPU when a GPU provider's libraries fail to load, which is an error for an explicit
    request (``cuda``, ``tensorrt``: their provider; a list: every GPU provider in it) and reported for ``auto``."""
    spec = parse_providers(choice)
    got = list(session.get_providers())
    if not spec.explicit_gpu:
        return got
    must = [requested[0]] if spec.word is not None else [n for n in requested if n in GPU_PROVIDERS]
    missing = [n for n in must if n not in got]
    if missing:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{what} model: asked for {missing[0]} (providers {spec.text!r}) but onnxruntime "
                          f"opened the session on {', '.join(got)} only: it fell back because the GPU libraries did "
                          f"not load (onnxruntime's warning above names the one missing): install the CUDA and "
                          f"cuDNN (TensorRT) libraries the onnxruntime-gpu release requires, or use --providers cpu "
                          f"(or auto, which takes what loads)")
    return got


def describe_providers(session) -> str:
    """What runs a session, for tables and logs: ``ONNX Runtime on CUDAExecutionProvider (+ CPU)``."""
    got = list(session.get_providers())
    head = got[0] if got else "no provider"
    return f"ONNX Runtime on {head}" + (" (+ " + ", ".join(p.removesuffix("ExecutionProvider") for p in got[1:]) + ")"
                                        if len(got) > 1 else "")


def open_session(path: Path, providers: str | Sequence[str] | ProviderChoice | None = None, what: str = "ONNX",
                 threads: int | None = None, input_hw: Sequence[int] | None = None):
    """``onnxruntime.InferenceSession`` for ``path``; a missing or unreadable file raises DataError saying which
    (``what`` names the kind of model in the message, e.g. "face detector"). ``providers``: a choice of the module
    docstring (None: the CPU), resolved by :func:`resolve_providers` and checked after the session is made
    (:func:`check_session_providers`). ``threads``: intra-op threads (when None: :func:`set_default_threads`'s
    value, else ``OMP_NUM_THREADS`` (:func:`omp_threads`), else onnxruntime's default: the physical cores).

    The file comes from elsewhere: before onnxruntime sees it, :func:`visrec._onnx_check.check_graph` sizes its
    graph (what onnxruntime would compute at load, every tensor at batch 1, at the (height, width) ``input_hw``
    the caller feeds where the graph leaves them free) and refuses one that would allocate more than its
    bounds, with a DataError naming the file and the node; onnxruntime's own constant folding is capped at
    :data:`visrec._onnx_check.FOLD_LIMIT_BYTES` per node. Needs the ``onnx`` package (the ``export`` extra)."""
    threads = threads or DEFAULT_THREADS[0] or omp_threads()
    ort = require("onnxruntime", "export")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} file not found", path=path)
    spec = parse_providers(providers)
    names = resolve_providers(spec, ort.get_available_providers())
    rows = check_graph(path, input_hw)
    opts = ort.SessionOptions()
    # a second bound on load-time folding (2.0 GB -> 10 MB for the ConstantOfShape [16000, 16000] graph on
    # onnxruntime 1.32); an onnxruntime that does not know the key ignores it, and check_graph bounds the same
    opts.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", str(FOLD_LIMIT_BYTES))
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), opts, providers=names,
                                       provider_options=provider_options(names, spec.device_id))
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise DataError(f"onnxruntime cannot load it: {str(exc).splitlines()[0][:200]}", path=path) from None
    check_session_providers(session, spec, names, path, what)
    session.visrec_max_rows = rows  # run_batched's slice: no tensor beyond MAX_VALUE_BYTES at the batch run
    return session


def run_batched(session, output_names, input_name: str, batch: np.ndarray) -> list[np.ndarray]:
    """``session.run(output_names, {input_name: batch})`` in slices of at most the rows :func:`open_session`
    allowed (``visrec._onnx_check.check_graph``: a graph whose tensors are large per image takes fewer images a
    run, so that none holds more than 1 GiB), the outputs joined along the batch axis. A session visrec did not
    open, or a graph with a fixed batch, runs the batch whole."""
    rows = getattr(session, "visrec_max_rows", None)
    if rows is None or len(batch) <= rows:
        return session.run(output_names, {input_name: batch})
    parts = [session.run(output_names, {input_name: batch[i:i + rows]}) for i in range(0, len(batch), rows)]
    return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]


class OnnxEmbedder:
    """Runs an exported model with onnxruntime (the CPU unless ``providers`` says otherwise): float32 NCHW array
    -> (N, D) embeddings."""

    def __init__(self, path: str | Path, threads: int | None = None, session=None,
                 providers: str | Sequence[str] | None = None):
        self.path = Path(path)
        self.session = session if session is not None else open_session(self.path, providers, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return run_batched(self.session, None, self.input_name, batch)[0]
        except Exception as exc:  # onnxruntime's own exception types: the graph cannot take this input
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise DataError(f"the ONNX graph failed on a float32 {list(batch.shape)} input: "
                            f"{str(exc).splitlines()[0][:300]}", path=self.path) from None
