"""The HTTP service (FastAPI): faces (enroll / identify / verify / delete / list), landmarks, product search,
health, Prometheus metrics, OpenAPI at /docs and a single web page at /.

Images come as multipart form files (field ``image``; enroll also takes several ``image`` parts) or JSON
with base64 (``{"image": "<base64>"}`` / ``{"images": [...]}``). Every user-input problem is a 4xx with
``{"error": "..."}`` saying what was wrong; a 5xx means a bug in the server.

What a request may cost is bounded (``limits`` in the config, SECURITY.md): body bytes while streaming
(:mod:`visrec.serve.guard`), images per request, pixels per image and per request (read from the image
headers before anything is decoded), the time to receive the body, and how many requests do image work at
once. A JSON body or field holding NaN or Infinity is a 400.
"""


# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import asyncio
import base64
import binascii
import io
import json
import math
from pathlib import Path

import numpy as np

from visrec.errors import VisrecError
from visrec.serve.config import ServeConfig
from visrec.serve.guard import Guard, Metrics
from visrec.faces.images import InputError

PAGE = Path(__file__).with_name("page.html")


def create_app(cfg: ServeConfig):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    cfg.check()
    limits = cfg.limits
    max_body = int(limits.max_body_mb * 1e6)
    app = FastAPI(title="visrec", description="faces, landmarks and product search", version="0.1.0")
    state: dict = {}

    if cfg.faces is not None:
        from visrec.faces.pipeline import FacePipeline
        from visrec.serve.pipeline import open_configured_gallery

        pipe = FacePipeline(cfg.faces.model, aligned=cfg.faces.aligned, landmarks=cfg.faces.landmarks,
                            detector=cfg.faces.detector, align=cfg.faces.align, max_pixels=limits.max_pixels,
                            detect_size=cfg.faces.detect_size)
        state["faces"], state["gallery"] = pipe, open_configured_gallery(cfg.faces, pipe.embedder)
    if cfg.landmarks is not None:
        from visrec.errors import ConfigError
        from visrec.models.loading import load_model

        # predicts with the crop margin / size of the model's contract
        state["landmarks"] = load_model(cfg.landmarks.model)
        if state["landmarks"].contract.task != "landmarks":
            raise ConfigError(f"landmarks.model {cfg.landmarks.model} is a {state['landmarks'].contract.task} "
                              f"model, not a landmark model")
    if cfg.products is not None:
        from visrec.index.catalogue import CatalogueIndex

        state["products"] = CatalogueIndex(cfg.products.index)

    metrics = Metrics(state["gallery"].count if "gallery" in state else None)
    app.add_middleware(Guard, keys=cfg.keys(), max_body=max_body, body_timeout_s=limits.body_timeout_s,
                       metrics=metrics)
    working = asyncio.Semaphore(limits.max_concurrent)

    async def offload(work):
        """Image work off the event loop, at most ``limits.max_concurrent`` at once; waiting holds no thread."""
        async with working:
            return await run_in_threadpool(work)

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

    def _json(text, where: str):
        try:
            return json.loads(text, parse_constant=_reject_non_finite)
        except _NonFinite as exc:
            raise InputError(f"{where} holds {exc}: numbers must be finite", 400) from None
        except ValueError:
            raise InputError(f"{where} is not valid JSON", 400) from None

    def _check_pixels(images: dict[str, list[bytes]]) -> None:
        """Images per request and their pixels (from each header, nothing decoded) against the limits."""
        count = sum(len(v) for v in images.values())
        if count > limits.max_images:
            raise InputError(f"{count} images in one request, above the limit of {limits.max_images} "
                             f"(limits.max_images)", 413)
        total = 0
        for data in (d for v in images.values() for d in v):
            total += _header_pixels(data)  # an unreadable image is reported when it is decoded
            if total > limits.max_request_pixels:
                raise InputError(f"the request's images hold more than {limits.max_request_pixels:,} pixels "
                                 f"(limits.max_request_pixels)", 413)

    async def read_images(request: Request, *, many: bool = False, names=("image",)) -> tuple[dict[str, list[bytes]], dict]:
        """Images by field name and the other fields, from multipart or base64 JSON (body bounded by Guard)."""
        ctype = request.headers.get("content-type", "")
        images: dict[str, list[bytes]] = {n: [] for n in names}
        fields: dict = {}
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=limits.max_images + 1, max_fields=64, max_part_size=max_body)
            except InputError:
                raise
            except Exception as exc:  # malformed multipart, too many parts
                if "Too many files" in str(exc):
                    raise InputError(f"more than {limits.max_images} images in one request "
                                     f"(limits.max_images)", 413) from None
                raise InputError(f"malformed multipart body: {exc}", 400) from None
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    if key not in images:
                        raise InputError(f"unexpected file field {key!r}; expected {', '.join(names)}", 400)
                    images[key].append(await value.read())
                else:
                    fields[key] = value
        elif ctype.startswith("application/json"):
            payload = _json(await request.body(), "the JSON body")
            if not isinstance(payload, dict):
                raise InputError("JSON body must be an object", 400)
            for key, value in payload.items():
                plural = key[:-1] if key.endswith("s") and key[:-1] in images else None
                if key in images or plural:
                    values = value if plural else [value]
                    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                        raise InputError(f"field {key!r} must hold base64 strings", 400)
                    if len(values) > limits.max_images:
                        raise InputError(f"{len(values)} images in one request, above the limit of "
                                         f"{limits.max_images} (limits.max_images)", 413)
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
        _check_pixels(images)
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
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page_html = PAGE.read_text()  # read once, not per request

    @app.get("/", response_class=HTMLResponse)
    def page():
        return page_html

    def _identity(value) -> str:
        from visrec.index.gallery import check_identity

        if not isinstance(value, str) or not value.strip():
            raise InputError("field 'identity' (a non-empty string) is required", 400)
        try:
            return check_identity(value.strip())
        except VisrecError as exc:
            raise InputError(str(exc), 400) from None

    @app.post("/v1/faces/enroll")
    async def enroll(request: Request):
        from visrec.index.gallery import check_metadata
        from visrec.faces.images import image_hash

        pipe, gallery = need("faces"), state["gallery"]
        images, fields = await read_images(request, many=True)
        identity = _identity(fields.get("identity"))
        meta = fields.get("metadata", {})
        if isinstance(meta, str):  # multipart forms carry it as a JSON string
            meta = _json(meta, "field 'metadata'") if meta.strip() else {}
        try:
            meta = check_metadata(meta, identity)  # before any work: the whole request is valid or refused
        except VisrecError as exc:
            raise InputError(str(exc), 422 if "limit" in str(exc) else 400) from None

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

        return await offload(work)

    @app.post("/v1/faces/identify")
    async def identify(request: Request):
        pipe, gallery = need("faces"), state["gallery"]
        images, fields = await read_images(request)
        top_k = _int_field(fields, "top_k", cfg.faces.top_k)
        all_faces = _bool_field(fields, "all_faces")

        def work():
            embs, faces = pipe.embed_upload(images["image"][0], all_faces=all_faces)
            t, origin = gallery.decision_threshold(pipe.embedder.contract)
            results = gallery.search(embs, top_k, threshold=t)
            return {"threshold": t, "threshold_origin": origin, "faces": [
                {"box": list(f.box), "matches": [{"identity": m.identity, "score": round(float(m.score), 6),
                                                  "accepted": bool(m.accepted)} for m in ms]}
                for f, ms in zip(faces, results)]}

        return await offload(work)

    @app.post("/v1/faces/verify")
    async def verify(request: Request):
        pipe, gallery = need("faces"), state["gallery"]
        images, _ = await read_images(request, names=("image_a", "image_b"))

        def work():
            a, _ = pipe.embed_upload(images["image_a"][0])
            b, _ = pipe.embed_upload(images["image_b"][0])
            score = gallery.score(a[0], b[0])  # cosine, or negated distance for a distance model
            t, origin = gallery.decision_threshold(pipe.embedder.contract)
            return {"score": round(score, 6), "threshold": t, "threshold_origin": origin,
                    "same": None if t is None else score >= t}

        return await offload(work)

    def _erase(identity) -> dict:
        need("faces")
        identity = _identity(identity)
        removed = state["gallery"].remove(identity)
        if not removed:
            raise InputError(f"identity {identity!r} is not enrolled", 404)
        return {"identity": identity, "removed": removed}

    @app.delete("/v1/faces")
    def delete_by_query(identity: str | None = None):
        """Erase an identity named in the query (``?identity=...``, URL-encoded): any name, '/' included."""
        return _erase(identity)

    @app.delete("/v1/faces/{identity:path}")
    def delete(identity: str):
        return _erase(identity)

    @app.get("/v1/faces")
    def list_faces():
        need("faces")
        return {"identities": state["gallery"].list()}

    @app.post("/v1/landmarks")
    async def landmarks(request: Request):
        from visrec.faces.images import decode_upload

        landmark_model = need("landmarks")
        images, fields = await read_images(request)

        def work():
            image = decode_upload(images["image"][0], limits.max_pixels)
            h, w = image.shape[:2]
            box = fields.get("box")
            if box is None:
                box = (0, 0, w, h)
            else:
                try:
                    box = tuple(float(v) for v in (box.split(",") if isinstance(box, str) else box))
                    ok = len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]
                except (ValueError, TypeError):
                    ok = False
                if not ok or not (box[0] < w and box[1] < h and box[2] > 0 and box[3] > 0):
                    raise InputError("field 'box' must be 4 finite numbers x1,y1,x2,y2 with x2 > x1 and y2 > y1 "
                                     "that overlap the image", 400)
            pts = landmark_model.predict(image, box)
            return {"box": list(box), "points": [[round(float(a), 2), round(float(b), 2)] for a, b in pts]}

        return await offload(work)

    @app.post("/v1/products/search")
    async def products(request: Request):
        from visrec.faces.images import decode_upload

        index = need("products")
        images, fields = await read_images(request)
        k = _int_field(fields, "top_k", cfg.products.top_k)

        def work():
            image = decode_upload(images["image"][0], limits.max_pixels)
            ids, scores = index.search_images([image], k)
            return {"results": [{"id": i, "score": round(float(s), 6)} for i, s in zip(ids[0], scores[0])]}

        return await offload(work)

    return app


class _NonFinite(ValueError):
    pass


def _reject_non_finite(name: str):
    raise _NonFinite(name)


def _header_pixels(data: bytes) -> int:
    """Width x height from an image's header (Pillow reads no pixel data to open it); 0 if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        return 1 << 62  # declares more pixels than any limit
    except Exception:  # noqa: BLE001 - not an image: decode_upload names the problem
        return 0
    return int(w) * int(h)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info")
