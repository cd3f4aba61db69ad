"""Pure-ASGI middleware: API keys, the request body (size and read deadline), request
counts, and the leases of admitted requests.

Each is a plain ASGI class (no Starlette internals), so it sees every request before
routing and validation: a bad key is a 401 even for a body that is not JSON, an oversized
body is a 413 before it is read, a body that does not arrive within the read timeout is a
408 before the route (and admission) sees it.  Their errors take the shape of the endpoint
at the request's path (:func:`glmserve.api.errors.error_response`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections.abc import Sequence
from typing import Protocol

from starlette.datastructures import Headers
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmserve.api.errors import error_response
from glmserve.metrics import Metrics, route_label, status_label

_KEY_HEADERS: dict[str, tuple[str, ...]] = {}


def accept_key_header(prefix: str, header: str) -> None:
    """Let requests to paths under ``prefix`` carry the API key in ``header`` (e.g. the
    Anthropic SDK's ``x-api-key``) as well as in ``Authorization: Bearer``."""
    _KEY_HEADERS[prefix] = tuple(dict.fromkeys((*_KEY_HEADERS.get(prefix, ()), header.lower())))


def key_headers(path: str) -> tuple[str, ...]:
    """The extra key headers accepted at ``path`` (from every registered prefix it falls under)."""
    return tuple(dict.fromkeys(h for p, hs in _KEY_HEADERS.items() if path.startswith(p) for h in hs))


def key_id(key: str) -> str:
    """A stable, non-secret identity of an API key (what stores may scope data by)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def protected(path: str) -> bool:
    """Paths behind the API key: the API itself and ``/tokenize`` (``/health``, ``/metrics``,
    ``/version`` and the OpenAPI document stay open)."""
    return path.startswith("/v1") or path == "/tokenize"


class AuthMiddleware:
    """Require one of ``keys`` on protected paths; no keys, no check.

    Puts the matched key's :func:`key_id` (None when auth is off or the path is open) into
    ``scope["state"]["api_key_id"]``, read by routes as ``request.state.api_key_id``.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [(k.encode(), key_id(k)) for k in keys]

    def match(self, path: str, headers: Headers) -> str | None | bool:
        """The matched key's id; False when none of the offered keys is valid."""
        offered: list[str] = []
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered.append(token.strip())
        offered += [headers[h].strip() for h in key_headers(path) if h in headers]
        for token in offered:
            for key, ident in self.keys:
                if hmac.compare_digest(token.encode(), key):
                    return ident
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        ident: str | None | bool = None
        if self.keys and protected(path):
            ident = self.match(path, Headers(scope=scope))
            if ident is False:
                extra = "".join(f" or '{h}: <key>'" for h in key_headers(path))
                response = error_response(401, f"missing or invalid API key (send 'Authorization: Bearer <key>'{extra})",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}, path=path)
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})["api_key_id"] = ident
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """The request body, read here before routing: 413 for one over ``max_bytes`` (at once
    when Content-Length says so, else as soon as the bytes read pass the limit), 408 for one
    that has not arrived ``read_timeout`` seconds after the headers (a client dribbling it
    holds a connection, never an admission slot: routes run on the whole body).  Within both,
    the body is replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    def too_large(self, scope: Scope, what: str) -> ASGIApp:
        return error_response(413, f"{what} exceeds the limit of {self.max_bytes} bytes",
                              code="request_too_large", path=scope["path"])

    def too_slow(self, scope: Scope) -> ASGIApp:
        return error_response(408, f"the request body did not arrive within {self.read_timeout:g} s",
                              code="request_timeout", headers={"Connection": "close"}, path=scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self.too_large(scope, f"request body of {length} bytes")(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + (self.read_timeout if self.read_timeout is not None else math.inf)
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic())
                                                 if self.read_timeout is not None else None)
            except TimeoutError:
                await self.too_slow(scope)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.too_large(scope, "request body")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Count API responses by route template and status (``glmserve_requests_total``): labels
    from :func:`glmserve.metrics.route_label` / :func:`~glmserve.metrics.status_label`, never
    the raw path, so distinct ids or unknown paths add no series.

    The outermost middleware, so every answer is counted: the 401s, 408s and 413s the
    middleware inside it give before routing (labelled with the route their path matches,
    through ``router``), the routes' own, and the server's failures.  The head's 408 and 431
    come before any ASGI call and are counted by :mod:`glmserve.api.http_protocol`."""

    def __init__(self, app: ASGIApp, metrics: Metrics, router: Router | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    def route(self, scope: Scope) -> str:
        """The label of the route serving ``scope``: the one routing chose, else (answered before
        routing) the one its path and method match."""
        if "route" not in scope and self.router is not None:
            for route in self.router.routes:
                if route.matches(scope)[0] is Match.FULL:
                    return route_label({"route": route})
        return route_label(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(self.route(scope), status_label(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            # an unhandled error is answered 500 by Starlette's outermost middleware, outside this one:
            # count it here, or the server's own failures would be missing from the series
            if not started:
                self.metrics.requests.labels(self.route(scope), status_label(500)).inc()
            raise


class Closable(Protocol):
    async def close(self) -> None: ...


LEASES = "glmserve.leases"
"""The key, in the ASGI scope's state, of the leases the current request holds."""


def hold(scope: Scope, lease: Closable) -> None:
    """Have the request's :class:`LeaseMiddleware` close ``lease`` when the request ends."""
    leases = scope.get("state", {}).get(LEASES)
    if leases is None:
        raise RuntimeError("this app has no LeaseMiddleware: a lease taken here would have no owner")
    leases.append(lease)


class LeaseMiddleware:
    """The owner of every lease a request takes (:class:`glmserve.api.admission.Lease`): it
    closes them when the request's ASGI call ends, on every path (response sent, failed,
    never built, client gone, task cancelled), so no later code can leak a slot."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[Closable] = []
        scope.setdefault("state", {})[LEASES] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for lease in leases:
                await lease.close()
