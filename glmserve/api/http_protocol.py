"""The HTTP/1.1 connection uvicorn serves glmserve on: uvicorn's h11 protocol plus a deadline
on each request's headers.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and the size of the
headers (``h11_max_incomplete_event_size``), but not the time they take: a client sending
a header byte every few seconds holds its connection forever.  Here a request's headers
must be complete ``read_timeout`` seconds after its first byte (or after the connection
opened); past that the client gets a 408 in the error shape of the path its request line
names (when it got that far) and the connection is closed.  A connection that opened and
sent nothing is closed without an answer.  The body's deadline is
:class:`~glmserve.api.middleware.BodyLimitMiddleware`'s (ASGI sees the body, not the headers).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from glmserve.api.errors import error_shape


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers (:data:`header_timeout`)."""

    header_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._started = False  # some bytes of the pending request's head have arrived
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's head begun, not finished
            self._started = self._started or bool(data)
            self._arm()
        else:
            self._started = False
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._started:
            self.transport.write(timeout_response(self.conn.trailing_data[0], self.header_timeout))
        self.transport.close()


def timeout_response(head: bytes, timeout: float) -> bytes:
    """The raw 408 for a request whose head (so far: ``head``) did not arrive in time."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    path = line[1].split(b"?", 1)[0].decode("latin-1") if len(line) > 1 else ""
    body: Any = error_shape(path).body(408, f"the request headers did not arrive within {timeout:g} s", None,
                                       "request_timeout")
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(data)) + data


def protocol(header_timeout: float | None) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``; None: uvicorn's own (no deadline)."""
    if header_timeout is None:
        return H11Protocol
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})


def server_config(app: Any, *, read_timeout: float | None, **kw: Any) -> uvicorn.Config:
    """uvicorn's config for glmserve: the header deadline of :func:`protocol` (``kw`` as
    ``uvicorn.Config``'s)."""
    return uvicorn.Config(app, http=protocol(read_timeout), **kw)
