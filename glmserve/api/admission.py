"""What an admitted request holds, and the per-request log line.

An admitted request holds two things: a place under the bound on requests in flight
(:class:`Slot`) and the engine requests it started.  A :class:`Lease` owns both; its
:meth:`Lease.close` is idempotent and frees the slot and aborts every engine request that
did not run to its end.  The runner opens the lease and hands it to the request's
:class:`~glmserve.api.middleware.LeaseMiddleware`, whose ``finally`` closes it when the
request's ASGI call ends, whatever happened: a response sent, failed, cut off by the client,
or never built.  Earlier closes (a whole answer's JSON is ready, a stream ended) are
optimisations, not the guarantee.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from glmserve.api import observe
from glmserve.api.errors import APIError
from glmserve.engine.base import Delta, Engine, GenerateParams
from glmserve.metrics import Metrics

request_log = logging.getLogger("glmserve.requests")

_OPEN: ContextVar[set[str] | None] = ContextVar("glmserve_open_engine_requests", default=None)
"""The engine request ids the current request started and that have not ended yet."""


class Slot:
    """One place under :class:`Admission`'s bound; :meth:`release` frees it once."""

    def __init__(self, admission: "Admission") -> None:
        self._admission = admission
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._free()


class Admission:
    """A bound on requests in flight; past it, 429 at once instead of a queue."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self.metrics = metrics

    def acquire(self) -> Slot:
        if self.in_flight >= self.limit:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                           code="too_many_requests", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.running.set(self.in_flight)
        return Slot(self)

    def _free(self) -> None:
        self.in_flight -= 1
        self.metrics.running.set(self.in_flight)


class TrackedEngine:
    """The engine, as the endpoints see it: each ``generate`` is recorded in the current
    request's :class:`Lease` until it runs to its end or is aborted, so the lease can abort
    what a consumer left hanging (a generator never closed, a task cancelled mid-way).
    Everything else is the engine's own."""

    def __init__(self, engine: Engine) -> None:
        self.inner = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        opened = _OPEN.get()
        if opened is not None:
            opened.add(request_id)
        async for d in self.inner.generate(prompt_ids, params, request_id):
            yield d
        if opened is not None:  # ran to its end: nothing to abort
            opened.discard(request_id)

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)
        opened = _OPEN.get()
        if opened is not None:  # only once it is done: an abort cancelled mid-way is retried by the lease
            opened.discard(request_id)


class Lease:
    """A request's slot and engine requests, released together, once (see the module's doc)."""

    def __init__(self, slot: Slot, engine: Engine | TrackedEngine) -> None:
        self.slot = slot
        self.engine = engine
        self.engine_requests: set[str] = set()
        _OPEN.set(self.engine_requests)  # this task's context; the tasks it starts share the set
        self.streaming = False
        """Handed to a streamed response, which closes it once sent."""

    async def close(self) -> None:
        """Free the slot, then abort the engine requests still open (idempotent; called again
        after an abort was cancelled, it aborts what is left)."""
        self.slot.release()
        while self.engine_requests:
            request_id = next(iter(self.engine_requests))
            await self.engine.abort(request_id)
            self.engine_requests.discard(request_id)


class RequestLog:
    """One line per finished request on the ``glmserve.requests`` logger: text, or one JSON
    object per line with ``--json-logs``."""

    def __init__(self, model: str, json_logs: bool = False) -> None:
        self.model = model
        self.json_logs = json_logs

    def record(self, endpoint: str, request_id: str, prompt_tokens: int, t0: float, status: int,
               extra: dict[str, Any]) -> None:
        """``t0`` is the request's ``time.perf_counter()`` at arrival.  The request's observer
        (:mod:`glmserve.api.observe`) gets the same record."""
        obs = observe.current()
        if obs is not None:
            obs.logged(endpoint, request_id, prompt_tokens, status, extra)
        elapsed = time.perf_counter() - t0
        if self.json_logs:
            request_log.info(json.dumps({"id": request_id, "endpoint": endpoint, "model": self.model, "status": status,
                                         "prompt_tokens": prompt_tokens, "latency_s": round(elapsed, 4), **extra},
                                        ensure_ascii=False))
        else:
            request_log.info("%s %s status=%s prompt_tokens=%d latency=%.3fs %s", endpoint, request_id, status,
                             prompt_tokens, elapsed, " ".join(f"{k}={v}" for k, v in extra.items()))
