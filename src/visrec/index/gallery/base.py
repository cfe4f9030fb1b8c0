"""The gallery interface and everything backend-independent (the backends: :mod:`visrec.index.gallery.faiss`,
:mod:`visrec.index.gallery.milvus`).

Scores (higher = more alike; ``metric``, fixed when the gallery is created, from the model):

- ``cosine`` (visrec's and ArcFace models): the cosine of L2-normalised float32 embeddings (docs/metrics.md).
- ``euclidean`` (distance models such as dlib's, whose authors threshold the raw distance): the negated
  Euclidean distance of the raw embeddings, so a score of -0.6 is dlib's "distance 0.6". The conversion
  happens here, at the model boundary; the evaluation engine only ever sees scores.

Template fusion per identity: ``max`` (the best template's score) or ``mean``. With cosine, mean is the mean
of the template cosines, which equals the probe's inner product with the mean of the unit templates — so it
is one exact search over identity centroids; with euclidean it is the negated distance to the mean of the
raw templates (a mean template; not the mean of the distances). Max fusion is exact for both: the templates
are searched with a growing limit until the results hold ``top_k`` distinct identities; those are then the
top-k identities by their best template.

Enrollment is idempotent per (identity, image hash): a template's id is a hash of both, and rows are
upserted, so repeating an enrollment — say after a crash before the answer reached the client — never
duplicates it. A gallery records the model name and embedding dimension on its first enrollment and
refuses embeddings of another model or size (:class:`GalleryMismatchError`). A model's name carries a
fingerprint of its weights (``<architecture>@sha256:<16 hex digits>``, :mod:`visrec.models.loading`), so two
checkpoints of one architecture are two models; a name recorded without one by an earlier version is taken as
the same model's and gets the fingerprint recorded at the first open (:func:`same_model`, logged).

Identities are data. A name is normalised to Unicode NFC (so "Zoë" typed either way is one person) and
checked by :func:`check_identity`: 1-200 characters, at most 256 bytes of UTF-8, no control characters, no
surrounding spaces; quotes, backslashes, slashes and any other printable character are allowed. A backend
never sees a name inside a query expression: rows are keyed and filtered by :func:`identity_key` (hex).

Writes are all-or-nothing as the caller sees them: :meth:`Gallery.enroll` validates everything (names,
vectors, hashes, metadata and its size) before the first write, :meth:`Gallery.import_` everything but the
vectors, which it streams; a failure after a write undoes what was written; and new templates are marked pending until their identity row is written,
so a crash in between (kill -9) is rolled back when the gallery is next opened, never promoted. Identity rows
are written last and deleted first, so a template without an identity row was never acknowledged (or was
being erased) and is removed on open.

``threshold``: a template-fused score at or above it is a match (``Match.accepted``); set it with
:func:`visrec.index.gallery.calibration.calibrate` (``visrec gallery calibrate``) at a target FPR from a
labelled set, using the exact evaluation engine (:func:`visrec.evaluate.verification.tpr_at_fpr`).

The export format (:meth:`Gallery.export`, read back by :class:`GalleryExport` and :func:`read_export`) and the :data:`BACKENDS`
registry a backend registers itself in (``@BACKENDS.register("name")``) live here too.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visrec._files import replacing
from visrec._npz import NpzWriter, load_npz
from visrec._structured import MAX_NESTING, loads_json, nesting_problem
from visrec.data.text import check_output
from visrec.errors import ConfigError, DataError, VisrecError, shown
from visrec.registry import Registry

FUSIONS = ("max", "mean")
METRICS = ("cosine", "euclidean")
MAX_IDENTITY_CHARS = 200
MAX_IDENTITY_BYTES = 256  # UTF-8 bytes: what every backend's name field holds
MAX_METADATA_CHARS = 65535  # JSON characters (ASCII: non-ASCII is escaped), Milvus's VARCHAR limit
MAX_HASH_CHARS = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # only a lone one survives decoding; no UTF-8 text can hold it
# joiners between letters are part of real names (Persian, Indic scripts, emoji sequences)
_JOINERS = {"\u200c", "\u200d"}
# Invisible characters outside category Cf, from Unicode's Default_Ignorable_Code_Point property (the combining
# grapheme joiner, Hangul fillers, Khmer's deprecated inherent vowels) and the blank Braille pattern: "alice" +
# U+3164 looks like "alice" as much as "alice" + U+200B does
_INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0]")
# Variation selectors (standard, Mongolian, ideographic) choose a glyph of the character before them: an emoji's
# or symbol's form, a Han ideograph's variant, a Mongolian letter's form; after anything else they show nothing
_SELECTORS = re.compile("[\u180b-\u180d\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_MILVUS_TOPK = 16384  # the largest limit a Milvus search accepts
IMPORT_BATCH = 4096  # templates per write when an export is imported
# the longest raw (euclidean) row stored: its squared distances stay well inside float32, as FAISS and Milvus
# compute them
_MAX_RAW_NORM = 1e18
FINGERPRINT = "@sha256:"  # a model name's fingerprint of its weights (visrec.models.loading.FINGERPRINT)
log = logging.getLogger(__name__)


class GalleryMismatchError(VisrecError):
    """Embeddings from another model, or of another dimension, than the gallery holds."""


class IdentityExistsError(DataError):
    """A rename onto a name that is enrolled already."""


class GalleryUnavailableError(VisrecError):
    """The gallery's store did not answer (a Milvus server down or restarting); nothing of the call stayed."""


@dataclass(frozen=True)
class Match:
    identity: str
    score: float  # fused score: cosine, or negated Euclidean distance (the gallery's metric)
    accepted: bool  # score >= threshold (False when the gallery has no threshold)


def template_id(identity: str, image_hash: str) -> str:
    return hashlib.sha256(f"{identity}\0{image_hash}".encode()).hexdigest()[:32]


def identity_key(identity: str) -> str:
    """The hex key a backend stores and filters an identity by (SHA-256 of its NFC name, 160 bits): the only
    form of a name that ever reaches a key lookup or a filter expression."""
    return hashlib.sha256(identity.encode()).hexdigest()[:40]


def _vectors(x: np.ndarray, what: str, metric: str = "cosine") -> np.ndarray:
    """Checked (n, dim) float32 rows as a gallery of ``metric`` stores them: unit rows for cosine, raw for
    euclidean (a zero row is refused for both: no model gives one for a real face).

    Norms are taken in float64, so a row of huge finite values (1e38, whose float32 norm overflows) or of tiny
    ones (1e-30, whose float32 squares underflow to 0) is normalised as any other, never stored as zeros; every
    unit row is checked to be finite and of length 1 before it is returned. Euclidean rows are kept raw, so one
    whose squared distances float32 cannot hold is refused."""
    raw = np.asarray(x)
    if raw.ndim == 1:
        raw = raw[None]
    if raw.ndim != 2 or len(raw) == 0:
        raise DataError(f"{what} must be shaped (n, dim), got {raw.shape}")
    try:
        wide = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be numbers, got {raw.dtype}") from None
    if not np.isfinite(wide).all():
        raise DataError(f"{what}: row {int(np.flatnonzero(~np.isfinite(wide).all(1))[0])} holds NaN or inf")
    norms = np.sqrt(np.square(wide / np.maximum(np.abs(wide).max(1, keepdims=True), np.finfo(np.float64).tiny))
                    .sum(1, keepdims=True)) * np.abs(wide).max(1, keepdims=True)  # scaled: no overflow
    zero = norms[:, 0] == 0
    if zero.any():
        raise DataError(f"{what}: row {int(np.flatnonzero(zero)[0])} is all zeros")
    if metric == "euclidean":
        too_big = norms[:, 0] > _MAX_RAW_NORM
        if too_big.any():
            row = int(np.flatnonzero(too_big)[0])
            raise DataError(f"{what}: row {row} has length {norms[row, 0]:.3g}, beyond what distances in float32 "
                            f"can hold (at most {_MAX_RAW_NORM:.0e}); no distance model gives such an embedding")
        return wide.astype(np.float32)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        # rows whose float32 norm is exact enough are divided in float32 as ever (bit for bit what the evaluation
        # engine scores); the others (huge, tiny) in float64
        x32 = wide.astype(np.float32)
        n32 = np.linalg.norm(x32, axis=1, keepdims=True)
        fast = np.isfinite(n32) & (np.abs(n32.astype(np.float64) - norms) <= 1e-6 * norms)
        unit = np.where(fast, x32 / n32, (wide / norms).astype(np.float32)).astype(np.float32)
    lengths = np.linalg.norm(unit.astype(np.float64), axis=1)
    bad = ~np.isfinite(unit).all(1) | (np.abs(lengths - 1) > 1e-3)
    if bad.any():  # not reachable from finite input; kept so that no non-unit row is ever stored as one
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what}: row {row} cannot be scaled to unit length (length {norms[row, 0]:.3g})")
    return unit


def split_model_name(name: str) -> tuple[str, str | None]:
    """(what the model is, the fingerprint of its weights or None) of a model name as
    :mod:`visrec.models.loading` gives it: ``<what>@sha256:<16 hex digits>``; a name without one (earlier
    versions, or a caller's own) is all ``what``."""
    what, sep, digest = name.rpartition(FINGERPRINT)
    if sep and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest):
        return what, digest
    return name, None


def same_model(recorded: str, given: str) -> bool | str:
    """Whether embeddings of model ``given`` may join a gallery (or export) that recorded model ``recorded``.

    Two fingerprinted names are one model exactly when their fingerprints are: the weights decide, whatever
    the file is called (a checkpoint and its ONNX export share one). A name without a fingerprint was written
    by an earlier version: it matches a fingerprinted name of the same model (the part before ``@sha256:``, or
    a name ``given`` says earlier versions gave it, its ``earlier``): ``"fingerprint recorded"`` when the gallery's
    name is the old one (it then records the fingerprint), ``"unverified"`` when ``given`` is (an old export,
    whose weights nothing identifies). Names without any fingerprint compare as text."""
    (r_what, r_digest), (g_what, g_digest) = split_model_name(recorded), split_model_name(given)
    if r_digest is not None and g_digest is not None:
        return r_digest == g_digest
    if r_digest is None and g_digest is None:
        return recorded == given
    if r_digest is None:
        return "fingerprint recorded" if recorded in (g_what, *getattr(given, "earlier", ())) else False
    return "unverified" if given == r_what else False


def pair_scores(a, b, metric: str = "cosine") -> np.ndarray:
    """(len(a), len(b)) scores of every row pair under ``metric`` (module docstring), float32."""
    if metric not in METRICS:
        raise VisrecError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    a, b = _vectors(a, "embeddings", metric), _vectors(b, "embeddings", metric)
    if metric == "cosine":
        return a @ b.T
    a, b = a.astype(np.float64), b.astype(np.float64)  # |a|^2 + |b|^2 - 2ab cancels for near pairs
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * (a @ b.T)
    return (-np.sqrt(np.maximum(d2, 0))).astype(np.float32)


def _score_from_raw(raw: float, metric: str) -> float:
    """A backend's raw result (inner product, or squared L2 distance as FAISS and Milvus give) -> score."""
    return float(raw) if metric == "cosine" else -float(np.sqrt(max(float(raw), 0.0)))


def check_identity(identity, *, new: bool = False) -> str:
    """``identity`` as the gallery stores it (NFC-normalised), or :class:`DataError` saying what is wrong.

    ``new``: a name about to be enrolled (or renamed to, or imported) must also hold no invisible character
    (Unicode category Cf: zero-width spaces, bidirectional overrides, a byte-order mark, the zero-width joiners
    excepted; the other default-ignorable characters: Hangul fillers, the combining grapheme joiner; the blank
    Braille pattern; a variation selector after anything but a symbol, a Han ideograph or a Mongolian letter)
    and may not start with a combining mark, any of which would make two people look like one ("alice" and
    "alice" + U+200B) or show a name reversed or blank. Looking a name up (erase, rename from) does not apply
    that rule, so a person enrolled by an
earlier version can still be erased."""
    if not isinstance(identity, str):
        raise DataError(f"identity must be a string, got {type(identity).__name__}")
    if _SURROGATE.search(identity):
        raise DataError(f"identity {identity[:80]!r} is not valid: holds a lone UTF-16 surrogate, which is no "
                        f"character")
    name = unicodedata.normalize("NFC", identity)
    problem = None
    if not name or name != name.strip():
        problem = "empty or surrounded by spaces"
    elif len(name) > MAX_IDENTITY_CHARS or len(name.encode()) > MAX_IDENTITY_BYTES:
        problem = f"longer than {MAX_IDENTITY_CHARS} characters or {MAX_IDENTITY_BYTES} bytes of UTF-8"
    elif _CONTROL.search(name):
        problem = "holds a control character"
    elif new and (bad := _invisible(name)):
        problem = bad
    if problem:
        raise DataError(f"identity {identity[:80]!r} is not valid: {problem}")
    return name


def _takes_selector(c: str) -> bool:
    """Whether a variation selector after ``c`` picks one of its forms (a symbol, a Han ideograph, Mongolian)."""
    return unicodedata.category(c).startswith("S") or unicodedata.name(c, "").startswith(("CJK", "MONGOLIAN"))


def _invisible(name: str) -> str | None:
    """Why a new name could pass for another (an invisible character in it, or nothing visible to start it);
    None when it cannot."""
    for i, c in enumerate(name):
        if unicodedata.category(c) == "Cf" and c not in _JOINERS:
            return f"holds the invisible formatting character U+{ord(c):04X}"
        if _INVISIBLE.match(c) or (_SELECTORS.match(c) and not (i and _takes_selector(name[i - 1]))):
            return f"holds the invisible character U+{ord(c):04X}"
    if unicodedata.category(name[0]).startswith("M"):  # a mark with nothing to sit on: "\u0301" looks empty
        return f"starts with the combining mark U+{ord(name[0]):04X}, which has no character to go on"
    return None


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a :meth:`Gallery.export` file (a zip holding its members), which an export may replace."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return {"vectors.npy", "identities.npy", "info.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class MetadataTooLargeError(DataError):
    """Metadata that is valid JSON but more than MAX_METADATA_CHARS of it (the service answers 422, not 400)."""


def check_metadata(metadata, identity: str = "") -> dict:
    """Identity metadata as stored: a JSON object of finite numbers and text (no lone UTF-16 surrogate), nested
    at most ``visrec._structured.MAX_NESTING`` levels, at most MAX_METADATA_CHARS of JSON; a :class:`DataError`
    otherwise (:class:`MetadataTooLargeError` for one too large)."""
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise DataError(f"metadata for {identity!r} must be a JSON object, got {type(metadata).__name__}")
    too_deep = nesting_problem(metadata)  # what is stored must read back (``loads_json``)
    if too_deep is not None:
        raise DataError(f"metadata for {identity!r} is {too_deep}")
    try:
        text = json.dumps(metadata, sort_keys=True, allow_nan=False)
        json.dumps(metadata, ensure_ascii=False).encode("utf-8")  # a lone surrogate could never be answered
    except UnicodeEncodeError:
        raise DataError(f"metadata for {identity!r} holds a lone UTF-16 surrogate, which is no character") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise DataError(f"metadata for {identity!r} is not JSON (finite numbers only): {exc}") from None
    if len(text) > MAX_METADATA_CHARS:
        raise MetadataTooLargeError(f"metadata for {identity!r} is {len(text):,} characters of JSON, above the "
                                    f"limit of {MAX_METADATA_CHARS:,}")
    return loads_json(text)


def _check_hashes(hashes, n: int, identity: str) -> list[str]:
    if len(hashes) != n:
        raise DataError(f"{n} embeddings but {len(hashes)} hashes for {identity!r}")
    for h in hashes:
        if not isinstance(h, str) or not h or len(h) > MAX_HASH_CHARS or _CONTROL.search(h):
            raise DataError(f"image hash {str(h)[:80]!r} of {identity!r}: 1-{MAX_HASH_CHARS} printable characters")
    return list(hashes)


@dataclass(frozen=True)
class Enrollment:
    """One identity's part of :meth:`Gallery.enroll_many`: rows of ``embeddings`` as new templates, ``hashes``
    one per row (default: a hash of the row), ``metadata`` merged into the identity's."""

    identity: str
    embeddings: object
    hashes: list[str] | None = None
    metadata: dict | None = None


@dataclass
class _Undo:
    """What one write changed, so a failure can put it back: new template ids, each touched identity's row
    before the write (None: it was new) and the info record before it."""

    info: dict
    templates: list[str] = field(default_factory=list)
    marks: list = field(default_factory=list)  # what _mark_pending returned, for _clear_pending
    counts: dict[str, int] = field(default_factory=dict)  # identity -> template count as the write leaves it
    rows: dict[str, dict | None] = field(default_factory=dict)

class ReadWriteLock:
    """Many readers at once, or one writer. ``with lock:`` writes (reentrant in the writing thread, which may
    also read); ``with lock.reading():`` reads. A waiting writer holds new readers back, so a stream of
    searches never starves an enrollment. A reader must not take the write side (it would wait for itself)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # the writing thread's ident
        self._depth = 0
        self._writers_waiting = 0

    def __enter__(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return self
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer, self._depth = me, 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._depth -= 1
            if not self._depth:
                self._writer = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            mine = self._writer == threading.get_ident()  # the writer reads under its own lock
            if not mine:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield self
        finally:
            if not mine:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()


class Gallery(abc.ABC):
    """Backend-independent logic; a backend stores templates, identity rows and the info record."""

    # how searches and lookups share the gallery with writes: "exclusive" (one at a time, under the write lock),
    # "shared" (reads run together, writes wait for them: a backend whose structures are read-only while
    # searched) or "concurrent" (reads never wait: a store that orders reads and writes itself)
    reads = "exclusive"
    # how long the sorted identity names behind :meth:`page` may be reused: None while this process is the only
    # writer (they are dropped on every local write); a store other processes write too sets seconds
    names_reuse_s: float | None = None
    # the most templates one search may return (a store's own limit, Milvus's 16,384); None: no limit
    max_template_hits: int | None = None

    def __init__(self, *, model_name: str | None = None, dim: int | None = None, fusion: str = "max",
                 metric: str | None = None):
        self.lock = ReadWriteLock()  # ``with self.lock``: a write; reads as ``reads`` says
        self._names: tuple[float, list[str], list[str]] | None = None  # (when, sorted names, casefolded)
        self._needs_recovery = False  # an undo failed: repair from the pending marks before the next operation
        if self.reads not in ("exclusive", "shared", "concurrent"):
            raise VisrecError(f"{type(self).__name__}.reads = {self.reads!r}: exclusive, shared or concurrent")
        info = self._read_info()
        if fusion not in FUSIONS:
            raise ConfigError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
        if metric is not None and metric not in METRICS:
            raise ConfigError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
        # galleries written before the metric was recorded hold unit vectors: cosine
        self.info = {"model_name": None, "dim": None, "fusion": fusion, "threshold": None, "target_fpr": None,
                     "metric": "cosine"}
        self.info.update(info or {})
        self.info["fusion"] = fusion
        t = self.info["threshold"]
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t)):
            # earlier versions imported a NaN threshold, after which every identify failed: drop it
            log.warning("gallery threshold %r is not a finite number; it is cleared (calibrate again)", t)
            self.info["threshold"] = self.info["target_fpr"] = None
        if model_name is not None or dim is not None or metric is not None:
            self._check_model(model_name, dim, metric)
        if self.info != info:  # an open that changes nothing writes nothing: a full disk still serves searches
            self._write_info()

    # -- the model / dimension / metric guard --------------------------------------------------------
    def _check_model(self, model_name: str | None, dim: int | None, metric: str | None = None) -> None:
        if metric is not None and metric != self.metric and self.info["dim"] is None:
            self.info["metric"] = metric  # nothing enrolled yet: the first model sets it, as it sets the dim
        if metric is not None and metric != self.metric:
            raise GalleryMismatchError(f"the gallery compares embeddings by {self.metric}; got a model compared "
                                       f"by {metric} (re-enroll into a new gallery)")
        have_name, have_dim = self.info["model_name"], self.info["dim"]
        if dim is not None and have_dim is not None and int(dim) != int(have_dim):
            raise GalleryMismatchError(f"the gallery holds {have_dim}-d embeddings; got {dim}-d ones "
                                       f"(another model: {model_name or 'unnamed'})")
        same = None if model_name is None or have_name is None else same_model(have_name, model_name)
        if same is False:
            raise GalleryMismatchError(f"the gallery holds embeddings of model {have_name!r}; refusing "
                                       f"embeddings of model {model_name!r} (re-enroll into a new gallery)")
        if same == "fingerprint recorded":
            log.warning("the gallery recorded model %r without a fingerprint of its weights (written by an earlier "
                        "visrec); it now records %r, and refuses any other model's embeddings", have_name,
                        str(model_name))
            self.info["model_name"] = str(model_name)
        elif same == "unverified":
            log.warning("embeddings of model %r, named without a fingerprint of its weights (by an earlier visrec), "
                        "are taken as those of the gallery's model %r: nothing shows they are not", str(model_name),
                        have_name)
        if have_dim is None and dim is not None:
            self.info["dim"] = int(dim)
        if have_name is None and model_name is not None:
            self.info["model_name"] = str(model_name)

    @property
    def threshold(self) -> float | None:
        return self.info["threshold"]

    @property
    def fusion(self) -> str:
        return self.info["fusion"]

    @property
    def metric(self) -> str:
        return self.info["metric"]

    def score(self, a, b) -> float:
        """The score of two single embeddings under the gallery's metric (what ``verify`` thresholds)."""
        return float(pair_scores(a, b, self.metric)[0, 0])

    def decision_threshold(self, contract=None) -> tuple[float | None, str]:
        """(threshold, where it came from) a match is accepted against: the gallery's own calibration, else the
        model contract's threshold (``contract``: a :class:`visrec.models.contract.ModelContract`), else None
        with what to do about it."""
        if self.threshold is not None:
            fpr = self.info.get("target_fpr")
            return self.threshold, "calibrated on this gallery" + (f" at FPR {fpr:g}" if fpr is not None else "")
        t = getattr(contract, "threshold", None)
        if t is not None:
            return float(t.value), "the model's contract: " + t.origin_text()
        return None, "none: the model records none and the gallery is not calibrated (visrec gallery calibrate)"

    def set_threshold(self, threshold: float | None, target_fpr: float | None = None) -> None:
        """Store the match threshold (a finite score in the metric's range) and the FPR it was picked at."""
        if threshold is not None and (not math.isfinite(float(threshold))
                                      or not _threshold_in_range(float(threshold), self.metric)):
            raise DataError(f"threshold {threshold!r} is not a finite {self.metric} score")
        if target_fpr is not None and not 0 < float(target_fpr) <= 1:
            raise DataError(f"target FPR {target_fpr!r} is not in (0, 1]")
        with self.lock:
            self.info["threshold"] = None if threshold is None else float(threshold)
            self.info["target_fpr"] = None if target_fpr is None else float(target_fpr)
            self._write_info()

    def _reading(self):
        """The lock a search or lookup holds (``reads``)."""
        if self.reads == "exclusive":
            return self.lock
        return self.lock.reading() if self.reads == "shared" else contextlib.nullcontext()

    # -- public API -------------------------------------------------------------------------------------
    def enroll(self, identity: str, embeddings, *, hashes: list[str] | None = None, metadata: dict | None = None,
               model_name: str | None = None) -> list[str]:
        """Add templates (rows of ``embeddings``) to ``identity``; returns their template ids.

        ``identity`` is stored NFC-normalised (:func:`check_identity`). ``hashes``: one per row (the image's
        hash; by default a hash of the embedding itself). A row whose (identity, hash) is already enrolled (by an
        earlier call) is not added again: its id is the stored template's. Two rows of one call with the same hash
        are refused (:class:`DataError` naming both): the ids answered match the templates stored one to one.
        ``metadata`` (a JSON object) is merged into the identity's metadata. All or nothing:
        on any error nothing of this call stays in the gallery (module docstring).
        """
        return self.enroll_many([Enrollment(identity, embeddings, hashes, metadata)], model_name=model_name)[0]

    def enroll_many(self, items, *, model_name: str | None = None, before_commit=None) -> list[list[str]]:
        """:meth:`enroll` for many identities in one write: ``items`` are :class:`Enrollment` s or tuples
        ``(identity, embeddings[, hashes[, metadata]])``; returns each item's template ids, in order. One
        (identity, hash) twice in the batch, in one item or two, is refused as in :meth:`enroll`.

        The batch costs one key lookup of the templates and one of the identity rows, then one write of each
        kind, whatever the gallery's size. All or nothing, as :meth:`enroll`: every item is checked before the
        first write. Callers feeding millions of rows pass batches of a few thousand templates.

        ``before_commit(ids)``: called with the result after the write, before it is committed; if it raises,
        the write is undone and the error raised (files that must exist with the templates, as thumbnails,
        are staged there)."""
        checked = self._check_items(items)
        with self.lock, self._transaction() as undo:
            ids = self._enroll_locked(checked, model_name, undo)
            if before_commit is not None:
                before_commit(ids)
            return ids

    def enroll_and_count(self, identity: str, embeddings, *, hashes: list[str] | None = None,
                         metadata: dict | None = None, model_name: str | None = None,
                         before_commit=None) -> tuple[list[str], int]:
        """:meth:`enroll`, also returning the identity's template count after the write, taken from the write
        itself: a store that fails right after the write succeeded cannot turn a done enrollment into an error
        (as a second read for the count could). ``before_commit(ids)``: as in :meth:`enroll_many`."""
        checked = self._check_items([Enrollment(identity, embeddings, hashes, metadata)])
        with self.lock, self._transaction() as undo:
            ids = self._enroll_locked(checked, model_name, undo)[0]
            if before_commit is not None:
                before_commit(ids)
        return ids, undo.counts[checked[0][0]]

    def _check_item(self, item) -> tuple[str, np.ndarray, list[str], dict]:
        if not isinstance(item, Enrollment):
            if not isinstance(item, (tuple, list)) or not 2 <= len(item) <= 4:
                raise DataError(f"an enrollment is (identity, embeddings[, hashes[, metadata]]), got "
                                f"{type(item).__name__}")
            item = Enrollment(*item)
        identity = check_identity(item.identity, new=True)
        x = _vectors(item.embeddings, f"embeddings for {identity!r}", self.metric)
        hashes = item.hashes
        if hashes is None:
            hashes = [hashlib.sha256(row.tobytes()).hexdigest()[:32] for row in x]
        return identity, x, _check_hashes(hashes, len(x), identity), check_metadata(item.metadata, identity)

    def _check_items(self, items) -> list[tuple[str, np.ndarray, list[str], dict]]:
        """Every item checked (:meth:`_check_item`), and no template twice in the call: one (identity, image
        hash) in two rows would be one stored template answered as two, so it is refused naming both rows
        (a :class:`DataError`; the service refuses the same photo twice in one request the same way)."""
        checked = [self._check_item(item) for item in items]
        rows = [(i, r) for i, (_, _, hashes, _) in enumerate(checked) for r in range(len(hashes))]
        repeat = _first_repeat([checked[i][0] for i, _ in rows], [checked[i][2][r] for i, r in rows])
        if repeat is not None:
            (a_item, a_row), (i, r) = rows[repeat[0]], rows[repeat[1]]
            identity, h = checked[i][0], checked[i][2][r]
            where = (lambda i, r: f"row {r}") if len(checked) == 1 else (lambda i, r: f"item {i} row {r}")
            raise DataError(f"{where(i, r)} of the embeddings for {identity!r} has the same image hash "
                            f"{shown(h)} as {where(a_item, a_row)} (counting from 0): each row is one template, "
                            f"so enroll each image once; nothing was enrolled")
        return checked

    def _enroll_locked(self, items: list, model_name: str | None, undo: _Undo) -> list[list[str]]:
        self._recover()
        if not items:
            return []
        dims = {x.shape[1] for _, x, _, _ in items}
        if len(dims) > 1:
            raise GalleryMismatchError(f"one batch holds embeddings of {len(dims)} sizes: {sorted(dims)}")
        before = (self.info["model_name"], self.info["dim"])
        self._check_model(model_name, dims.pop())
        if (self.info["model_name"], self.info["dim"]) != before:
            self._write_info()
        ids = [[template_id(identity, h) for h in hashes] for identity, _, hashes, _ in items]
        existing = self._existing_templates([i for group in ids for i in group])
        old_rows = self._identity_rows_of(list(dict.fromkeys(identity for identity, _, _, _ in items)))
        rows: dict[str, dict] = {}  # identity -> its row as this batch leaves it
        templates: dict[str, tuple] = {}  # template id -> (identity, hash, vector), new ones only
        for (identity, x, hashes, metadata), group in zip(items, ids):
            if identity not in rows:
                old = old_rows.get(identity)
                undo.rows.setdefault(identity, old)
                rows[identity] = ({"templates": 0, "metadata": {}, "centroid": None, "changed": True} if old is None
                                  else {**old, "changed": False})
            row = rows[identity]
            merged = check_metadata({**row["metadata"], **metadata}, identity)  # must fit before any write
            if merged != row["metadata"]:
                row["metadata"], row["changed"] = merged, True
            for tid, h, v in zip(group, hashes, x):
                if tid in existing or tid in templates:
                    continue
                templates[tid] = (identity, h, v)
                # the centroid is the mean of the identity's stored templates, kept up to date in float64
                n = row["templates"]
                total = v.astype(np.float64) + (0.0 if row["centroid"] is None
                                                 else n * np.asarray(row["centroid"], np.float64))
                row["centroid"], row["templates"], row["changed"] = total / (n + 1), n + 1, True
        if templates:
            undo.templates.extend(templates)  # before the write: a half-done upsert is undone too
            undo.marks.append(self._mark_pending(list(templates)))
            self._upsert_templates([(identity, tid, h, v) for tid, (identity, h, v) in templates.items()])
        undo.counts.update({identity: r["templates"] for identity, r in rows.items()})
        changed = [(identity, r["templates"], np.asarray(r["centroid"], np.float32), r["metadata"])
                   for identity, r in rows.items() if r["changed"]]
        if changed:
            self._upsert_identities(changed)
        return ids

    @contextlib.contextmanager
    def _transaction(self):
        """Yield an :class:`_Undo` the write fills in; on any error put everything back, then re-raise.

        Pending marks are cleared only when the whole write succeeded; if the undo itself fails (the backend
        went away), the marks stay: the gallery repairs itself from them before its next operation (and the
        next open does, after a crash)."""
        undo = _Undo(info=dict(self.info))
        self._names = None
        self._begin()
        try:
            yield undo
            self._clear_pending(undo.marks)
            self._commit()
            self._names = None
        except BaseException:
            self._names = None
            try:
                self._rollback(undo)
            except Exception:  # noqa: BLE001 - the original error is what the caller must see
                self._needs_recovery = True
                log.exception("could not undo a failed gallery write; it is rolled back before the gallery's "
                              "next operation")
            raise

    def _recover(self) -> None:
        """After an undo that failed (the backend was away), repair from the pending marks first."""
        if self._needs_recovery:
            self._reconcile()
            self._needs_recovery = False

    def _rollback(self, undo: _Undo) -> None:
        if undo.templates:
            self._delete_templates(undo.templates)
        for identity, row in undo.rows.items():
            vectors = list(self._templates_of(identity).values())
            if row is None or not vectors:
                self._delete_identity(identity)
            else:
                self._upsert_identities([(identity, len(vectors), np.mean(vectors, axis=0), row["metadata"])])
        if self.info != undo.info:
            self.info = dict(undo.info)
            self._write_info()
        self._clear_pending(undo.marks)

    def remove(self, identity: str) -> int:
        """Erase an identity: its row and every template; returns how many templates it had (0: not enrolled).

        The row goes first, so a crash in between leaves only templates without a row, which the next open
        removes: an erased person never comes back."""
        identity = check_identity(identity)
        with self.lock:
            self._recover()
            row = self._identity_rows_of([identity]).get(identity)
            if row is None:
                return 0
            self._names = None
            self._delete_identity(identity)
            return int(row["templates"])

    def rename(self, identity: str, new_name: str) -> int:
        """Give an enrolled identity another name, keeping its templates (image hashes included) and metadata;
        returns its template count (0: ``identity`` is not enrolled). Refused when ``new_name`` is enrolled
        already (add the photos to it instead).

        The templates are written under the new name (one transaction, undone on failure), then the old name
        is erased as :meth:`remove` does: a crash in between leaves the person under both names, never under
        neither."""
        old, new = check_identity(identity), check_identity(new_name, new=True)
        if old == new:
            raise DataError(f"identity {old!r} already has that name")
        with self.lock:
            self._recover()
            rows = self._identity_rows_of([old, new])
            if old not in rows:
                return 0
            if new in rows:
                raise IdentityExistsError(f"identity {new!r} is already enrolled: add the photos to it, or rename "
                                          f"it first")
            vectors, hashes = self._templates_of(old), self._template_hashes_of(old)
            ids = sorted(vectors)
            with self._transaction() as undo:
                self._enroll_locked([(new, np.stack([vectors[i] for i in ids]), [hashes[i] for i in ids],
                                      rows[old]["metadata"])], None, undo)
            self._names = None
            self._delete_identity(old)
            return len(ids)

    def page(self, offset: int = 0, limit: int = 50, contains: str | None = None) -> tuple[list[dict], int]:
        """One page of identities sorted by name, ignoring case: (``limit`` rows ``{"identity", "templates", "metadata"}``
        from ``offset``, the number of identities that match). ``contains``: only names holding this text,
        compared case-insensitively.

        The sorted names are kept between calls (dropped on every write through this object, and after
        ``names_reuse_s`` seconds where other processes write too), so paging through a large gallery costs
        one sort, then ``limit`` key lookups per page."""
        import time

        if offset < 0 or not 1 <= limit <= 10_000:
            raise DataError(f"a page is offset >= 0 and 1 <= limit <= 10000, got offset {offset}, limit {limit}")
        with self.lock:
            self._recover()
            cached = self._names
            if cached is None or (self.names_reuse_s is not None and time.monotonic() - cached[0] > self.names_reuse_s):
                names = sorted(self._identity_names(), key=lambda n: (n.casefold(), n))
                cached = self._names = (time.monotonic(), names, [n.casefold() for n in names])
            _, names, folded = cached
            if contains:
                text = unicodedata.normalize("NFC", contains).casefold()
                names = [n for n, f in zip(names, folded) if text in f]
            chosen = names[offset:offset + limit]
            rows = self._identity_rows_of(chosen)
            found = [{k: rows[n][k] for k in ("identity", "templates", "metadata")} for n in chosen if n in rows]
            return found, len(names)

    def search(self, probes, top_k: int = 5, threshold: float | None = None) -> list[list[Match]]:
        """Top-``top_k`` identities per probe row by fused score, best first (exact)."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ConfigError(f"top_k must be a whole number >= 1, got {shown(top_k)}")
        q = _vectors(probes, "probes", self.metric)
        if self.info["dim"] is not None and q.shape[1] != self.info["dim"]:
            raise GalleryMismatchError(f"the gallery holds {self.info['dim']}-d embeddings; probes are {q.shape[1]}-d")
        t = self.threshold if threshold is None else float(threshold)
        if self._needs_recovery:  # before reading: a reader must not take the write lock
            with self.lock:
                self._recover()
        with self._reading():
            if self.info["dim"] is None:  # nothing was ever enrolled
                return [[] for _ in q]
            if self.fusion == "mean":
                found = self._search_identities(q, top_k)
            else:
                found = self._search_max(q, top_k)
        for row in found:
            for identity, score in row:
                self._check_score(identity, score)
        return [[Match(i, float(s), t is not None and float(s) >= t) for i, s in row] for row in found]

    def _check_score(self, identity: str, score: float) -> None:
        """A stored vector visrec wrote scores a unit probe in the metric's range (cosine: [-1, 1], a negated
        distance: <= 0, both finite). One that does not was written by something else (a Milvus collection
        another client changed, a copied database): it would outrank, or be accepted against, every probe, so
        the search is a DataError saying so instead of a match."""
        bad = not math.isfinite(score) or (score > 1 + 1e-3 or score < -1 - 1e-3 if self.metric == "cosine"
                                           else score > 0)
        if bad:
            raise DataError(f"a stored template of {shown(identity, 80)} scores {score:.6g} against a probe, outside "
                            f"what the {self.metric} metric gives: the gallery holds a vector visrec did not write "
                            f"(not unit length, or not finite); enroll that identity again or restore the gallery")

    def _search_max(self, q: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        # no count query per search: fewer hits than the limit means every template was returned
        out: list[list[tuple[str, float]] | None] = [None] * len(q)
        todo, limit, cap = list(range(len(q))), max(4 * top_k, 16), self.max_template_hits
        while todo:
            hits = self._search_templates(q[todo], limit)
            again = []
            for row, found in zip(todo, hits):
                best: dict[str, float] = {}
                for identity, score in found:  # best first: the first score seen is the identity's max
                    best.setdefault(identity, score)
                if len(best) >= top_k or len(found) < limit:
                    out[row] = list(best.items())[:top_k]
                elif cap is not None and limit >= cap:
                    raise VisrecError(f"max fusion needs more than {cap} templates to find {top_k} "
                                      f"identities: use fusion 'mean' or a smaller top_k")
                else:
                    again.append(row)
            todo, limit = again, limit * 4 if cap is None else min(limit * 4, cap)
        return out

    def identity(self, identity: str) -> dict | None:
        """``{"identity", "templates", "metadata"}`` of one identity, or None when it is not enrolled."""
        identity = check_identity(identity)
        with self._reading():
            row = self._identity_rows_of([identity]).get(identity)
        return None if row is None else {k: row[k] for k in ("identity", "templates", "metadata")}

    def list(self) -> list[dict]:
        """One row per identity: ``{"identity", "templates", "metadata"}``, sorted by name ignoring case (as
        :meth:`page` sorts them)."""
        with self.lock:
            self._recover()
            return sorted(self._identity_rows(), key=lambda r: (r["identity"].casefold(), r["identity"]))

    def names(self) -> list[str]:
        """Every enrolled identity's name, in no particular order."""
        with self.lock:
            self._recover()
            return self._identity_names()

    def count(self) -> int:
        """Number of templates."""
        with self.lock:
            self._recover()
            return self._count_templates()

    def export(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write every template, identity metadata and the info record to a ``.npz`` (no pickle). Streams: the
        vectors go to the file :data:`IMPORT_BATCH` templates at a time (memory: one batch of vectors plus the
        templates' names, whatever the gallery's size); the file appears complete or not at all. An existing
        ``path`` is replaced only when it is an earlier export (its members say so) or with ``overwrite``; a
        folder, or any other file (the gallery's own database, a config), is a :class:`DataError` naming it."""
        path = check_output(path, kind="file")
        if path.exists() and not overwrite and not _is_export(path):
            raise DataError("exists and is not a gallery export (an export replaces only an earlier export): "
                            "name another file", path=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids, owners, hashes = [], [], []

        def vectors(batches):
            for batch in batches:  # (id, identity, hash, vector) per template
                ids.extend(r[0] for r in batch)
                owners.extend(r[1] for r in batch)
                hashes.extend(r[2] for r in batch)
                yield np.stack([r[3] for r in batch]).astype(np.float32)

        try:
            with self.lock, replacing(path, suffix=".npz") as tmp:
                # an identity's metadata goes with its templates (an import refuses metadata without any)
                metas = {r["identity"]: r["metadata"] for r in self._identity_rows() if r["templates"]}
                info = dict(self.info)
                count = self._count_templates()
                with NpzWriter(tmp) as out:
                    out.rows("vectors", (count, info["dim"] or 0), np.float32,
                             vectors(self._template_batches(IMPORT_BATCH)))
                    out.array("template_ids", np.array(ids, dtype=str))
                    out.array("identities", np.array(owners, dtype=str))
                    out.array("hashes", np.array(hashes, dtype=str))
                    out.array("metadata", np.array(json.dumps(metas, sort_keys=True)))
                    out.array("info", np.array(json.dumps(info, sort_keys=True)))
        except ValueError as exc:  # another process wrote to a shared (Milvus) gallery while it was read
            raise VisrecError(f"the gallery changed while it was exported ({exc}); export again") from None
        return path

    def import_(self, path: str | Path, *, progress=None) -> int:
        """Enroll everything from an :meth:`export` file; returns the templates added (idempotent).

        Streams: names, hashes and metadata are checked before the first write, then the vectors are read and
        written :data:`IMPORT_BATCH` templates at a time (memory: one batch, whatever the file's size). The
        import is one transaction: on any error — a bad vector found half-way included — the gallery is as it
        was. ``progress(done, total)`` is called after each batch (templates)."""
        export = GalleryExport(path)
        info = export.info
        before = self.count()
        with self.lock, self._transaction() as undo:
            self._check_model(info["model_name"], info["dim"], info["metric"])
            name = self.info["model_name"]  # checked once (an old export's unfingerprinted name warns once)
            done = 0
            for batch in export.batches():
                self._enroll_locked(batch, name, undo)
                done += sum(len(x) for _, x, _, _ in batch)
                if progress is not None:
                    progress(done, len(export))
            if self.threshold is None and info["threshold"] is not None:
                self.info["threshold"], self.info["target_fpr"] = info["threshold"], info["target_fpr"]
            self._write_info()
        return self.count() - before

    def close(self) -> None:
        pass

    # -- what a backend implements -----------------------------------------------------------------------
    @abc.abstractmethod
    def _read_info(self) -> dict | None:
        """The stored info record (model name, dim, fusion, threshold), None for a new gallery."""

    @abc.abstractmethod
    def _write_info(self) -> None:
        """Store ``self.info``."""

    @abc.abstractmethod
    def _existing_templates(self, ids: list[str]) -> set[str]:
        """Which of the template ids are stored (a lookup by primary key: its cost does not grow with the
        gallery)."""

    @abc.abstractmethod
    def _identity_rows_of(self, identities: list[str]) -> dict[str, dict]:
        """Identity -> ``{"identity", "templates", "metadata", "centroid"}`` for those enrolled (by key)."""

    @abc.abstractmethod
    def _templates_of(self, identity: str) -> dict[str, np.ndarray]:
        """Template id -> stored vector (unit for cosine), for one identity (undo and repair only)."""

    @abc.abstractmethod
    def _template_hashes_of(self, identity: str) -> dict[str, str]:
        """Template id -> image hash, for one identity (:meth:`rename`)."""

    @abc.abstractmethod
    def _upsert_templates(self, rows: list) -> None:
        """Store ``(identity, template id, image hash, vector)`` rows."""

    @abc.abstractmethod
    def _upsert_identities(self, rows: list) -> None:
        """Store identity rows ``(identity, template count, centroid, metadata)``; the centroid is the mean of
        the identity's stored templates."""

    @abc.abstractmethod
    def _delete_identity(self, identity: str) -> None:
        """Delete the identity row, then its templates (in that order: see :meth:`remove`)."""

    @abc.abstractmethod
    def _delete_templates(self, ids: list[str]) -> None:
        """Delete templates by id (undoing a failed write)."""

    def _mark_pending(self, ids: list[str]):
        """Durably mark templates about to be written as not yet acknowledged (a persistent backend must);
        returns what :meth:`_clear_pending` needs to drop the marks."""

    def _clear_pending(self, marks: list) -> None:
        """Drop the pending marks (what :meth:`_mark_pending` returned) of a write complete or undone."""

    def _begin(self) -> None:
        """Start a write (a backend with transactions opens one; the others need nothing)."""

    def _commit(self) -> None:
        """End a write that succeeded."""

    def _reconcile(self) -> None:
        """Roll back what an interrupted write left (pending templates, half-erased identities); a backend whose
        writes cannot be interrupted half-way has nothing to do."""

    @abc.abstractmethod
    def _search_templates(self, q: np.ndarray, limit: int) -> list[list[tuple[str, float]]]:
        """Per probe, the ``limit`` best templates as (identity, score), best first."""

    @abc.abstractmethod
    def _search_identities(self, q: np.ndarray, limit: int) -> list[list[tuple[str, float]]]:
        """Per probe, the ``limit`` best identity centroids as (identity, score), best first."""

    @abc.abstractmethod
    def _identity_rows(self) -> list[dict]:
        """Every identity row as ``{"identity", "templates", "metadata"}``."""

    def _identity_names(self) -> list[str]:
        """Every enrolled identity's name (a backend that can read names alone overrides this)."""
        return [r["identity"] for r in self._identity_rows()]

    @abc.abstractmethod
    def _count_templates(self) -> int:
        """Number of templates."""

    @abc.abstractmethod
    def _template_batches(self, rows: int):
        """Every template as lists of at most ``rows`` (id, identity, hash, vector), in id order."""

def _reject_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _json_field(data: dict, key: str, path: Path):
    value = data[key]
    if value.shape != () or value.dtype.kind != "U":
        raise DataError(f"gallery export field {key!r} must be one JSON string, got a {value.dtype} {value.shape}",
                        path=path)
    try:
        # the metadata field maps each identity to its metadata: one level above what check_metadata bounds
        return loads_json(str(value), nesting=MAX_NESTING + (key == "metadata"), parse_constant=_reject_constant)
    except ValueError as exc:
        raise DataError(f"gallery export field {key!r} is not valid JSON: {exc}", path=path) from None


def _threshold_in_range(threshold: float, metric: str) -> bool:
    # a cosine lies in [-1, 1]; a negated distance is <= 0
    return -1.0 <= threshold <= 1.0 if metric == "cosine" else threshold <= 0.0


class GalleryExport:
    """A gallery export (:meth:`Gallery.export`) opened for reading: everything but the vectors is read and
    checked at once (``info``, ``metadata``, one name and one hash per row); the vectors are read a block at a
    time by :meth:`batches`, so importing a million templates never holds them all. Template ids in the file
    are not trusted: they are recomputed from (identity, hash). Errors are :class:`DataError` s naming the file
    and the field or row."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        data = load_npz(path, "visrec gallery export", stream=("vectors",))
        missing = {"template_ids", "identities", "hashes", "vectors", "metadata", "info"} - set(data)
        if missing:
            raise DataError(f"not a visrec gallery export: missing {', '.join(sorted(missing))}", path=path)
        self.info = self._info(_json_field(data, "info", path))
        names, hashes, vectors = data["identities"], data["hashes"], data["vectors"]
        n = len(vectors)
        for key, arr in (("identities", names), ("hashes", hashes), ("template_ids", data["template_ids"])):
            if arr.ndim != 1 or arr.dtype.kind != "U" or len(arr) != n:
                raise DataError(f"gallery export field {key!r} must be {n} strings (one per row of 'vectors'), "
                                f"got a {arr.dtype} {arr.shape}", path=path)
        dim = self.info["dim"]
        if vectors.dtype.kind != "f" or (n and dim is not None and vectors.shape[1] != dim):
            raise DataError(f"gallery export field 'vectors' must be float rows of dim {dim}, got a "
                            f"{vectors.dtype} {vectors.shape}", path=path)
        if n and dim is None:
            self.info["dim"] = int(vectors.shape[1])
        self.vectors = vectors
        self.names: list[str] = []
        self.hashes: list[str] = []
        for row, (name, h) in enumerate(zip(names.tolist(), hashes.tolist())):
            try:
                name = check_identity(name, new=True)  # an import enrolls: the rules of a new name
                self.hashes += _check_hashes([h], 1, name)
            except DataError as exc:
                raise DataError(f"gallery export row {row}: {exc}", path=path) from None
            self.names.append(name)
        repeat = _first_repeat(self.names, self.hashes)
        if repeat is not None:  # enroll refuses one template twice in a call; an import is one call
            a, b = repeat
            raise DataError(f"gallery export rows {a} and {b} hold the same template (identity {self.names[a]!r}, "
                            f"image hash {self.hashes[a]}): an export holds each template once", path=path)
        metas = _json_field(data, "metadata", path)
        if not isinstance(metas, dict):
            raise DataError("gallery export field 'metadata' must be a JSON object (identity -> object)", path=path)
        self.metadata = {}
        for name, meta in metas.items():
            try:
                self.metadata[check_identity(name, new=True)] = check_metadata(meta, name)
            except DataError as exc:
                raise DataError(f"gallery export metadata: {exc}", path=path) from None
        orphans = sorted(set(self.metadata) - set(self.names))
        if orphans:  # an identity is enrolled with its templates: metadata alone would be dropped without a word
            many = "identity" if len(orphans) == 1 else "identities"
            raise DataError(f"gallery export metadata names {len(orphans)} {many} with no template in the export, "
                            f"e.g. {orphans[0][:200]!r}", path=path)

    def _info(self, raw) -> dict:
        path = self.path
        if not isinstance(raw, dict):
            raise DataError("gallery export field 'info' must be a JSON object", path=path)
        info = {"model_name": raw.get("model_name"), "dim": raw.get("dim"), "metric": raw.get("metric", "cosine"),
                "threshold": raw.get("threshold"), "target_fpr": raw.get("target_fpr")}
        name = info["model_name"]
        if name is not None and (not isinstance(name, str) or len(name) > 1000):
            raise DataError(f"gallery export: model_name {str(name)[:80]!r} is not a name", path=path)
        if info["metric"] not in METRICS:
            raise DataError(f"gallery export: metric {str(info['metric'])[:40]!r} is not one of {', '.join(METRICS)}",
                            path=path)
        dim = info["dim"]
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536):
            raise DataError(f"gallery export: dim {dim!r} is not an integer in 1..65536", path=path)
        t, fpr = info["threshold"], info["target_fpr"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                              or not _threshold_in_range(float(t), info["metric"])):
            raise DataError(f"gallery export: threshold {t!r} is not a finite {info['metric']} score "
                            f"({'in [-1, 1]' if info['metric'] == 'cosine' else '<= 0'})", path=path)
        if fpr is not None and (isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr <= 1):
            raise DataError(f"gallery export: target_fpr {fpr!r} is not in (0, 1]", path=path)
        info["threshold"] = None if t is None else float(t)
        info["target_fpr"] = None if fpr is None else float(fpr)
        return info

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, rows: int | None = None):
        """Yield lists of ``(identity, vectors, hashes, metadata)``, one per identity within a block of at most
        ``rows`` rows (default :data:`IMPORT_BATCH`) read from the file (an identity whose rows lie in several
        blocks comes once per block), each block's vectors checked as the gallery stores them."""
        for start, block in self.vectors.blocks(rows or IMPORT_BATCH):
            groups: dict[str, list[int]] = {}
            for row in range(start, start + len(block)):
                groups.setdefault(self.names[row], []).append(row)
            out = []
            for name, at in groups.items():
                try:
                    x = _vectors(block[[r - start for r in at]], f"templates of {name!r}", self.info["metric"])
                except DataError as exc:
                    raise DataError(f"gallery export rows {at[0]}-{at[-1]}: {exc}", path=self.path) from None
                out.append((name, x, [self.hashes[r] for r in at], self.metadata.get(name, {})))
            yield out


def _first_repeat(names: list[str], hashes: list[str]) -> tuple[int, int] | None:
    """The rows ``(a, b)``, ``a < b``, of the first row ``b`` that repeats an earlier row's (identity, hash), or
    None: one template twice, in an enroll call or an import. Memory: 8 bytes a row (a sort of the pairs'
    hashes; only rows whose hashes collide are compared), whatever an export's size."""
    keys = np.fromiter((hash(pair) for pair in zip(names, hashes)), dtype=np.int64, count=len(names))
    order = np.argsort(keys, kind="stable")
    ties = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    rows = np.unique(np.concatenate([order[ties], order[ties + 1]])) if len(ties) else []
    seen: dict[tuple[str, str], int] = {}
    for row in rows:  # ascending: the first repeat found is the earliest second row
        pair = (names[row], hashes[row])
        if pair in seen:
            return seen[pair], int(row)
        seen[pair] = int(row)
    return None


def read_export(path: str | Path) -> dict:
    """A whole gallery export in memory, checked (:class:`GalleryExport`; an import streams it instead).

    Returns ``{"info": {model_name, dim, metric, threshold, target_fpr}, "metadata": {identity: dict},
    "identities": {identity: (vectors, hashes)}}`` with identities NFC-normalised."""
    export = GalleryExport(path)
    parts: dict[str, list] = {}
    for batch in export.batches():
        for name, x, hashes, _ in batch:
            parts.setdefault(name, []).append((x, hashes))
    identities = {name: (np.concatenate([x for x, _ in p]), [h for _, hs in p for h in hs])
                  for name, p in parts.items()}
    return {"info": export.info, "metadata": export.metadata, "identities": identities}


BACKENDS: Registry = Registry("gallery backend")  # name -> Gallery subclass; open_gallery builds through it
