"""Small aligned face thumbnails of a gallery's identities, kept only where a gallery is configured to
(``thumbnails: FOLDER``), so the web console can show who is enrolled.

Layout: ``FOLDER/<identity key>/<template id>.jpg`` — the folder is named by the identity's hex key
(:func:`visrec.index.gallery.identity_key`), never by the name itself, so no name reaches the file system.
Each file is the embedder's aligned crop as the enrollment saw it, JPEG, written to a temporary name and
renamed into place.

Order with the gallery (callers hold :attr:`Thumbnails.lock` across both): an enrollment's thumbnails are
staged (written under temporary names) inside the gallery's write, before it is committed, so a thumbnail
that cannot be written (a full disk) undoes the enrollment and the client is told it failed; once the gallery
committed, they are renamed into place (a crash in between leaves a person without a picture, never a
picture without a person). They are erased *before* the gallery forgets the person, so an erased person's
face never stays on disk. A rename moves them after the gallery's rename; whatever a crash leaves in between
(a folder under a name no longer enrolled, a staged file) :meth:`Thumbnails.sweep` removes when the service
next starts.

The folder is the gallery's alone: visrec marks it (``.visrec-thumbnails``) when it first uses it, and refuses
a folder that holds anything else it did not write (``thumbnails: runs`` would otherwise mix thumbnails with
a user's files, and the start-up sweep would remove them). A folder of an earlier version, unmarked but
holding only identity folders, is adopted. The sweep only ever removes identity folders and staged files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np

from visrec._files import leftovers, writing_into
from visrec.data.images import encode_jpeg
from visrec.errors import ConfigError
from visrec.index.gallery import identity_key

MAX_THUMBNAIL_BYTES = 1 << 20  # a stored thumbnail larger than this is not one visrec wrote
MARKER = ".visrec-thumbnails"
_KEY = re.compile(r"[0-9a-f]{40}")  # identity_key's form: the only folder names visrec writes here
log = logging.getLogger(__name__)


class Thumbnails:
    """The thumbnail folder of one gallery."""

    def __init__(self, folder: str | Path):
        self.root = Path(folder).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"thumbnail folder {self.root}: cannot create it ({exc.strerror})") from None
        marker = self.root / MARKER
        if not marker.exists():
            foreign = sorted(e.name for e in self.root.iterdir() if not self._is_identity_folder(e))
            if foreign:
                raise ConfigError(f"thumbnail folder {self.root} holds {', '.join(map(repr, foreign[:3]))}"
                                  f"{' and more' if len(foreign) > 3 else ''}, which visrec did not write: give the "
                                  f"gallery's thumbnails a folder of their own (a new or empty one)")
            marker.write_text("visrec keeps this gallery's face thumbnails here (one folder per identity key); "
                              "do not keep other files in this folder.\n", encoding="utf-8")
        self.lock = threading.Lock()

    @staticmethod
    def _is_identity_folder(entry: Path) -> bool:
        return bool(_KEY.fullmatch(entry.name)) and entry.is_dir() and not entry.is_symlink()

    def _dir(self, identity: str) -> Path:
        return self.root / identity_key(identity)

    def stage(self, identity: str, template_ids: list[str], crops) -> list[tuple[Path, Path]]:
        """Write one crop (RGB uint8) per template id under a temporary name; returns the (staged, final) pairs
        for :meth:`publish`. What was staged is removed again if a write fails; what a killed process staged in
        this identity's folder is removed first."""
        folder = self._dir(identity)
        staged = []
        try:
            with writing_into(self.root):  # a full disk: a StorageError naming the thumbnail folder
                folder.mkdir(exist_ok=True)
                for left in leftovers(folder, "."):  # staged names: .<pid>.<template id>.tmp
                    if left.name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            left.unlink()
                for tid, crop in zip(template_ids, crops):
                    tmp = folder / f".{os.getpid()}.{tid}.tmp"
                    staged.append((tmp, folder / f"{tid}.jpg"))
                    tmp.write_bytes(encode_jpeg(np.asarray(crop, np.uint8), quality=85))
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def publish(self, staged: list[tuple[Path, Path]]) -> None:
        """Rename staged thumbnails into place (an existing one is replaced). Called once the gallery committed
        the enrollment; a rename that fails leaves the person without that picture (logged), as a crash would."""
        for tmp, final in staged:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                log.warning("thumbnail %s not kept: %s", final, exc)
                self.discard([(tmp, final)])

    @staticmethod
    def discard(staged: list[tuple[Path, Path]]) -> None:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()

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
        """Delete every identity folder whose identity is not in ``enrolled`` (names) and every staged file;
        returns how many folders went. Anything else in the folder is left alone (module docstring). Run at
        start-up, before any request."""
        keep = {identity_key(name) for name in enrolled}
        gone = 0
        for entry in self.root.iterdir():
            if not self._is_identity_folder(entry):
                continue
            if entry.name in keep:
                for tmp in entry.glob(".*.tmp"):
                    tmp.unlink()
                continue
            shutil.rmtree(entry)
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
