"""Real face photos and landmark annotations for offline tests, fetched only from package registries.

Two sources, both pinned by the SHA-256 of the archive they come in:

- PyPI: the ``face_recognition==1.3.0`` sdist (MIT). Its ``tests/test_images/`` go to ``faces/``: five photos
  of Barack Obama (``obama.jpg``, ``obama2.jpg``, ``obama3.jpg``, ``obama_partial_face.jpg``,
  ``obama_partial_face2.jpg``), one of Joe Biden (``biden.jpg``) and ``32bit.png`` (an RGBA PNG).
  Fetched with ``pip download`` (the ordinary client, so the user's pip configuration applies).
- Debian: the ``dlib`` source package of bookworm, ``dlib_19.24+dfsg.orig.tar.bz2`` (Boost licence). Its
  ``examples/faces/`` go to ``dlib-examples/``: the JPEG photos and ``training_with_face_landmarks.xml`` /
  ``testing_with_face_landmarks.xml`` (43 faces from PASCAL VOC 2011 with 68 points in the iBUG 300-W order).
  Note the XML's own comment: those points were produced by dlib's ``shape_predictor_68_face_landmarks.dat``,
  so they are reference annotations for dlib's model, not independent human labels. The archive's URI and
  SHA-256 come from ``apt-get source --print-uris`` with a private list directory (the system's apt
  configuration is left alone), i.e. from apt's signature-verified index; where apt-get is missing or
  fails (not root, no keyring) the package pool URI is used. Either way the download must match the
  pinned SHA-256.

``manifest.json`` lists every file (relative path, sha256, bytes, source). ``fetch_real_fixtures`` is
idempotent: when the manifest's checksums verify it does nothing. ``python -m visrec.data.fixtures [DEST]``
runs it. The directory is ``$VISREC_FIXTURES`` or ``~/.cache/visrec/fixtures``.

``read_imglab_xml`` reads dlib's imglab XML (``<image file=..><box top left width height><part name x y/>``).
Boxes are ``x1, y1, x2, y2`` in pixels with ``x2 = left + width`` (one past the last column, so
``x2 - x1`` is the width); points are ``(x, y)`` pixels, origin top-left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from visrec.errors import DataError, VisrecError

FETCH_HINT = "run `python -m visrec.data.fixtures` (needs PyPI and deb.debian.org once)"
MANIFEST = "manifest.json"

PYPI = {
    "package": "face_recognition", "version": "1.3.0", "archive": "face_recognition-1.3.0.tar.gz",
    "sha256": "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
    "registry": "https://pypi.org/simple/face-recognition/",
    "command": "pip download face_recognition==1.3.0 --no-deps --no-binary :all: (hash-checking mode)",
    "member_dir": "face_recognition-1.3.0/tests/test_images/", "dest": "faces",
    "members": ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg",
                "biden.jpg", "32bit.png"],
}
DEBIAN = {
    "package": "dlib", "version": "19.24+dfsg-1 (bookworm)", "archive": "dlib_19.24+dfsg.orig.tar.bz2",
    "sha256": "66b4263822a2ff91a3e769e501c7d7927a13089e178c1427ec19cb0475823cf6",
    "registry": "http://deb.debian.org/debian",
    "uri": "http://deb.debian.org/debian/pool/main/d/dlib/dlib_19.24%2bdfsg.orig.tar.bz2",
    "command": "apt-get source --download-only --print-uris dlib (deb-src bookworm main), then fetch the "
               "orig tarball",
    "member_dir": "dlib-19.24+dfsg/examples/faces/", "dest": "dlib-examples",
    "suffixes": (".jpg",), "members": ["training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"],
}
DEB_SRC = ("deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian "
           "bookworm main\n")


def fixtures_dir() -> Path:
    """``$VISREC_FIXTURES`` or ``~/.cache/visrec/fixtures``."""
    env = os.environ.get("VISREC_FIXTURES")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visrec" / "fixtures"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_archive(path: Path, spec: dict) -> None:
    got = _sha256(path)
    if got != spec["sha256"]:
        raise VisrecError(f"{spec['archive']} from {spec['registry']} has SHA-256 {got}, expected "
                          f"{spec['sha256']}: the registry's file changed or the download is corrupt")


def _pip_download(work: Path) -> Path:
    # hash-checking mode: pip verifies the archive before it runs the sdist's metadata step
    req = work / "requirements.txt"
    req.write_text(f"{PYPI['package']}=={PYPI['version']} --hash=sha256:{PYPI['sha256']}\n")
    cmd = [sys.executable, "-m", "pip", "download", "-r", str(req), "--no-deps", "--no-binary", ":all:",
           "-d", str(work)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VisrecError(f"pip download of {PYPI['package']}=={PYPI['version']} failed: {exc}") from None
    archive = work / PYPI["archive"]
    if res.returncode != 0 or not archive.exists():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise VisrecError(f"pip could not download {PYPI['archive']} from PyPI ({PYPI['registry']}): PyPI "
                          f"unreachable, or the archive does not match the pinned SHA-256\n{tail}")
    _check_archive(archive, PYPI)
    return archive


def _apt_uri(cache: Path) -> tuple[str, str]:
    """(URI, SHA-256) of the dlib orig tarball from apt's signed Sources index, in a private list directory."""
    apt = cache / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache").mkdir(exist_ok=True)
    (apt / "sources.list").write_text(DEB_SRC)
    opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}"]
    run = dict(capture_output=True, text=True, timeout=600, cwd=apt)
    try:
        upd = subprocess.run(["apt-get", *opts, "-q", "update"], **run)
        if upd.returncode != 0 or "Err:" in upd.stdout:
            raise VisrecError(f"apt-get update for deb-src bookworm failed; is deb.debian.org reachable?\n"
                              f"{(upd.stderr or upd.stdout).strip()[-600:]}")
        res = subprocess.run(["apt-get", *opts, "source", "--download-only", "--print-uris", "dlib"], **run)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VisrecError(f"apt-get failed: {exc}") from None
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == DEBIAN["archive"]:
            return parts[0].strip("'"), parts[3].removeprefix("SHA256:")
    raise VisrecError(f"apt-get source --print-uris dlib did not list {DEBIAN['archive']} "
                      f"(bookworm's dlib changed?):\n{(res.stderr or res.stdout).strip()[-600:]}")


def _debian_download(work: Path, cache: Path, log=print) -> tuple[Path, str]:
    uri, how = DEBIAN["uri"], "package pool URI, pinned SHA-256 (apt-get not available)"
    if shutil.which("apt-get"):
        try:
            uri, apt_sha = _apt_uri(cache)
            how = "URI and SHA-256 from apt-get source --print-uris (signed index)"
        except VisrecError as exc:  # e.g. not root, no keyring: the pinned SHA-256 still guards the download
            log(f"  apt-get route failed, using the pool URI: {str(exc).splitlines()[0]}")
            uri, apt_sha, how = DEBIAN["uri"], DEBIAN["sha256"], "package pool URI, pinned SHA-256 (apt-get failed)"
        if apt_sha != DEBIAN["sha256"]:
            raise VisrecError(f"apt lists {DEBIAN['archive']} with SHA-256 {apt_sha}, expected {DEBIAN['sha256']}")
    archive = work / DEBIAN["archive"]
    try:
        with urllib.request.urlopen(uri, timeout=120) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError) as exc:
        raise VisrecError(f"cannot download {uri} from the Debian archive; is deb.debian.org reachable? "
                          f"({exc})") from None
    _check_archive(archive, DEBIAN)
    return archive, f"{uri} ({how})"


def _extract(archive: Path, spec: dict, dest: Path, source: dict) -> list[dict]:
    out, want, suffixes = [], set(spec["members"]), spec.get("suffixes", ())
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if not (m.isfile() and m.name.startswith(spec["member_dir"])):
                continue
            name = m.name[len(spec["member_dir"]):]
            if "/" in name or not (name in want or (suffixes and name.endswith(suffixes))):
                continue
            target = dest / spec["dest"] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as f, open(target, "wb") as g:
                shutil.copyfileobj(f, g)
            want.discard(name)
            out.append({"path": f"{spec['dest']}/{name}", "sha256": _sha256(target), "bytes": target.stat().st_size,
                        "source": {**source, "member": m.name}})
    if want:
        raise VisrecError(f"{spec['archive']} lacks {sorted(want)} under {spec['member_dir']}")
    return out


def _verify(dest: Path) -> dict:
    path = dest / MANIFEST
    if not path.exists():
        raise VisrecError(f"no real-face fixtures at {dest} (no {MANIFEST}): {FETCH_HINT}")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VisrecError(f"{path} is not a fixture manifest ({exc}): {FETCH_HINT}") from None
    for f in files:
        p = dest / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or _sha256(p) != f["sha256"]:
            raise VisrecError(f"fixture {p} is missing or does not match {MANIFEST}: {FETCH_HINT} --force")
    return manifest


def load_fixture_manifest(dest: str | Path | None = None) -> dict:
    """The manifest, after checking every file's size and SHA-256; raises VisrecError (with how to fetch)."""
    return _verify(Path(dest) if dest else fixtures_dir())


def require_real_fixtures(dest: str | Path | None = None) -> Path:
    """The verified fixture directory, or a VisrecError saying to run ``python -m visrec.data.fixtures``."""
    dest = Path(dest) if dest else fixtures_dir()
    _verify(dest)
    return dest


def fetch_real_fixtures(dest: str | Path | None = None, force: bool = False, log=None) -> Path:
    """Fetch the photos and annotations into ``dest`` (see the module docstring); returns ``dest``.

    Skips the download when ``manifest.json`` verifies (unless ``force``). ``log``: a print-like callable.
    Raises VisrecError naming the registry when one is unreachable or a checksum differs.
    """
    log = log or (lambda *_: None)
    dest = Path(dest) if dest else fixtures_dir()
    if not force:
        try:
            _verify(dest)
            log(f"fixtures at {dest} verify against {MANIFEST}: nothing to do")
            return dest
        except VisrecError:
            pass
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visrec-fixtures-") as tmp:
        work = Path(tmp)
        log(f"PyPI: {PYPI['command']}")
        sdist = _pip_download(work)
        files = _extract(sdist, PYPI, dest, {k: PYPI[k] for k in ("package", "version", "registry", "command")}
                         | {"archive": PYPI["archive"], "archive_sha256": PYPI["sha256"]})
        log(f"  {sdist.name} (sha256 {PYPI['sha256'][:12]}...) -> {len(files)} files in {dest / PYPI['dest']}")
        log(f"Debian: {DEBIAN['command']}")
        orig, url = _debian_download(work, dest / ".cache", log)
        more = _extract(orig, DEBIAN, dest, {k: DEBIAN[k] for k in ("package", "version", "registry", "command")}
                        | {"url": url, "archive": DEBIAN["archive"], "archive_sha256": DEBIAN["sha256"]})
        log(f"  {orig.name} (sha256 {DEBIAN['sha256'][:12]}...) -> {len(more)} files in {dest / DEBIAN['dest']}")
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    manifest = {"version": 1, "files": sorted(files + more, key=lambda f: f["path"])}
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(dest / MANIFEST)  # the manifest appears only once every file is in place
    log(f"wrote {dest / MANIFEST} ({len(manifest['files'])} files)")
    return dest


def read_imglab_xml(path: str | Path) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """dlib imglab XML -> ``[(image path, box (4,) float32 x1 y1 x2 y2, points (n, 2) float32)]``.

    One entry per ``<box>`` (boxes with ``ignore='1'`` are skipped). Parts must be named ``0..n-1``
    (``'00'``, ``'01'``, ...). Image paths resolve against the XML's directory. Malformed records raise
    DataError naming the file and the image.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"not a readable imglab XML: {exc}", path=path) from None
    out = []
    for image in root.iter("image"):
        name = image.get("file")
        if not name:
            raise DataError("<image> without a file attribute", path=path)
        for k, box in enumerate(image.findall("box")):
            where = f"image {name!r} box {k}"
            if box.get("ignore") == "1":
                continue
            try:
                top, left, w, h = (float(box.get(a)) for a in ("top", "left", "width", "height"))
                parts = {int(p.get("name")): (float(p.get("x")), float(p.get("y"))) for p in box.findall("part")}
            except (TypeError, ValueError):
                raise DataError("box or part with a missing or non-numeric attribute", path=path,
                                record=where) from None
            if w <= 0 or h <= 0:
                raise DataError(f"box of size {w} x {h}", path=path, record=where)
            if not parts or sorted(parts) != list(range(len(parts))):
                raise DataError(f"parts must be named 0..n-1, got {sorted(parts)[:5]}...", path=path, record=where)
            pts = np.array([parts[i] for i in range(len(parts))], np.float32)
            out.append((path.parent / name, np.array([left, top, left + w, top + h], np.float32), pts))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m visrec.data.fixtures", description=__doc__.split("\n")[0])
    ap.add_argument("dest", nargs="?", default=None, help=f"default: {fixtures_dir()}")
    ap.add_argument("--force", action="store_true", help="download again even if the manifest verifies")
    args = ap.parse_args(argv)
    try:
        dest = fetch_real_fixtures(args.dest, force=args.force, log=print)
    except VisrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for f in load_fixture_manifest(dest)["files"]:
        print(f"  {f['path']:48s} {f['bytes']:>9,d} B  sha256 {f['sha256'][:16]}  from {f['source']['package']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
