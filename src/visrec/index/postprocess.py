"""Retrieval post-processing: a chain of stages over L2-normalised descriptors (rows, float32).

Every stage has ``fit(catalogue)`` (learn from the catalogue as the previous stages left it),
``catalogue(x)`` and ``queries(x)`` (transform each side; identity where the stage does not touch it).
A chain fits and applies its stages in the configured order; the last stage may be a re-ranker
(``Diffusion``) that replaces the nearest-neighbour search.

- PCA-whitening (Jegou & Chum 2012): learned on the catalogue, x -> (x - mean) V diag(lambda + eps)^-power,
  keeping the ``dim`` leading components, then L2. ``power=0.5`` is full whitening (the whitened
  catalogue has identity covariance); smaller powers shrink it.
- DBA, database-side augmentation (k, alpha): each catalogue vector becomes the L2-normalised weighted sum
  of its k nearest catalogue vectors (itself included, similarity 1), weights max(sim, 0)^alpha
  (alpha = 0: plain mean).
- alpha-QE, alpha query expansion (Radenovic et al. 2018): a query becomes the L2-normalised sum of
  itself (weight 1) and its k nearest catalogue vectors weighted max(sim, 0)^alpha.
- Diffusion (Iscen et al., CVPR 2017): on the catalogue's mutual k-NN graph with affinities
  max(sim, 0)^gamma and S = D^-1/2 A D^-1/2, a query's ranking scores solve (I - alpha S) f = y, where
  y holds the query's similarities^gamma to its ``query_k`` nearest catalogue vectors (0 elsewhere);
  solved by conjugate gradient for all queries at once.

Well-posed fits (checked in ``fit`` against the n catalogue vectors the stage is fitted on). A stage whose
setting the catalogue cannot support is shrunk to the largest setting it can, with a
``PostprocessWarning`` naming the stage and the numbers (``Chain.fit`` also keeps the messages in
``Chain.adjustments``, and ``products index`` writes them into the manifest); a catalogue too small for
any setting raises ``ConfigError``. Shrinking rather than refusing because the limits below are a
statistical rule, not an impossibility, and a catalogue index is built after a long extraction; the
warning and the manifest say exactly what was fitted.

- whiten: keeping d components needs n >= 4 d vectors (``WHITEN_VECTORS_PER_DIM``). A d-dimensional
  sample covariance from n vectors has rank <= n - 1; directions beyond it have eigenvalue ~0 and
  whitening multiplies them by eps^-power (1000x at the defaults): pure noise. Short of that, with n/d = r
  the smallest eigenvalue of a sample covariance of white noise is about (1 - 1/sqrt(r))^2 of the true
  one (Marchenko-Pastur), so r = 4 keeps the over-amplification of the weakest kept direction within 2x
  (full whitening). d is shrunk to floor(n / 4); n < 4 is an error.
- dba, qe: k neighbours out of n catalogue vectors must stay k <= n / 2 (``MAX_NEIGHBOUR_SHARE``): with k
  near n every vector is averaged with (nearly) the whole catalogue and all become alike, so the
  neighbourhood carries no information. k is shrunk to max(1, floor(n / 2)).
- diffusion: the same bound for ``k`` (graph neighbours) and ``query_k``.

Parameters are checked when a stage is made (``build_stage``: a ConfigError naming the stage and the
parameter, before any extraction): neighbour counts (``k``, ``query_k``) integers in 1..``MAX_NEIGHBOURS``,
``whiten.dim`` an integer >= 1 or unset, ``power`` in [0, 1], ``eps`` and ``tol`` finite > 0, ``alpha`` of
dba/qe and ``gamma`` finite >= 0, ``diffusion.alpha`` in [0, 1) (the system I - alpha S is then positive
definite and conjugate gradient converges), ``iterations`` in 1..``MAX_ITERATIONS``.

``chain.pt`` (``Chain.save``/``Chain.load``) holds each stage's fitted tensors under ``"<stage index>.<name>"``.
It is untrusted: ``Chain.load`` checks that every tensor a configured stage needs is there and no other, that
each is floating (the graph's indices integer), finite, of the expected rank, that dimensions agree along the
chain (whiten: mean (d,), projection (d, d_out) with d_out <= d; qe / diffusion vectors (n, d)) and that n is
the catalogue count; anything else is a DataError naming chain.pt and the key. A loaded neighbour count is
bounded as ``fit`` bounded it (the manifest records that shrink).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from visrec._torchfile import atomic_save, read_torch_file
from visrec.errors import ConfigError, DataError
from visrec.registry import Registry

STAGES: Registry = Registry("post-processing stage")

WHITEN_VECTORS_PER_DIM = 4      # whiten: n >= 4 * kept dimensions (module docstring)
MAX_NEIGHBOUR_SHARE = 0.5       # dba / qe / diffusion: k <= n / 2
MAX_NEIGHBOURS = 1 << 20        # any neighbour count (a config or manifest.json asking for more is refused)
MAX_ITERATIONS = 10_000         # diffusion conjugate-gradient steps
MAX_DIM = 1 << 16               # whiten.dim (the model contract's bound on an embedding's dimension)


def _int_param(stage: str, name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"post-processing stage {stage}: {name} must be an integer in {low}..{high}, "
                          f"got {value!r}")


def _real_param(stage: str, name: str, value, low: float, high: float = math.inf, *, open_low: bool = False,
                open_high: bool = False, rule: str) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if open_low else value >= low) and (value < high if open_high else value <= high))
    if not ok:
        raise ConfigError(f"post-processing stage {stage}: {name} must be {rule}, got {value!r}")


class PostprocessWarning(UserWarning):
    """A post-processing stage was shrunk to what its catalogue can support (module docstring)."""


def _adjust(stage: "Stage", message: str) -> None:
    stage.adjustments.append(message)
    warnings.warn(message, PostprocessWarning, stacklevel=3)


def _bounded_k(stage: "Stage", name: str, attr: str, n: int) -> None:
    """Shrink ``stage.<attr>`` (a neighbour count) to max(1, floor(n * MAX_NEIGHBOUR_SHARE)) with a warning."""
    k = getattr(stage, attr)
    limit = max(1, int(n * MAX_NEIGHBOUR_SHARE))
    if k > limit:
        setattr(stage, attr, limit)
        _adjust(stage, f"post-processing stage {name}: {attr}={k} neighbours is ill-posed for a catalogue of "
                       f"{n} vectors (the rule is {attr} <= n/2 = {limit}); fitted with {attr}={limit}")


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _topk(vectors: np.ndarray, catalogue: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k most similar catalogue rows for each vector, best first, in blocks."""
    k = min(k, len(catalogue))
    try:  # FAISS's exact inner-product search is the fast path; torch gives the same answer without it
        import faiss

        index = faiss.IndexFlatIP(catalogue.shape[1])
        index.add(np.ascontiguousarray(catalogue, dtype=np.float32))
        sims, idx = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return sims, idx.astype(np.int64)
    except ImportError:
        pass
    sims_out = np.empty((len(vectors), k), np.float32)
    idx_out = np.empty((len(vectors), k), np.int64)
    cat = torch.from_numpy(np.ascontiguousarray(catalogue, dtype=np.float32))
    for s in range(0, len(vectors), block):
        q = torch.from_numpy(np.ascontiguousarray(vectors[s:s + block], dtype=np.float32))
        sims, idx = torch.topk(q @ cat.T, k, dim=1)
        sims_out[s:s + block], idx_out[s:s + block] = sims.numpy(), idx.numpy()
    return sims_out, idx_out


def _expand(vectors: np.ndarray, catalogue: np.ndarray, k: int, alpha: float, include_self: bool) -> np.ndarray:
    top, order = _topk(vectors, catalogue, k)
    weights = np.maximum(top, 0.0) ** alpha
    expanded = np.einsum("nk,nkd->nd", weights, catalogue[order])
    if not include_self:
        expanded = expanded + vectors
    return _l2n(expanded)


class Stage:
    #: messages of the shrinks ``fit`` made (module docstring), newest last
    adjustments: list

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.adjustments = []
        return obj

    def fit(self, catalogue: np.ndarray) -> "Stage":
        return self

    def catalogue(self, x: np.ndarray) -> np.ndarray:
        return x

    def queries(self, x: np.ndarray) -> np.ndarray:
        return x

    def load_state(self, tensors: "_StageTensors", dim: int | None, count: int | None) -> int | None:
        """Take this stage's fitted tensors from chain.pt (``tensors``, checked there) for ``dim``-d input and a
        catalogue of ``count`` vectors (None: unknown, taken from the tensors); returns the output dimension.
        This default (a stage that declares no shapes, as one from another package): each array attribute
        ``Chain.save`` wrote for it, checked finite, the dimension passed on unchanged."""
        for key in list(vars(self)):
            t = tensors.state.get(f"{tensors.i}.{key}")
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                kind = "float" if t.dtype.is_floating_point else "int"
                setattr(self, key, tensors.get(key, t.dim(), (None,) * t.dim(), kind=kind))
        return dim


@STAGES.register("whiten")
class PCAWhitening(Stage):
    def __init__(self, dim: int | None = None, power: float = 0.5, eps: float = 1e-6):
        if dim is not None:
            _int_param("whiten", "dim", dim, 1, MAX_DIM)
        _real_param("whiten", "power", power, 0, 1, rule="in [0, 1] (0.5: full whitening)")
        _real_param("whiten", "eps", eps, 0, open_low=True, rule="finite and > 0")
        self.dim, self.power, self.eps = dim, power, eps
        self.mean: np.ndarray | None = None
        self.projection: np.ndarray | None = None

    def fit(self, catalogue: np.ndarray) -> "PCAWhitening":
        x = np.asarray(catalogue, np.float64)
        if self.dim is not None and not 1 <= self.dim <= x.shape[1]:
            raise ConfigError(f"whiten.dim must be in 1..{x.shape[1]}, got {self.dim}")
        n, dims = x.shape
        dim = self.dim or dims
        if n < WHITEN_VECTORS_PER_DIM:
            raise ConfigError(f"post-processing stage whiten: a catalogue of {n} vectors cannot fit a whitening "
                              f"(needs at least {WHITEN_VECTORS_PER_DIM} vectors per kept dimension)")
        if n < WHITEN_VECTORS_PER_DIM * dim:
            limit = n // WHITEN_VECTORS_PER_DIM
            _adjust(self, f"post-processing stage whiten: keeping {dim} of {dims} dimensions is ill-posed for a "
                          f"catalogue of {n} vectors (the rule is n >= {WHITEN_VECTORS_PER_DIM} x dim, so dim <= "
                          f"{limit}); fitted with dim={limit}")
            dim = self.dim = limit
        self.mean = x.mean(0)
        cov = np.cov(x - self.mean, rowvar=False, bias=True)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1][:dim]
        self.projection = (eigvec[:, order] * (np.maximum(eigval[order], 0) + self.eps) ** -self.power).astype(np.float32)
        self.mean = self.mean.astype(np.float32)
        return self

    def transform(self, x: np.ndarray, normalise: bool = True) -> np.ndarray:
        if self.projection is None:
            raise ConfigError("PCAWhitening used before fit")
        y = (np.asarray(x, np.float32) - self.mean) @ self.projection
        return _l2n(y) if normalise else y

    catalogue = queries = transform  # both sides

    def load_state(self, tensors, dim, count):
        self.mean = tensors.get("mean", 1, (dim,))
        dim = self.mean.shape[0]
        self.projection = tensors.get("projection", 2, (dim, None))
        out = self.projection.shape[1]
        if not 1 <= out <= min(dim, self.dim or dim):
            most = min(dim, self.dim or dim)
            tensors.fail("projection", f"whitening keeps {out} of {dim} dimensions, expected 1..{most}"
                         + (f" (whiten.dim={self.dim})" if self.dim else ""))
        return out


@STAGES.register("dba")
class DBA(Stage):
    def __init__(self, k: int = 2, alpha: float = 0.0):
        _int_param("dba", "k", k, 1, MAX_NEIGHBOURS)
        _real_param("dba", "alpha", alpha, 0, rule="finite and >= 0")
        self.k, self.alpha = k, alpha

    def fit(self, catalogue: np.ndarray) -> "DBA":
        _bounded_k(self, "dba", "k", len(catalogue))
        return self

    def catalogue(self, x: np.ndarray) -> np.ndarray:
        # the top-1 neighbour of a catalogue vector is itself (sim 1), so k includes self
        return _expand(x, x, self.k, self.alpha, include_self=True)

    apply = catalogue


@STAGES.register("qe")
class AlphaQE(Stage):
    def __init__(self, k: int = 2, alpha: float = 3.0):
        _int_param("qe", "k", k, 1, MAX_NEIGHBOURS)
        _real_param("qe", "alpha", alpha, 0, rule="finite and >= 0")
        self.k, self.alpha = k, alpha
        self.catalogue_vectors: np.ndarray | None = None

    def fit(self, catalogue: np.ndarray) -> "AlphaQE":
        _bounded_k(self, "qe", "k", len(catalogue))
        self.catalogue_vectors = catalogue
        return self

    def queries(self, x: np.ndarray) -> np.ndarray:
        return _expand(x, self.catalogue_vectors, self.k, self.alpha, include_self=False)

    apply = queries

    def load_state(self, tensors, dim, count):
        self.catalogue_vectors = tensors.get("catalogue_vectors", 2, (count, dim))
        self.k = min(self.k, max(1, int(len(self.catalogue_vectors) * MAX_NEIGHBOUR_SHARE)))  # as fit shrank k
        return self.catalogue_vectors.shape[1]


@STAGES.register("diffusion")
class Diffusion(Stage):
    """Re-ranker (module docstring). ``rank(queries, k)`` returns (scores, catalogue indices), best first."""

    reranker = True

    def __init__(self, k: int = 30, query_k: int = 10, alpha: float = 0.99, gamma: float = 3.0,
                 iterations: int = 20, tol: float = 1e-6):
        _int_param("diffusion", "k", k, 1, MAX_NEIGHBOURS)
        _int_param("diffusion", "query_k", query_k, 1, MAX_NEIGHBOURS)
        _real_param("diffusion", "alpha", alpha, 0, 1, open_high=True, rule="in [0, 1)")
        _real_param("diffusion", "gamma", gamma, 0, rule="finite and >= 0")
        _int_param("diffusion", "iterations", iterations, 1, MAX_ITERATIONS)
        _real_param("diffusion", "tol", tol, 0, open_low=True, rule="finite and > 0")
        self.k, self.query_k, self.alpha, self.gamma = k, query_k, alpha, gamma
        self.iterations, self.tol = iterations, tol
        self.vectors: np.ndarray | None = None
        self.graph: torch.Tensor | None = None

    def fit(self, catalogue: np.ndarray) -> "Diffusion":
        n = len(catalogue)
        _bounded_k(self, "diffusion", "k", n)
        _bounded_k(self, "diffusion", "query_k", n)
        self.vectors = catalogue
        sims, idx = _topk(catalogue, catalogue, min(self.k + 1, n))
        rows = np.repeat(np.arange(n), idx.shape[1])
        cols, vals = idx.ravel(), np.maximum(sims.ravel(), 0) ** self.gamma
        keep = rows != cols
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        # mutual neighbours only: keep an edge if its reverse is present (A = min(W, W^T) on the support)
        codes = rows.astype(np.int64) * n + cols
        mutual = np.isin(codes, cols.astype(np.int64) * n + rows)
        rows, cols, vals = rows[mutual], cols[mutual], vals[mutual]
        deg = np.bincount(rows, weights=vals, minlength=n)
        dinv = 1.0 / np.sqrt(np.maximum(deg, 1e-12))
        vals = vals * dinv[rows] * dinv[cols]
        self.graph = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals.astype(np.float32)),
                                             (n, n), check_invariants=True).coalesce()
        return self

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """(queries, catalogue) diffusion scores f solving (I - alpha S) f = y (conjugate gradient)."""
        n = len(self.vectors)
        sims, idx = _topk(queries, self.vectors, min(self.query_k, n))
        y = np.zeros((n, len(queries)), np.float32)
        y[idx.T, np.arange(len(queries))[None, :]] = (np.maximum(sims, 0) ** self.gamma).T
        b = torch.from_numpy(y)

        def op(v):
            return v - self.alpha * torch.sparse.mm(self.graph, v)

        f = torch.zeros_like(b)
        r = b - op(f)
        p = r.clone()
        rs = (r * r).sum(0)
        for _ in range(self.iterations):
            ap = op(p)
            step = rs / torch.clamp((p * ap).sum(0), min=1e-20)
            f += step * p
            r -= step * ap
            rs_new = (r * r).sum(0)
            if float(rs_new.max()) < self.tol ** 2:
                break
            p = r + (rs_new / torch.clamp(rs, min=1e-20)) * p
            rs = rs_new
        return f.T.numpy()

    def load_state(self, tensors, dim, count):
        self.vectors = tensors.get("vectors", 2, (count, dim))
        n = len(self.vectors)
        for attr in ("k", "query_k"):  # as fit shrank them
            setattr(self, attr, min(getattr(self, attr), max(1, int(n * MAX_NEIGHBOUR_SHARE))))
        size = tensors.get("graph.size", 1, (2,), kind="int")
        if size.tolist() != [n, n]:
            tensors.fail("graph.size", f"graph of {size.tolist()} for {n} catalogue vectors")
        indices = tensors.get("graph.indices", 2, (2, None), kind="int")
        values = tensors.get("graph.values", 1, (indices.shape[1],))
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            tensors.fail("graph.indices", f"indices outside 0..{n - 1}")
        self.graph = torch.sparse_coo_tensor(torch.from_numpy(indices), torch.from_numpy(values), (n, n),
                                             check_invariants=True).coalesce()
        return self.vectors.shape[1]

    def rank(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        f = torch.from_numpy(self.scores(queries))
        top = torch.topk(f, min(k, f.shape[1]), dim=1)
        return top.values.numpy(), top.indices.numpy()


def build_stage(spec: dict) -> Stage:
    """``{name: whiten, dim: 256}`` -> a stage; the names are those of ``STAGES``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name is None:
        raise ConfigError(f"post-processing stage without a name: {spec}")
    try:
        return STAGES.build(name, **spec)
    except TypeError as exc:
        raise ConfigError(f"post-processing stage {name!r}: {exc}") from None


class Chain:
    """Ordered stages; a re-ranker may only come last."""

    def __init__(self, stages: list[Stage]):
        for s in stages[:-1]:
            if getattr(s, "reranker", False):
                raise ConfigError("diffusion re-ranks the final results: it must be the last stage")
        self.stages = stages
        self.out_dim: int | None = None  # the output dimension, once loaded (``load``)

    @classmethod
    def from_config(cls, specs: list[dict]) -> "Chain":
        return cls([build_stage(s) for s in specs])

    @property
    def reranker(self) -> Diffusion | None:
        return self.stages[-1] if self.stages and getattr(self.stages[-1], "reranker", False) else None

    @property
    def adjustments(self) -> list[str]:
        """Every stage's shrink messages from ``fit`` (module docstring), in chain order."""
        return [m for s in self.stages for m in s.adjustments]

    def fit(self, catalogue: np.ndarray) -> np.ndarray:
        """Fit every stage in order and return the catalogue as the search index should hold it. A stage
        setting the catalogue cannot support is shrunk with a ``PostprocessWarning`` (module docstring)."""
        x = _l2n(catalogue)
        for s in self.stages:
            s.fit(x)
            x = s.catalogue(x)
        return x

    def stagewise(self, catalogue: np.ndarray, queries: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For a fitted chain: ``[(catalogue, queries)]`` as the search sees them after no stage, the first
        stage, the first two, ... all stages (``len(stages) + 1`` pairs), both sides L2-normalised."""
        x, q = _l2n(catalogue), _l2n(queries)
        out = [(x, q)]
        for s in self.stages:
            x, q = s.catalogue(x), s.queries(q)
            out.append((x, q))
        return out

    def queries(self, x: np.ndarray) -> np.ndarray:
        x = _l2n(x)
        for s in self.stages:
            x = s.queries(x)
        return x

    # --- persistence: plain tensors only, so loading never unpickles code ----------------------------
    def save(self, path) -> None:
        state = {}
        for i, stage in enumerate(self.stages):
            for key, value in vars(stage).items():
                if isinstance(value, np.ndarray):
                    state[f"{i}.{key}"] = torch.from_numpy(np.ascontiguousarray(value))
                elif isinstance(value, torch.Tensor) and value.is_sparse:
                    state[f"{i}.{key}.indices"] = value.indices()
                    state[f"{i}.{key}.values"] = value.values()
                    state[f"{i}.{key}.size"] = torch.tensor(list(value.shape))
        atomic_save(state, path)

    def load(self, path, dim: int | None = None, count: int | None = None) -> "Chain":
        """The fitted stages from ``path`` (``save``), checked against this chain (module docstring): ``dim`` the
        raw descriptors' dimension, ``count`` the catalogue's vectors (None: unknown, only agreement within the
        file is checked). Sets ``out_dim``, the dimension the chain gives (None with no stage and no ``dim``)."""
        state = read_torch_file(path)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise DataError("not a post-processing chain: expected a mapping of names to tensors", path=path)
        used: set[str] = set()
        for i, stage in enumerate(self.stages):
            dim = stage.load_state(_StageTensors(state, path, i, used), dim, count)
        extra = sorted(set(state) - used)
        if extra:
            raise DataError(f"holds tensors no stage of the configured chain ({len(self.stages)} stages) uses: "
                            f"the file belongs to another chain", path=path, field=extra[0])
        self.out_dim = dim
        return self


FINITE_CHECK_ROWS = 1 << 16  # rows checked for NaN / inf at a time: the check's mask stays small


class _StageTensors:
    """The tensors of stage ``i`` in a loaded chain.pt, each checked as it is taken (``Chain.load``)."""

    def __init__(self, state: dict, path, i: int, used: set):
        self.state, self.path, self.i, self.used = state, path, i, used

    def fail(self, name: str, message: str):
        raise DataError(f"{message}: chain.pt does not match the index's chain and catalogue; build the index "
                        "again", path=self.path, field=f"{self.i}.{name}")

    def get(self, name: str, ndim: int, shape: tuple, kind: str = "float") -> np.ndarray:
        """The tensor ``<i>.<name>`` as a NumPy array (float32, or int64 for ``kind="int"``): present, of that
        kind, ``ndim``-D, finite, and of ``shape`` where an entry is not None."""
        key = f"{self.i}.{name}"
        t = self.state.get(key)
        if t is None:
            self.fail(name, "missing")
        self.used.add(key)
        if t.is_sparse or t.dim() != ndim:
            self.fail(name, f"a {'sparse ' if t.is_sparse else ''}{t.dim()}-D tensor, expected {ndim}-D")
        if kind == "int" and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            self.fail(name, f"{t.dtype} values, expected integers")
        if kind == "float" and not t.dtype.is_floating_point:
            self.fail(name, f"{t.dtype} values, expected floating point")
        if any(w is not None and w != got for w, got in zip(shape, t.shape)):
            want = ", ".join("any" if w is None else str(w) for w in shape)
            self.fail(name, f"shaped {tuple(t.shape)}, expected ({want})")
        if kind == "float":
            for s in range(0, max(len(t), 1), FINITE_CHECK_ROWS):
                bad = ~torch.isfinite(t[s:s + FINITE_CHECK_ROWS])
                if bool(bad.any()):
                    row = s + int(bad.reshape(len(bad), -1).any(1).nonzero()[0, 0])
                    self.fail(name, f"not finite (NaN or inf) at row {row}")
            return t.to(torch.float32).numpy()
        return t.to(torch.int64).numpy()
