"""``POST /v1/products/search``: the catalogue images nearest a query photo; ``GET /v1/products/images/{image_id}``:
one of those catalogue images (only ids the index holds, only files of its own catalogue folder)."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
from urllib.parse import quote

from visrec.faces.images import InputError, decode_upload
from visrec.serve.requests import image_body, int_field
from visrec.serve.routes import ROUTES

TOP_K = ({"type": "integer", "minimum": 1, "maximum": 1000}, "how many catalogue images (default: the config's)")


@ROUTES.register("products")
def product_routes(ctx):
    from fastapi import APIRouter, Request
    from fastapi.responses import Response

    router = APIRouter(tags=["products"])

    body = image_body(fields={"top_k": TOP_K})

    @router.post("/v1/products/search", openapi_extra=body)
    async def products(request: Request):
        """The ``top_k`` catalogue images nearest the photo: id, score and the address of the image."""
        index = ctx.need("products")
        images, fields = await ctx.requests.read(request, body)
        k = int_field(fields, "top_k", ctx.cfg.products.top_k)

        def work():
            image = decode_upload(images["image"][0], ctx.limits.max_pixels)
            ids, scores = index.search_images([image], k)
            return {"results": [{"id": i, "score": round(float(s), 6),
                                 "image": "/v1/products/images/" + quote(i, safe="")}
                                for i, s in zip(ids[0], scores[0])]}

        return await ctx.offload(work)

    @router.get("/v1/products/images/{image_id}")
    def catalogue_image(image_id: str):
        """One catalogue image of the index, by id."""
        ctx.need("products")
        found = ctx.state["catalogue_images"].read(image_id)
        if found is None:
            shown = repr(image_id) if len(image_id) <= 80 else repr(image_id[:77] + "...")
            raise InputError(f"no catalogue image {shown} (not in the index, or its file is gone)", 404)
        data, media = found
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    return router
