"""The service's routes, one module per area, each a function ``(ctx: ServiceContext) -> APIRouter``
registered in :data:`ROUTES`. ``create_app`` includes every registered router; a route whose area is not
configured answers 404 through ``ctx.need``. A new route is one module with a registered router function
(here, or in a plugin package through the ``visrec.plugins`` entry points)."""

from visrec.registry import Registry

ROUTES: Registry = Registry("service routes")

from visrec.serve.routes import faces, landmarks, products, system  # noqa: E402,F401 - registers them
