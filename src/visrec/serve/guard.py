"""The service's outer layer (plain ASGI, in front of every route): API key, request bytes bounded *while*
the body streams in, a deadline for receiving the body, and Prometheus metrics labelled by route template.

The route label is the template of the route that answered (``/v1/faces/{identity:path}``), never the path
itself; ``unmatched`` only for a request no route of the app matches. FastAPI's own routes put themselves in
the scope; a route that does not (Starlette's ``/openapi.json``, the ``/_docs-assets`` mount) is found by
matching the request as it arrived against the app's routes, as the router did.

Under ``/v1/`` the request target's percent escapes must decode to UTF-8 (the server would otherwise hand on
U+FFFD for each bad byte, ``?identity=Al%FFce`` as ``Al\ufffdce``), and no query parameter may come twice: a 400
naming the query parameter, or the path.

The key a request carries may be restricted to some face galleries: the Guard puts the galleries it may use
into the request's scope (:func:`allowed_galleries` reads them; None: every gallery) and the face routes
refuse the others. The key itself goes nowhere but the constant-time comparison.

Why plain ASGI: a limit checked on ``Content-Length`` alone lets a chunked body (no length) be read whole
before anything looks at its size. Here every chunk is counted as it arrives and the request is answered
413 as soon as the count passes the limit, so memory never holds more than the limit plus one chunk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from urllib.parse import unquote_to_bytes

from visrec._optional import require
from visrec.errors import shown
from visrec.faces.images import InputError

UNMATCHED = "unmatched"  # the route label of a path no route matches (a fixed label: no path is ever one)
GALLERIES_SCOPE = "visrec.galleries"  # the scope key holding the galleries the request's key may use


def allowed_galleries(scope) -> frozenset[str] | None:
    """The face galleries the request's API key may use; None: every one (an unrestricted key, or no keys)."""
    return scope.get(GALLERIES_SCOPE)


def leaf_routes(routes):
    """The app's routes with FastAPI's included routers opened up (it keeps each as one entry)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from leaf_routes(inner.routes)
        else:
            yield route


def route_template(route) -> str | None:
    """A route's label: its path template (a mount's with ``/{path}`` after it)."""
    from starlette.routing import Mount

    if isinstance(route, Mount):
        return route.path_format
    return getattr(route, "path", None)


def matched_template(routes, scope) -> str:
    """The template of the route among ``routes`` that the router hands ``scope`` to (a full match first, else
    the first partial one: a method that route does not take); :data:`UNMATCHED` when none."""
    from starlette.routing import Match

    partial = None
    for route in leaf_routes(routes):
        match, _ = route.matches(dict(scope))
        if match is Match.FULL:
            return route_template(route) or UNMATCHED
        if match is Match.PARTIAL and partial is None:
            partial = route
    return (route_template(partial) if partial is not None else None) or UNMATCHED


def _target_problem(scope) -> str | None:
    """What in the request target does not percent-decode to UTF-8, or a query parameter given twice (which
    one would a route take? ``?identity=alice&identity=bob`` erased bob while a log reading the first saw alice);
    None: neither."""
    raw = scope.get("raw_path")  # optional in ASGI: without it the server's decoding is all there is
    if raw is not None:
        try:
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return f"the path is not UTF-8 once percent-decoded: {shown(raw, 80)}"
    seen = set()
    for pair in (scope.get("query_string") or b"").split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        try:
            name = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            return f"a query parameter name is not UTF-8 once percent-decoded: {shown(name)}"
        if name in seen:
            return f"query parameter {shown(name)} is sent twice"
        seen.add(name)
        try:
            unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            return f"query parameter {shown(name)} is not UTF-8 once percent-decoded: {shown(value)}"
    return None


class Metrics:
    """Request counts by (route template, status) and latency by route template, in a private registry
    (``prometheus_client``, so the text is the exposition format every scraper parses)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, gallery_templates=None):
        prom = require("prometheus_client", "serve", "prometheus-client")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("visrec_requests", "HTTP requests by route template and status.",
                                     ["route", "status"], registry=self.registry)
        self.latency = prom.Histogram("visrec_request_seconds", "Request latency in seconds by route template.",
                                      ["route"], buckets=self.BUCKETS, registry=self.registry)
        if gallery_templates is not None:
            gauge = prom.Gauge("visrec_gallery_templates", "Templates in the face galleries (all of them).",
                               registry=self.registry)
            gauge.set_function(gallery_templates)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def text(self) -> str:
        return self._prom.generate_latest(self.registry).decode()


async def _answer(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware; ``keys``: each key -> the face galleries it may use (None: every one), as
    :meth:`ServeConfig.keys` gives them; empty means no key is asked (loopback only: :class:`ServeConfig`
    checks)."""

    def __init__(self, app, *, keys: dict[str, frozenset[str] | None], max_body: int, body_timeout_s: float,
                 metrics: Metrics, routes=None):
        self.app, self.max_body, self.body_timeout_s, self.metrics = app, max_body, body_timeout_s, metrics
        self.routes = routes  # () -> the app's routes, to label requests no route put in the scope
        self.keys = [(k.encode(), galleries) for k, galleries in keys.items()]

    def _refuse(self, scope) -> InputError | None:
        headers = scope.get("headers") or []
        if self.keys:
            given = [v for k, v in headers if k == b"x-api-key"]
            # exactly one header, compared in constant time against every key (no early exit)
            found = False
            for key, galleries in self.keys:
                if len(given) == 1 and hmac.compare_digest(given[0], key):
                    found, scope[GALLERIES_SCOPE] = True, galleries
            if not found:
                return InputError("missing or wrong API key (header X-API-Key)", 401)
        problem = _target_problem(scope)
        if problem is not None:
            return InputError(problem, 400)
        lengths = [v for k, v in headers if k == b"content-length"]
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                return InputError("malformed Content-Length header", 400)
            if int(lengths[0]) > self.max_body:
                return InputError(f"body of {int(lengths[0]):,} bytes is above the limit of {self.max_body:,} "
                                  f"(limits.max_body_mb)", 413)
        return None

    def _bounded(self, receive):
        """``receive`` that counts body bytes and enforces the body deadline until the body is complete."""
        state = {"bytes": 0, "done": False, "deadline": time.monotonic() + self.body_timeout_s}

        async def bounded():
            if state["done"]:  # after the body: disconnect notices, no limit applies
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(state["deadline"] - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise InputError(f"request body not received within {self.body_timeout_s:g} s "
                                 f"(limits.body_timeout_s)", 408) from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.max_body:
                    raise InputError(f"body is above the limit of {self.max_body:,} bytes (limits.max_body_mb)", 413)
                state["done"] = not message.get("more_body", False)
            return message

        return bounded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": 500, "started": False}
        arrived = dict(scope)  # as the router first sees it (a mount moves root_path on the way in)

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if scope["path"].startswith("/v1/"):
                refusal = self._refuse(scope)
                if refusal is not None:
                    return await _answer(tracked_send, refusal.status, str(refusal))
                receive = self._bounded(receive)
            try:
                await self.app(scope, receive, tracked_send)
            except InputError as exc:  # raised by the body limit where no route handler catches it
                if status["started"]:
                    raise
                await _answer(tracked_send, exc.status, str(exc))
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = UNMATCHED if self.routes is None else matched_template(self.routes(), arrived)
            self.metrics.observe(route, status["code"], time.perf_counter() - start)
