"""Form bodies (``multipart/form-data`` and ``application/x-www-form-urlencoded``) read with python-multipart's
own streaming parsers, keeping every text field's bytes until it is decoded as strict UTF-8.

Why not ``request.form()``: Starlette decodes a multipart text field with the body's ``charset`` parameter and,
when the bytes are not valid in it, silently as Latin-1 (``_user_safe_decode`` in starlette/formparsers.py);
field names and file names the same way. A URL-encoded body is decoded as Latin-1 before its percent escapes
are decoded (as UTF-8 with ``errors="replace"``). Either way a name that is not UTF-8 arrives as other text
(``b"Jos\\xe9"`` as ``"José"``, raw UTF-8 bytes of a URL-encoded body as ``"JosÃ©"``, ``%FF`` as U+FFFD)
and would be enrolled or renamed under it. Here such a field is a 400 that names it.

Charsets: text fields are UTF-8 (ASCII is a subset). A ``charset`` parameter naming anything else on the
body's Content-Type is a 415; on a text part's own Content-Type, or in a ``_charset_`` field (RFC 7578 4.6;
HTML forms send one when they hold a hidden ``_charset_`` input), it is a 400 naming the field. A
``_charset_`` field naming UTF-8 is accepted and not passed on as a field. File parts are bytes: their
charset, if any, is not looked at.

Bounds (the same as before): file parts at most ``max_files`` (413), text fields at most ``max_fields``
(400), every part at most ``max_part_size`` bytes (413); the body itself is bounded while it streams by
:mod:`visrec.serve.guard`. A multipart body that ends before its closing boundary is malformed (400), not
a form missing its last part.
"""

from __future__ import annotations

import codecs
from urllib.parse import unquote_to_bytes

from visrec._optional import require
from visrec.errors import shown
from visrec.faces.images import InputError

CHARSET_FIELD = "_charset_"
_UTF8_NAMES = frozenset({"utf-8", "ascii"})  # codecs' own names of UTF-8 and of its ASCII subset
_JSON_UTF_NAMES = frozenset({"utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"})


def is_utf8_charset(name: bytes | str) -> bool:
    """Whether a declared charset names UTF-8 (or ASCII, a subset of it), however it is spelled."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    try:
        return codecs.lookup(name.strip()).name in _UTF8_NAMES
    except (LookupError, ValueError, TypeError):
        return False


def is_json_charset(name: bytes | str) -> bool:
    """Whether a declared charset is one JSON text may be in: UTF-8 (or ASCII), or the UTF-16/32 forms that
    ``json.loads`` reads from bytes."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    try:
        return is_utf8_charset(name) or codecs.lookup(name.strip()).name in _JSON_UTF_NAMES
    except (LookupError, ValueError, TypeError):
        return False


def utf8_text(raw: bytes, what: str) -> str:
    """``raw`` decoded as strict UTF-8; a 400 naming ``what`` and showing the bytes (cut) when it is not."""
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} is not UTF-8: {shown(bytes(raw))} (send text as UTF-8)", 400) from None


def _multipart_lib():
    """python-multipart (imported as ``python_multipart`` since 0.0.13, as ``multipart`` before, as Starlette
    does)."""
    try:
        import python_multipart as lib
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import parse_options_header
    except ModuleNotFoundError:  # pragma: no cover - python-multipart < 0.0.13
        lib = require("multipart", "serve", "python-multipart")
        from multipart.exceptions import FormParserError
        from multipart.multipart import parse_options_header
    return lib, FormParserError, parse_options_header


def content_type_params(ctype: str) -> dict[bytes, bytes]:
    """The parameters of a Content-Type header value (python-multipart's parser: quoted values unquoted)."""
    return _multipart_lib()[2](ctype.encode("latin-1", "replace"))[1]


class _Parts:
    """What the parser callbacks collect: ``items`` of (name, raw bytes, is a file), bounded as they arrive."""

    def __init__(self, *, max_files: int, max_fields: int, max_part_size: int, too_many_files: str):
        self.max_files, self.max_fields, self.max_part_size = max_files, max_fields, max_part_size
        self.too_many_files = too_many_files
        self.items: list[tuple[str, bytes | bytearray, bool]] = []  # a file's bytes, a text field's buffer
        self.files = self.fields = 0
        self.ended = False

    def count(self, is_file: bool) -> None:
        if is_file:
            self.files += 1
            if self.files > self.max_files:
                raise InputError(self.too_many_files, 413)
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise InputError(f"more than {self.max_fields} text fields in one request", 400)

    def grow(self, buffer: bytearray, data: bytes, start: int, end: int, what) -> None:
        if len(buffer) + (end - start) > self.max_part_size:
            raise InputError(f"{what()} is above the limit of {self.max_part_size:,} bytes (limits.max_body_mb)",
                             413)
        buffer += data[start:end]


async def _multipart(request, params: dict, parts: _Parts) -> None:
    lib, parse_error, parse_options_header = _multipart_lib()
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError("malformed multipart body: the content type names no boundary", 400)
    part: dict = {}
    header = [bytearray(), bytearray()]

    def on_part_begin():
        part.clear()
        part.update(headers={}, name=None, file=False, data=bytearray())

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        part["headers"][bytes(header[0]).strip().lower()] = bytes(header[1])
        header[0], header[1] = bytearray(), bytearray()

    def on_headers_finished():
        _, options = parse_options_header(part["headers"].get(b"content-disposition"))
        if b"name" not in options:
            raise InputError('malformed multipart body: a part has no field name (its header Content-Disposition: '
                             'form-data; name="..." is missing or names none)', 400)
        name = utf8_text(options[b"name"], "a multipart field name")
        part["name"], part["file"] = name, b"filename" in options
        parts.count(part["file"])
        charset = content_type_params(part["headers"].get(b"content-type", b"").decode("latin-1")).get(b"charset")
        if not part["file"] and charset is not None and not is_utf8_charset(charset):
            raise InputError(f"field {shown(name)} is declared as {shown(charset.decode('latin-1'))} text: text "
                             f"fields must be UTF-8", 400)

    def on_part_data(data, start, end):
        parts.grow(part["data"], data, start, end, lambda: f"field {shown(part['name'])}")

    def on_part_end():  # a file's bytes are copied out of their buffer here: one file held twice at most
        parts.items.append((part["name"], bytes(part["data"]) if part["file"] else part["data"], part["file"]))

    def on_end():
        parts.ended = True

    callbacks = {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
                 "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_end": on_end}
    try:
        parser = lib.MultipartParser(boundary, callbacks)
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except parse_error as exc:  # the parser's words ('Expected boundary character 45, got 103') say where, not what
        opening = "--" + boundary.decode("latin-1")
        raise InputError(f"malformed multipart body: its parts must each start with the line {shown(opening, 80)} "
                         f"(the boundary its Content-Type declares) and follow the multipart layout; the parser "
                         f"stopped: {shown(str(exc), 200)}", 400) from None
    if not parts.ended:
        closing = "--" + boundary.decode("latin-1") + "--"
        raise InputError(f"malformed multipart body: it ends before its closing boundary {shown(closing, 80)}", 400)


async def _urlencoded(request, parts: _Parts) -> None:
    lib, parse_error, _ = _multipart_lib()
    field = [bytearray(), bytearray()]

    def on_field_start():
        field[0], field[1] = bytearray(), bytearray()

    def on_field_name(data, start, end):
        parts.grow(field[0], data, start, end, lambda: "a field name")

    def on_field_data(data, start, end):
        parts.grow(field[1], data, start, end, lambda: f"field {shown(bytes(field[0]))}")

    def on_field_end():
        parts.count(False)
        # percent escapes are bytes: decoded with the raw bytes around them, then the whole as strict UTF-8
        name = utf8_text(unquote_to_bytes(bytes(field[0]).replace(b"+", b" ")), "a form field name")
        parts.items.append((name, bytearray(unquote_to_bytes(bytes(field[1]).replace(b"+", b" "))), False))

    callbacks = {"on_field_start": on_field_start, "on_field_name": on_field_name, "on_field_data": on_field_data,
                 "on_field_end": on_field_end}
    try:
        parser = lib.QuerystringParser(callbacks)
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except parse_error as exc:
        raise InputError(f"malformed form body: {shown(str(exc), 200)}", 400) from None


async def read_form(request, media: str, params: dict, *, max_files: int, max_fields: int, max_part_size: int,
                    too_many_files: str) -> list[tuple[str, str | bytes, bool]]:
    """The body's fields in order as (name, value, is a file): a file's value is its bytes, a text field's its
    strict UTF-8 text. ``media``: ``multipart/form-data`` or ``application/x-www-form-urlencoded``; ``params``:
    the Content-Type's parameters (:func:`content_type_params`). ``too_many_files``: the 413's message."""
    charset = params.get(b"charset")
    if charset is not None and not is_utf8_charset(charset):
        raise InputError(f"content type {media} with charset {shown(charset.decode('latin-1'))} not accepted: "
                         f"form text must be UTF-8 (send charset=utf-8 or no charset)", 415)
    parts = _Parts(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size,
                   too_many_files=too_many_files)
    if media == "multipart/form-data":
        await _multipart(request, params, parts)
    else:
        await _urlencoded(request, parts)
    declared = [raw for name, raw, is_file in parts.items if name == CHARSET_FIELD and not is_file]
    for raw in declared:  # first: a body declared in another charset is refused as such, not field by field
        if not is_utf8_charset(bytes(raw)):
            raise InputError(f"field {CHARSET_FIELD!r} names {shown(bytes(raw).decode('latin-1'))}: text fields "
                             f"must be UTF-8", 400)
    return [(name, raw if is_file else utf8_text(raw, f"field {shown(name)}"), is_file)
            for name, raw, is_file in parts.items if is_file or name != CHARSET_FIELD]
