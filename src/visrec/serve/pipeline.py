"""The face pipeline bound to a serve config: the configured gallery, and gallery calibration.

The pipeline itself (decoding, detection, alignment, embedders) is :mod:`visrec.faces`.
"""

from __future__ import annotations

from pathlib import Path

from visrec.errors import ConfigError
from visrec.faces.pipeline import Embedder
from visrec.index.gallery import calibrate, open_gallery
from visrec.serve.config import load_serve_config


def open_configured_gallery(faces_cfg, embedder: Embedder):
    """The gallery a serve config's ``faces.gallery`` names, bound to the embedder's model name and dimension."""
    g = faces_cfg.gallery
    kwargs = {"model_name": embedder.name, "dim": embedder.dim, "fusion": g.fusion, "metric": embedder.metric}
    if g.backend == "milvus":
        kwargs.update(uri=g.uri, collection=g.collection)
    return open_gallery(g.backend, **kwargs)



def calibrate_gallery(config: str | Path, data: str | Path, target_fpr: float = 1e-4, *, photos: bool = False,
                      batch: int = 64, progress=None) -> dict:
    """``visrec gallery calibrate``: embed a labelled set with the serve config's model, pick the threshold at
    ``target_fpr`` over all its pairs (exact engine's rule, in the gallery's metric) and store it in the
    configured gallery. ``data``: aligned 112x112 faces (image folder or RecordIO), or with ``photos`` raw
    photos in ``data/<identity>/`` run through the configured detector, landmarks and alignment — the only
    way for an embedder with its own crop (dlib-resnet). Returns what :func:`visrec.index.gallery.calibrate`
    returns plus the counts and ``no_face`` (photos where no face was found; left out of the pairs)."""
    from visrec.faces.calibrate import embed_labelled

    cfg = load_serve_config(config)
    if cfg.faces is None:
        raise ConfigError(f"{config}: no faces section, so no gallery to calibrate")
    if cfg.faces.gallery.backend != "milvus":
        raise ConfigError(f"{config}: the {cfg.faces.gallery.backend!r} gallery lives in memory; a calibrated "
                          f"threshold would be lost — calibrate a milvus gallery")
    f = cfg.faces
    embedder, embeddings, labels, seen = embed_labelled(
        f.model, data, photos=photos, batch=batch, progress=progress, aligned=f.aligned, landmarks=f.landmarks,
        detector=f.detector, align=f.align, max_pixels=cfg.limits.max_pixels, detect_size=f.detect_size)
    gallery = open_configured_gallery(cfg.faces, embedder)
    try:
        out = calibrate(gallery, embeddings, labels, target_fpr)
    finally:
        gallery.close()
    return {**out, **seen, "gallery": cfg.faces.gallery.uri}
