"""``POST /v1/products/search``: the catalogue images nearest a query photo."""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
from visrec.faces.images import decode_upload
from visrec.serve.requests import image_body, int_field
from visrec.serve.routes import ROUTES

TOP_K = ({"type": "integer", "minimum": 1, "maximum": 1000}, "how many catalogue images (default: the config's)")


@ROUTES.register("products")
def product_routes(ctx):
    from fastapi import APIRouter, Request

    router = APIRouter(tags=["products"])

    @router.post("/v1/products/search", openapi_extra=image_body(fields={"top_k": TOP_K}))
    async def products(request: Request):
        index = ctx.need("products")
        images, fields = await ctx.requests.read(request)
        k = int_field(fields, "top_k", ctx.cfg.products.top_k)

        def work():
            image = decode_upload(images["image"][0], ctx.limits.max_pixels)
            ids, scores = index.search_images([image], k)
            return {"results": [{"id": i, "score": round(float(s), 6)} for i, s in zip(ids[0], scores[0])]}

        return await ctx.offload(work)

    return router
