"""The HTTP service (FastAPI): faces (enroll / identify / verify / delete / list), landmarks, product search,
health, Prometheus metrics, OpenAPI at /docs and a single web page at /.

Images come as multipart form files (field ``image``; enroll also takes several ``image`` parts) or JSON
with base64 (``{"image": "<base64>"}`` / ``{"images": [...]}``). Every user-input problem is a 4xx with
``{"error": "..."}`` saying what was wrong; a 5xx means a bug in the server.
"""


# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import base64
import binascii
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from visrec.errors import VisrecError
from visrec.serve.config import ServeConfig
from visrec.serve.pipeline import InputError

PAGE = Path(__file__).with_name("page.html")


class Metrics:
    """Request counters by (route, status) and a latency histogram, in Prometheus text format."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self):
        self.counts: dict[tuple[str, int], int] = defaultdict(int)
        self.hist: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.BUCKETS) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.counts[(route, status)] += 1
        h = self.hist[route]
        for i, b in enumerate(self.BUCKETS):
            if seconds <= b:
                h[i] += 1
        h[-1] += 1
        self.sums[route] += seconds

    def text(self, gallery_templates: int | None) -> str:
        lines = ["# HELP visrec_requests_total HTTP requests by route and status.", "# TYPE visrec_requests_total counter"]
        for (route, status), n in sorted(self.counts.items()):
            lines.append(f'visrec_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# HELP visrec_request_seconds Request latency.", "# TYPE visrec_request_seconds histogram"]
        for route, h in sorted(self.hist.items()):
            for b, n in zip(self.BUCKETS, h):
                lines.append(f'visrec_request_seconds_bucket{{route="{route}",le="{b}"}} {n}')
            lines.append(f'visrec_request_seconds_bucket{{route="{route}",le="+Inf"}} {h[-1]}')
            lines.append(f'visrec_request_seconds_sum{{route="{route}"}} {self.sums[route]:.6f}')
            lines.append(f'visrec_request_seconds_count{{route="{route}"}} {h[-1]}')
        if gallery_templates is not None:
            lines += ["# TYPE visrec_gallery_templates gauge", f"visrec_gallery_templates {gallery_templates}"]
        return "\n".join(lines) + "\n"


def create_app(cfg: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    cfg.check()
    keys = cfg.keys()
    max_body = int(cfg.limits.max_body_mb * 1e6)
    app = FastAPI(title="visrec", description="faces, landmarks and product search", version="0.1.0")
    metrics = Metrics()
    state: dict = {}

    if cfg.faces is not None:
        from visrec.serve.pipeline import FacePipeline, open_configured_gallery

        pipe = FacePipeline(cfg.faces.model, aligned=cfg.faces.aligned, landmarks=cfg.faces.landmarks,
                            detector=cfg.faces.detector, align=cfg.faces.align, max_pixels=cfg.limits.max_pixels)
        state["faces"], state["gallery"] = pipe, open_configured_gallery(cfg.faces, pipe.embedder)
    if cfg.landmarks is not None:
        from visrec.train.checkpoint import load_backbone

        state["landmarks"], _ = load_backbone(cfg.landmarks.model)
    if cfg.products is not None:
        from visrec.index.catalogue import CatalogueIndex

        state["products"] = CatalogueIndex(cfg.products.index)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        route = request.url.path if not request.url.path.startswith("/v1/faces/") or request.method != "DELETE" \
            else "/v1/faces/{identity}"
        try:
            if request.url.path.startswith("/v1/"):
                if keys and request.headers.get("x-api-key") not in keys:
                    raise InputError("missing or wrong API key (header X-API-Key)", 401)
                length = request.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > max_body:
                    raise InputError(f"body of {int(length):,} bytes is above the limit of {max_body:,}", 413)
            response = await call_next(request)
        except InputError as exc:
            response = JSONResponse({"error": str(exc)}, status_code=exc.status)
        metrics.observe(route, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(VisrecError)
    async def visrec_error(request: Request, exc: VisrecError):
        # gallery refusals (another model's embeddings, a bad identity name) are the caller's to fix
        from visrec.index.gallery import GalleryMismatchError

        return JSONResponse({"error": str(exc)}, status_code=409 if isinstance(exc, GalleryMismatchError) else 422)

    def _bool_field(fields: dict, name: str) -> bool:
        value = fields.get(name, False)
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "false", "0", "no", ""):
            return str(value).lower() in ("true", "1", "yes")
        raise InputError(f"field {name!r} must be true or false, got {value!r}", 400)

    def _int_field(fields: dict, name: str, default: int, high: int = 1000) -> int:
        value = fields.get(name, default)
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise InputError(f"field {name!r} must be an integer, got {value!r}", 400) from None
        if not 1 <= value <= high:
            raise InputError(f"field {name!r} must be between 1 and {high}, got {value}", 400)
        return value

    async def read_images(request: Request, *, many: bool = False, names=("image",)) -> tuple[dict[str, list[bytes]], dict]:
        """Images by field name and the other fields, from multipart or base64 JSON."""
        body = await request.body()
        if len(body) > max_body:
            raise InputError(f"body of {len(body):,} bytes is above the limit of {max_body:,}", 413)
        ctype = request.headers.get("content-type", "")
        images: dict[str, list[bytes]] = {n: [] for n in names}
        fields: dict = {}
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_part_size=max_body)
            except Exception as exc:  # malformed multipart
                raise InputError(f"malformed multipart body: {exc}", 400) from None
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    if key not in images:
                        raise InputError(f"unexpected file field {key!r}; expected {', '.join(names)}", 400)
                    images[key].append(await value.read())
                else:
                    fields[key] = value
        elif ctype.startswith("application/json"):
            try:
                payload = await request.json()
            except Exception:
                raise InputError("body is not valid JSON", 400) from None
            if not isinstance(payload, dict):
                raise InputError("JSON body must be an object", 400)
            for key, value in payload.items():
                plural = key[:-1] if key.endswith("s") and key[:-1] in images else None
                if key in images or plural:
                    values = value if plural else [value]
                    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                        raise InputError(f"field {key!r} must hold base64 strings", 400)
                    for v in values:
                        try:
                            images[plural or key].append(base64.b64decode(v, validate=True))
                        except (binascii.Error, ValueError):
                            raise InputError(f"field {key!r} is not valid base64", 400) from None
                else:
                    fields[key] = value
        else:
            raise InputError(f"content type {ctype or '(none)'!r} not accepted: send multipart/form-data or "
                             f"application/json", 415)
        for n in names:
            if not images[n]:
                raise InputError(f"no image in field {n!r}", 400)
            if len(images[n]) > 1 and not many:
                raise InputError(f"one image expected in field {n!r}, got {len(images[n])}", 400)
        return images, fields

    def need(name: str):
        if name not in state:
            raise InputError(f"this server does not serve {name} (not configured)", 404)
        return state[name]

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "serves": [k for k in ("faces", "landmarks", "products") if k in state],
                "gallery_templates": state["gallery"].count() if "gallery" in state else None}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return metrics.text(state["gallery"].count() if "gallery" in state else None)

    page_html = PAGE.read_text()  # read once, not per request

    @app.get("/", response_class=HTMLResponse)
    def page():
        return page_html

    def _identity(fields) -> str:
        identity = fields.get("identity")
        if not isinstance(identity, str) or not identity.strip():
            raise InputError("field 'identity' (a non-empty string) is required", 400)
        return identity.strip()

    @app.post("/v1/faces/enroll")
    async def enroll(request: Request):
        from visrec.serve.pipeline import image_hash

        pipe, gallery = need("faces"), state["gallery"]
        images, fields = await read_images(request, many=True)
        identity = _identity(fields)
        meta = fields.get("metadata", {})
        if isinstance(meta, str):  # multipart forms carry it as a JSON string
            try:
                meta = json.loads(meta) if meta.strip() else {}
            except ValueError:
                raise InputError("field 'metadata' is not valid JSON", 400) from None
        if not isinstance(meta, dict):
            raise InputError("field 'metadata' must be a JSON object", 400)

        def work():
            crops = []
            for i, data in enumerate(images["image"]):
                try:
                    crops.append(pipe.upload_faces(data)[0].crop)
                except InputError as exc:
                    raise InputError(f"image {i + 1}: {exc}", exc.status) from None
            embs = pipe.embedder(np.stack(crops))  # all images of the request in one batch
            hashes = [image_hash(data) for data in images["image"]]
            ids = gallery.enroll(identity, embs, hashes=hashes, metadata=meta, model_name=pipe.embedder.name)
            return {"identity": identity, "enrolled": len(ids), "entries": ids,
                    "templates": gallery.identity(identity)["templates"]}

        return await run_in_threadpool(work)

    @app.post("/v1/faces/identify")
    async def identify(request: Request):
        pipe, gallery = need("faces"), state["gallery"]
        images, fields = await read_images(request)
        top_k = _int_field(fields, "top_k", cfg.faces.top_k)
        all_faces = _bool_field(fields, "all_faces")

        def work():
            embs, faces = pipe.embed_upload(images["image"][0], all_faces=all_faces)
            results = gallery.search(embs, top_k)
            return {"threshold": gallery.threshold, "faces": [
                {"box": list(f.box), "matches": [{"identity": m.identity, "score": round(float(m.score), 6),
                                                  "accepted": bool(m.accepted)} for m in ms]}
                for f, ms in zip(faces, results)]}

        return await run_in_threadpool(work)

    @app.post("/v1/faces/verify")
    async def verify(request: Request):
        pipe, gallery = need("faces"), state["gallery"]
        images, _ = await read_images(request, names=("image_a", "image_b"))

        def work():
            a, _ = pipe.embed_upload(images["image_a"][0])
            b, _ = pipe.embed_upload(images["image_b"][0])
            score = gallery.score(a[0], b[0])  # cosine, or negated distance for a distance model
            t = gallery.threshold
            return {"score": round(score, 6), "threshold": t, "same": None if t is None else score >= t}

        return await run_in_threadpool(work)

    @app.delete("/v1/faces/{identity}")
    def delete(identity: str):
        need("faces")
        removed = state["gallery"].remove(identity)
        if not removed:
            raise InputError(f"identity {identity!r} is not enrolled", 404)
        return {"identity": identity, "removed": removed}

    @app.get("/v1/faces")
    def list_faces():
        need("faces")
        return {"identities": state["gallery"].list()}

    @app.post("/v1/landmarks")
    async def landmarks(request: Request):
        from visrec.models.landmark_nets import predict_points
        from visrec.serve.pipeline import decode_upload

        net = need("landmarks")
        images, fields = await read_images(request)

        def work():
            image = decode_upload(images["image"][0], cfg.limits.max_pixels)
            h, w = image.shape[:2]
            box = fields.get("box")
            if box is None:
                box = (0, 0, w, h)
            else:
                try:
                    box = tuple(float(v) for v in (box.split(",") if isinstance(box, str) else box))
                    assert len(box) == 4 and box[2] > box[0] and box[3] > box[1]
                except (ValueError, AssertionError, TypeError):
                    raise InputError("field 'box' must be x1,y1,x2,y2 with x2 > x1 and y2 > y1", 400) from None
            pts = predict_points(net, image, box)
            return {"box": list(box), "points": [[round(float(a), 2), round(float(b), 2)] for a, b in pts]}

        return await run_in_threadpool(work)

    @app.post("/v1/products/search")
    async def products(request: Request):
        from visrec.serve.pipeline import decode_upload

        index = need("products")
        images, fields = await read_images(request)
        k = _int_field(fields, "top_k", cfg.products.top_k)

        def work():
            image = decode_upload(images["image"][0], cfg.limits.max_pixels)
            ids, scores = index.search_images([image], k)
            return {"results": [{"id": i, "score": round(float(s), 6)} for i, s in zip(ids[0], scores[0])]}

        return await run_in_threadpool(work)

    return app


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info")
