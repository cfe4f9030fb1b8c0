"""Face galleries: identities enrolled as templates (several unit embeddings each), searched exactly.

One :class:`Gallery` interface, two backends behind ``open_gallery(backend, ...)`` (registered by name in
:data:`BACKENDS`):

- ``milvus`` (:mod:`visrec.index.gallery.milvus`): a Milvus Lite file (``uri="gallery.db"``, embedded,
  offline) or a Milvus cluster (``uri="http://host:19530"``), one code path through ``pymilvus.MilvusClient``.
  Three collections: ``<name>_templates`` (one row per template), ``<name>_people`` (one row per identity:
  template count, metadata, the mean of its unit templates) and ``<name>_info`` (model name, dimension, fusion,
  threshold, metric).
- ``faiss`` (:mod:`visrec.index.gallery.faiss`): in memory (exact ``IndexFlat``), for tests and batch work;
  ``export``/``import_`` persist it.

The modules:

- :mod:`visrec.index.gallery.base`: the :class:`Gallery` interface and all that is backend-independent —
  scores (``cosine``, or negated Euclidean distance), template fusion (``max``/``mean``), idempotent
  enrollment and the model guard, identity and metadata checks, all-or-nothing writes and crash rollback, the
  export format (:func:`read_export`) and the :data:`BACKENDS` registry. Its docstring spells these out.
- :mod:`visrec.index.gallery.faiss`, :mod:`visrec.index.gallery.milvus`: the backends.
- :mod:`visrec.index.gallery.calibration`: :func:`calibrate`, the match threshold at a target FPR.

Every public name is importable from here (``from visrec.index.gallery import open_gallery``).
"""

from __future__ import annotations

from visrec.errors import ConfigError
from visrec.index.gallery.base import (BACKENDS, FUSIONS, MAX_HASH_CHARS, MAX_IDENTITY_BYTES,  # noqa: F401
                                       MAX_IDENTITY_CHARS, MAX_METADATA_CHARS, METRICS, Enrollment, Gallery,
                                       GalleryMismatchError, GalleryUnavailableError, IdentityExistsError, Match,
                                       MetadataTooLargeError,
                                       check_identity,
                                       check_metadata, identity_key, pair_scores, read_export, template_id)

# One import line per backend module: importing runs its @BACKENDS.register decorator.
from visrec.index.gallery.faiss import FaissGallery  # noqa: E402,F401
from visrec.index.gallery.milvus import MilvusGallery  # noqa: E402,F401

from visrec.index.gallery.calibration import calibrate  # noqa: E402,F401

__all__ = ["BACKENDS", "FUSIONS", "MAX_HASH_CHARS", "MAX_IDENTITY_BYTES", "MAX_IDENTITY_CHARS", "MAX_METADATA_CHARS",
           "METRICS", "Enrollment", "FaissGallery", "Gallery", "GalleryMismatchError", "GalleryUnavailableError",
           "IdentityExistsError", "Match", "MilvusGallery", "calibrate",
           "check_identity", "check_metadata", "identity_key", "open_gallery", "pair_scores", "read_export",
           "template_id"]


def open_gallery(backend: str = "milvus", **kwargs) -> Gallery:
    """``open_gallery("milvus", uri="gallery.db", collection=..., model_name=..., dim=..., fusion="max",
    metric="cosine")`` or ``open_gallery("faiss", ...)`` (in memory). ``metric``: the model's (``cosine``, or
    ``euclidean`` for distance models); an existing gallery keeps its own and refuses another. An unknown
    ``backend`` is a :class:`ConfigError` listing the known ones."""
    # exact names only (the registry would take "Milvus" too): a config's misspelt backend must fail here, not
    # open a Milvus gallery without the uri a caller passes only when the name is exactly "milvus"
    if backend not in BACKENDS.names():
        raise ConfigError(f"unknown {BACKENDS.kind} {backend!r}; known: {', '.join(BACKENDS.names())}")
    return BACKENDS.build(backend, **kwargs)
