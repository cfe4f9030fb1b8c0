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
import base64
import contextlib
import logging

import numpy as np

from visrec.data.images import encode_jpeg
from visrec.errors import DataError, VisrecError
from visrec.faces.images import InputError
from visrec.index.enroll import crop_hash, with_thumbnails
from visrec.index.gallery import (IdentityExistsError, MetadataTooLargeError, check_identity, check_metadata,
                                  pair_scores)
from visrec.serve.config import MAX_GALLERY_NAME
from visrec.serve.requests import bool_field, box_field, image_body, int_field, parse_json, whole_number
from visrec.serve.routes import ROUTES
from visrec.serve.thumbnails import erase_person

IDENTITY = ({"type": "string", "maxLength": 200}, "the person's name (any printable text, stored NFC-normalised)")
METADATA = ({"type": "string"}, "optional JSON object of small facts about the person")
TOP_K = ({"type": "integer", "minimum": 1, "maximum": 1000}, "how many identities per face (default: the config's)")
ALL_FACES = ({"type": "boolean"}, "every face of the photo (default: the largest only)")
GALLERY = ({"type": "string", "maxLength": MAX_GALLERY_NAME, "pattern": "^[A-Za-z0-9_][A-Za-z0-9_-]*$"},
           "the gallery whose threshold applies (default: the default gallery; without one, the model's)")

CROPS = ({"type": "boolean"}, "also answer each face's aligned crop (a JPEG data: URL)")
FACE_BOX = ({"type": "string", "example": "10,10,100,100"},
            "with one image: enroll the detected face that best overlaps this box x1,y1,x2,y2 (from "
            "/v1/faces/detect) instead of the largest")

ENROLL_BODY = image_body(many=True, fields={"identity": IDENTITY, "metadata": METADATA, "box": FACE_BOX},
                         required=("identity",))
IDENTIFY_BODY = image_body(fields={"top_k": TOP_K, "all_faces": ALL_FACES})
VERIFY_BODY = image_body(("image_a", "image_b"), fields={"gallery": GALLERY, "crops": CROPS})
NAMED_VERIFY_BODY = image_body(("image_a", "image_b"), fields={"crops": CROPS})
DETECT_BODY = image_body(fields={"crops": CROPS})
RENAME_BODY = image_body((), fields={"identity": (IDENTITY[0], "the enrolled name"),
                                      "to": (IDENTITY[0], "the new name (not enrolled yet)")},
                         required=("identity", "to"))
MAX_PAGE = 1000  # identities per page of GET .../faces with a limit
MAX_OFFSET = 1 << 40
MAX_QUERY_TEXT = 200  # characters of GET .../faces?q=
# declared for /docs (and for the refusal of any other query parameter, visrec.serve.app); read by list_faces
PAGE_QUERY = {"parameters": [
    {"name": "limit", "in": "query", "required": False, "description": "identities per page (ASCII digits)",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
    {"name": "offset", "in": "query", "required": False, "description": "identities skipped before the page",
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}},
    {"name": "q", "in": "query", "required": False, "description": "only names containing this text, any case",
     "schema": {"type": "string", "maxLength": MAX_QUERY_TEXT}},
]}
ROUTE_PREFIXES = ("/v1/faces", "/v1/galleries/{name}/faces")  # the default gallery; a named one
log = logging.getLogger(__name__)


def _identity(value, *, new: bool = False, field: str = "identity", where: str = "field") -> str:
    """``where``: "field" (the body's) or "query parameter", for the message."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where} {field!r} (a non-empty string) is required", 400)
    try:  # not stripped here: " bob" is refused, as every other path refuses it, not silently taken as "bob"
        return check_identity(value, new=new)
    except VisrecError as exc:
        raise InputError(str(exc), 400) from None


def _data_url(crop: np.ndarray) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(crop, quality=90)).decode()


def _iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def pick_face(faces, box, min_iou: float = 0.5):
    """The face whose box best overlaps ``box`` (intersection over union at least ``min_iou``)."""
    best = max(faces, key=lambda f: _iou(f.box, box))
    if _iou(best.box, box) < min_iou:
        shown = [[round(float(v)) for v in f.box] for f in faces[:10]]
        raise InputError(f"no detected face overlaps field 'box' {list(box)} by half or more (detected: {shown}"
                         f"{f' and {len(faces) - 10} more' if len(faces) > 10 else ''})", 422)
    return best


def _face_json(face, crops: bool) -> dict:
    out = {"box": [int(v) for v in face.box]}
    if face.points is not None:
        out["points"] = [[round(float(x), 2), round(float(y), 2)] for x, y in face.points]
    if crops:
        out["crop"] = _data_url(face.crop)
    return out


def _page_field(request, name: str, default: int | None, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = whole_number(raw)
    if value is None:
        raise InputError(f"query parameter {name!r} must be an integer (ASCII digits), got {raw[:40]!r}", 400)
    if not 0 <= value <= high or (name == "limit" and value == 0):
        raise InputError(f"query parameter {name!r} must be between {int(name == 'limit')} and {high}, got {value}",
                         400)
    return value


def _model_threshold(contract) -> tuple[float | None, str]:
    """(threshold, origin) from the model alone: what verify uses when no gallery is meant."""
    t = getattr(contract, "threshold", None)
    if t is not None:
        return float(t.value), "the model's contract: " + t.origin_text()
    return None, "none: the model records none and no gallery was named (visrec models calibrate)"


def _gallery_field(fields: dict, name: str | None) -> str | None:
    """The gallery whose threshold verify applies: the path's (``name``; that route takes no ``gallery`` field),
    else the body's ``gallery`` field, else None."""
    value = fields.get("gallery")
    if name is not None or value is None or value == "":
        return name
    if not isinstance(value, str):
        raise InputError("field 'gallery' must be a gallery name (a string)", 400)
    return value


@ROUTES.register("faces")
def face_routes(ctx):
    from fastapi import APIRouter, Request

    router = APIRouter(tags=["faces"])

    async def enroll(request, name):
        pipe = ctx.need("faces")
        gallery_name, gallery = ctx.gallery(request, name)
        images, fields = await ctx.requests.read(request, ENROLL_BODY, many=True)
        identity = _identity(fields.get("identity"), new=True)
        meta = fields.get("metadata", {})
        if isinstance(meta, str):  # multipart forms carry it as a JSON string
            meta = parse_json(meta, "field 'metadata'") if meta.strip() else {}
        try:
            meta = check_metadata(meta, identity)  # before any work: the whole request is valid or refused
        except VisrecError as exc:
            raise InputError(str(exc), 422 if isinstance(exc, MetadataTooLargeError) else 400) from None

        if fields.get("box") not in (None, "") and len(images["image"]) != 1:
            raise InputError("field 'box' picks a face of one image: send one image with it", 400)
        thumbs = ctx.state["thumbnails"].get(gallery_name)

        def work():
            crops, found = [], []
            for i, data in enumerate(images["image"]):
                try:
                    image, detections = pipe.detect_upload(data)
                    box = box_field(fields, "box", image.shape[1], image.shape[0])
                    pipe.require_faces(image, detections)
                    chosen = detections[0] if box is None else pick_face(detections, box)
                except InputError as exc:
                    raise InputError(f"image {i + 1}: {exc}", exc.status) from None
                crops.append(pipe.align_all(image, [chosen])[0].crop)
                found.append(len(detections))
            # keyed by the aligned crop, as `visrec gallery enroll` and the Python API key theirs: the same photo
            # adds nothing on any path, and two faces of one group photo are two templates
            hashes = [crop_hash(crop) for crop in crops]
            first = {}
            for i, h in enumerate(hashes):  # one template per image: the answer lists each part's, one to one
                if first.setdefault(h, i) != i:
                    raise InputError(f"image {i + 1} is the same photo as image {first[h] + 1} (the same aligned "
                                     f"face): each image enrolls one template, send each photo once", 400)
            embs = pipe.embedder(np.stack(crops))  # all images of the request in one batch
            with thumbs.lock if thumbs is not None else contextlib.nullcontext():
                # the count comes from the write: no read after it that could fail once the enrollment is done;
                # the thumbnails are staged inside the write (a thumbnail not written undoes it: serve.thumbnails)
                ids, templates = with_thumbnails(
                    thumbs,
                    lambda before_commit: gallery.enroll_and_count(identity, embs, hashes=hashes, metadata=meta,
                                                                   model_name=pipe.embedder.name,
                                                                   before_commit=before_commit),
                    lambda ids: thumbs.stage(identity, ids, crops))
            return {"identity": identity, "enrolled": len(ids), "entries": ids, "templates": templates,
                    "faces_found": found}

        return await ctx.offload(work)

    async def identify(request, name):
        pipe = ctx.need("faces")
        _, gallery = ctx.gallery(request, name)
        images, fields = await ctx.requests.read(request, IDENTIFY_BODY)
        top_k = int_field(fields, "top_k", ctx.cfg.faces.top_k)
        all_faces = bool_field(fields, "all_faces")

        def work():
            image, detections = pipe.detect_upload(images["image"][0])
            pipe.require_faces(image, detections)
            faces = pipe.align_all(image, detections[:ctx.limits.max_faces if all_faces else 1])
            embs = pipe.embedder(np.stack([f.crop for f in faces]))
            t, origin = gallery.decision_threshold(pipe.embedder.contract)
            results = gallery.search(embs, top_k, threshold=t)
            return {"threshold": t, "threshold_origin": origin, "faces_found": len(detections),
                    "image": {"width": int(image.shape[1]), "height": int(image.shape[0])}, "faces": [
                {"box": list(f.box), "matches": [{"identity": m.identity, "score": round(float(m.score), 6),
                                                  "accepted": bool(m.accepted)} for m in ms]}
                for f, ms in zip(faces, results)]}

        return await ctx.offload(work)

    async def verify(request, name):
        pipe = ctx.need("faces")
        if name is not None:
            ctx.gallery(request, name)  # refused before the body is read
        body = VERIFY_BODY if name is None else NAMED_VERIFY_BODY  # a named gallery's route takes no 'gallery'
        images, fields = await ctx.requests.read(request, body, names=("image_a", "image_b"))
        wanted = _gallery_field(fields, name)
        if wanted is None and ctx.state["default_gallery"] is None:
            gallery = None  # several galleries, none the default, none named: the model's threshold
        else:
            _, gallery = ctx.gallery(request, wanted)

        crops = bool_field(fields, "crops")

        def work():
            a, face_a = pipe.embed_upload(images["image_a"][0])
            b, face_b = pipe.embed_upload(images["image_b"][0])
            shown = {"faces": [_face_json(face_a[0], crops), _face_json(face_b[0], crops)]} if crops else {}
            if gallery is None:
                score = float(pair_scores(a[0], b[0], pipe.embedder.metric)[0, 0])
                t, origin = _model_threshold(pipe.embedder.contract)
            else:
                score = gallery.score(a[0], b[0])  # cosine, or negated distance for a distance model
                t, origin = gallery.decision_threshold(pipe.embedder.contract)
            return {"score": round(score, 6), "threshold": t, "threshold_origin": origin,
                    "same": None if t is None else score >= t, **shown}

        return await ctx.offload(work)

    def erase(request, name, identity, where: str = "field") -> dict:
        name, gallery = ctx.gallery(request, name)
        identity = _identity(identity, where=where)
        removed = erase_person(gallery, identity, ctx.state["thumbnails"].get(name))
        if not removed:
            raise InputError(f"identity {identity!r} is not enrolled in gallery {name!r}", 404)
        return {"identity": identity, "removed": removed}

    def list_faces(request, name) -> dict:
        name, gallery = ctx.gallery(request, name)
        limit = _page_field(request, "limit", None, MAX_PAGE)
        offset = _page_field(request, "offset", 0, MAX_OFFSET)
        text = request.query_params.get("q") or None
        if text is not None and len(text) > MAX_QUERY_TEXT:
            raise InputError(f"query parameter 'q' is longer than {MAX_QUERY_TEXT} characters", 400)
        if limit is None and not offset and text is None:
            rows = gallery.list()  # everything, as this route always answered without paging parameters
            total = len(rows)
        else:
            rows, total = gallery.page(offset, limit or MAX_PAGE, text)
        thumbs = ctx.state["thumbnails"].get(name)
        if thumbs is not None:
            for row in rows:
                row["thumbnail"] = thumbs.has(row["identity"])
        return {"identities": rows, "total": total, "offset": offset}

    def thumbnail(request, name, identity):
        from fastapi.responses import Response

        name, gallery = ctx.gallery(request, name)
        identity = _identity(identity, where="query parameter")
        thumbs = ctx.state["thumbnails"].get(name)
        data = None if thumbs is None else thumbs.first(identity)
        if data is None:
            why = "keeps no thumbnails" if thumbs is None else f"has no thumbnail of {identity!r}"
            raise InputError(f"gallery {name!r} {why}", 404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, no-cache"})

    async def rename(request, name):
        name, gallery = ctx.gallery(request, name)
        _, fields = await ctx.requests.read(request, RENAME_BODY, names=())
        old, new = _identity(fields.get("identity")), _identity(fields.get("to"), new=True, field="to")
        thumbs = ctx.state["thumbnails"].get(name)

        def work():
            with thumbs.lock if thumbs is not None else contextlib.nullcontext():
                try:
                    n = gallery.rename(old, new)
                except IdentityExistsError as exc:
                    raise InputError(str(exc), 409) from None
                except DataError as exc:  # the same name twice
                    raise InputError(str(exc), 400) from None
                if not n:
                    raise InputError(f"identity {old!r} is not enrolled in gallery {name!r}", 404)
                if thumbs is not None:
                    try:
                        thumbs.rename(old, new)
                    except OSError as exc:  # the rename is done: say so; the pictures are what was lost
                        log.warning("gallery %s: thumbnails of %r not moved to its new name: %s", name, old, exc)
                        with contextlib.suppress(OSError):
                            thumbs.erase(old)  # the sweep would remove them at the next start anyway
            return {"identity": new, "renamed_from": old, "templates": n}

        return await ctx.offload(work)

    # -- no gallery: detection -------------------------------------------------------------------------------
    @router.post("/v1/faces/detect", openapi_extra=DETECT_BODY)
    async def detect(request: Request):
        """Every face of the photo, largest first: its box and the points it is aligned on (and with ``crops``
        the aligned crop), with the decoded image's size (EXIF orientation applied) to draw the boxes on."""
        pipe = ctx.need("faces")
        images, fields = await ctx.requests.read(request, DETECT_BODY)
        crops = bool_field(fields, "crops")

        def work():
            image, detections = pipe.detect_upload(images["image"][0])
            faces = pipe.align_all(image, detections[:ctx.limits.max_faces])
            return {"image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
                    "faces_found": len(detections), "faces": [_face_json(f, crops) for f in faces]}

        return await ctx.offload(work)

    # -- the default gallery: /v1/faces/... ----------------------------------------------------------------
    @router.post("/v1/faces/enroll", openapi_extra=ENROLL_BODY)
    async def enroll_default(request: Request):
        """Enroll photos of one identity in the default gallery: each image one template, answered in order in
        ``entries`` (the same photo twice in one request is a 400)."""
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
        return erase(request, None, identity, "query parameter")

    @router.delete("/v1/faces/{identity:path}")
    def delete_default(request: Request, identity: str):
        """Erase an identity named in the (percent-encoded) path from the default gallery."""
        return erase(request, None, identity)

    @router.get("/v1/faces", openapi_extra=PAGE_QUERY)
    def list_default(request: Request):
        """The identities of the default gallery, sorted by name: all of them, or a page with ``limit`` (at
        most 1000), ``offset`` and ``q`` (names containing this text, any case); ``total`` counts the matches."""
        return list_faces(request, None)

    @router.get("/v1/faces/thumbnail")
    def thumbnail_default(request: Request, identity: str | None = None):
        """The first aligned thumbnail of an identity of the default gallery (JPEG), where it keeps them."""
        return thumbnail(request, None, identity)

    @router.post("/v1/faces/rename", openapi_extra=RENAME_BODY)
    async def rename_default(request: Request):
        """Rename an identity of the default gallery (``identity`` -> ``to``), keeping its templates."""
        return await rename(request, None)

    # -- a named gallery: /v1/galleries/{name}/faces/... ----------------------------------------------------
    @router.post("/v1/galleries/{name}/faces/enroll", openapi_extra=ENROLL_BODY)
    async def enroll_named(request: Request, name: str):
        """Enroll photos of one identity in the gallery ``name`` (as /v1/faces/enroll)."""
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
        return erase(request, name, identity, "query parameter")

    @router.delete("/v1/galleries/{name}/faces/{identity:path}")
    def delete_named(request: Request, name: str, identity: str):
        """Erase an identity named in the (percent-encoded) path from the gallery ``name``."""
        return erase(request, name, identity)

    @router.get("/v1/galleries/{name}/faces", openapi_extra=PAGE_QUERY)
    def list_named(request: Request, name: str):
        """The identities of the gallery ``name``: all, or a page (``limit``, ``offset``, ``q``; as /v1/faces)."""
        return list_faces(request, name)

    @router.get("/v1/galleries/{name}/faces/thumbnail")
    def thumbnail_named(request: Request, name: str, identity: str | None = None):
        """The first aligned thumbnail of an identity of the gallery ``name`` (JPEG), where it keeps them."""
        return thumbnail(request, name, identity)

    @router.post("/v1/galleries/{name}/faces/rename", openapi_extra=RENAME_BODY)
    async def rename_named(request: Request, name: str):
        """Rename an identity of the gallery ``name`` (``identity`` -> ``to``), keeping its templates."""
        return await rename(request, name)

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
                             "fusion": g.fusion, "identities": g.page(0, 1)[1], "templates": g.count(),
                             "thumbnails": name in ctx.state["thumbnails"],
                    "threshold": t, "threshold_origin": origin, "target_fpr": g.info.get("target_fpr"),
                    "model": {"name": g.info.get("model_name"), "dim": g.info.get("dim"), "metric": g.metric}})
            return {"galleries": rows}

        return await ctx.offload(work)

    return router
