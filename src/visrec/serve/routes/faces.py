"""Faces: ``POST /v1/faces/enroll|identify|verify``, ``GET /v1/faces``, ``DELETE /v1/faces?identity=`` (or the
percent-encoded ``DELETE /v1/faces/{identity}``)."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import numpy as np

from visrec.errors import VisrecError
from visrec.faces.images import InputError, image_hash
from visrec.index.gallery import check_identity, check_metadata
from visrec.serve.requests import bool_field, image_body, int_field, parse_json
from visrec.serve.routes import ROUTES

IDENTITY = ({"type": "string", "maxLength": 200}, "the person's name (any printable text, stored NFC-normalised)")
METADATA = ({"type": "string"}, "optional JSON object of small facts about the person")
TOP_K = ({"type": "integer", "minimum": 1, "maximum": 1000}, "how many identities per face (default: the config's)")
ALL_FACES = ({"type": "boolean"}, "every face of the photo (default: the largest only)")


def _identity(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError("field 'identity' (a non-empty string) is required", 400)
    try:
        return check_identity(value.strip())
    except VisrecError as exc:
        raise InputError(str(exc), 400) from None


@ROUTES.register("faces")
def face_routes(ctx):
    from fastapi import APIRouter, Request

    router = APIRouter(tags=["faces"])

    @router.post("/v1/faces/enroll", openapi_extra=image_body(
        many=True, fields={"identity": IDENTITY, "metadata": METADATA}, required=("identity",)))
    async def enroll(request: Request):
        pipe, gallery = ctx.need("faces"), ctx.state["gallery"]
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
            ids = gallery.enroll(identity, embs, hashes=hashes, metadata=meta, model_name=pipe.embedder.name)
            return {"identity": identity, "enrolled": len(ids), "entries": ids,
                    "templates": gallery.identity(identity)["templates"]}

        return await ctx.offload(work)

    @router.post("/v1/faces/identify", openapi_extra=image_body(fields={"top_k": TOP_K, "all_faces": ALL_FACES}))
    async def identify(request: Request):
        pipe, gallery = ctx.need("faces"), ctx.state["gallery"]
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

    @router.post("/v1/faces/verify", openapi_extra=image_body(("image_a", "image_b")))
    async def verify(request: Request):
        pipe, gallery = ctx.need("faces"), ctx.state["gallery"]
        images, _ = await ctx.requests.read(request, names=("image_a", "image_b"))

        def work():
            a, _ = pipe.embed_upload(images["image_a"][0])
            b, _ = pipe.embed_upload(images["image_b"][0])
            score = gallery.score(a[0], b[0])  # cosine, or negated distance for a distance model
            t, origin = gallery.decision_threshold(pipe.embedder.contract)
            return {"score": round(score, 6), "threshold": t, "threshold_origin": origin,
                    "same": None if t is None else score >= t}

        return await ctx.offload(work)

    def _erase(identity) -> dict:
        ctx.need("faces")
        identity = _identity(identity)
        removed = ctx.state["gallery"].remove(identity)
        if not removed:
            raise InputError(f"identity {identity!r} is not enrolled", 404)
        return {"identity": identity, "removed": removed}

    @router.delete("/v1/faces")
    def delete_by_query(identity: str | None = None):
        """Erase an identity named in the query (``?identity=...``, URL-encoded): any name, '/' included."""
        return _erase(identity)

    @router.delete("/v1/faces/{identity:path}")
    def delete(identity: str):
        return _erase(identity)

    @router.get("/v1/faces")
    def list_faces():
        ctx.need("faces")
        return {"identities": ctx.state["gallery"].list()}

    return router
