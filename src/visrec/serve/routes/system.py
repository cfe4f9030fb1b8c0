"""Health, the service's status (its models' contracts, galleries and limits), Prometheus metrics and the web
console (``/`` with its script and style sheet under ``/_console/``, all served from the package)."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations at runtime
from pathlib import Path

from visrec import __version__
from visrec.faces.images import InputError
from visrec.serve.routes import ROUTES

CONSOLE = Path(__file__).resolve().parents[1] / "console"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}


def _file_name(path) -> str | None:
    """The last part of a path the config or a contract names: no server path reaches a client."""
    return None if path is None else Path(str(path)).name


def _model_status(model, runtime: str) -> dict:
    contract = model.contract.to_dict()
    contract["source"] = _file_name(contract.get("source"))  # the path the service loaded it from
    t = model.contract.threshold
    return {"contract": contract, "runtime": runtime,
            "threshold_origin": None if t is None else t.describe()}


@ROUTES.register("system")
def system_routes(ctx):
    from fastapi import APIRouter, Request
    from fastapi.responses import HTMLResponse, PlainTextResponse, Response

    router = APIRouter(tags=["service"])
    # read once, not per request
    page_html = (CONSOLE / "index.html").read_text(encoding="utf-8")
    assets = {name: (CONSOLE / name).read_bytes() for name in ASSETS}

    @router.get("/healthz")
    def healthz():
        state = ctx.state
        galleries = state.get("galleries")  # open: totals only, no gallery name (keys may restrict those)
        runtimes = {}  # what runs each model: torch, onnxruntime, or an adapter's own library
        if "faces" in state:
            runtimes["faces"] = state["faces"].embedder.runtime
        if "landmarks" in state:
            runtimes["landmarks"] = state["landmarks"].runtime
        return {"status": "ok", "serves": [k for k in ("faces", "landmarks", "products") if k in state],
                "runtimes": runtimes,
                "gallery_templates": None if galleries is None else sum(g.count() for g in galleries.values())}

    @router.get("/v1/status")
    async def status(request: Request):
        """What this service runs: each model's contract (task, input, dimension, metric, threshold and where it
        came from) and runtime, the face pipeline's detector and alignment, the face galleries this API key
        may use (backend, size, threshold and its origin), the product index, and the request limits."""
        state = ctx.state

        def work():
            out: dict = {"status": "ok", "version": __version__, "serves": [
                k for k in ("faces", "landmarks", "products") if k in state], "limits": ctx.limits.model_dump()}
            if "faces" in state:
                pipe = state["faces"]
                f = ctx.cfg.faces
                out["faces"] = {**_model_status(pipe.embedder, pipe.embedder.runtime), "model": _file_name(f.model),
                                "detector": None if f.aligned else pipe.detector_name, "aligned": f.aligned,
                                "landmarks": _file_name(f.landmarks),
                                "align": pipe.align, "detect_size": f.detect_size}
                default, configs = state["default_gallery"], state["gallery_configs"]
                out["galleries"] = []
                for name, g in ctx.visible_galleries(request).items():
                    t, origin = g.decision_threshold(pipe.embedder.contract)
                    out["galleries"].append({"name": name, "default": name == default, "backend": configs[name].backend,
                                             "index": configs[name].index or "exact (flat)",
                                             "identities": g.page(0, 1)[1], "templates": g.count(),
                                             "threshold": t, "threshold_origin": origin,
                                             "thumbnails": name in state["thumbnails"]})
            if "landmarks" in state:
                lm = state["landmarks"]
                out["landmarks"] = {**_model_status(lm, lm.runtime), "model": _file_name(ctx.cfg.landmarks.model)}
            if "products" in state:
                index = state["products"]
                out["products"] = {"images": len(index.ids), "dim": index.manifest.get("dim"),
                                   "index": index.opts.factory, "top_k": ctx.cfg.products.top_k}
            return out

        return await ctx.offload(work)

    @router.get("/_console/{asset}", include_in_schema=False)
    def console_asset(asset: str):
        if asset not in assets:
            raise InputError("no such console file", 404)
        return Response(assets[asset], media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})

    @router.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(ctx.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return page_html

    return router
