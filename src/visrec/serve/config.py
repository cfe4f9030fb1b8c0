"""``visrec serve --config serve.yaml``: what the service loads and how it guards itself.

Face galleries: ``faces.galleries`` declares several, by name (letters, digits, ``-``, ``_``; at most
:data:`MAX_GALLERY_NAME` characters), each a :class:`GalleryConfig`; the single ``faces.gallery`` form is the
gallery named ``default``. The default gallery (what ``/v1/faces/...`` and the CLI without ``--gallery``
mean) is ``faces.default_gallery``, else the one named ``default``, else the only one. Two Milvus galleries
whose collections would share a name in one file or server are refused.

API keys come from ``api_keys`` or the ``VISREC_API_KEYS`` environment variable (comma-separated); they
are required whenever the server binds to anything but loopback, checked on every ``/v1`` request in
the ``X-API-Key`` header, and never logged. An ``api_keys`` entry is a key (every gallery) or
``{key: ..., galleries: [NAME, ...]}`` (only those galleries); keys from the environment reach every gallery.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from visrec._onnx import CHOICES_HELP, parse_providers
from visrec.config import read_yaml_mapping, validate_section
from visrec.errors import ConfigError
from visrec.index.gallery import BACKENDS


DEFAULT_GALLERY = "default"
MAX_GALLERY_NAME = 64
MAX_GALLERIES = 64
_GALLERY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,%d}" % (MAX_GALLERY_NAME - 1))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def is_gallery_name(name) -> bool:
    """A gallery name: ASCII letters, digits, ``-`` and ``_`` (not starting with ``-``), 1-64 characters."""
    return isinstance(name, str) and _GALLERY_NAME.fullmatch(name) is not None


def check_gallery_name(name, where: str) -> str:
    if not is_gallery_name(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(f"{where}: gallery name {shown} is not valid: use letters, digits, '-' and '_' "
                          f"(not starting with '-'), at most {MAX_GALLERY_NAME} characters")
    return name


DEFAULT_GALLERY_FILE = "gallery.sqlite"  # a durable FAISS gallery: the default since it met the service goal
OLD_DEFAULT_URI = "gallery.db"  # the Milvus Lite file earlier versions used when no backend was named


# the gallery settings each built-in backend reads (visrec.serve.pipeline.open_named_gallery passes them); a
# backend registered by a plugin gets none of them
BACKEND_SETTINGS = {"faiss": frozenset({"path", "index", "search_params"}),
                    "milvus": frozenset({"uri", "collection", "consistency", "index", "index_params", "search_params"})}
_LOCATION_SETTINGS = frozenset().union(*BACKEND_SETTINGS.values())


class GalleryConfig(_Strict):
    backend: Optional[str] = Field(None, max_length=64,
                                   description="faiss (searched in memory; durable in the SQLite file `path`) | "
                                               "milvus (a Milvus Lite file or a server/cluster at `uri`); omitted: "
                                               "milvus when `uri` is given, else a durable faiss gallery in "
                                               f"`path` ({DEFAULT_GALLERY_FILE} unless set) (docs/gallery.md)")
    uri: str = Field(OLD_DEFAULT_URI, description="Milvus Lite file, or http://host:19530 for a server or cluster")
    path: Optional[str] = Field(None, max_length=4096,
                                description="faiss: a SQLite file that keeps the gallery across restarts and crashes "
                                            "(every write is on disk before it is acknowledged); with `backend: "
                                            "faiss` and no path: in memory only")
    _defaulted: bool = PrivateAttr(False)  # the backend was left to the default (check_default_not_shadowing)
    collection: str = Field("visrec_faces", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$",
                            description="Milvus collection prefix (letters, digits, _): <collection>_templates, "
                                        "_people, _info; galleries in one file or server need different ones")
    fusion: str = Field("max", pattern="^(max|mean)$", description="template fusion per identity")
    index: Optional[str] = Field(None, max_length=200,
                                 description="vector index: exact by default (FAISS Flat, Milvus FLAT); FAISS: a "
                                             "factory string (HNSW32, IVF4096,Flat, IVF4096,PQ64); Milvus: "
                                             "IVF_FLAT | IVF_SQ8 | IVF_PQ | HNSW (docs/gallery.md)")
    index_params: dict[str, int] = Field(default_factory=dict, description="Milvus index build parameters "
                                                                           "(nlist, m, nbits, M, efConstruction)")
    consistency: str = Field("Session", pattern="^(Session|Strong|Bounded|Eventually)$",
                             description="Milvus read consistency: Session (this service sees its own writes) | "
                                         "Strong (several services writing one gallery) (docs/gallery.md)")
    thumbnails: Optional[str] = Field(None, max_length=4096,
                                      description="a folder where the service keeps a small aligned thumbnail of "
                                                  "each enrolled photo (shown by the web console, erased with "
                                                  "the identity); omitted: none are kept")
    search_params: dict[str, int] = Field(default_factory=dict, description="approximate search parameters "
                                                                            "(FAISS nprobe / efSearch; Milvus "
                                                                            "nprobe / ef)")

    @model_validator(mode="after")
    def _pick_backend(self):
        """Resolve an omitted backend (field description); remember that it was the default, for
        :meth:`check_default_not_shadowing`."""
        self._defaulted = self.backend is None and not {"uri", "path"} & self.model_fields_set
        if self.backend is None:
            self.backend = "milvus" if "uri" in self.model_fields_set else "faiss"
            if self.backend == "faiss" and self.path is None:
                self.path = DEFAULT_GALLERY_FILE
        known = BACKENDS.names()  # with the backends plugins register
        if self.backend not in known:  # exact names: "Faiss" is refused here, not when the gallery opens
            raise ValueError(f"backend {self.backend!r}: expected one of {', '.join(known)}")
        # a setting the backend does not read would be dropped without a word: the gallery would not be the one meant
        unused = sorted(self.model_fields_set & (_LOCATION_SETTINGS - BACKEND_SETTINGS.get(self.backend, frozenset())))
        if unused:
            raise ValueError(f"{', '.join(unused)}: {'a setting' if len(unused) == 1 else 'settings'} a "
                             f"{self.backend} gallery does not use" + (
                                 f" ({' / '.join(b for b in BACKEND_SETTINGS if set(unused) <= BACKEND_SETTINGS[b])}'s)"
                                 if self.backend in BACKEND_SETTINGS else "")
                             + ("; a FAISS index takes its parameters in the factory string (HNSW32, IVF4096,Flat)"
                                if self.backend == "faiss" and "index_params" in unused else ""))
        return self

    def check_default_not_shadowing(self, name: str) -> None:
        """A gallery whose backend was left to the default must not hide the Milvus Lite gallery an earlier
        version wrote under the same settings (``gallery.db`` in the working folder): starting on an empty new
        file would make every enrolled person vanish from the service without a word."""
        if not self._defaulted or os.path.exists(os.path.expanduser(self.path)):
            return
        if os.path.exists(OLD_DEFAULT_URI):
            raise ConfigError(
                f"face gallery {name!r} names no backend, so it would be a new FAISS gallery in {self.path}; but "
                f"{os.path.abspath(OLD_DEFAULT_URI)} holds the Milvus Lite gallery earlier versions used by default. "
                f"Keep serving it with `backend: milvus` (uri: {OLD_DEFAULT_URI}), or move it: `visrec gallery export` "
                f"with `backend: milvus`, then `visrec gallery import` into the new gallery (docs/gallery.md)")

    def storage(self) -> tuple[str, set[str]] | None:
        """(where, the Milvus collection names it may use) for a Milvus gallery, (file, {"*"}) for a durable FAISS
        gallery (nothing else may use its file); None for one in memory. A local file or folder is named with
        its links resolved (:func:`real_path`): a link to another gallery's file is that file.
        The names include the older layout's (``<collection>``, ``<collection>_identities``), which an
        open copies from and then drops: two galleries must not share any of them."""
        if self.backend == "faiss" and self.path:
            return real_path(self.path), {"*"}  # the whole file
        if self.backend != "milvus":
            return None
        uri = self.uri.strip()
        where = uri.rstrip("/").lower() if "://" in uri else real_path(uri)
        c = self.collection
        return where, {f"{c}_templates", f"{c}_people", f"{c}_info", c, f"{c}_identities"}


def real_path(path: str) -> str:
    """A local path as one name, whatever way it is reached: ``~`` expanded, absolute, every symbolic link resolved
    (of the file and of the folders above it)."""
    return os.path.realpath(os.path.expanduser(path))


def same_place(a: str, b: str) -> bool:
    """Whether two :meth:`GalleryConfig.storage` places are one: the same name, or (local paths that exist) the
    same file on disk by device and inode, which also finds a hard link."""
    if a == b:
        return True
    if "://" in a or "://" in b:
        return False
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):  # one is not there yet: its resolved name is all there is to compare
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


RUNTIME_HELP = ("torch | onnx | auto: auto serves a checkpoint through its ONNX export beside it (model.onnx "
                "written by `visrec export`, which records the checkpoint's SHA-256) with ONNX Runtime (on "
                "`providers`, the CPU by default) when PyTorch has no GPU, else PyTorch; onnx refuses to start "
                "without that export (docs/serve.md)")


class FacesConfig(_Strict):
    model: Path = Field(description="face embedder: visrec checkpoint (run dir / model.pt), .onnx, or "
                                    "dlib-resnet (visrec[dlib])")
    aligned: bool = Field(False, description="uploads are aligned 112x112 crops (no detection)")
    detector: str = Field("haar", description="haar (OpenCV's bundled cascade) | an ONNX face detector file "
                                              "(SCRFD or YuNet outputs; scrfd:PATH / yunet:PATH to force one) | "
                                              "dlib-hog | dlib-cnn")
    landmarks: Path | None = Field(None, description="landmark checkpoint, or dlib-68 / dlib-5, used for "
                                                     "alignment when the detector gives no 5 points")
    align: Optional[str] = Field(None, pattern="^(lstsq|eyes)$",
                                 description="5 points -> ArcFace crop: lstsq (least squares, InsightFace's) or "
                                             "eyes (eyes exactly on the template); default: the one the model's "
                                             "contract records (lstsq when it records none)")
    detect_size: Optional[int] = Field(640, ge=0, description="faces are found on a copy scaled to this longest "
                                                               "side in pixels (0 or null: the full image), then "
                                                               "aligned on the full image")
    gallery: Optional[GalleryConfig] = Field(None, description="the one gallery (named 'default'); the "
                                                                "default settings when no galleries are declared")
    galleries: dict[str, GalleryConfig] = Field(default_factory=dict, max_length=MAX_GALLERIES,
                                                description="several galleries by name (letters, digits, - and _)")
    default_gallery: Optional[str] = Field(None, description="the gallery /v1/faces and the CLI without --gallery "
                                                             "mean (default: 'default', else the only one)")
    top_k: int = Field(5, gt=0, le=1000, description="identities per face when a request names none (at most "
                                                     "1000, what a request may ask)")
    runtime: str = Field("auto", pattern="^(torch|onnx|auto)$", description="the embedder's runtime: "
                                                                             + RUNTIME_HELP)

    def named_galleries(self) -> dict[str, GalleryConfig]:
        """Every gallery by name (``faces.gallery`` is ``default``), checked: valid names, no name twice, no two
        Milvus galleries sharing a collection in one file or server, ``default_gallery`` one of them."""
        named: dict[str, GalleryConfig] = {}
        if self.gallery is not None or not self.galleries:
            named[DEFAULT_GALLERY] = self.gallery or GalleryConfig()
        for name, g in self.galleries.items():
            check_gallery_name(name, "faces.galleries")
            if name in named:
                raise ConfigError(f"faces.galleries.{name}: the name {name!r} is taken by faces.gallery (the "
                                  f"gallery named {DEFAULT_GALLERY!r}); declare it in one place")
            named[name] = g
        seen: dict[str, tuple[str, set[str]]] = {}
        for name, g in named.items():
            where = g.storage()
            if where is None:
                continue
            for other, (other_where, other_names) in seen.items():
                same = same_place(where[0], other_where)
                if same and "*" in where[1] | other_names:
                    raise ConfigError(f"faces galleries {other!r} and {name!r} use the same file ({where[0]}"
                                      + ("" if where[0] == other_where else f" and {other_where}, one file")
                                      + "): a durable FAISS gallery's file is its own")
                if same and where[1] & other_names:
                    raise ConfigError(f"faces galleries {other!r} and {name!r} point at the same Milvus "
                                      f"collections ({g.uri}, collection {g.collection!r} and "
                                      f"{named[other].collection!r}): give each gallery its own collection")
            seen[name] = where
        folders: dict[str, str] = {}
        files = {name: where[0] for name, where in seen.items() if "://" not in where[0]}
        for name, g in named.items():
            if g.thumbnails is None:
                continue
            folder = real_path(g.thumbnails)
            for other, file in files.items():
                if os.path.commonpath([folder, file]) == folder:
                    raise ConfigError(f"faces gallery {name!r} keeps thumbnails in {folder}, which holds the file of "
                                      f"gallery {other!r} ({file}): the thumbnail folder must be the gallery's "
                                      f"own")
            if folder in folders:
                raise ConfigError(f"faces galleries {folders[folder]!r} and {name!r} keep thumbnails in the same "
                                  f"folder ({folder}): give each gallery its own")
            folders[folder] = name
        if self.default_gallery is not None and self.default_gallery not in named:
            check_gallery_name(self.default_gallery, "faces.default_gallery")
            raise ConfigError(f"faces.default_gallery: no gallery named {self.default_gallery!r}; declared: "
                              f"{', '.join(named)}")
        return named

    def default_gallery_name(self) -> str | None:
        """The gallery meant when none is named: ``default_gallery``, else ``default``, else the only one;
        None when several are declared and none of these applies."""
        named = self.named_galleries()
        if self.default_gallery is not None:
            return self.default_gallery
        if DEFAULT_GALLERY in named:
            return DEFAULT_GALLERY
        return next(iter(named)) if len(named) == 1 else None

    def pick_gallery(self, name: str | None, where: str = "the config") -> tuple[str, GalleryConfig]:
        """(name, config) of the gallery ``name`` (None: the default one); a :class:`ConfigError` listing the
        declared galleries when there is no such gallery or no default."""
        named = self.named_galleries()
        if name is None:
            name = self.default_gallery_name()
            if name is None:
                raise ConfigError(f"{where} declares several face galleries and no default "
                                  f"({', '.join(named)}): name one (--gallery NAME)")
        elif name not in named:
            check_gallery_name(name, where)
            raise ConfigError(f"{where}: no face gallery named {name!r}; declared: {', '.join(named)}")
        return name, named[name]


class LandmarksConfig(_Strict):
    model: Path
    runtime: str = Field("auto", pattern="^(torch|onnx|auto)$", description=RUNTIME_HELP)


class ProductsConfig(_Strict):
    index: Path = Field(description="index directory from visrec products index")
    catalogue: Optional[Path] = Field(None, description="the catalogue folder the index was built from, whose "
                                                        "images the web console shows (default: the one the "
                                                        "index's manifest records)")
    top_k: int = Field(7, gt=0, le=1000, description="catalogue images per query when a request names none "
                                                     "(at most 1000, what a request may ask)")


class LimitsConfig(_Strict):
    """What one request may cost; each limit answers 413 (408 for the deadline) naming itself."""

    max_body_mb: float = Field(10.0, gt=0, le=100_000, allow_inf_nan=False, description="request body in MB (10^6 bytes), counted while it "
                                                       "streams in, chunked or not")
    max_pixels: int = Field(40_000_000, gt=0, description="pixels of one image (width x height, from its header)")
    max_images: int = Field(16, gt=0, le=1000, description="images in one request (enroll takes several)")
    max_request_pixels: int = Field(100_000_000, gt=0, description="pixels of all images of one request, "
                                                                   "checked from their headers before decoding")
    body_timeout_s: float = Field(60.0, gt=0, le=86_400, allow_inf_nan=False, description="seconds to receive a request body (slow clients)")
    max_concurrent: int = Field(4, gt=0, le=256, description="requests doing image work at once; others wait "
                                                             "without holding a thread")
    max_faces: int = Field(100, gt=0, le=10_000, description="faces of one photo aligned and answered (detect, "
                           "identify with all_faces): the largest; the answer's faces_found counts them all")


class ApiKey(_Strict):
    """An API key restricted to some face galleries."""

    key: str = Field(description="the key (header X-API-Key)")
    galleries: list[str] = Field(min_length=1, max_length=MAX_GALLERIES,
                                 description="the face galleries this key may use; no other /v1/faces or "
                                             "/v1/galleries route answers it but 403")


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    threads: Optional[int] = Field(None, ge=1, le=1024,
                                   description="intra-op threads of torch, FAISS and ONNX Runtime per request "
                                               "worker; default: the machine's cores / limits.max_concurrent, at "
                                               "least 1 (on 2 cores with 4 workers: 1), so concurrent requests "
                                               "do not oversubscribe the cores")
    api_keys: list[str | ApiKey] = Field(default_factory=list, description="keys (every gallery) or "
                                                                          "{key, galleries} (only those)")
    providers: str = Field("cpu", max_length=400,
                           description="ONNX Runtime execution providers of every model the service runs in ONNX "
                                       "Runtime (an ONNX face embedder, detector or landmark model, a checkpoint's "
                                       "export under runtime auto/onnx, an index's ONNX descriptor): "
                                       + CHOICES_HELP + "; cuda and tensorrt need visrec[gpu] (docs/serve.md)")
    faces: FacesConfig | None = None
    landmarks: LandmarksConfig | None = None
    products: ProductsConfig | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: str) -> str:
        try:
            parse_providers(value)  # spelling only: whether this machine has them is checked when a model opens
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    def keys(self) -> dict[str, frozenset[str] | None]:
        """Each configured key -> the galleries it may use (None: every one). An empty or blank key (in
        ``api_keys`` or ``VISREC_API_KEYS``) is a :class:`ConfigError`: it would let an empty header in; so is
        one key given twice with different rights. Errors name the entry, never the key."""
        env = os.environ.get("VISREC_API_KEYS")
        from_env = [] if env is None or not env.strip() else env.split(",")
        entries = [(f"api_keys entry {i + 1}", k.key if isinstance(k, ApiKey) else k,
                    frozenset(k.galleries) if isinstance(k, ApiKey) else None) for i, k in enumerate(self.api_keys)]
        if any(not isinstance(k, str) or not k.strip() for _, k, _ in entries):
            raise ConfigError("api_keys holds an empty or blank API key: every key must be a non-blank string")
        if any(not k.strip() for k in from_env):
            raise ConfigError("VISREC_API_KEYS holds an empty or blank API key: every key must be a non-blank "
                              "string")
        entries += [("a key of VISREC_API_KEYS", k.strip(), None) for k in from_env]
        for where, key, _ in entries:
            # an HTTP header value carries no surrounding spaces (servers strip them) and no controls, and
            # clients disagree on anything beyond ASCII: such a key could never match
            if not all("!" <= c <= "~" for c in key):
                raise ConfigError(f"{where}: an API key must be printable ASCII without spaces (it travels in an "
                                  f"HTTP header)")
        out: dict[str, frozenset[str] | None] = {}
        first: dict[str, str] = {}
        for where, key, galleries in entries:
            if key in out and out[key] != galleries:
                raise ConfigError(f"{where} repeats the key of {first[key]} with other galleries: give each key "
                                  f"its rights once")
            out[key] = galleries
            first.setdefault(key, where)
        return out

    def check_key_galleries(self) -> None:
        """Every gallery a restricted key names exists (a typo would lock its holder out silently)."""
        restricted = [(i, k) for i, k in enumerate(self.api_keys) if isinstance(k, ApiKey)]
        if not restricted:
            return
        if self.faces is None:
            raise ConfigError(f"api_keys entry {restricted[0][0] + 1} is restricted to face galleries, but this "
                              f"server has no faces section")
        named = self.faces.named_galleries()
        for i, k in restricted:
            for name in k.galleries:
                if name not in named:
                    check_gallery_name(name, f"api_keys entry {i + 1}")
                    raise ConfigError(f"api_keys entry {i + 1}: no face gallery named {name!r}; declared: "
                                      f"{', '.join(named)}")

    def intra_op_threads(self) -> int:
        """The threads one request's model and search may use (``threads``, or cores / max_concurrent)."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.limits.max_concurrent)

    def check(self) -> "ServeConfig":
        if self.faces is not None:
            self.faces.named_galleries()
        self.check_key_galleries()
        keys = self.keys()  # checked on loopback too: a blank or conflicting key is refused either way
        if not is_loopback(self.host) and not keys:
            raise ConfigError(f"serving on {self.host} (not loopback) needs an API key: set api_keys in the "
                              f"config or VISREC_API_KEYS")
        if not (self.faces or self.landmarks or self.products):
            raise ConfigError("nothing to serve: configure faces, landmarks and/or products")
        return self


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_serve_config(path: str | Path, overrides: dict | None = None) -> ServeConfig:
    return validate_section(ServeConfig, read_yaml_mapping(path, overrides), "serve", str(path)).check()
