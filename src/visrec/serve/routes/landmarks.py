"""``POST /v1/landmarks``: the points of one face (the box given, the largest face the service's detector
finds with ``detect``, or the whole image), with the square crop the model read and its point scheme."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
from visrec.faces.images import InputError, decode_upload
from visrec.serve.requests import bool_field, box_field, image_body
from visrec.serve.routes import ROUTES

BOX = ({"type": "string", "example": "10,10,100,100"},
       "face box x1,y1,x2,y2 in pixels (default: the whole image)")
DETECT = ({"type": "boolean"}, "find the face with the service's face detector first (needs a faces section)")


def crop_box(box, margin: float | None) -> list[float]:
    """The square a landmark model reads around ``box``: centred on it, side = its longer side x (1 + 2 x
    ``margin``) (the crop of :func:`visrec.data.augment.crop_face`); the box itself when the model has no
    margin (an adapter that crops by its own rule)."""
    x1, y1, x2, y2 = map(float, box)
    if not margin:
        return [x1, y1, x2, y2]
    half = max(x2 - x1, y2 - y1) * (1 + 2 * margin) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return [round(v, 2) for v in (cx - half, cy - half, cx + half, cy + half)]


@ROUTES.register("landmarks")
def landmark_routes(ctx):
    from fastapi import APIRouter, Request

    router = APIRouter(tags=["landmarks"])

    body = image_body(fields={"box": BOX, "detect": DETECT})

    @router.post("/v1/landmarks", openapi_extra=body)
    async def landmarks(request: Request):
        """The points of one face: ``points`` in image pixels, ``box`` and where it came from (``box_source``:
        given | detected | whole image), ``crop_box`` (the square the model read), ``scheme`` (the point
        order, e.g. jd106 or 300w68) and the decoded ``image`` size (EXIF orientation applied)."""
        landmark_model = ctx.need("landmarks")
        images, fields = await ctx.requests.read(request, body)
        detect = bool_field(fields, "detect")
        pipe = ctx.state.get("faces")
        if detect and (pipe is None or pipe.detector is None):
            raise InputError("field 'detect': this server has no face detector (no faces section, or faces "
                             "are served pre-aligned): send a 'box' instead", 400)

        def work():
            image = decode_upload(images["image"][0], ctx.limits.max_pixels)
            h, w = image.shape[:2]
            box, source = box_field(fields, "box", w, h), "given"
            if box is None and detect:
                found = pipe.detector(image)  # boxes only: no alignment or embedding
                if not found:
                    raise InputError(f"no face found in the {w}x{h} image ({pipe.detector_name} detector)", 422)
                largest = max(found, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
                box, source = tuple(float(v) for v in largest.box), "detected"
            if box is None:
                box, source = (0, 0, w, h), "whole image"
            contract = landmark_model.contract
            pts = landmark_model.predict(image, box)
            return {"box": [float(v) for v in box], "box_source": source,
                    "crop_box": crop_box(box, contract.crop_margin), "scheme": contract.point_scheme,
                    "image": {"width": w, "height": h},
                    "points": [[round(float(a), 2), round(float(b), 2)] for a, b in pts]}

        return await ctx.offload(work)

    return router
