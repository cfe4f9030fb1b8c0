"""``POST /v1/landmarks``: the points of one face (the box given, or the whole image)."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import math

from visrec.faces.images import InputError, decode_upload
from visrec.serve.requests import image_body
from visrec.serve.routes import ROUTES

BOX = ({"type": "string", "example": "10,10,100,100"},
       "face box x1,y1,x2,y2 in pixels (default: the whole image)")


@ROUTES.register("landmarks")
def landmark_routes(ctx):
    from fastapi import APIRouter, Request

    router = APIRouter(tags=["landmarks"])

    @router.post("/v1/landmarks", openapi_extra=image_body(fields={"box": BOX}))
    async def landmarks(request: Request):
        landmark_model = ctx.need("landmarks")
        images, fields = await ctx.requests.read(request)

        def work():
            image = decode_upload(images["image"][0], ctx.limits.max_pixels)
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

        return await ctx.offload(work)

    return router
