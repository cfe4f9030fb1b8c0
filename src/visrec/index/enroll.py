"""Enroll a folder of photos (one sub-folder per identity) into a gallery through a face pipeline.

Each photo's largest face is enrolled under its folder's name. Photos where the detector finds no face are
left out and listed; photos with several faces enroll the largest and are listed, so a person can check that
the right one was taken; photos that cannot be read are listed with the reason. The gallery's own rules
apply per photo (names checked, a photo enrolled twice adds nothing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from visrec.data.folders import read_image_folder
from visrec.data.images import read_image
from visrec.errors import VisrecError


@dataclass
class EnrollReport:
    """What :func:`enroll_folder` did: photo paths (relative to the folder) per outcome."""

    enrolled: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    several_faces: list[str] = field(default_factory=list)  # enrolled: the largest face
    errors: list[tuple[str, str]] = field(default_factory=list)  # (photo, why)
    identities: int = 0


def enroll_face(gallery, name: str, crop, embedding, model_name: str) -> None:
    """Enroll one face under ``name``, its template keyed by a hash of the aligned crop: the same photo in
    any form (path, bytes, array) gives the same crop, so enrolling it again adds nothing."""
    digest = hashlib.sha256(crop.tobytes()).hexdigest()[:32]
    gallery.enroll(name, embedding.reshape(1, -1), hashes=[digest], model_name=model_name)


def enroll_folder(pipeline, gallery, root: str | Path, progress=None) -> EnrollReport:
    """Enroll ``root/<identity>/<photo>`` with ``pipeline`` (:class:`visrec.faces.pipeline.FacePipeline`) into
    ``gallery`` (:class:`visrec.index.gallery.Gallery`). ``progress(n)`` after each photo."""
    root = Path(root)
    listing = read_image_folder(root)
    report = EnrollReport()
    names = set()
    for path, label in zip(listing.paths, listing.labels):
        rel = str(Path(path).relative_to(root))
        name = listing.class_names[int(label)]
        try:
            faces = pipeline.faces(read_image(path))
            if not faces:
                report.no_face.append(rel)
            else:
                if len(faces) > 1:
                    report.several_faces.append(rel)
                enroll_face(gallery, name, faces[0].crop, pipeline.embedder(faces[0].crop[None]),
                            pipeline.embedder.name)
                report.enrolled.append(rel)
                names.add(name)
        except VisrecError as exc:
            report.errors.append((rel, str(exc)))
        if progress is not None:
            progress(1)
    report.identities = len(names)
    return report
