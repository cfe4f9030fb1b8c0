"""Faces, per named gallery: ``POST /v1/galleries/{name}/faces/enroll|identify|verify``,
``GET /v1/galleries/{name}/faces``, ``DELETE /v1/galleries/{name}/faces?identity=`` (or the percent-encoded
``DELETE /v1/galleries/{name}/faces/{identity}``) and ``GET /v1/galleries`` (the galleries the API key may
use). The same routes under ``/v1/faces`` mean the default gallery; ``/v1/faces/verify`` takes an optional
``gallery`` field naming the gallery whose threshold applies.

Every gallery keeps its own identities, threshold and model guard (its own info record); a request reaches
one through :meth:`visrec.serve.app.ServiceContext.gallery`: 403 for a gallery the API key may not use, 404
for one the server does not hold. The answers have the same shape on both forms (the one ``/v1/faces`` always
had)."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import numpy as np

from visrec.errors import VisrecError
from visrec.faces.images import InputError, image_hash
from visrec.index.gallery import check_identity, check_metadata, pair_scores
from visrec.serve.config import MAX_GALLERY_NAME
from visrec.serve.requests import bool_field, image_body, int_field, parse_json
from visrec.serve.routes import ROUTES

IDENTITY = ({"type": "string", "maxLength": 200}, "the person's name (any printable text, stored NFC-normalised)")
METADATA = ({"type": "string"}, "optional JSON object of small facts about the person")
TOP_K = ({"type": "integer", "minimum": 1, "maximum": 1000}, "how many identities per face (default: the config's)")
ALL_FACES = ({"type": "boolean"}, "every face of the photo (default: the largest only)")
GALLERY = ({"type": "string", "maxLength": MAX_GALLERY_NAME, "pattern": "^[A-Za-z0-9_][A-Za-z0-9_-]*$"},
           "the gallery whose threshold applies (default: the default gallery; without one, the model's)")

ENROLL_BODY = image_body(many=True, fields={"identity": IDENTITY, "metadata": METADATA}, required=("identity",))
IDENTIFY_BODY = image_body(fields={"top_k": TOP_K, "all_faces": ALL_FACES})
VERIFY_BODY = image_body(("image_a", "image_b"), fields={"gallery": GALLERY})
NAMED_VERIFY_BODY = image_body(("image_a", "image_b"))
ROUTE_PREFIXES = ("/v1/faces", "/v1/galleries/{name}/faces")  # the default gallery; a named one


def _identity(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError("field 'identity' (a non-empty string) is required", 400)
    try:
        return check_identity(value.strip())
    except VisrecError as exc:
        raise InputError(str(exc), 400) from None


def _model_threshold(contract) -> tuple[float | None, str]:
    """(threshold, origin) from the model alone: what verify uses when no gallery is meant."""
    t = getattr(contract, "threshold", None)
    if t is not None:
        return float(t.value), "the model's contract: " + t.describe().split(" ", 1)[1].strip("()")
    return None, "none: the model records none and no gallery was named (visrec models calibrate)"


def _gallery_field(fields: dict, name: str | None) -> str | None:
    """The verify body's ``gallery`` field; with a gallery in the path it may only repeat that one."""
    value = fields.get("gallery")
    if value is None or value == "":
        return name
    if not isinstance(value, str):
        raise InputError("field 'gallery' must be a gallery name (a string)", 400)
    if name is not None and value != name:
        raise InputError("field 'gallery' names another gallery than the path does", 400)
    return value


@ROUTES.register("faces")
def face_routes(ctx):
    from fastapi import APIRouter, Request

    router = APIRouter(tags=["faces"])

    async def enroll(request, name):
        pipe = ctx.need("faces")
        _, gallery = ctx.gallery(request, name)
        images, fields = await ctx.requests.read(request, many=True)
        identity = _identity(fields.get("identity"))
        meta = fields.get("metadata", {})
        if isinstance(meta, str):  # multipart forms carry it as a JSON string
            meta = parse_json(meta, "field 'metadata'") if meta.strip() else {}
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
            # the count comes from the write: no read after it that could fail once the enrollment is done
            ids, templates = gallery.enroll_and_count(identity, embs, hashes=hashes, metadata=meta,
                                                      model_name=pipe.embedder.name)
            return {"identity": identity, "enrolled": len(ids), "entries": ids, "templates": templates}

        return await ctx.offload(work)

    async def identify(request, name):
        pipe = ctx.need("faces")
        _, gallery = ctx.gallery(request, name)
        images, fields = await ctx.requests.read(request)
        top_k = int_field(fields, "top_k", ctx.cfg.faces.top_k)
        all_faces = bool_field(fields, "all_faces")

        def work():
            embs, faces = pipe.embed_upload(images["image"][0], all_faces=all_faces)
            t, origin = gallery.decision_threshold(pipe.embedder.contract)
            results = gallery.search(embs, top_k, threshold=t)
            return {"threshold": t, "threshold_origin": origin, "faces": [
                {"box": list(f.box), "matches": [{"identity": m.identity, "score": round(float(m.score), 6),
                                                  "accepted": bool(m.accepted)} for m in ms]}
                for f, ms in zip(faces, results)]}

        return await ctx.offload(work)

    async def verify(request, name):
        pipe = ctx.need("faces")
        if name is not None:
            ctx.gallery(request, name)  # refused before the body is read
        images, fields = await ctx.requests.read(request, names=("image_a", "image_b"))
        wanted = _gallery_field(fields, name)
        if wanted is None and ctx.state["default_gallery"] is None:
            gallery = None  # several galleries, none the default, none named: the model's threshold
        else:
            _, gallery = ctx.gallery(request, wanted)

        def work():
            a, _ = pipe.embed_upload(images["image_a"][0])
            b, _ = pipe.embed_upload(images["image_b"][0])
            if gallery is None:
                score = float(pair_scores(a[0], b[0], pipe.embedder.metric)[0, 0])
                t, origin = _model_threshold(pipe.embedder.contract)
            else:
                score = gallery.score(a[0], b[0])  # cosine, or negated distance for a distance model
                t, origin = gallery.decision_threshold(pipe.embedder.contract)
            return {"score": round(score, 6), "threshold": t, "threshold_origin": origin,
                    "same": None if t is None else score >= t}

        return await ctx.offload(work)

    def erase(request, name, identity) -> dict:
        name, gallery = ctx.gallery(request, name)
        identity = _identity(identity)
        removed = gallery.remove(identity)
        if not removed:
            raise InputError(f"identity {identity!r} is not enrolled in gallery {name!r}", 404)
        return {"identity": identity, "removed": removed}

    def list_faces(request, name) -> dict:
        _, gallery = ctx.gallery(request, name)
        return {"identities": gallery.list()}

    # -- the default gallery: /v1/faces/... ----------------------------------------------------------------
    @router.post("/v1/faces/enroll", openapi_extra=ENROLL_BODY)
    async def enroll_default(request: Request):
        """Enroll photos of one identity in the default gallery."""
        return await enroll(request, None)

    @router.post("/v1/faces/identify", openapi_extra=IDENTIFY_BODY)
    async def identify_default(request: Request):
        """Search the default gallery for the photo's face(s)."""
        return await identify(request, None)

    @router.post("/v1/faces/verify", openapi_extra=VERIFY_BODY)
    async def verify_default(request: Request):
        """Compare the faces of two photos, against the threshold of the gallery named in ``gallery`` (default:
        the default gallery)."""
        return await verify(request, None)

    @router.delete("/v1/faces")
    def delete_by_query_default(request: Request, identity: str | None = None):
        """Erase an identity named in the query (``?identity=...``, URL-encoded): any name, '/' included."""
        return erase(request, None, identity)

    @router.delete("/v1/faces/{identity:path}")
    def delete_default(request: Request, identity: str):
        """Erase an identity named in the (percent-encoded) path from the default gallery."""
        return erase(request, None, identity)

    @router.get("/v1/faces")
    def list_default(request: Request):
        """The identities of the default gallery."""
        return list_faces(request, None)

    # -- a named gallery: /v1/galleries/{name}/faces/... ----------------------------------------------------
    @router.post("/v1/galleries/{name}/faces/enroll", openapi_extra=ENROLL_BODY)
    async def enroll_named(request: Request, name: str):
        """Enroll photos of one identity in the gallery ``name``."""
        return await enroll(request, name)

    @router.post("/v1/galleries/{name}/faces/identify", openapi_extra=IDENTIFY_BODY)
    async def identify_named(request: Request, name: str):
        """Search the gallery ``name`` for the photo's face(s)."""
        return await identify(request, name)

    @router.post("/v1/galleries/{name}/faces/verify", openapi_extra=NAMED_VERIFY_BODY)
    async def verify_named(request: Request, name: str):
        """Compare the faces of two photos against the threshold of the gallery ``name``."""
        return await verify(request, name)

    @router.delete("/v1/galleries/{name}/faces")
    def delete_by_query_named(request: Request, name: str, identity: str | None = None):
        """Erase an identity named in the query (``?identity=...``, URL-encoded) from the gallery ``name``."""
        return erase(request, name, identity)

    @router.delete("/v1/galleries/{name}/faces/{identity:path}")
    def delete_named(request: Request, name: str, identity: str):
        """Erase an identity named in the (percent-encoded) path from the gallery ``name``."""
        return erase(request, name, identity)

    @router.get("/v1/galleries/{name}/faces")
    def list_named(request: Request, name: str):
        """The identities of the gallery ``name``."""
        return list_faces(request, name)

    @router.get("/v1/galleries")
    async def galleries(request: Request):
        """The face galleries this API key may use: name, backend, size, threshold and its origin, and the
        model guard (the model, dimension and metric the gallery accepts)."""
        pipe = ctx.need("faces")
        visible = ctx.visible_galleries(request)
        default, configs = ctx.state["default_gallery"], ctx.state["gallery_configs"]

        def work():
            rows = []
            for name, g in visible.items():
                t, origin = g.decision_threshold(pipe.embedder.contract)
                rows.append({"name": name, "default": name == default, "backend": configs[name].backend,
                             "fusion": g.fusion, "identities": len(g.list()), "templates": g.count(),
                    "threshold": t, "threshold_origin": origin, "target_fpr": g.info.get("target_fpr"),
                    "model": {"name": g.info.get("model_name"), "dim": g.info.get("dim"), "metric": g.metric}})
            return {"galleries": rows}

        return await ctx.offload(work)

    return router
