"""Pure-ASGI middleware: API keys, the body-size limit, request counts.

Each is a plain ASGI class (no Starlette internals), so it sees every request before
routing and validation: a bad key is a 401 even for a body that is not JSON, an oversized
body is a 413 before it is read.  Their errors take the shape of the endpoint at the
request's path (:func:`glmserve.api.errors.error_response`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.datastructures import Headers
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
    """413 for a body over ``max_bytes``: at once when Content-Length says so, else (a chunked
    body) as soon as the bytes read pass the limit; a chunked body within it is replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self, scope: Scope, what: str) -> ASGIApp:
        return error_response(413, f"{what} exceeds the limit of {self.max_bytes} bytes",
                              code="request_too_large", path=scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self.too_large(scope, f"request body of {length} bytes")(scope, receive, send)
            return
        if length is not None or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)  # the server holds the body to its Content-Length
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
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
    the raw path, so distinct ids or unknown paths add no series."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":  # routed by now: the scope holds the route
                self.metrics.requests.labels(route_label(scope), status_label(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
