"""The HTTP service (FastAPI): faces (enroll / identify / verify / delete / list), landmarks, product search,
health, Prometheus metrics, OpenAPI at /docs and /redoc (their scripts served from the installed package, so
they work offline) and the web console at / (its files under /_console/).

``create_app`` loads what the config names (face pipeline and its named galleries, landmark model, product
index) into a :class:`ServiceContext` and includes every router of :data:`visrec.serve.routes.ROUTES` (one
module per area). Routes reach a face gallery through :meth:`ServiceContext.gallery`, which applies the API
key's gallery restriction (403) and answers 404 for a gallery this server does not hold.
Request reading and the declared request bodies are :mod:`visrec.serve.requests`. Every user-input problem is
a 4xx with ``{"error": "..."}`` saying what was wrong; a 5xx means a bug in the server.

What a request may cost is bounded (``limits`` in the config, SECURITY.md): body bytes while streaming
(:mod:`visrec.serve.guard`), images per request, pixels per image and per request (read from the image
headers before anything is decoded), the time to receive the body, and how many requests do image work at
once. A JSON body or field holding NaN or Infinity is a 400.
"""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import asyncio
import contextlib
import errno
import importlib.util
import json
import logging
import socket
from dataclasses import dataclass, field

from visrec._onnx import set_default_threads
from visrec._optional import require
from visrec.errors import ConfigError, StorageError, VisrecError, shown
from visrec.faces.images import InputError
from visrec.index.gallery import GalleryMismatchError, GalleryUnavailableError
from visrec.index.gallery.faiss import set_search_threads
from visrec.serve.config import ServeConfig, is_gallery_name
from visrec.serve.guard import Guard, Metrics, allowed_galleries
from visrec.serve.pipeline import configured_pipeline, open_configured_galleries
from visrec.serve.requests import ImageRequests
from visrec.serve.thumbnails import Thumbnails
from visrec.serve.routes import ROUTES

DOCS_ASSETS = "/_docs-assets"


@dataclass
class ServiceContext:
    """What every route works with: the config, what it loaded (``state``: ``faces`` (a FacePipeline),
    ``galleries`` (name -> Gallery), ``default_gallery`` (a name or None), ``thumbnails`` (name -> Thumbnails,
    for the galleries that keep them), ``landmarks``, ``products`` and ``catalogue_images``), the request
    reader, the metrics and ``offload``."""

    cfg: ServeConfig
    requests: ImageRequests
    metrics: Metrics
    working: asyncio.Semaphore
    state: dict = field(default_factory=dict)

    @property
    def limits(self):
        return self.cfg.limits

    def need(self, name: str):
        """What the config loaded under ``name``; a 404 when this server was not configured for it."""
        if name not in self.state:
            raise InputError(f"this server does not serve {name} (not configured)", 404)
        return self.state[name]

    def gallery(self, request, name: str | None = None):
        """(name, Gallery) the request may use: ``name``, or the default gallery when None. 404 when faces are
        not served, the gallery does not exist or there is no default; 403 when the request's API key is
        restricted to other galleries (checked before existence, so a restricted key learns no other name)."""
        self.need("faces")
        allowed = allowed_galleries(request.scope)
        if name is None:
            name = self.state["default_gallery"]
            if name is None:
                raise InputError("this server holds several face galleries and none is the default: use "
                                 "/v1/galleries/NAME/faces/... (GET /v1/galleries lists them)", 404)
            if allowed is not None and name not in allowed:
                raise InputError("this API key may not use the default face gallery: use "
                                 "/v1/galleries/NAME/faces/... with one of its galleries (GET /v1/galleries)", 403)
        shown = repr(name) if len(name) <= 64 else repr(name[:61] + "...")
        if allowed is not None and name not in allowed:
            raise InputError(f"this API key may not use face gallery {shown}", 403)
        if not is_gallery_name(name) or name not in self.state["galleries"]:
            raise InputError(f"no face gallery named {shown} on this server (GET /v1/galleries lists them)", 404)
        return name, self.state["galleries"][name]

    def visible_galleries(self, request) -> dict:
        """The galleries the request's API key may use, by name (every one for an unrestricted key)."""
        allowed = allowed_galleries(request.scope)
        return {n: g for n, g in self.need("galleries").items() if allowed is None or n in allowed}

    async def offload(self, work):
        """Image work off the event loop, at most ``limits.max_concurrent`` at once; waiting holds no thread."""
        from fastapi.concurrency import run_in_threadpool

        async with self.working:
            return await run_in_threadpool(work)


def set_threads(threads: int) -> None:
    """Intra-op threads for torch, ONNX Runtime sessions opened from now on, and FAISS (when installed)."""
    import torch

    torch.set_num_threads(threads)
    set_default_threads(threads)
    set_search_threads(threads)  # OpenMP's setting is per thread: each request worker applies it too
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(threads)


log = logging.getLogger(__name__)


def _load(cfg: ServeConfig) -> dict:
    state: dict = {}
    if cfg.faces is not None:
        pipe = configured_pipeline(cfg)
        state["faces"] = pipe
        log.info("faces %s: %s", cfg.faces.model, pipe.embedder.runtime_note or pipe.embedder.runtime)
        state["gallery_configs"] = cfg.faces.named_galleries()
        state["galleries"] = open_configured_galleries(cfg.faces, pipe.embedder)
        state["thumbnails"] = {name: Thumbnails(g.thumbnails) for name, g in state["gallery_configs"].items()
                               if g.thumbnails is not None}
        for name, thumbs in state["thumbnails"].items():  # what a crash left between a gallery and its thumbnails
            swept = thumbs.sweep(state["galleries"][name].names())
            if swept:
                log.info("gallery %s: %d thumbnail folder(s) of identities no longer enrolled removed", name, swept)
        state["default_gallery"] = cfg.faces.default_gallery_name()
    if cfg.landmarks is not None:
        from visrec.models.loading import load_model

        # predicts with the crop margin / size of the model's contract
        state["landmarks"] = load_model(cfg.landmarks.model, runtime=cfg.landmarks.runtime, providers=cfg.providers)
        log.info("landmarks %s: %s", cfg.landmarks.model, state["landmarks"].runtime_note or
                 state["landmarks"].runtime)
        if state["landmarks"].contract.task != "landmarks":
            raise ConfigError(f"landmarks.model {cfg.landmarks.model} is a {state['landmarks'].contract.task} "
                              f"model, not a landmark model")
    if cfg.products is not None:
        from visrec.index.catalogue import CatalogueImages, CatalogueIndex

        state["products"] = CatalogueIndex(cfg.products.index, providers=cfg.providers)
        state["catalogue_images"] = CatalogueImages(state["products"], cfg.products.catalogue)
    return state


def _docs_assets():
    """The folder holding Swagger UI's and ReDoc's scripts, installed with visrec[serve] (fastapi-offline's
    copies; only the files are used)."""
    from importlib.resources import files

    require("fastapi_offline", "serve")
    return files("fastapi_offline") / "static"


def _add_docs(app) -> None:
    """/docs and /redoc from local assets: FastAPI's defaults fetch them from a CDN, blank offline."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(_docs_assets())), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="visrec - API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title="visrec - API",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def declared_query(openapi: dict) -> dict[tuple[str, str], tuple[str, ...]]:
    """(path template, method) -> the query parameters the OpenAPI document declares for that route."""
    return {(path, method.upper()): tuple(p["name"] for p in op.get("parameters", []) if p.get("in") == "query")
            for path, ops in openapi.get("paths", {}).items() for method, op in ops.items() if isinstance(op, dict)}


def create_app(cfg: ServeConfig):
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse

    cfg.check()
    limits = cfg.limits
    state = _load(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        for g in (state.get("galleries") or {}).values():  # release the gallery files (and Milvus clients)
            g.close()

    declared: dict = {}

    def only_declared_query(request: Request):
        """A query parameter a /v1/ route does not declare (in /docs) is a 400: ``?limt=5`` is not silently the
        whole list, nor ``?identity=bob&extra=1`` an erase that ignored a part of the request."""
        route = request.scope.get("route")
        if not request.url.path.startswith("/v1/") or route is None or not request.query_params:
            return
        if not declared:
            declared.update(declared_query(app.openapi()))
        takes = declared.get((getattr(route, "path_format", route.path), request.method))
        if takes is None:  # a route the document does not describe
            return
        for name in request.query_params:
            if name not in takes:
                raise InputError(f"unknown query parameter {shown(name)}: this route takes "
                                 + (", ".join(takes) if takes else "none"), 400)

    app = FastAPI(title="visrec", description="faces, landmarks and product search", version="0.1.0",
                  docs_url=None, redoc_url=None, lifespan=lifespan, dependencies=[Depends(only_declared_query)])
    galleries = state.get("galleries")
    metrics = Metrics(None if galleries is None else (lambda: sum(g.count() for g in galleries.values())))
    requests = ImageRequests(limits)
    app.add_middleware(Guard, keys=cfg.keys(), max_body=requests.max_body, body_timeout_s=limits.body_timeout_s,
                       metrics=metrics, routes=lambda: app.routes)
    ctx = ServiceContext(cfg, requests, metrics, asyncio.Semaphore(limits.max_concurrent), state)
    app.state.visrec = ctx

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # the framework's own answers (no such route, method not allowed) in the shape every error has
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such route: {request.method} {request.url.path[:200]}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(VisrecError)
    async def visrec_error(request: Request, exc: VisrecError):
        # gallery refusals (another model's embeddings, a bad identity name) are the caller's to fix; a gallery
        # store that did not answer is not, and the same request may succeed once it is back
        status = 409 if isinstance(exc, GalleryMismatchError) else 422
        if isinstance(exc, GalleryUnavailableError):
            status = 503
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, exc: StorageError):
        return _storage_refused(request, exc)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError):  # one no layer below named: the system's words
        return _storage_refused(request, StorageError.from_os(exc))

    _add_docs(app)
    for name in ROUTES.names():
        app.include_router(ROUTES.get(name)(ctx))
    return app


def _storage_refused(request, exc: StorageError):
    """507 when the server's disk is full (or a quota or size limit is reached), 503 when it refused the write
    otherwise (read-only, failing): the client did nothing wrong, and the same request succeeds once there is
    room. The answer says why but names no server path; the log names the file."""
    from fastapi.responses import JSONResponse

    log.error("%s %s: %s", request.method, request.url.path[:200], exc.problem)
    why, then = ("its disk is full", "once the server has room") if exc.no_space else \
        ("its storage refused a read or write", "later")
    return JSONResponse({"error": f"the service could not store or read what this request needs: {why} "
                                  f"({exc.reason}); retry {then}"}, status_code=507 if exc.no_space else 503)


def log_to_stderr() -> None:
    """The service's own lines (which runtime runs each model, what a start-up sweep removed, a thumbnail not
    moved) at INFO on stderr beside uvicorn's, unless the process already sends log records somewhere."""
    logger = logging.getLogger("visrec")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))  # uvicorn's layout
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def json_error_http_protocol():
    """uvicorn's HTTP/1.1 protocol (h11), answering a request that h11 itself refuses (a raw non-ASCII byte in the
    target, ``Content-Length: abc``, a malformed header line) with the service's ``{"error": ...}`` shape: such a
    request never reaches the application, and uvicorn answers it in plain text, which a client parsing every 4xx
    as JSON cannot read."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JSONErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            if msg.startswith("Invalid HTTP request"):  # h11's refusal; an unsupported upgrade says its own
                msg = ("invalid HTTP request: its request line or headers are not valid HTTP/1.1 (a target of raw "
                       "non-ASCII bytes, a Content-Length that is not a number, a malformed header line)")
            body = json.dumps({"error": msg}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JSONErrorH11Protocol


BACKLOG = 2048  # connections waiting to be accepted: uvicorn's default

# Why an address cannot be listened on, in words a person acts on; the system's own reason is kept beside it.
_LISTEN_ADVICE = {
    errno.EADDRINUSE: "another program is listening there (another visrec serve?): stop it, or pick another port "
                      "with --set port=N",
    errno.EACCES: "this user may not listen on that port (below 1024 needs privileges): pick another with "
                  "--set port=N",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address: use one it has, 127.0.0.1 for "
                         "this machine alone or 0.0.0.0 for all of them (--set host=...)",
}


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal in brackets, as URLs write it


def server_url(host: str, port: int) -> str:
    """The service's base URL: ``http://127.0.0.1:8000``, ``http://[::1]:8000``."""
    return f"http://{_address(host, port)}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: one the system picks), for uvicorn. An address that
    cannot be had (in use, a privileged port, an address this machine lacks, a host name that does not resolve)
    is a ``ConfigError`` naming it, raised before anything is loaded."""
    ipv6 = ":" in host  # as uvicorn chooses: an IPv6 literal, else IPv4 (a host name resolves to its IPv4)
    where = _address(host, port)
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # as uvicorn does: a restarted server may take its port back while the old connections are in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # listening at once holds the port while the models load: with SO_REUSEADDR a second server could
        # bind the same port meanwhile, and would only fail inside uvicorn. Connections wait in the backlog.
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror):  # its errno is the resolver's (EAI_*), not the system's
            why = (f"the host name does not resolve on this machine ({exc.strerror}); set host to an address of "
                   "this machine (--set host=...)")
        else:
            advice = _LISTEN_ADVICE.get(exc.errno)
            why = f"{exc.strerror or exc}" + (f"; {advice}" if advice else "")
        raise ConfigError(f"cannot listen on {where}: {why}") from None
    return sock


def serve(cfg: ServeConfig, announce=None) -> None:
    """Load what ``cfg`` names, then serve it with uvicorn. The address is taken first, so one that cannot be
    listened on is said before any model or gallery is opened (:func:`listening_socket`). ``announce(host,
    port)``, when given, runs once everything loaded and before the server starts (so a model or gallery that
    fails to load is the only thing said); ``port`` is the one listened on (the system's pick for port 0)."""
    import uvicorn

    sock = listening_socket(cfg.host, cfg.port)
    try:
        log_to_stderr()  # before the models load: their runtime lines come from create_app
        # the service's own process: set the threads before any model is loaded (ONNX sessions take them when
        # they open); create_app alone leaves the process's settings as they are (a test process builds many apps)
        set_threads(cfg.intra_op_threads())
        application = create_app(cfg)
        port = sock.getsockname()[1]
        if announce is not None:
            announce(cfg.host, port)
        server = uvicorn.Server(uvicorn.Config(application, host=cfg.host, port=port, log_level="info",
                                               backlog=BACKLOG, http=json_error_http_protocol()))
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # the application's startup failed: uvicorn logged why; its own exit code for it
        raise SystemExit(3)
