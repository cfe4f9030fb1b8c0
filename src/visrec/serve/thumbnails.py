"""Small aligned face thumbnails of a gallery's identities, kept only where a gallery is configured to
(``thumbnails: FOLDER``), so the web console can show who is enrolled.

Layout: ``FOLDER/<identity key>/<template id>.jpg`` — the folder is named by the identity's hex key
(:func:`visrec.index.gallery.identity_key`), never by the name itself, so no name reaches the file system.
Each file is the embedder's aligned crop as the enrollment saw it, JPEG, written to a temporary name and
renamed into place.

Order with the gallery (callers hold :attr:`Thumbnails.lock` across both): thumbnails are written after the
gallery acknowledged the enrollment (a crash in between leaves a person without a picture, never a picture
without a person) and erased *before* the gallery forgets the person, so an erased person's face never
stays on disk. A rename moves them after the gallery's rename; whatever a crash leaves in between (a folder
under a name no longer enrolled, a half-written file) :meth:`Thumbnails.sweep` removes when the service
next starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from visrec.data.images import encode_jpeg
from visrec.index.gallery import identity_key

MAX_THUMBNAIL_BYTES = 1 << 20  # a stored thumbnail larger than this is not one visrec wrote


class Thumbnails:
    """The thumbnail folder of one gallery."""

    def __init__(self, folder: str | Path):
        self.root = Path(folder).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def _dir(self, identity: str) -> Path:
        return self.root / identity_key(identity)

    def add(self, identity: str, template_ids: list[str], crops: np.ndarray) -> None:
        """Store one crop (RGB uint8) per template id; an existing one is replaced."""
        folder = self._dir(identity)
        folder.mkdir(exist_ok=True)
        for tid, crop in zip(template_ids, crops):
            final = folder / f"{tid}.jpg"
            tmp = folder / f".{tid}.{os.getpid()}.tmp"
            tmp.write_bytes(encode_jpeg(np.asarray(crop, np.uint8), quality=85))
            os.replace(tmp, final)

    def has(self, identity: str) -> bool:
        folder = self._dir(identity)
        return folder.is_dir() and any(folder.glob("*.jpg"))

    def first(self, identity: str) -> bytes | None:
        """The identity's first thumbnail (by template id) as JPEG bytes; None when it has none."""
        folder = self._dir(identity)
        files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        for f in files:
            if f.is_file() and not f.is_symlink() and f.stat().st_size <= MAX_THUMBNAIL_BYTES:
                return f.read_bytes()
        return None

    def erase(self, identity: str) -> None:
        """Delete every thumbnail of the identity (an error if the folder cannot be removed)."""
        folder = self._dir(identity)
        if folder.exists():
            shutil.rmtree(folder)

    def sweep(self, enrolled) -> int:
        """Delete every folder whose identity is not in ``enrolled`` (names) and every unfinished file; returns
        how many folders went. Run at start-up, before any request."""
        keep = {identity_key(name) for name in enrolled}
        gone = 0
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink() and entry.name in keep:
                for tmp in entry.glob(".*.tmp"):
                    tmp.unlink()
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            gone += 1
        return gone

    def rename(self, identity: str, new_name: str) -> None:
        """Move the identity's thumbnails to its new name (the new name has none: the gallery refuses a rename
        onto an enrolled identity, and a folder left by a crash is replaced)."""
        old, new = self._dir(identity), self._dir(new_name)
        if not old.exists():
            return
        if new.exists():
            shutil.rmtree(new)
        os.replace(old, new)


def erase_person(gallery, identity: str, thumbnails: Thumbnails | None = None) -> int:
    """Erase ``identity`` from ``gallery`` and, first, its thumbnails (module docstring: the order); returns the
    templates removed (0: not enrolled, nothing touched). What the HTTP erase and ``visrec gallery delete`` do."""
    with thumbnails.lock if thumbnails is not None else contextlib.nullcontext():
        if thumbnails is not None and gallery.identity(identity) is not None:
            thumbnails.erase(identity)
        return gallery.remove(identity)
