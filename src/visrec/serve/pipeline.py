"""The face pipeline bound to a serve config: the configured galleries, and gallery calibration.

The pipeline itself (decoding, detection, alignment, embedders) is :mod:`visrec.faces`.
"""

from __future__ import annotations

from pathlib import Path

from visrec.errors import ConfigError
from visrec.faces.pipeline import Embedder, FacePipeline
from visrec.index.gallery import GalleryMismatchError, calibrate, open_gallery
from visrec.serve.config import GalleryConfig, load_serve_config


def configured_pipeline(cfg) -> FacePipeline:
    """The face pipeline a serve config (:class:`visrec.serve.config.ServeConfig`) describes: what the service
    and ``visrec gallery enroll`` both run, so one photo gives one crop either way."""
    f = cfg.faces
    return FacePipeline(f.model, aligned=f.aligned, landmarks=f.landmarks, detector=f.detector, align=f.align,
                        max_pixels=cfg.limits.max_pixels, detect_size=f.detect_size, runtime=f.runtime,
                        providers=cfg.providers)


def open_named_gallery(name: str, g: GalleryConfig, embedder: Embedder):
    """The gallery ``g`` (called ``name`` in the config), bound to the embedder's model name, dimension and
    metric (its model guard); an error opening it names the gallery."""
    g.check_default_not_shadowing(name)
    kwargs = {"model_name": embedder.name, "dim": embedder.dim, "fusion": g.fusion, "metric": embedder.metric}
    if g.backend == "milvus":
        kwargs.update(uri=g.uri, collection=g.collection, index=g.index, index_params=g.index_params,
                      search_params=g.search_params, consistency=g.consistency)
    elif g.backend == "faiss":  # GalleryConfig refused the Milvus settings (index_params: FAISS's factory string)
        kwargs.update(index=g.index or "Flat", search_params=g.search_params, path=g.path)
    try:
        return open_gallery(g.backend, **kwargs)
    except (GalleryMismatchError, ConfigError) as exc:  # another model's gallery, a bad collection name
        raise type(exc)(f"face gallery {name!r}: {exc}") from None


def open_configured_gallery(faces_cfg, embedder: Embedder, name: str | None = None):
    """The gallery called ``name`` in a serve config's faces section (None: the default one), bound to the
    embedder's model name and dimension."""
    name, g = faces_cfg.pick_gallery(name)
    return open_named_gallery(name, g, embedder)


def open_configured_galleries(faces_cfg, embedder: Embedder) -> dict:
    """Every gallery of a serve config's faces section by name, opened; those opened are closed again when one
    fails."""
    opened: dict = {}
    try:
        for name, g in faces_cfg.named_galleries().items():
            opened[name] = open_named_gallery(name, g, embedder)
    except BaseException:
        for g in opened.values():
            g.close()
        raise
    return opened



def calibrate_gallery(config: str | Path, data: str | Path, target_fpr: float = 1e-4, *, photos: bool = False,
                      batch: int = 64, progress=None, gallery: str | None = None) -> dict:
    """``visrec gallery calibrate``: embed a labelled set with the serve config's model, pick the threshold at
    ``target_fpr`` over all its pairs (exact engine's rule, in the gallery's metric) and store it in the
    configured gallery called ``gallery`` (None: the default one). ``data``: aligned 112x112 faces (image folder or RecordIO), or with ``photos`` raw
    photos in ``data/<identity>/`` run through the configured detector, landmarks and alignment — the only
    way for an embedder with its own crop (dlib-resnet). Returns what :func:`visrec.index.gallery.calibrate`
    returns plus the counts, ``no_face`` (photos where no face was found; left out of the pairs), ``gallery``
    (its uri) and ``gallery_name``."""
    from visrec.faces.calibrate import embed_labelled

    cfg = load_serve_config(config)
    if cfg.faces is None:
        raise ConfigError(f"{config}: no faces section, so no gallery to calibrate")
    name, g = cfg.faces.pick_gallery(gallery, str(config))
    if g.storage() is None:
        raise ConfigError(f"{config}: the {g.backend!r} gallery {name!r} lives in memory; a calibrated "
                          f"threshold would be lost — give it a file (faiss `path`) or use milvus")
    f = cfg.faces
    embedder, embeddings, labels, seen = embed_labelled(
        f.model, data, photos=photos, batch=batch, progress=progress, aligned=f.aligned, landmarks=f.landmarks,
        detector=f.detector, align=f.align, max_pixels=cfg.limits.max_pixels, detect_size=f.detect_size,
        providers=cfg.providers)
    store = open_named_gallery(name, g, embedder)
    try:
        out = calibrate(store, embeddings, labels, target_fpr)
    finally:
        store.close()
    return {**out, **seen, "gallery": g.uri if g.backend == "milvus" else g.path, "gallery_name": name}
