"""A round-robin HTTP load balancer for the replica tests (loopback only).

Each request goes to the next backend in turn, whatever connection it came on (so a client
that keeps one connection alive still alternates), and the response, streamed or not, is
relayed as it arrives.  ``served`` records which backend answered each path, so a test can
show that consecutive turns of a conversation really landed on different replicas.  A
backend that cannot be reached is a 502 (as a real balancer answers; the tests never rely
on the balancer to retry).
"""

from __future__ import annotations

import itertools
import threading

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from servers import ThreadServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "host",
        "content-length"}


class RoundRobin(ThreadServer):
    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.served: list[tuple[str, str]] = []
        """``(backend url, method + path)`` per request, in arrival order."""
        self._next = itertools.cycle(range(len(backends)))
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None

        async def app(scope, receive, send) -> None:  # a plain coroutine function: uvicorn sees ASGI 3
            await self._app(scope, receive, send)

        super().__init__(app)

    def _pick(self) -> str:
        with self._lock:
            return self.backends[next(self._next)]

    async def _app(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self._client is not None:
                await self._client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=5))
        request = Request(scope, receive)
        backend = self._pick()
        with self._lock:
            self.served.append((backend, f"{request.method} {request.url.path}"))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        url = backend + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            upstream = await self._client.send(
                self._client.build_request(request.method, url, headers=headers, content=await request.body()),
                stream=True)
        except httpx.TransportError as exc:
            await Response(f"backend {backend} unreachable: {exc}", status_code=502)(scope, receive, send)
            return
        out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
        await StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=dict(out),
                                background=BackgroundTask(upstream.aclose))(scope, receive, send)
