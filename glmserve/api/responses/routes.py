"""``/v1/responses``: the OpenAI Responses API on the chat pipeline.

What Codex CLI and the OpenAI Agents SDK speak.  An endpoint of the runner
(:mod:`glmserve.api.runner`): the request mapping is :mod:`glmserve.api.responses.mapping` (items, tools,
tool choice, reasoning, text format -> :class:`ChatRequest` + :class:`GenerationOptions`,
validated by the helpers Chat Completions uses), the response shape is
:class:`~glmserve.api.responses.shape.ResponseAssembler` (one fold for the streamed events
and the whole response).  Responses are stored (``store``, default true) in
:class:`~glmserve.api.responses.store.ResponseStore`, per API key; ``GET`` and ``DELETE``
``/v1/responses/{id}`` read and remove them, ``previous_response_id`` continues them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from glmserve.api import media
from glmserve.api.errors import APIError
from glmserve.api.media import MediaNotes
from glmserve.api.mapping import build_tools, check_message_count, normalise_tool_choice, response_format_constraint
from glmserve.api.pipeline import GenerationOptions, Prepared, schema_work
from glmserve.api.responses.seal import ReasoningSeal
from glmserve.api.responses.mapping import (
    collect_tools,
    items_to_messages,
    parse_items,
    text_format,
    thinking,
    tool_choice,
)
from glmserve.api.responses.schemas import ResponseDeleted, ResponseOut, ResponsesRequest
from glmserve.api.responses.shape import ResponseAssembler, sse
from glmserve.api.responses.store import Bounds, ChainBroken, ResponseStore, StoreFull, StoreUnavailable
from glmserve.api.responses.store_factory import is_postgres_url, open_store
from glmserve.api.runner import Prelude, PreparedHandle, Services, rendered
from glmserve.engine.base import EngineRequestError, EngineUnavailable
from glmserve.formats.base import ChatRequest
from glmserve.metrics import counted
from glmserve.server_secret import SecretSource

log = logging.getLogger("glmserve.responses")
T = TypeVar("T")


class ResponsesState:
    """The store and the reasoning seal, opened on first use (an app that never serves
    ``/v1/responses`` touches no database file and writes no secret; a PostgreSQL store is
    connected at start-up, :meth:`start`)."""

    def __init__(self, db_path: str | Path | None, secret: SecretSource | None = None, bounds: Bounds | None = None,
                 db_timeout: float = 5.0) -> None:
        self.db_path = db_path
        self.secret = secret or SecretSource()
        self.bounds = bounds or Bounds()
        self.db_timeout = db_timeout
        self._store: ResponseStore | None = None
        self._seal: ReasoningSeal | None = None
        self._lock = threading.Lock()

    @property
    def store(self) -> ResponseStore:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.db_path, self.bounds, self.db_timeout)
                log.info("responses store: %s", self._store.describe())
            return self._store

    @property
    def seal(self) -> ReasoningSeal:
        with self._lock:
            if self._seal is None:
                self._seal = ReasoningSeal(self.secret.get())
            return self._seal

    async def start(self) -> None:
        if is_postgres_url(self.db_path):
            await self.store.start()

    async def check(self) -> None:
        """``/health``'s view: a 503 unless the store answers (a SQLite file not opened yet
        has nothing to check)."""
        if self._store is not None or is_postgres_url(self.db_path):
            await store_call(self.store.check())

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None


async def store_call(op: Awaitable[T]) -> T:
    """``op`` on the store; any failure of the database is a 503 for the client (the details,
    which name hosts, go to the log); a response the API key's share cannot hold is a 507."""
    try:
        return await op
    except StoreUnavailable as exc:
        log.warning("%s", exc)
        raise APIError(503, "the response store is unavailable; retry later", code="store_unavailable",
                       headers={"Retry-After": "2"}) from None
    except StoreFull as exc:
        log.warning("response not stored: %s", exc)
        raise APIError(507, f"the response was not stored: {exc} (store: false keeps nothing)",
                       code="store_full") from None


@dataclass
class ResponsesHandle(PreparedHandle):
    """A prepared Responses request."""

    body: ResponsesRequest
    owner: str
    assembler: ResponseAssembler


def _owner(request: Request) -> str:
    """The identity of the request's API key ("" when the server has no keys)."""
    return getattr(request.state, "api_key_id", None) or ""


class Responses:
    """The Responses endpoint (see :class:`glmserve.api.runner.Endpoint`)."""

    name = "responses"

    def __init__(self, services: Services, state: ResponsesState) -> None:
        self.services = services
        self.pipeline = services.pipeline
        self.state = state

    def _dropped(self, param: str, reason: str) -> None:
        """Reasoning not verified as this server's (a seal that does not open, or none) is not
        the model's own: left out, logged, counted."""
        if counted():
            why = "not sealed under this server's secrets" if reason == "invalid_seal" else "no encrypted_content to verify"
            log.warning("%s: reasoning left out of the prompt (%s: %s)", param, reason, why)
            self.services.metrics.reasoning_dropped.labels(reason).inc()

    async def _history(self, owner: str, previous: str | None) -> list[Any]:
        if previous is None:
            return []
        try:
            items = await store_call(self.state.store.history(owner, previous))
        except ChainBroken as exc:
            raise APIError(400, f"previous_response_id: {exc}", param="previous_response_id",
                           code="previous_response_not_found") from None
        if items is None:
            raise APIError(400, f"previous response with id {previous!r} not found", param="previous_response_id",
                           code="previous_response_not_found")
        return parse_items(items)

    async def prepare(self, body: ResponsesRequest, request: Request) -> ResponsesHandle:
        limits = self.services.settings.limits
        owner = _owner(request)
        history = await self._history(owner, body.previous_response_id)
        declared = collect_tools(body.tools)
        choice, shown = tool_choice(body.tool_choice, declared)
        tools = await schema_work(shown.defs, build_tools, shown.defs, limits)  # off the event loop
        choice = normalise_tool_choice(choice, tools)
        params = [f"previous_response_id (item {k})" for k in range(len(history))] + \
                 [f"input[{i}]" for i in range(len(body.input))]
        notes = MediaNotes(self.services.settings.image_input)
        messages = items_to_messages([*history, *body.input], body.instructions, self.state.seal, params,
                                     on_drop=self._dropped, media=notes, stored=len(history))
        check_message_count(len(messages), limits, "input", "messages (input items and history)")
        enable, effort = thinking(body)
        chat = ChatRequest(messages=messages, tools=tools, tool_choice=choice,
                           parallel_tool_calls=body.parallel_tool_calls is not False, enable_thinking=enable,
                           reasoning_effort=effort)
        fmt, fmt_param = text_format(body)
        opts = GenerationOptions(max_tokens=body.max_output_tokens, temperature=body.temperature,
                                 top_p=body.top_p, schema_field="parameters",
                                 output_constraint=await schema_work(isinstance(fmt, dict), response_format_constraint,
                                                                     fmt, fmt_param, limits))
        try:
            run = await self.pipeline.prepare(chat, opts, "resp_")
        except APIError as exc:  # the pipeline names Chat Completions' field; here it is the input
            if exc.param == "messages":
                exc.param = "input"
            raise
        if declared.left_out:
            log.info("request %s: left out tools only OpenAI's cloud runs: %s", run.request_id,
                     ", ".join(declared.left_out))
        asm = ResponseAssembler(self._response_object(body, run), names=declared.names, seal=self.state.seal,
                                include_encrypted=body.include_encrypted_reasoning,
                                hooked=self.pipeline.argument_hook is not None,
                                custom=frozenset(t.name for t in tools if t.freeform is not None))
        media.remember(request, notes)
        return ResponsesHandle(run=run, stream=body.stream, body=body, owner=owner, assembler=asm,
                               media_fields=notes.report(run.request_id, self.services.metrics))

    def _response_object(self, body: ResponsesRequest, run: Prepared) -> dict[str, Any]:
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        return {
            "id": run.request_id, "object": "response", "created_at": run.created, "status": "in_progress",
            "model": self.services.check_model(body.model), "output": [], "error": None, "incomplete_details": None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [], "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                          "summary": body.reasoning.summary if body.reasoning else None},
            "text": {"format": fmt}, "truncation": body.truncation or "disabled", "store": body.store,
            "user": body.user, "prompt_cache_key": body.prompt_cache_key, "background": False,
            "service_tier": "default", "usage": None,
        }

    def log_fields(self, h: ResponsesHandle) -> tuple[int, dict[str, Any]]:
        prompt_tokens, fields = h.log_fields()
        return prompt_tokens, {**fields, "store": h.body.store}

    async def _save(self, h: ResponsesHandle) -> None:
        if h.body.store:
            items = [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in h.body.input]
            await store_call(self.state.store.put(h.owner, h.assembler.response, items, h.body.previous_response_id))

    async def _fold(self, h: ResponsesHandle) -> AsyncIterator[list[dict[str, Any]]]:
        """Batches of stream events, the final one (completed / incomplete) after the
        response is stored, so a client may continue from it at once."""
        asm = h.assembler
        yield asm.start()
        reason = None
        async with aclosing(self.pipeline.run(h.run)) as updates:
            async for u in updates:
                events = asm.feed(u.events, u.builder, u.num_tokens)
                if u.finish_reason is not None:
                    reason = u.finish_reason
                yield events  # even empty: the first one releases the stream's prelude
        final = asm.finish(reason, h.run.prompt_tokens, h.run.cached_tokens)
        await self._save(h)
        yield final

    async def complete(self, h: ResponsesHandle) -> dict[str, Any]:
        async with aclosing(self._fold(h)) as batches:
            async for _ in batches:
                pass
        return h.assembler.response

    async def stream(self, h: ResponsesHandle) -> AsyncIterator[str]:
        try:
            async with aclosing(self._fold(h)) as batches:
                # response.created / in_progress leave with the engine's first output
                yield Prelude("".join(sse(ev) for ev in await anext(batches)))
                async for events in batches:
                    yield "".join(sse(ev) for ev in events)
        except EngineUnavailable as exc:
            yield self._failed(h, f"the engine is unavailable: {exc}")
        except APIError as exc:  # the store failed at the end (not stored, so not completed), or the server's own failure
            yield self._failed(h, exc.message, exc.code or ("server_error" if exc.status >= 500 else "invalid_prompt"))
        except EngineRequestError as exc:
            yield self._failed(h, str(exc), "invalid_prompt")
        except Exception as exc:  # headers are gone: report in-band, as the runner would (and log it)
            log.exception("stream %s failed", h.request_id)
            yield self._failed(h, f"internal error: {type(exc).__name__}")

    @staticmethod
    def _failed(h: ResponsesHandle, message: str, code: str = "server_error") -> str:
        return "".join(sse(ev) for ev in h.assembler.fail(message, code))

    def stream_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> str:
        # ``stream`` reports its own failures with the response; this is only reached for an
        # error raised outside it, where no sequence is known.
        return sse({"type": "error", "sequence_number": 0, "code": code, "message": message, "param": param})


EVENTS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the response object (JSON), or with stream=true server-sent events, each named by its "
                         "type (response.created ... response.completed) with a JSON data line", "model": ResponseOut,
          "content": {"text/event-stream": {"schema": {"type": "object", "required": ["event", "data"],
                                                       "properties": {"event": {"type": "string"},
                                                                      "data": {"type": "string"}}}}}},
}


def router(services: Services) -> APIRouter:
    st = services.settings
    state = ResponsesState(st.responses_db, SecretSource(st.secret),
                           Bounds(ttl=st.responses_ttl, max_bytes=st.responses_max_bytes,
                                  max_bytes_per_owner=st.responses_share), st.responses_db_timeout)
    services.on_start.append(state.start)
    services.on_stop.append(state.close)
    services.checks["store"] = state.check
    endpoint = Responses(services, state)
    r = APIRouter()

    @r.post("/v1/responses", responses=EVENTS)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return media.add_header(request, await services.serve(endpoint, body, request))

    @r.post("/v1/responses/render")
    async def render_response(body: ResponsesRequest, request: Request) -> dict[str, Any]:
        """vLLM's render API for Responses: the prompt's token ids (the ``previous_response_id``
        chain included), nothing generated or stored (:meth:`~glmserve.api.runner.Services.render`)."""
        return rendered(await services.render(endpoint, body, request), services.check_model(body.model))

    def not_found(response_id: str) -> APIError:
        return APIError(404, f"no response with id {response_id!r} found", param="response_id")

    @r.get("/v1/responses/{response_id}", responses={200: {"model": ResponseOut}})
    async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
        stored = await store_call(state.store.get(_owner(request), response_id))
        if stored is None:
            raise not_found(response_id)
        return JSONResponse(stored.response)

    @r.delete("/v1/responses/{response_id}", responses={200: {"model": ResponseDeleted}})
    async def delete_response(response_id: str, request: Request) -> JSONResponse:
        if not await store_call(state.store.delete(_owner(request), response_id)):
            raise not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    return r
