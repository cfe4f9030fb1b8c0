"""Reading a request's images and fields, bounded, for every route; and the request bodies routes declare.

Images come as multipart form files (field ``image``; several ``image`` parts where a route takes many) or as
JSON with base64 strings (``{"image": "<base64>"}`` / ``{"images": [...]}``). The body itself is bounded while
it streams (:mod:`visrec.serve.guard`); here the number of images and their pixels (read from each header,
nothing decoded) are checked against ``limits`` before any image work. Every problem is an
:class:`~visrec.faces.images.InputError` with the status the service answers.

Routes read the body themselves (so that the limits apply while it streams) and declare its two forms in the
OpenAPI document with :func:`image_body`: ``/docs`` shows a file picker per image field, and generated clients
know the fields.
"""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import base64
import binascii
import io
import json

from visrec.faces.images import InputError


class _NonFinite(ValueError):
    pass


def _reject_non_finite(name: str):
    raise _NonFinite(name)


def parse_json(text, where: str):
    """JSON from a request; NaN / Infinity and malformed text are 400s naming ``where``."""
    try:
        return json.loads(text, parse_constant=_reject_non_finite)
    except _NonFinite as exc:
        raise InputError(f"{where} holds {exc}: numbers must be finite", 400) from None
    except ValueError:
        raise InputError(f"{where} is not valid JSON", 400) from None


def bool_field(fields: dict, name: str) -> bool:
    value = fields.get(name, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return str(value).lower() in ("true", "1", "yes")
    raise InputError(f"field {name!r} must be true or false, got {value!r}", 400)


def int_field(fields: dict, name: str, default: int, high: int = 1000) -> int:
    value = fields.get(name, default)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise InputError(f"field {name!r} must be an integer, got {value!r}", 400) from None
    if not 1 <= value <= high:
        raise InputError(f"field {name!r} must be between 1 and {high}, got {value}", 400)
    return value


def box_field(fields: dict, name: str, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Field ``name`` as a box x1,y1,x2,y2 (a "x1,y1,x2,y2" string or 4 numbers) of finite numbers with
    x2 > x1 and y2 > y1 that overlaps the ``width`` x ``height`` image; None when the field is absent."""
    import math

    box = fields.get(name)
    if box is None or box == "":
        return None
    try:
        box = tuple(float(v) for v in (box.split(",") if isinstance(box, str) else box))
        ok = len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]
    except (ValueError, TypeError):
        ok = False
    if not ok or not (box[0] < width and box[1] < height and box[2] > 0 and box[3] > 0):
        raise InputError(f"field {name!r} must be 4 finite numbers x1,y1,x2,y2 with x2 > x1 and y2 > y1 that "
                         f"overlap the {width}x{height} image", 400)
    return box


def header_pixels(data: bytes) -> int:
    """Width x height from an image's header (Pillow reads no pixel data to open it); 0 if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        return 1 << 62  # declares more pixels than any limit
    except Exception:  # noqa: BLE001 - not an image: the decoder names the problem later
        return 0
    return int(w) * int(h)


class ImageRequests:
    """Reads images and fields from requests within ``limits`` (a :class:`visrec.serve.config.LimitsConfig`)."""

    def __init__(self, limits):
        self.limits = limits
        self.max_body = int(limits.max_body_mb * 1e6)

    def check_pixels(self, images: dict) -> None:
        """Images per request and their pixels (from each header, nothing decoded) against the limits."""
        limits = self.limits
        count = sum(len(v) for v in images.values())
        if count > limits.max_images:
            raise InputError(f"{count} images in one request, above the limit of {limits.max_images} "
                             f"(limits.max_images)", 413)
        total = 0
        for data in (d for v in images.values() for d in v):
            total += header_pixels(data)  # an unreadable image is reported when it is decoded
            if total > limits.max_request_pixels:
                raise InputError(f"the request's images hold more than {limits.max_request_pixels:,} pixels "
                                 f"(limits.max_request_pixels)", 413)

    async def read(self, request, *, many: bool = False, names=("image",)):
        """(images by field name, the other fields) from multipart or base64 JSON (body bounded by Guard); a request
        that carries no image (``names`` empty) may also be a URL-encoded form."""
        limits = self.limits
        ctype = request.headers.get("content-type", "")
        images: dict = {n: [] for n in names}
        fields: dict = {}
        if ctype.startswith("multipart/form-data") or (not names and ctype.startswith("application/x-www-form-urlencoded")):
            try:
                form = await request.form(max_files=limits.max_images + 1, max_fields=64, max_part_size=self.max_body)
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
            payload = parse_json(await request.body(), "the JSON body")
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
                             f"application/json" + ("" if names else " (or a URL-encoded form)"), 415)
        for n in names:
            if not images[n]:
                raise InputError(f"no image in field {n!r}", 400)
            if len(images[n]) > 1 and not many:
                raise InputError(f"one image expected in field {n!r}, got {len(images[n])}", 400)
        self.check_pixels(images)
        return images, fields


def image_body(images=("image",), *, many: bool = False, fields: dict | None = None, required=()) -> dict:
    """``openapi_extra`` declaring a route's request body in its two forms: multipart (a binary file per image
    field; ``many``: the first field may repeat) and JSON (base64 strings). ``fields``: other form fields,
    ``{name: (JSON schema, description)}``; ``required``: which of them must be sent."""
    fields = fields or {}
    multipart, as_json = {}, {}
    for i, name in enumerate(images):
        one = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, ...)"}
        multipart[name] = {"type": "array", "items": one} if many and i == 0 else one
        as_json[name] = {"type": "string", "format": "byte", "description": "the image file, base64"}
        if many and i == 0:
            as_json[name + "s"] = {"type": "array", "items": {"type": "string", "format": "byte"},
                                   "description": "several image files, base64"}
    for name, (schema, description) in fields.items():
        multipart[name] = as_json[name] = {**schema, "description": description}
    need = list(images) + list(required)
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": multipart, "required": need}},
        "application/json": {"schema": {"type": "object", "properties": as_json,
                                        "required": [n for n in need if n not in images or not many]}},
    }}}
