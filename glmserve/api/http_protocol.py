"""The HTTP/1.1 connection uvicorn serves glmserve on: uvicorn's own protocol (httptools when
installed, else h11, as uvicorn picks) plus a deadline on each request's headers.

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

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn serves h11, and so do we
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from glmserve.api.errors import error_shape


class _HeadDeadline:
    """The deadline, shared by both of uvicorn's HTTP/1.1 protocols: armed when a connection
    opens and when a request's head begins, disarmed when the head is complete."""

    header_timeout: float = 30.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _pending_head(self) -> tuple[bool, bytes | None]:
        """(a request's head is still awaited, its bytes so far: None when none came)."""
        raise NotImplementedError

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        pending, head = self._pending_head()
        if self.transport.is_closing() or not pending:
            return
        if head is not None:
            self.transport.write(timeout_response(head, self.header_timeout))
        self.transport.close()


class H11HeaderTimeout(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._started = False  # some bytes of the pending request's head have arrived
        self._arm()

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

    def _pending_head(self) -> tuple[bool, bytes | None]:
        return self.conn.their_state is h11.IDLE, self.conn.trailing_data[0] if self._started else None


class HttpToolsHeaderTimeout(_HeadDeadline, HttpToolsProtocol or H11Protocol):  # type: ignore[misc]
    """uvicorn's httptools protocol (what it picks when httptools is installed, as it is
    with vLLM) with the header deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._fresh = True  # no request began on this connection yet
        self._in_head = False
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fresh, self._in_head = False, True
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _pending_head(self) -> tuple[bool, bytes | None]:
        if self._in_head:
            return True, b"GET " + self.url + b" HTTP/1.1"  # the method does not matter, the path does
        return self._fresh, None


def timeout_response(head: bytes, timeout: float) -> bytes:
    """The raw 408 for a request whose head (so far: ``head``) did not arrive in time."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    path = line[1].split(b"?", 1)[0].decode("latin-1") if len(line) > 1 else ""
    body: Any = error_shape(path).body(408, f"the request headers did not arrive within {timeout:g} s", None,
                                       "request_timeout")
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(data)) + data


def protocol(header_timeout: float | None, impl: str = "auto") -> type[asyncio.Protocol] | str:
    """The protocol for ``uvicorn.Config(http=...)``: ``impl`` as uvicorn chooses it (``auto``:
    httptools when installed, else h11) with the header deadline; None: uvicorn's own."""
    if header_timeout is None:
        return impl
    if impl == "auto":
        impl = "httptools" if HttpToolsProtocol is not None else "h11"
    if impl == "httptools" and HttpToolsProtocol is None:
        raise ValueError("http='httptools' needs httptools installed")
    base: type[_HeadDeadline] = HttpToolsHeaderTimeout if impl == "httptools" else H11HeaderTimeout
    return type(base.__name__, (base,), {"header_timeout": header_timeout})


def server_config(app: Any, *, read_timeout: float | None, http: str = "auto", **kw: Any) -> uvicorn.Config:
    """uvicorn's config for glmserve: the header deadline of :func:`protocol` (``kw`` as
    ``uvicorn.Config``'s)."""
    return uvicorn.Config(app, http=protocol(read_timeout, http), **kw)
