"""Health, Prometheus metrics and the web page."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations at runtime
from pathlib import Path

from visrec.serve.routes import ROUTES

PAGE = Path(__file__).resolve().parents[1] / "page.html"


@ROUTES.register("system")
def system_routes(ctx):
    from fastapi import APIRouter
    from fastapi.responses import HTMLResponse, PlainTextResponse

    router = APIRouter(tags=["service"])
    page_html = PAGE.read_text()  # read once, not per request

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

    @router.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(ctx.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return page_html

    return router
