"""The one route skeleton every generating endpoint runs through.

An endpoint is a request mapping plus a response shape (:class:`Endpoint`); :func:`serve`
does the rest in the same order for all of them: model check -> engine health ->
admission (before any rendering, so a flood is shed cheaply), which opens the request's
:class:`~glmserve.api.admission.Lease` (its slot and its engine requests) -> ``endpoint.prepare``
-> either a server-sent-event stream (errors in-band once headers are gone; cut off by the
client, 499 in the log) or the whole answer raced against the client's disconnect (499,
engine request aborted) -> the lease closed (slot freed, unfinished engine requests
aborted) and one request-log line.

The lease is closed early where the runner can (a whole answer is ready, a stream ended or
failed, ``prepare`` raised), but its owner is the request's
:class:`~glmserve.api.middleware.LeaseMiddleware`, which closes it when the request's ASGI
call ends: a response that is never sent (a route's code raising after ``serve`` returned),
a stream never iterated or cut off by the client cannot keep a slot.  The body is read (by
:class:`~glmserve.api.middleware.BodyLimitMiddleware`, under the read timeout) before any
of this, so a slow client never holds a slot; nor does one that stops reading a stream: past
the write deadline its connection is aborted (:mod:`glmserve.api.http_protocol`), which ends
the stream as a disconnect does, logged ``write_timeout``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from glmserve.api import observe
from glmserve.api.admission import Admission, Lease, RequestLog, TrackedEngine
from glmserve.api.errors import APIError
from glmserve.api.http_protocol import connection_state
from glmserve.api.middleware import hold
from glmserve.api.pipeline import ChatPipeline, Prepared
from glmserve.api.settings import Settings
from glmserve.engine.base import Engine, EngineRequestError, EngineUnavailable, GenerateParams
from glmserve.formats.base import ChatFormat
from glmserve.metrics import CUT_ENDPOINTS, CUT_REASONS, RENDERING, Metrics

log = logging.getLogger("glmserve.api")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_TOKENS_HEADER = "X-Glmserve-Max-Tokens"
"""The output budget a generating request was granted (:func:`glmserve.api.pipeline.output_budget`):
less than it asked for when its prompt left less room (or ``--max-output-tokens`` is lower)."""

_SSE_SCHEMA: dict[str, Any] = {
    "description": "server-sent events: the body as text, or each event as its fields",
    "anyOf": [{"type": "string"},
              {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}],
}

def streams(answer: type) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that may stream: the whole ``answer`` (a pydantic model of
    the JSON body), or server-sent events (the OpenAPI document says both)."""
    return {200: {"description": "the answer (JSON), or server-sent events with stream=true", "model": answer,
                  "content": {"text/event-stream": {"schema": _SSE_SCHEMA}}}}


def header_list(values: Iterable[str]) -> str:
    """A response header's value made of request data (tool names...): each value
    percent-encoded as UTF-8 (RFC 3986: all but ``A-Z a-z 0-9 - . _ ~``), joined by commas.
    Always ASCII and free of commas, quotes and control characters, whatever the request
    held, so building the header can never fail (``搜索`` -> ``%E6%90%9C%E7%B4%A2``)."""
    return ",".join(quote(v, safe="") for v in values)


def chunk_encoder(head: dict[str, Any], usage_null: bool) -> Callable[[dict[str, Any]], str]:
    """The ``data:`` line of each one-choice OpenAI chunk of a stream. The fields every chunk repeats
    (``head``: id, object, created, model, ...) are encoded once per stream; a chunk encodes only
    its choice, which is per-token work saved on every delta."""
    prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
    suffix = ']' + (', "usage": null}\n\n' if usage_null else "}\n\n")
    return lambda choice: prefix + json.dumps(choice, ensure_ascii=False) + suffix


class Prelude(str):
    """Stream text that must not leave before the engine's first output (Chat Completions' role
    chunk, Anthropic's ``message_start``, Responses' ``response.created``): the runner holds it
    and sends it with the next text the endpoint yields (an empty string once the engine's first
    output came but shows nothing yet), or before the error if the stream fails first.  A client
    that times the first chunk (``vllm bench serve``, guidellm) then measures the real time to
    first token, as against vLLM's server, which sends its first chunk with the first output."""


class Handle(Protocol):
    """What the runner needs of a prepared request."""

    request_id: str
    stream: bool

    @property
    def headers(self) -> dict[str, str]:
        """Headers of the answer, streamed or whole (the granted output budget)."""
        ...


@dataclass
class PreparedHandle:
    """What the chat-pipeline endpoints' handles share: a :class:`Handle` over a prepared run."""

    run: Prepared
    stream: bool
    media_fields: dict[str, Any] = field(default_factory=dict, kw_only=True)
    """The request-log fields of the media parts replaced by notes (:mod:`glmserve.api.media`)."""

    @property
    def request_id(self) -> str:
        return self.run.request_id

    @property
    def headers(self) -> dict[str, str]:
        return {MAX_TOKENS_HEADER: str(self.run.params.max_tokens)}

    def log_fields(self) -> tuple[int, dict[str, Any]]:
        """The request-log fields every chat endpoint writes: ``max_tokens`` is the budget granted,
        ``max_tokens_asked`` what the request asked for, where it got less."""
        r = self.run
        granted = r.params.max_tokens
        asked = {"max_tokens_asked": r.max_tokens_asked} if (r.max_tokens_asked or 0) > granted else {}
        return r.prompt_tokens, {"cached_tokens": r.cached_tokens or 0, "completion_tokens": r.completion_tokens,
                                 "tools": list(r.tool_names), "max_tokens": granted, **asked, **self.media_fields}


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
        """The server-sent events of a streamed answer, the terminator included; what comes
        before the engine's first output is yielded as :class:`Prelude`."""
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
    checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    """Readiness of the parts besides the engine, by name (the Responses store): ``/health``
    awaits each; one raising :class:`APIError` makes the server unready (a 503)."""
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run by the app's lifespan (a router's connections opened and closed with the server)."""

    @classmethod
    def build(cls, engine: Engine, fmt: ChatFormat, settings: Settings) -> "Services":
        metrics = Metrics()
        names = settings.served_model_names or [engine.model_name]
        engine = TrackedEngine(engine)  # type: ignore[assignment]  # every request's engine requests, for its lease
        pipeline = ChatPipeline(engine, fmt, metrics, settings.argument_hook, settings.max_output_tokens,
                                early_start=not settings.wait_for_grammar)
        return cls(engine, fmt, settings, metrics, Admission(settings.max_concurrent_requests, metrics),
                   RequestLog(names[0], settings.json_logs), pipeline, on_start=[pipeline.warm_preludes],
                   on_stop=[pipeline.warmup.close])

    def count_cut(self, endpoint: str, reason: str) -> None:
        """Count a request the client left (logged 499); only fixed label values reach the metric."""
        if endpoint in CUT_ENDPOINTS and reason in CUT_REASONS:
            self.metrics.requests_cut.labels(endpoint, reason).inc()

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
        lease = Lease(self.admission.acquire(), self.engine)  # before rendering, so a flood is shed cheaply
        hold(request.scope, lease)  # from here on, the request's end closes the lease whatever happens
        try:
            handle = await endpoint.prepare(body, request)
            if handle.stream:
                cut = _cut_reason(request)
                return LeasedStream(self._stream(endpoint, handle, t0, lease, named, cut), lease, handle.headers)
            result = await _unless_disconnected(request, endpoint.complete(handle))
        finally:
            if not lease.streaming:
                await lease.close()
        prompt_tokens, fields = endpoint.log_fields(handle)
        if result is None:  # the client went away; its engine request was aborted
            self.count_cut(endpoint.name, "disconnected")
            self.request_log.record(endpoint.name, handle.request_id, prompt_tokens, t0, 499,
                                    {**fields, "disconnected": True, **named})
            return Response(status_code=499)
        self.request_log.record(endpoint.name, handle.request_id, prompt_tokens, t0, 200, {**fields, **named})
        return JSONResponse(result, headers=handle.headers)

    async def render(self, endpoint: Endpoint[Any, HandleT], body: Any, request: Request) -> HandleT:
        """``endpoint.prepare`` alone, for vLLM's render API (``POST /v1/chat/completions/render``
        and its siblings): what the request becomes -- its prompt's token ids and the engine's
        settings -- without generating.  vllm-router's ``kv_aware`` policy asks every replica
        for them and routes to the one whose KV-cache events hold the longest prefix of the ids.
        The same checks as :meth:`serve` up to ``prepare`` (model, engine health, an admission
        slot while preparing, so a flood of renders is shed like one of requests); nothing is
        logged as a request nor counted as one generated (:data:`glmserve.metrics.RENDERING`)."""
        requested = getattr(endpoint, "requested_model", None)
        self.check_model(requested(body) if requested is not None else getattr(body, "model", None))
        await self.engine.check_health()
        lease = Lease(self.admission.acquire(), self.engine)
        hold(request.scope, lease)
        rendering = RENDERING.set(True)
        try:
            return await endpoint.prepare(body, request)
        finally:
            RENDERING.reset(rendering)
            await lease.close()

    async def _stream(self, endpoint: Endpoint[Any, Any], handle: Any, t0: float, lease: Lease,
                      named: dict[str, Any], cut: Callable[[], str]) -> AsyncIterator[str]:
        held = ""  # the Prelude, until the engine's first output
        ended = False  # sent to its end (an error in-band included)
        try:
            try:
                async with aclosing(endpoint.stream(handle)) as events:
                    async for event in events:
                        if isinstance(event, Prelude):
                            held += event
                        elif held or event:
                            yield held + event
                            held = ""
            except EngineUnavailable as exc:
                yield held + _in_band(endpoint, 503, f"the engine is unavailable: {exc}", code="engine_unavailable")
            except EngineRequestError as exc:
                yield held + _in_band(endpoint, 400, str(exc), exc.param)
            except APIError as exc:
                if exc.status >= 500:
                    log.error("stream %s failed: %s", handle.request_id, exc.message)
                yield held + _in_band(endpoint, exc.status, exc.message, exc.param, exc.code)
            except Exception as exc:  # headers are gone: report in-band (and log it)
                log.exception("stream %s failed", handle.request_id)
                yield held + _in_band(endpoint, 500, f"internal error: {type(exc).__name__}", code="server_error")
            ended = True
        finally:
            await lease.close()
            prompt_tokens, fields = endpoint.log_fields(handle)
            # closed before its end: the client went away, or stopped reading past the write deadline
            status, why = 200, {}
            if not ended:
                reason = cut()
                status, why = 499, {reason: True}
                self.count_cut(endpoint.name, reason)
            self.request_log.record(endpoint.name, handle.request_id, prompt_tokens, t0, status,
                                    {"stream": True, **why, **fields, **named})


class LeasedStream(StreamingResponse):
    """A server-sent-event response that closes its body (so the endpoint's generators and
    engine requests end now, not when collected) and its lease once sent, failed or cut
    off.  Never sent at all, the request's LeaseMiddleware closes the lease."""

    def __init__(self, events: AsyncIterator[str], lease: Lease, headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**STREAM_HEADERS, **(headers or {})})
        self.events = events
        self.lease = lease
        lease.streaming = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
            await self.lease.close()


def generate_request(request_id: str, model: str, token_ids: list[int], params: GenerateParams,
                     stream: bool) -> dict[str, Any]:
    """One engine input in the shape of vLLM's render API (its ``GenerateRequest``): the token
    ids the engine is given and the sampling settings glmserve derived from the request (the
    decoding constraint is not among them: it is glmserve's own, built from the tools)."""
    return {"request_id": request_id, "model": model, "token_ids": token_ids, "stream": stream,
            "sampling_params": {"max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p, "top_k": params.top_k or 0, "seed": params.seed,
                                "stop": params.stop, "stop_token_ids": params.stop_token_ids,
                                "presence_penalty": params.presence_penalty,
                                "frequency_penalty": params.frequency_penalty, "n": params.n,
                                "logprobs": params.logprobs, "ignore_eos": params.ignore_eos,
                                "skip_special_tokens": params.skip_special_tokens}}


def rendered(handle: PreparedHandle, model: str) -> dict[str, Any]:
    """The render API's answer for a chat-pipeline request (Chat Completions, Messages, Responses)
    to ``model`` (the served name)."""
    run = handle.run
    return generate_request(run.request_id, model, run.prompt_ids, run.params, handle.stream)


def _in_band(endpoint: Endpoint[Any, Any], status: int, message: str, param: str | None = None,
             code: str | None = None) -> str:
    """The endpoint's in-band error event, once a stream's headers are gone; the request's
    observer (:mod:`glmserve.api.observe`) is told, as it cannot see the status."""
    obs = observe.current()
    if obs is not None:
        obs.failed(status, message)
    return endpoint.stream_error(status, message, param, code)


async def serve(endpoint: Endpoint[Any, Any], body: Any, request: Request) -> Response:
    """Run ``endpoint`` for ``body`` with the services of the app serving ``request``."""
    services: Services = request.app.state.services
    return await services.serve(endpoint, body, request)


def _cut_reason(request: Request) -> Callable[[], str]:
    """Why the stream of ``request`` ended before its end (asked once it has): ``write_timeout``
    when its connection was aborted for a write that made no progress, else ``disconnected``."""
    connection = connection_state(request.scope)
    return lambda: "write_timeout" if connection is not None and connection.write_timed_out else "disconnected"


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
