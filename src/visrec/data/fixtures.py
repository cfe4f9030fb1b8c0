"""Real face photos and landmark annotations for offline tests, fetched only from package registries.

Two sources, both pinned by the SHA-256 of the archive they come in:

- PyPI: the ``face_recognition==1.3.0`` sdist (MIT). Its ``tests/test_images/`` go to ``faces/``: five photos
  of Barack Obama (``obama.jpg``, ``obama2.jpg``, ``obama3.jpg``, ``obama_partial_face.jpg``,
  ``obama_partial_face2.jpg``), one of Joe Biden (``biden.jpg``) and ``32bit.png`` (an RGBA PNG).
  Fetched with ``pip download`` (the ordinary client, so the user's pip configuration applies: its index,
  mirror, proxy and certificates; no index is named here). The manifest records the index-url pip was
  configured with (``pip config list`` / ``PIP_INDEX_URL``, credentials removed) as provenance.
- Debian: the ``dlib`` source package of bookworm, ``dlib_19.24+dfsg.orig.tar.bz2`` (Boost licence). Its
  ``examples/faces/`` go to ``dlib-examples/``: the JPEG photos and ``training_with_face_landmarks.xml`` /
  ``testing_with_face_landmarks.xml`` (43 faces from PASCAL VOC 2011 with 68 points in the iBUG 300-W order).
  Note the XML's own comment: those points were produced by dlib's ``shape_predictor_68_face_landmarks.dat``,
  so they are reference annotations for dlib's model, not independent human labels. The Debian mirror is
  the one the machine's apt already uses: ``debian_mirror`` reads the apt sources (``/etc/apt/sources.list``,
  ``/etc/apt/sources.list.d/*.list`` and deb822 ``*.sources``) and takes the URI, suite and ``Signed-By`` of
  the first main-archive entry (a Debian suite such as ``bookworm`` or ``stable`` with component ``main``;
  security, updates and backports suites are not the archive). From it a private ``deb-src`` line is built
  and the archive's URI and SHA-256 come from ``apt-get source --print-uris`` with a private list directory
  (the system's apt configuration is left alone, its proxy settings still apply), i.e. from apt's
  signature-verified index; where apt-get is missing or fails (not root, no keyring) the package pool URI
  on that same mirror is used (``<mirror>/pool/main/d/dlib/<archive>``). Either way the download must match
  the pinned SHA-256. With no Debian mirror configured the fetch stops and says what to add.

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
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visrec._files import replacing
from visrec._structured import MAX_METADATA_FILE_BYTES, loads_json
from visrec.data.text import read_bytes
from visrec.errors import DataError, VisrecError

FETCH_HINT = ("run `python -m visrec.data.fixtures` (needs, once, pip's configured package index and the "
              "Debian mirror configured in the system's apt sources)")
MANIFEST = "manifest.json"

PYPI = {
    "package": "face_recognition", "version": "1.3.0", "archive": "face_recognition-1.3.0.tar.gz",
    "sha256": "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
    "command": "pip download face_recognition==1.3.0 --no-deps --no-binary :all: (hash-checking mode)",
    "member_dir": "face_recognition-1.3.0/tests/test_images/", "dest": "faces",
    "members": ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg",
                "biden.jpg", "32bit.png"],
}
DEBIAN = {
    "package": "dlib", "version": "19.24+dfsg-1 (bookworm)", "archive": "dlib_19.24+dfsg.orig.tar.bz2",
    "sha256": "66b4263822a2ff91a3e769e501c7d7927a13089e178c1427ec19cb0475823cf6",
    "pool": "pool/main/d/dlib",
    "command": "apt-get source --download-only --print-uris dlib (private deb-src line from the configured "
               "Debian mirror), then fetch the orig tarball",
    "member_dir": "dlib-19.24+dfsg/examples/faces/", "dest": "dlib-examples",
    "suffixes": (".jpg",), "members": ["training_with_face_landmarks.xml", "testing_with_face_landmarks.xml"],
}

# The apt sources apt itself reads: a file, or a directory whose *.list / *.sources files are read in name order.
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Suites of the main Debian archive (codenames and release aliases). Suffixed suites (bookworm-updates,
# bookworm-security, bookworm-backports, bookworm/updates) are not in it, so they are never chosen.
DEBIAN_SUITES = frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid", "experimental",
                           "oldoldstable", "oldstable", "stable", "testing", "unstable"})
_URI_SCHEMES = ("http", "https", "ftp", "file")  # those both apt and urllib fetch (for the pool fallback)


@dataclass(frozen=True)
class AptEntry:
    """One (type, URI, suite) of an apt sources file; ``origin`` is ``path:line`` (line of the stanza)."""

    type: str
    uri: str
    suite: str
    components: tuple[str, ...]
    signed_by: str | None
    origin: str

    @property
    def main_archive(self) -> bool:
        """A main Debian archive entry: a Debian suite (no -updates/-security suffix) with ``main``."""
        scheme = urllib.parse.urlsplit(self.uri).scheme.lower()
        return (self.type in ("deb", "deb-src") and scheme in _URI_SCHEMES and self.suite in DEBIAN_SUITES
                and "main" in self.components and not self.uri.rstrip("/").endswith("-security"))


def _redact(uri: str) -> str:
    """``uri`` without a ``user:password@`` part (safe for messages and the manifest)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def apt_source_files(paths=APT_SOURCES) -> list[Path]:
    """The files apt reads among ``paths``: files as given, directories' ``*.list`` and ``*.sources``."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix in (".list", ".sources") and f.is_file())
        elif p.is_file():
            out.append(p)
    return out


def _parse_one_line(text: str, origin: str) -> list[AptEntry]:
    """``deb [opt=value ...] URI SUITE [COMPONENT ...]`` lines (``#`` starts a comment)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.replace("\t", " ").partition(" ")
        opts, rest = {}, rest.strip()
        if rest.startswith("["):
            inside, sep, rest = rest[1:].partition("]")
            if not sep:
                continue
            for opt in inside.split():
                key, _, value = opt.partition("=")
                opts[key.rstrip("+-").lower()] = value
        fields = rest.split()
        if kind not in ("deb", "deb-src") or len(fields) < 2:
            continue
        out.append(AptEntry(kind, fields[0], fields[1], tuple(fields[2:]), opts.get("signed-by") or None,
                            f"{origin}:{n}"))
    return out


def _parse_deb822(text: str, origin: str) -> list[AptEntry]:
    """deb822 stanzas (``Types:``, ``URIs:``, ``Suites:``, ``Components:``, ``Signed-By:``, ``Enabled:``)."""
    out, stanza, key, start = [], {}, None, 0

    def flush():
        if stanza.get("enabled", "yes").strip().lower() != "no":
            comps = tuple(stanza.get("components", "").split())
            signed = stanza.get("signed-by", "").strip() or None
            for kind in stanza.get("types", "").split():
                for uri in stanza.get("uris", "").split():
                    for suite in stanza.get("suites", "").split():
                        out.append(AptEntry(kind, uri, suite, comps, signed, f"{origin}:{start}"))
        stanza.clear()

    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                flush()
            key = None
        elif line[0] in " \t" and key:  # continuation (an inline Signed-By key); " ." is an empty line
            stanza[key] += "\n" + ("" if line.strip() == "." else line.strip())
        elif ":" in line:
            if not stanza:
                start = n
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    return out


def read_apt_sources(paths=APT_SOURCES) -> list[AptEntry]:
    """Every entry of the apt sources under ``paths`` (see ``apt_source_files``), in apt's order."""
    out = []
    for f in apt_source_files(paths):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        out += (_parse_deb822 if f.suffix == ".sources" else _parse_one_line)(text, str(f))
    return out


def debian_mirror(paths=APT_SOURCES) -> AptEntry:
    """The first main Debian archive entry of the apt sources; VisrecError saying what to configure if none."""
    entries = read_apt_sources(paths)
    for e in entries:
        if e.main_archive:
            return e
    where = ", ".join(f"{p}/*.list, {p}/*.sources" if Path(p).is_dir() or Path(p).suffix == ".d" else str(p)
                      for p in paths)
    seen = "; ".join(f"{e.type} {_redact(e.uri)} {e.suite} ({e.origin})" for e in entries[:6]) or "none"
    raise VisrecError(
        f"no Debian archive mirror is configured in the apt sources ({where}); entries found: {seen}. The "
        f"dlib annotations come from the Debian archive: add your Debian mirror's main archive entry, e.g. a "
        f"line `deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] <mirror URI> bookworm main` "
        f"in /etc/apt/sources.list, or a deb822 stanza (Types: deb, URIs: <mirror URI>, Suites: bookworm, "
        f"Components: main, Signed-By: ...) in /etc/apt/sources.list.d/debian.sources; security, updates "
        f"and backports suites do not count. Or fetch the fixtures where one is configured and copy the "
        f"directory (VISREC_FIXTURES).")


def deb_src_line(mirror: AptEntry, signed_by: str | None = None) -> str:
    """The private ``deb-src`` line for ``mirror``'s URI and suite (component main), keeping its Signed-By.

    ``signed_by`` overrides the keyring (a path, for a key that was written out from an inline Signed-By).
    """
    key = signed_by or mirror.signed_by
    opts = f"[signed-by={','.join(key.replace(',', ' ').split())}] " if key and "\n" not in key else ""
    return f"deb-src {opts}{mirror.uri.rstrip('/')} {mirror.suite} main\n"


def pool_uri(mirror: AptEntry) -> str:
    """The dlib orig tarball in ``mirror``'s package pool: ``<mirror>/pool/main/d/dlib/<archive>``."""
    return f"{mirror.uri.rstrip('/')}/{DEBIAN['pool']}/{urllib.parse.quote(DEBIAN['archive'])}"


def pip_index() -> str:
    """The index pip is configured with (``PIP_INDEX_URL`` or ``pip config list``), credentials removed.

    Provenance only: ``pip download`` is never given an index. ``"pip's default index"`` when none is set.
    """
    found = {}
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60)
        for line in res.stdout.splitlines():
            name, _, value = line.partition("=")
            section, _, key = name.strip().rpartition(".")
            if section in ("global", "download", ":env:") and key in ("index-url", "extra-index-url"):
                found[(section, key)] = value.strip().strip("'\"")
    except (OSError, subprocess.TimeoutExpired):
        pass
    env = os.environ.get("PIP_INDEX_URL")
    index = env or next((found[(s, "index-url")] for s in (":env:", "download", "global")
                         if (s, "index-url") in found), None)
    extra = next((found[(s, "extra-index-url")] for s in (":env:", "download", "global")
                  if (s, "extra-index-url") in found), None)
    text = " ".join(map(_redact, index.split())) if index else "pip's default index"
    if extra:
        text += f" (extra: {' '.join(map(_redact, extra.split()))})"
    return text


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


def _check_archive(path: Path, spec: dict, where: str) -> None:
    got = _sha256(path)
    if got != spec["sha256"]:
        raise VisrecError(f"{spec['archive']} from {where} has SHA-256 {got}, expected "
                          f"{spec['sha256']}: the registry's file changed or the download is corrupt")


def _pip_download(work: Path, index: str) -> Path:
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
        raise VisrecError(f"pip could not download {PYPI['archive']} from its configured index ({index}): "
                          f"index unreachable, or the archive does not match the pinned SHA-256\n{tail}")
    _check_archive(archive, PYPI, index)
    return archive


def _apt_uri(cache: Path, mirror: AptEntry) -> tuple[str, str]:
    """(URI, SHA-256) of the dlib orig tarball from apt's signed Sources index, in a private list directory."""
    apt = cache / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache").mkdir(exist_ok=True)
    key = None
    if mirror.signed_by and "\n" in mirror.signed_by:  # an inline key (deb822): apt wants it in a file
        key = apt / "signed-by.asc"
        key.write_text(mirror.signed_by.strip() + "\n")
    (apt / "sources.list").write_text(deb_src_line(mirror, str(key) if key else None))
    opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}"]
    run = dict(capture_output=True, text=True, timeout=600, cwd=apt)
    try:
        upd = subprocess.run(["apt-get", *opts, "-q", "update"], **run)
        if upd.returncode != 0 or "Err:" in upd.stdout:
            raise VisrecError(f"apt-get update for deb-src {mirror.suite} main failed; is the mirror "
                              f"{_redact(mirror.uri)} reachable?\n{(upd.stderr or upd.stdout).strip()[-600:]}")
        res = subprocess.run(["apt-get", *opts, "source", "--download-only", "--print-uris", "dlib"], **run)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VisrecError(f"apt-get failed: {exc}") from None
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == DEBIAN["archive"]:
            return parts[0].strip("'"), parts[3].removeprefix("SHA256:")
    raise VisrecError(f"apt-get source --print-uris dlib did not list {DEBIAN['archive']} "
                      f"({mirror.suite}'s dlib is another version?):\n{(res.stderr or res.stdout).strip()[-600:]}")


def _debian_download(work: Path, cache: Path, mirror: AptEntry, log=print) -> tuple[Path, str]:
    uri, how = pool_uri(mirror), "package pool URI, pinned SHA-256 (apt-get not available)"
    if shutil.which("apt-get"):
        try:
            uri, apt_sha = _apt_uri(cache, mirror)
            how = "URI and SHA-256 from apt-get source --print-uris (signed index)"
        except VisrecError as exc:  # e.g. not root, no keyring: the pinned SHA-256 still guards the download
            log(f"  apt-get route failed, using the pool URI: {str(exc).splitlines()[0]}")
            uri, apt_sha = pool_uri(mirror), DEBIAN["sha256"]
            how = "package pool URI, pinned SHA-256 (apt-get failed)"
        if apt_sha != DEBIAN["sha256"]:
            raise VisrecError(f"apt lists {DEBIAN['archive']} with SHA-256 {apt_sha}, expected {DEBIAN['sha256']}")
    archive = work / DEBIAN["archive"]
    try:
        with urllib.request.urlopen(uri, timeout=120) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError) as exc:
        raise VisrecError(f"cannot download {_redact(uri)} from the configured Debian mirror "
                          f"({mirror.origin}); is it reachable? ({exc})") from None
    _check_archive(archive, DEBIAN, _redact(mirror.uri))
    return archive, f"{_redact(uri)} ({how})"


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
        manifest = loads_json(read_bytes(path, MAX_METADATA_FILE_BYTES))  # a DataError for a pipe or a huge file
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


def fetch_real_fixtures(dest: str | Path | None = None, force: bool = False, log=None,
                        apt_sources=APT_SOURCES) -> Path:
    """Fetch the photos and annotations into ``dest`` (see the module docstring); returns ``dest``.

    Skips the download when ``manifest.json`` verifies (unless ``force``). ``log``: a print-like callable.
    ``apt_sources``: where the Debian mirror is looked up (see ``debian_mirror``). Raises VisrecError naming
    the index or mirror when one is unreachable or a checksum differs, or when no Debian mirror is configured.
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
    mirror = debian_mirror(apt_sources)  # before any download: a missing mirror fails fast
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="visrec-fixtures-") as tmp:
        work = Path(tmp)
        index = pip_index()
        log(f"PyPI package via pip ({index}): {PYPI['command']}")
        sdist = _pip_download(work, index)
        files = _extract(sdist, PYPI, dest, {k: PYPI[k] for k in ("package", "version", "command")}
                         | {"registry": index, "archive": PYPI["archive"], "archive_sha256": PYPI["sha256"]})
        log(f"  {sdist.name} (sha256 {PYPI['sha256'][:12]}...) -> {len(files)} files in {dest / PYPI['dest']}")
        log(f"Debian mirror {_redact(mirror.uri)} {mirror.suite} (from {mirror.origin}): {DEBIAN['command']}")
        orig, url = _debian_download(work, dest / ".cache", mirror, log)
        more = _extract(orig, DEBIAN, dest, {k: DEBIAN[k] for k in ("package", "version", "command")}
                        | {"registry": f"{_redact(mirror.uri)} {mirror.suite} ({mirror.origin})", "url": url,
                           "archive": DEBIAN["archive"], "archive_sha256": DEBIAN["sha256"]})
        log(f"  {orig.name} (sha256 {DEBIAN['sha256'][:12]}...) -> {len(more)} files in {dest / DEBIAN['dest']}")
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    manifest = {"version": 1, "files": sorted(files + more, key=lambda f: f["path"])}
    with replacing(dest / MANIFEST) as tmp:  # the manifest appears only once every file is in place
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
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
