"""Reading a request's images and fields, bounded, for every route; and the request bodies routes declare.

Images come as multipart form files (field ``image``; several ``image`` parts where a route takes many) or as
JSON with base64 strings (``{"image": "<base64>"}`` / ``{"images": [...]}``). The body itself is bounded while
it streams (:mod:`visrec.serve.guard`); here the number of images and their pixels (read from each header,
nothing decoded) are checked against ``limits`` before any image work. Form bodies are read by
:mod:`visrec.serve.forms` (text fields strict UTF-8, never re-read as Latin-1). Every problem is an
:class:`~visrec.faces.images.InputError` with the status the service answers.

Routes read the body themselves (so that the limits apply while it streams) and declare its two forms in the
OpenAPI document with :func:`image_body`: ``/docs`` shows a file picker per image field, and generated clients
know the fields.
"""

# no `from __future__ import annotations`: FastAPI resolves the handlers' annotations (Request) at runtime
import base64
import binascii
import contextlib
import json
import math
import re

from visrec._structured import MAX_NESTING, NestingError, loads_json
from visrec.data.images import header_size
from visrec.data.landmarks import box_on_image
from visrec.errors import shown
from visrec.faces.images import InputError
from visrec.serve.forms import content_type_params, is_json_charset, read_form

MAX_FIELDS = 64  # text fields in one form body


class _Refused(ValueError):
    pass


def _reject_constant(name: str):
    raise _Refused(f"holds {name}: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise _Refused(f"holds {shown(text)}, beyond a float's range: numbers must be finite")
    return value


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise _Refused(f"gives the key {shown(twice)} twice")
    return dict(pairs)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text, where: str):
    """JSON from a request: NaN / Infinity / numbers beyond a float's range, a key twice in one object, nesting
    deeper than ``visrec._structured.MAX_NESTING`` + 1 levels, lone UTF-16 surrogates (``"\\udc00"``: no UTF-8
    text holds one, so no answer or store could write it back) and malformed text are 400s naming ``where``."""
    try:
        if isinstance(text, (bytes, bytearray)):
            with contextlib.suppress(UnicodeDecodeError):  # UTF-16/32 JSON stays bytes: json.loads decodes it
                text = bytes(text).decode("utf-8")
        # a body holds identity metadata (bounded at MAX_NESTING levels by the gallery) one level down
        value = loads_json(text, nesting=MAX_NESTING + 1, parse_constant=_reject_constant,
                           parse_float=_finite_float, object_pairs_hook=_unique_keys)
        # in strict UTF-8 text only a \\uD800-\\uDFFF escape makes a lone surrogate, so the re-encoding that finds
        # one is skipped for bodies without such an escape (every image upload: base64 holds no backslash);
        # other bytes json.loads decoded with 'surrogatepass' are always checked
        if not isinstance(text, str) or _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except _Refused as exc:
        raise InputError(f"{where} {exc}", 400) from None
    except NestingError:
        raise InputError(f"{where} is nested more than {MAX_NESTING + 1} levels deep", 400) from None
    except UnicodeEncodeError:
        raise InputError(f"{where} holds a lone UTF-16 surrogate escape, which is no character", 400) from None
    except UnicodeDecodeError as exc:  # bytes neither UTF-8 nor the UTF-16/32 JSON allows
        raise InputError(f"{where} is not UTF-8 text: {shown(exc.object[max(exc.start - 20, 0):exc.end + 5], 80)} "
                         f"at byte {exc.start}", 400) from None
    except ValueError:
        raise InputError(f"{where} is not valid JSON", 400) from None
    return value


def bool_field(fields: dict, name: str) -> bool:
    value = fields.get(name, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return str(value).lower() in ("true", "1", "yes")
    raise InputError(f"field {name!r} must be true or false, got {value!r}", 400)


def whole_number(value) -> int | None:
    """``value`` as an integer when it is one by the service's rule, else None: a JSON integer (not true/false),
    a JSON number with no fraction (``2.0``), or text of 1 to 20 ASCII digits and nothing else. No sign, space,
    ``_`` or other digits: ``int()`` alone takes `` +2 ``, ``1_0``, ``²`` and ``٣``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and 1 <= len(value) <= 20 and value.isascii() and value.isdigit():
        return int(value)
    return None


def int_field(fields: dict, name: str, default: int, high: int = 1000) -> int:
    """Field ``name`` as an integer in [1, ``high``] (:func:`whole_number`'s rule); anything else is a 400."""
    raw = fields.get(name, default)
    value = whole_number(raw)
    if value is None:
        raise InputError(f"field {name!r} must be an integer (ASCII digits), got {shown(raw)}", 400)
    if not 1 <= value <= high:
        raise InputError(f"field {name!r} must be between 1 and {high}, got {shown(raw)}", 400)
    return value


def box_field(fields: dict, name: str, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Field ``name`` as a box x1,y1,x2,y2 (a "x1,y1,x2,y2" string or 4 numbers, pixels) that overlaps the
    ``width`` x ``height`` image, at least 1 pixel wide and high, no coordinate further than 4 image sides
    outside it (``visrec.data.landmarks.box_on_image``); None when the field is absent."""
    box = fields.get(name)
    if box is None or box == "":
        return None
    try:
        values = box.split(",") if isinstance(box, str) else box
        if not isinstance(values, (list, tuple)) or any(isinstance(v, bool) for v in values):
            raise TypeError("true/false is no coordinate")
        box = tuple(float(v) for v in values)
        ok = len(box) == 4 and box_on_image(box, width, height) and box[2] - box[0] >= 1 and box[3] - box[1] >= 1
    except (ValueError, TypeError, OverflowError):  # OverflowError: a JSON integer of 400 digits
        ok = False
    if not ok:
        raise InputError(f"field {name!r} must be 4 numbers x1,y1,x2,y2 with x2 >= x1 + 1 and y2 >= y1 + 1 that "
                         f"overlap the {width}x{height} image, none more than 4 image sides outside it", 400)
    return box


def header_pixels(data: bytes) -> int:
    """Width x height from an image's header, read by the parser the decoder itself checks sizes with
    (:func:`visrec.data.images.header_size`: a header this cannot read is refused by the decoder too, so
    counting it as 0 here lets nothing through); nothing is decoded."""
    size = header_size(data) if data else None
    return 0 if size is None else int(size[0]) * int(size[1])


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

    async def read(self, request, body: dict, *, many: bool = False, names=("image",)):
        """(images by field name, the other fields) from multipart or base64 JSON (body bounded by Guard); a request
        that carries no image (``names`` empty) may also be a URL-encoded form. ``body``: the route's declared body
        (:func:`image_body`); a field it does not declare is a 400 (a misspelt ``topk`` is not silently the
        default)."""
        limits = self.limits
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()  # media types are case-insensitive; parameters follow ";"
        images: dict = {n: [] for n in names}
        fields: dict = {}
        if media == "multipart/form-data" or (not names and media == "application/x-www-form-urlencoded"):
            # not request.form(): it decodes text that is not UTF-8 as Latin-1 (visrec.serve.forms says how)
            form = await read_form(request, media, content_type_params(ctype), max_files=limits.max_images,
                                   max_fields=MAX_FIELDS, max_part_size=self.max_body,
                                   too_many_files=f"more than {limits.max_images} images in one request "
                                                  f"(limits.max_images)")
            for key, value, is_file in form:
                if is_file:
                    if key not in images:
                        raise InputError(f"unexpected file field {shown(key)}; "
                                         + (f"expected {', '.join(names)}" if names else "this route takes no file"),
                                         400)
                    images[key].append(value)
                else:
                    if key in fields:
                        raise InputError(f"field {shown(key)} is sent twice", 400)
                    fields[key] = value
        elif media == "application/json":
            charset = content_type_params(ctype).get(b"charset")
            if charset is not None and not is_json_charset(charset):
                raise InputError(f"content type application/json with charset "
                                 f"{shown(charset.decode('latin-1'))} not accepted: JSON text is UTF-8 (RFC 8259; "
                                 f"send charset=utf-8 or no charset)", 415)
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
            raise InputError(f"content type {shown(ctype) if ctype else '(none)'} not accepted: send "
                             f"multipart/form-data or application/json"
                             + ("" if names else " (or a URL-encoded form)"), 415)
        for n in names:
            if not images[n] and n in fields and media == "multipart/form-data":
                raise InputError(f"field {n!r} was sent as text, not as a file (curl: -F {n}=@photo.jpg)", 400)
            if not images[n]:
                raise InputError(f"no image in field {n!r}", 400)
            if len(images[n]) > 1 and not many:
                raise InputError(f"one image expected in field {n!r}, got {len(images[n])}", 400)
        declared = body["requestBody"]["content"]["application/json"]["schema"]["properties"]
        if unknown := [k for k in fields if k not in declared]:
            raise InputError(f"unknown field {shown(unknown[0])}: this route takes {', '.join(declared)}", 400)
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
