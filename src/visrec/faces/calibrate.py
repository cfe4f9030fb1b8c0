"""A face model's verification threshold, calibrated on the user's labelled faces and written into the model's
own contract, so every later user of the file (``visrec.verify``, ``FaceAnalysis``, a gallery, the service) gets
the threshold with where it came from: ``calibrated at FPR f on <data>``.

The data are aligned crops (an image folder ``root/<identity>/*.jpg`` or RecordIO) embedded as they are, or raw
photos (``photos=True``, ``root/<identity>/*``) run through the face pipeline (detector, landmarks, alignment),
the only way for an embedder that cuts its own crop. The threshold follows
:func:`visrec.evaluate.calibration.calibrate_threshold` (every pair, the exact engine's strict rule, in the
model's metric).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visrec._torchfile import atomic_save, read_torch_file
from visrec.data.datasets import open_face_dataset
from visrec.data.folders import read_image_folder
from visrec.errors import DataError, VisrecError
from visrec.evaluate.calibration import calibrate_threshold
from visrec.evaluate.verification import check_target_fpr
from visrec.export import write_onnx_contract
from visrec.faces.evaluation import embed_all
from visrec.faces.pipeline import ArcFaceEmbedder, Embedder, FacePipeline, embed_photos
from visrec.models.contract import FINGERPRINT_KEY, Threshold
from visrec.models.loading import file_sha256, model_contract, recorded_fingerprint
from visrec.models.model_file import _from_checkpoint


def calibrate_model(model: str | Path, data: str | Path, target_fpr: float = 1e-4, *, photos: bool = False,
                    detector="haar", landmarks=None, detect_size: int | None = 640, write: bool = True,
                    batch: int = 64, progress=None) -> dict:
    """Calibrate ``model`` (a run directory, ``model.pt`` or a ``.onnx`` file) at ``target_fpr`` on ``data``;
    with ``write``, store the threshold in the model file's contract (in place, atomically). Returns
    ``{"threshold": Threshold, "tpr", "fpr", "genuine_pairs", "impostor_pairs", "images", "identities",
    "no_face", "written"}`` (``written``: the file changed, or None)."""
    target_fpr = check_target_fpr(target_fpr)  # before anything is embedded
    target = _model_file(model) if write else None
    embedder, embeddings, labels, seen = embed_labelled(model, data, photos=photos, batch=batch, progress=progress,
                                                        detector=detector, landmarks=landmarks,
                                                        detect_size=detect_size)
    images, identities, no_face = seen["images"], seen["identities"], seen["no_face"]
    res = calibrate_threshold(embeddings, labels, target_fpr, embedder.metric)
    threshold = Threshold(value=float(res.threshold), origin="calibrated", fpr=float(target_fpr),
                          data=f"{Path(data).name} ({images} images, {identities} identities, "
                               f"{res.impostor_count:,} impostor pairs)")
    written = write_threshold(target, threshold) if write else None
    return {"threshold": threshold, "tpr": res.tpr, "fpr": res.fpr, "genuine_pairs": res.genuine_count,
            "impostor_pairs": res.impostor_count, "images": images, "identities": identities,
            "no_face": no_face, "written": None if written is None else str(written)}


def embed_labelled(model: str | Path, data: str | Path, *, photos: bool = False, batch: int = 64, progress=None,
                   **pipeline_options):
    """``(embedder, embeddings, labels, {"images", "identities", "no_face"})`` of a labelled set: aligned crops
    (an image folder or RecordIO, embedded as they are), or with ``photos`` raw photos in ``data/<identity>/``
    through a :class:`FacePipeline` built with ``pipeline_options`` (photos without a face are left out and
    listed; ``images`` and ``identities`` count what was embedded). Used to calibrate a model and a gallery alike."""
    if photos:
        pipe = FacePipeline(model, **pipeline_options)
        listing = read_image_folder(data)
        embeddings, labels, no_face = embed_photos(pipe, listing, batch, progress)
        if not len(embeddings):
            raise VisrecError(f"no face found in any of the {len(listing.paths)} photos of {data}: nothing to "
                              f"calibrate on")
        # what the pairs were made of: the photos with a face, and the identities they belong to
        return pipe.embedder, embeddings, labels, {"images": len(embeddings),
                                                   "identities": len(np.unique(labels)),
                                                   "no_face": [str(p) for p in no_face]}

    embedder = Embedder(model, providers=pipeline_options.get("providers"))
    if not isinstance(embedder, ArcFaceEmbedder):
        raise VisrecError(f"{embedder.name} embeds its own crops, not aligned faces: calibrate on raw photos "
                          f"through the face pipeline (--photos)")
    ds = open_face_dataset(data, scored=True)
    size = (embedder.input_size, embedder.input_size)
    embeddings = embed_all(embedder, len(ds), lambda i: ds.crop(i, size, embedder.name), batch, progress)
    return embedder, embeddings, ds.labels, {"images": len(ds), "identities": int(ds.num_classes), "no_face": []}


def _model_file(model: str | Path) -> Path:
    """The file a threshold is written into: a checkpoint or an ONNX file (checked before any embedding)."""
    path = Path(model)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise VisrecError(f"{model}: a threshold is written into a model file (run dir, model.pt or .onnx); "
                          f"an adapter's file is not visrec's to change - pass write=False / --no-write, or "
                          f"calibrate a gallery (visrec gallery calibrate)")
    return path


def write_threshold(path: str | Path, threshold: Threshold) -> Path:
    """Store ``threshold`` in the contract of a visrec checkpoint or an ONNX file, in place (a temporary file
    renamed over it: a crash leaves the old file). An ONNX file without a contract gets the one visrec infers
    for it (:func:`visrec.models.model_contract`), now with the threshold."""
    path = _model_file(path)
    if path.suffix.lower() == ".onnx":
        contract = model_contract(path)
        if contract.task != "face-embedding":
            raise VisrecError(f"{path} is a {contract.task} model: only face embedders have a verification threshold")
        write_onnx_contract(path, contract.replace(threshold=threshold, source=None))
        return path

    blob = read_torch_file(path)
    if not (isinstance(blob, dict) and "model_config" in blob and "backbone" in blob):
        raise DataError("not a visrec checkpoint (needs 'model_config' and 'backbone')", path=path)
    _, _, contract = _from_checkpoint(path, blob)
    if contract.task != "face-embedding":
        raise VisrecError(f"{path} is a {contract.task} model: only face embedders have a verification threshold")
    blob["contract"] = contract.replace(threshold=threshold, source=None).to_dict()
    # the same weights: the model keeps the fingerprint a gallery knows it by (the file's bytes change here)
    blob[FINGERPRINT_KEY] = recorded_fingerprint(blob.get(FINGERPRINT_KEY)) or file_sha256(path)
    atomic_save(blob, path)
    return path
