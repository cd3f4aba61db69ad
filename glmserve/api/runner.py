"""The one route skeleton every generating endpoint runs through.

An endpoint is a request mapping plus a response shape (:class:`Endpoint`); :func:`serve`
does the rest in the same order for all of them: model check -> engine health ->
admission (before any rendering, so a flood is shed cheaply) -> ``endpoint.prepare`` ->
either a server-sent-event stream (errors in-band once headers are gone) or the whole
answer raced against the client's disconnect (499, engine request aborted) -> admission
released and one request-log line.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from glmserve.api.admission import Admission, RequestLog
from glmserve.api.errors import APIError
from glmserve.api.pipeline import ChatPipeline
from glmserve.api.settings import Settings
from glmserve.engine.base import Engine, EngineRequestError, EngineUnavailable
from glmserve.formats.base import ChatFormat
from glmserve.metrics import Metrics

log = logging.getLogger("glmserve.api")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_SSE_SCHEMA: dict[str, Any] = {
    "description": "server-sent events: the body as text, or each event as its fields",
    "anyOf": [{"type": "string"},
              {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}],
}

STREAMS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the answer (JSON), or server-sent events with stream=true",
          "content": {"text/event-stream": {"schema": _SSE_SCHEMA}}},
}
"""``responses=`` for a route that may stream (the OpenAPI document says so)."""


def chunk_encoder(head: dict[str, Any], usage_null: bool) -> Callable[[dict[str, Any]], str]:
    """The ``data:`` line of each one-choice OpenAI chunk of a stream. The fields every chunk repeats
    (``head``: id, object, created, model, ...) are encoded once per stream; a chunk encodes only
    its choice, which is per-token work saved on every delta."""
    prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
    suffix = ']' + (', "usage": null}\n\n' if usage_null else "}\n\n")
    return lambda choice: prefix + json.dumps(choice, ensure_ascii=False) + suffix


class Handle(Protocol):
    """What the runner needs of a prepared request."""

    request_id: str
    stream: bool


BodyT = TypeVar("BodyT", contravariant=True)
HandleT = TypeVar("HandleT", bound=Handle)


class Endpoint(Protocol[BodyT, HandleT]):
    """A request mapping plus a response shape."""

    name: str
    """In request-log lines (``chat``, ``completion``...)."""

    async def prepare(self, body: BodyT, request: Request) -> HandleT:
        """Validate and map the body, render and tokenize: every client mistake is an
        :class:`APIError` raised here, before anything is generated.  ``request`` gives
        the headers and ``request.state.api_key_id``."""
        ...

    def stream(self, handle: HandleT) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer, the terminator included."""
        ...

    def stream_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> str:
        """An error in-band, once the stream's headers are gone (it ends the stream)."""
        ...

    async def complete(self, handle: HandleT) -> dict[str, Any]:
        """The whole answer's JSON body."""
        ...

    def log_fields(self, handle: HandleT) -> tuple[int, dict[str, Any]]:
        """``(prompt tokens, extra fields)`` for the request log, once it has run."""
        ...

    # Optional: ``requested_model(body) -> str | None``, the model name to check against the
    # served names (None: no check).  Without it the runner checks ``body.model``.


@dataclass
class Services:
    """What every endpoint of one app shares."""

    engine: Engine
    fmt: ChatFormat
    settings: Settings
    metrics: Metrics
    admission: Admission
    request_log: RequestLog
    pipeline: ChatPipeline

    @classmethod
    def build(cls, engine: Engine, fmt: ChatFormat, settings: Settings) -> "Services":
        metrics = Metrics()
        names = settings.served_model_names or [engine.model_name]
        return cls(engine, fmt, settings, metrics, Admission(settings.max_concurrent_requests, metrics),
                   RequestLog(names[0], settings.json_logs), ChatPipeline(engine, fmt, metrics, settings.argument_hook,
                                                                       settings.max_output_tokens))

    @property
    def model_names(self) -> list[str]:
        return self.settings.served_model_names or [self.engine.model_name]

    def check_model(self, model: str | None) -> str:
        """The served name a request's ``model`` means: itself when served, the first served
        name when absent or matching a ``--model-alias`` glob (Claude Code asks for
        ``claude-haiku-…`` for subagents whatever the settings say); anything else is 404
        ``model_not_found``, as OpenAI and vLLM answer."""
        names = self.model_names
        if model is None:
            return names[0]
        if model in names:
            return model
        if any(fnmatch.fnmatchcase(model, pattern) for pattern in self.settings.model_aliases):
            return names[0]
        aliases = f" (or a name matching {', '.join(self.settings.model_aliases)})" if self.settings.model_aliases else ""
        raise APIError(404, f"the model {model!r} is not served here; available: {', '.join(names)}{aliases}",
                       param="model", code="model_not_found")

    async def serve(self, endpoint: Endpoint[Any, Any], body: Any, request: Request) -> Response:
        t0 = time.perf_counter()
        requested = getattr(endpoint, "requested_model", None)
        asked = requested(body) if requested is not None else getattr(body, "model", None)
        served = self.check_model(asked)
        # a name served through --model-alias: the log line says which was asked and which served
        named = {"model": served, "requested_model": asked} if asked not in (None, served) else {}
        await self.engine.check_health()
        self.admission.acquire()  # before rendering and tokenizing, so a flood is shed cheaply
        try:
            handle = await endpoint.prepare(body, request)
        except BaseException:
            self.admission.release()
            raise
        if handle.stream:
            return StreamingResponse(self._stream(endpoint, handle, t0, named), media_type="text/event-stream",
                                     headers=STREAM_HEADERS)
        try:
            result = await _unless_disconnected(request, endpoint.complete(handle))
        finally:
            self.admission.release()
        if result is None:  # the client went away; its engine request was aborted
            await self.engine.abort(handle.request_id)
            self.request_log.record(endpoint.name, handle.request_id, endpoint.log_fields(handle)[0], t0, 499,
                                    {"disconnected": True, **named})
            return Response(status_code=499)
        prompt_tokens, fields = endpoint.log_fields(handle)
        self.request_log.record(endpoint.name, handle.request_id, prompt_tokens, t0, 200, {**fields, **named})
        return JSONResponse(result)

    async def _stream(self, endpoint: Endpoint[Any, Any], handle: Any, t0: float,
                      named: dict[str, Any]) -> AsyncIterator[str]:
        try:
            async for event in endpoint.stream(handle):
                yield event
        except EngineUnavailable as exc:
            yield endpoint.stream_error(503, f"the engine is unavailable: {exc}", code="engine_unavailable")
        except EngineRequestError as exc:
            yield endpoint.stream_error(400, str(exc), exc.param)
        except APIError as exc:
            yield endpoint.stream_error(exc.status, exc.message, exc.param, exc.code)
        except Exception as exc:  # headers are gone: report in-band (and log it)
            log.exception("stream %s failed", handle.request_id)
            yield endpoint.stream_error(500, f"internal error: {type(exc).__name__}")
        finally:
            self.admission.release()
            prompt_tokens, fields = endpoint.log_fields(handle)
            self.request_log.record(endpoint.name, handle.request_id, prompt_tokens, t0, 200,
                                    {"stream": True, **fields, **named})


async def serve(endpoint: Endpoint[Any, Any], body: Any, request: Request) -> Response:
    """Run ``endpoint`` for ``body`` with the services of the app serving ``request``."""
    services: Services = request.app.state.services
    return await services.serve(endpoint, body, request)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (which aborts its engine
    request) and return None.  A non-streamed request would otherwise keep generating,
    up to max_tokens, for nobody."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # cannot listen: never report a disconnect
            await asyncio.Event().wait()

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watch.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and watch.done() and not watch.cancelled():
            return None
        raise
