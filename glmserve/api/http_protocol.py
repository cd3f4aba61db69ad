"""The HTTP/1.1 connection glmserve is served on: uvicorn's own protocol (httptools when
installed, as it is with vLLM, else h11, as uvicorn picks) with the bounds uvicorn lacks.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and, under h11 only,
the size of a request's head (with a 400).  It bounds neither the time a head takes, nor its
size under httptools, nor the time a write may wait: a client that stops reading fills the
socket buffers, and uvicorn's ``send`` then waits for the transport's ``resume_writing`` for
ever.  Here, on every connection (:class:`Limits`):

- **the head's time**: a request's head must be complete ``head_timeout`` seconds after its
  first byte, or after the connection opened (a connection that sends nothing is closed
  without an answer); past that, 408.
- **the head's size**: past ``max_header_bytes`` bytes of head, 431.  The bytes beyond are
  never given to the parser, so memory stays bounded whatever the client sends.
- **each write**: when the transport's buffer stays above its high-water mark (the client
  takes nothing) for ``write_timeout`` seconds, the connection is reset.  uvicorn then
  reports the request disconnected, so its stream ends, its engine request is aborted and
  its admission slot freed (:mod:`glmserve.api.runner`), and :class:`ConnectionState` (in
  every request's ``scope["state"]``) tells the app why.

**Nothing is ever written into a response already started.**  The server's own answers (408,
431, and uvicorn's 400 for a request its parser refuses) are whole responses written only while
no response is in progress on the connection: a head that begins during a response
(pipelining) gets its deadline once that response is complete, and an oversized or malformed
one is answered after it (the bytes that follow are dropped meanwhile).

This takes no HTTP framing into its own hands: the parsers are uvicorn's, the answers are
serialized by h11, and the hooks are the parser's interface (httptools' callbacks, h11's
``their_state`` and ``trailing_data``), asyncio's flow-control callbacks, and uvicorn's
``on_response_complete``, ``send_400_response`` and the ``response_complete`` of its cycle
(tests/api/test_hostile_http.py runs every vector on both parsers: an uvicorn that moved one
fails there).  The body's deadline and size are
:class:`~glmserve.api.middleware.BodyLimitMiddleware`'s (ASGI sees the body, not the head).
"""

from __future__ import annotations

import asyncio
import http
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn serves h11, and so do we
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from glmserve.api.errors import error_shape
from glmserve.api.settings import Settings
from glmserve.metrics import OTHER_ROUTE, Metrics, status_label

LINGER = 2.0
"""Seconds a connection answered 408 or 431 stays open, reading and dropping, for its client to
read the answer before the close (see :meth:`_Bounded._write_answer`)."""

CONNECTION = "glmserve.connection"
"""The key, in each request's ``scope["state"]``, of its connection's :class:`ConnectionState`."""


@dataclass(frozen=True)
class Limits:
    """The bounds on one connection (see the module's doc); None: no limit."""

    head_timeout: float | None = 30.0
    max_header_bytes: int = 64 * 1024
    write_timeout: float | None = 60.0


@dataclass
class ConnectionState:
    """What the protocol tells the requests of one connection."""

    write_timed_out: bool = False
    """A write waited past the write deadline: the connection was aborted."""


def connection_state(scope: Any) -> ConnectionState | None:
    """The :class:`ConnectionState` of the connection a request came on (None: served otherwise)."""
    state = scope.get("state") or {}
    conn = state.get(CONNECTION)
    return conn if isinstance(conn, ConnectionState) else None


def whole_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    """A complete ``Connection: close`` response, serialized by h11."""
    writer = h11.Connection(h11.SERVER)
    writer.receive_data(b"GET / HTTP/1.1\r\nhost: glmserve\r\n\r\n")  # h11 answers only what it was asked
    writer.next_event()
    headers = [("content-type", content_type), ("content-length", str(len(body))), ("connection", "close")]
    return b"".join(writer.send(event) or b"" for event in (
        h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase),
        h11.Data(data=body), h11.EndOfMessage()))


def error_answer(status: int, path: str, message: str, code: str) -> bytes:
    """The server's own answer to a request whose head named ``path``, in that path's error shape."""
    return whole_response(status, json.dumps(error_shape(path).body(status, message, None, code)).encode())


def path_of(head: bytes) -> str:
    """The path of a request line (so far), without its query: ``""`` when none came yet."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) > 1 else ""


class _Bounded:
    """The bounds, shared by both of uvicorn's HTTP/1.1 protocols.  A subclass says where a
    request's head stands (:meth:`_head_size`, :meth:`_head_start`)."""

    limits: ClassVar[Limits] = Limits()
    metrics: ClassVar[Metrics | None] = None

    # uvicorn's
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        self.connection = ConnectionState()
        # each request's scope["state"] is a copy of app_state: this connection's holds its state
        super().__init__(config, server_state, {**app_state, CONNECTION: self.connection}, _loop)  # type: ignore[call-arg]
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._due: tuple[int, bytes] | None = None
        """The server's own answer (status, bytes), due once no response is in progress."""

    # -- where the head stands (per parser)

    def _head_size(self) -> int | None:
        """Bytes of the pending request's head received so far; None when no head is awaited."""
        raise NotImplementedError

    def _head_start(self) -> bytes:
        """The start of the pending request's head (its request line, as far as it came)."""
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head()  # a connection that never sends a head is closed at the deadline

    def data_received(self, data: bytes) -> None:
        limit = self.limits.max_header_bytes
        while data and self._due is None and not self.transport.is_closing():
            size = self._head_size()
            if size is None:  # a body, or nothing more is expected: uvicorn's, whole
                piece, data = data, b""
            elif size >= limit:
                self._answer(431, f"the request head exceeds the limit of {limit} bytes",
                             "request_header_fields_too_large")
                return
            else:  # never more than the limit allows into the parser
                piece, data = data[: limit - size], data[limit - size:]
            self._feed(piece)
            self._head_moved()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._write_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        if self.limits.write_timeout is not None and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()  # type: ignore[misc]

    # -- uvicorn

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.transport.is_closing() or self._responding():
            return
        if self._due is not None:
            self._write_answer()
        else:  # a head begun during the response is awaited from now on
            self._head_moved()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refuses, counted; for one pipelined behind a
        response in progress (httptools parses ahead), due once that response is complete."""
        if self._responding():
            if self._due is None:
                self._due = (400, whole_response(400, msg.encode(), "text/plain; charset=utf-8"))
            return
        self._count(400)
        super().send_400_response(msg)  # type: ignore[misc]

    # -- the bounds

    def _responding(self) -> bool:
        """A request is in progress (being answered, or queued behind the one that is)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _head_moved(self) -> None:
        """After the head's bytes or the connection's state changed: the deadline runs while
        a head is begun and awaited, and only then."""
        size = self._head_size()
        if not size or self._responding():  # none begun (or the last one complete), or not awaited yet
            self._disarm_head()
        else:
            self._arm_head()

    def _arm_head(self) -> None:
        if self._head_timer is None and self.limits.head_timeout is not None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_too_slow)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        size = self._head_size()
        if self.transport.is_closing() or size is None or self._responding():
            return  # (a head awaited behind a response is armed again when the response completes)
        if size == 0:  # opened and said nothing: nothing to answer
            self.transport.close()
            return
        self._answer(408, f"the request headers did not arrive within {self.limits.head_timeout:g} s",
                     "request_timeout")

    def _answer(self, status: int, message: str, code: str) -> None:
        """Answer the pending head and close, now or once the response in progress is complete."""
        self._disarm_head()
        self._due = (status, error_answer(status, path_of(self._head_start()), message, code))
        if not self._responding():
            self._write_answer()

    def _write_answer(self) -> None:
        """Write the due answer, then close as a careful server does: the write side first, the
        rest once the client closes or after :data:`LINGER` seconds.  (Closed at once with the
        client's bytes unread, the kernel would reset the connection, and a client still
        sending would likely never read its answer.)  What arrives meanwhile is dropped."""
        assert self._due is not None
        status, data = self._due
        self._count(status)
        self.transport.write(data)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    def _write_stalled(self) -> None:
        """The client took nothing for the write deadline: reset the connection.  A close would
        wait for the buffer to drain; an abort alone would leave the kernel an orphan socket
        still offering its unsent bytes to a closed window, and the client never told."""
        self._write_timer = None
        self.connection.write_timed_out = True
        if self.metrics is not None:
            self.metrics.write_timeouts.inc()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # linger 0: the close resets, discarding the unsent bytes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _count(self, status: int) -> None:
        if self.metrics is not None:  # no route was matched: the head never (wholly) came
            self.metrics.requests.labels(OTHER_ROUTE, status_label(status)).inc()


class H11Bounded(_Bounded, H11Protocol):
    """uvicorn's h11 protocol, bounded.  h11 buffers the head until it is whole: its
    ``trailing_data`` is the head so far, while the client is between requests (IDLE) or
    has sent a request whole and the next begins (DONE)."""

    def _head_size(self) -> int | None:
        if self.conn.their_state not in (h11.IDLE, h11.DONE):
            return None
        return len(self.conn.trailing_data[0])

    def _head_start(self) -> bytes:
        return bytes(self.conn.trailing_data[0][:8192])


class HttpToolsBounded(_Bounded, HttpToolsProtocol or H11Protocol):  # type: ignore[misc]
    """uvicorn's httptools protocol (what it picks when httptools is installed, as it is with
    vLLM), bounded.  httptools gives a header only once whole (keeping its bytes until then), so
    the head's bytes are counted as they are fed, from the end of a request to its successor's
    ``on_headers_complete``.  (A head that begins in the same read as its predecessor's end
    counts from the next read: the parser does not say where in a read a message ended.)"""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_open, self._head_bytes, self._began = True, 0, False
        super().connection_made(transport)

    def _feed(self, data: bytes) -> None:
        if self._head_open:
            self._head_bytes += len(data)
        super()._feed(data)

    def on_message_begin(self) -> None:
        self._began = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_open, self._head_bytes, self._began = True, 0, False
        super().on_message_complete()

    def _head_size(self) -> int | None:
        if not self._head_open:
            return None
        return self._head_bytes or int(self._began)  # begun: at least its first byte came

    def _head_start(self) -> bytes:
        return b"GET " + self.url + b" HTTP/1.1" if self._began else b""  # the method does not matter, the path does


def protocol(limits: Limits, impl: str = "auto", metrics: Metrics | None = None) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``: ``impl`` as uvicorn chooses it
    (``auto``: httptools when installed, else h11) with ``limits``; ``metrics`` counts its own
    answers and write timeouts."""
    if impl == "auto":
        impl = "httptools" if HttpToolsProtocol is not None else "h11"
    if impl == "httptools" and HttpToolsProtocol is None:
        raise ValueError("http='httptools' needs httptools installed")
    if impl not in ("httptools", "h11"):
        raise ValueError(f"http={impl!r}: glmserve serves HTTP/1.1 with httptools or h11")
    base: type[_Bounded] = HttpToolsBounded if impl == "httptools" else H11Bounded
    return type(base.__name__, (base,), {"limits": limits, "metrics": metrics})


def limits(settings: Settings) -> Limits:
    """The connection bounds ``settings`` ask for (``--read-timeout`` is the head's deadline too)."""
    return Limits(head_timeout=settings.read_timeout, max_header_bytes=settings.max_header_bytes,
                  write_timeout=settings.write_timeout)


def server_config(app: Any, settings: Settings, *, http: str = "auto", **kw: Any) -> uvicorn.Config:
    """uvicorn's config for glmserve (``kw`` as ``uvicorn.Config``'s): the bounded protocol,
    counting into the app's metrics.  h11's own buffer bound sits above the head limit, which
    is enforced first and answered 431."""
    bounds = limits(settings)
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    return uvicorn.Config(app, http=protocol(bounds, http, metrics),
                          h11_max_incomplete_event_size=bounds.max_header_bytes + 1, **kw)
