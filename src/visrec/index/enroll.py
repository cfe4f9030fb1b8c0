"""Enroll a folder of photos (one sub-folder per identity) into a gallery through a face pipeline.

Each photo's largest face is enrolled under its folder's name. Photos where the detector finds no face are
left out and listed; photos with several faces enroll the largest and are listed, so a person can check that
the right one was taken; photos that cannot be read are listed with the reason. A photo whose aligned face is
the same as an earlier photo's of the same person in this folder (a copy under another name) is one template,
so it is left out and listed with the photo it repeats: ``enrolled`` lists the photos stored, one per
template. The gallery's own rules apply per photo (names checked, a photo enrolled by an earlier run adds
nothing: enrolling a folder again is idempotent). Faces are written in batches
(:meth:`visrec.index.gallery.Gallery.enroll_many`), so a large folder costs one gallery write per batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from visrec.data.folders import read_image_folder
from visrec.data.images import read_image
from visrec.errors import VisrecError
from visrec.faces.images import MAX_PIXELS
from visrec.index.gallery import check_identity


@dataclass
class EnrollReport:
    """What :func:`enroll_folder` did: photo paths (relative to the folder) per outcome."""

    enrolled: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    several_faces: list[str] = field(default_factory=list)  # enrolled: the largest face
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (photo, the earlier photo it repeats): left out
    # (photo, an earlier photo with the same face in another person's folder): enrolled for both, but the same
    # face under two names is most likely a labelling mistake
    other_person: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (photo, why)
    identities: int = 0


def crop_hash(crop) -> str:
    """A template's image hash: of the aligned crop, so the same photo in any form (path, bytes, array) gives
    the same hash and enrolling it again adds nothing."""
    return hashlib.sha256(crop.tobytes()).hexdigest()[:32]


def enroll_face(gallery, name: str, crop, embedding, model_name: str) -> None:
    """Enroll one face under ``name``, its template keyed by :func:`crop_hash`."""
    gallery.enroll(name, embedding.reshape(1, -1), hashes=[crop_hash(crop)], model_name=model_name)


def with_thumbnails(thumbnails, write, stage):
    """``write(before_commit)`` — a gallery write taking :meth:`~visrec.index.gallery.Gallery.enroll_many`'s
    ``before_commit`` — with the thumbnails ``stage(ids)`` stages for its template ids (an iterable of staged
    files, taken one by one, so those staged before a failure are discarded too) written inside it:
    staged before the write commits (one that cannot be written undoes the write), published after, discarded
    if the write fails. ``thumbnails``: :class:`visrec.serve.thumbnails.Thumbnails` or None (then just the
    write). Returns what ``write`` returns."""
    if thumbnails is None:
        return write(None)
    staged = []
    try:
        result = write(lambda ids: staged.extend(stage(ids)))
    except BaseException:
        thumbnails.discard(staged)
        raise
    thumbnails.publish(staged)
    return result


def enroll_folder(pipeline, gallery, root: str | Path, progress=None, batch: int = 256,
                  thumbnails=None) -> EnrollReport:
    """Enroll ``root/<identity>/<photo>`` with ``pipeline`` (:class:`visrec.faces.pipeline.FacePipeline`) into
    ``gallery`` (:class:`visrec.index.gallery.Gallery`), ``batch`` faces per gallery write. ``progress(n)``
    after each photo. ``thumbnails`` (the service's :class:`visrec.serve.thumbnails.Thumbnails`, or anything
    with its ``stage`` / ``publish`` / ``discard``): each face's crop is staged inside the batch's write (a
    crop that cannot be written undoes the batch) and published once the write is committed."""
    root = Path(root)
    listing = read_image_folder(root)
    report = EnrollReport()
    names, pending = set(), []  # pending: (photo, name, crop, embedding) not yet written
    seen: dict[tuple[str, str], str] = {}  # (identity, crop hash) -> the photo enrolled with it in this run
    first_of: dict[str, tuple[str, str]] = {}  # crop hash -> (identity, photo) that first enrolled it in this run

    def flush():
        if pending:
            items = [(name, emb.reshape(1, -1), [crop_hash(crop)]) for _, name, crop, emb in pending]
            with_thumbnails(
                thumbnails,
                lambda before_commit: gallery.enroll_many(items, model_name=pipeline.embedder.name,
                                                          before_commit=before_commit),
                lambda ids: (s for (_, name, crop, _), tids in zip(pending, ids)  # lazy: what was staged before a
                             for s in thumbnails.stage(name, tids, crop[None])))  # failure is discarded too
            report.enrolled.extend(rel for rel, _, _, _ in pending)
            names.update(name for _, name, _, _ in pending)
            pending.clear()

    for path, label in zip(listing.paths, listing.labels):
        rel = str(Path(path).relative_to(root))
        name = listing.class_names[int(label)]
        try:
            name = check_identity(name, new=True)  # a bad folder name is this photo's error, not the batch's
            faces = pipeline.faces(read_image(path, getattr(pipeline, "max_pixels", MAX_PIXELS)))  # as elsewhere
            if not faces:
                report.no_face.append(rel)
            elif (key := (name, crop_hash(faces[0].crop))) in seen:
                report.duplicates.append((rel, seen[key]))  # one template: listing both would claim two
            else:
                embedding = pipeline.embedder(faces[0].crop[None])
                seen[key] = rel
                owner, photo = first_of.setdefault(key[1], (name, rel))
                if owner != name:
                    report.other_person.append((rel, photo))
                if len(faces) > 1:
                    report.several_faces.append(rel)
                pending.append((rel, name, faces[0].crop, embedding))
        except VisrecError as exc:
            report.errors.append((rel, str(exc)))
        if len(pending) >= batch:
            flush()
        if progress is not None:
            progress(1)
    flush()
    report.identities = len(names)
    return report
