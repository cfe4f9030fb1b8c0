"""The face pipeline bound to a serve config: the configured gallery, and gallery calibration.

The pipeline itself (decoding, detection, alignment, embedders) is :mod:`visrec.faces.pipeline`; its names
are importable from here too, as before.
"""

from __future__ import annotations

from pathlib import Path

from visrec.faces.images import InputError, decode_upload, image_hash  # noqa: F401
from visrec.faces.pipeline import (ArcFaceEmbedder, Embedder, ExternalEmbedder, Face, FacePipeline,  # noqa: F401
                                   embed_photos)


def open_configured_gallery(faces_cfg, embedder: Embedder):
    """The gallery a serve config's ``faces.gallery`` names, bound to the embedder's model name and dimension."""
    from visrec.index.gallery import open_gallery

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
    from visrec.errors import ConfigError
    from visrec.index.gallery import calibrate
    from visrec.serve.config import load_serve_config

    cfg = load_serve_config(config)
    if cfg.faces is None:
        raise ConfigError(f"{config}: no faces section, so no gallery to calibrate")
    if cfg.faces.gallery.backend != "milvus":
        raise ConfigError(f"{config}: the {cfg.faces.gallery.backend!r} gallery lives in memory; a calibrated "
                          f"threshold would be lost — calibrate a milvus gallery")
    no_face: list = []
    if photos:
        from visrec.data.folders import read_image_folder

        pipe = FacePipeline(cfg.faces.model, aligned=cfg.faces.aligned, landmarks=cfg.faces.landmarks,
                            detector=cfg.faces.detector, align=cfg.faces.align, max_pixels=cfg.limits.max_pixels)
        embedder, listing = pipe.embedder, read_image_folder(data)
        embeddings, labels, no_face = embed_photos(pipe, listing, batch, progress)
        images, identities = len(listing.paths), listing.num_classes
    else:
        from visrec.data.datasets import open_face_dataset
        from visrec.faces.evaluation import embed_all

        embedder = Embedder(cfg.faces.model)
        if not isinstance(embedder, ArcFaceEmbedder):
            raise ConfigError(f"{embedder.name} embeds its own crops, not aligned 112x112 faces: calibrate on raw "
                              f"photos through the configured pipeline (visrec gallery calibrate --photos)")
        ds = open_face_dataset(data)
        embeddings, labels = embed_all(embedder, len(ds), ds.source.image, batch, progress), ds.labels
        images, identities = len(ds), int(ds.num_classes)
    gallery = open_configured_gallery(cfg.faces, embedder)
    try:
        out = calibrate(gallery, embeddings, labels, target_fpr)
    finally:
        gallery.close()
    return {**out, "images": images, "identities": identities, "no_face": [str(p) for p in no_face],
            "gallery": cfg.faces.gallery.uri}
