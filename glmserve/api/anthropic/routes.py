"""``/v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API on the chat
pipeline, so Claude Code and the ``anthropic`` SDK drive a self-hosted GLM.

The request mapping is :mod:`glmserve.api.anthropic.mapping`; the answer, streamed or whole,
is one :class:`~glmserve.api.anthropic.shape.BlockFolder` over the pipeline's updates.
Differences from Chat Completions that clients rely on: ``max_tokens`` beyond the room the
context leaves is clamped to it (Claude Code always asks for 32000), the key may come in
``x-api-key``, and errors take Anthropic's shape (registered for the ``/v1/messages`` prefix).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from glmserve.api.anthropic import mapping as am
from glmserve.api.anthropic.schemas import CountTokensRequest, MessageOut, MessagesBase, MessagesRequest, TokenCount
from glmserve.api.anthropic.shape import BlockFolder, ThinkingSigner, error_body, sse, stop_reason, usage
from glmserve.api import media
from glmserve.api.errors import APIError, ErrorShape, register_error_shape
from glmserve.api.mapping import build_tools, check_message_count, normalise_tool_choice, response_format_constraint
from glmserve.api.media import MediaNotes
from glmserve.api.middleware import accept_key_header
from glmserve.api.pipeline import ChatPipeline, GenerationOptions, schema_work
from glmserve.api.runner import Prelude, PreparedHandle, Services, header_list, rendered
from glmserve.formats.base import ChatRequest, ToolCallEnd
from glmserve.metrics import counted
from glmserve.server_secret import SecretSource

log = logging.getLogger("glmserve.messages")

PREFIX = "/v1/messages"
UNSUPPORTED_TOOLS_HEADER = "X-Glmserve-Unsupported-Tools"
"""Names the declared tools left out because only Anthropic's cloud runs their type (each name
percent-encoded, comma-separated: :func:`glmserve.api.runner.header_list`)."""

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    },
}
ANTHROPIC_ERRORS = ErrorShape(lambda status, message, param, code: error_body(status, message), ERROR_SCHEMA,
                              "AnthropicErrorResponse")


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the message (JSON), or named server-sent events with stream=true", "model": MessageOut,
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["event", "data"],
              "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}}},
}
"""Anthropic's stream events carry an ``event:`` name as well as their ``data:``."""


@dataclass
class MessagesHandle(PreparedHandle):
    model: str
    omit_thinking: bool


class Signatures:
    """The app's thinking-block signer, made from the server secret when first needed."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._source = SecretSource(services.settings.secret)

    @property
    def signer(self) -> ThinkingSigner:
        return ThinkingSigner(self._source.get())

    def dropped(self, param: str, reason: str) -> None:
        """A thinking block whose signature does not verify is not the model's own: left out, logged, counted."""
        if counted():
            log.warning("%s: thinking left out of the prompt (%s: not signed under this server's secrets)", param,
                        reason)
            self.services.metrics.reasoning_dropped.labels(reason).inc()


def chat_request(body: MessagesBase, services: Services, signatures: Signatures,
                 notes: MediaNotes | None = None, report_drops: bool = True) -> tuple[ChatRequest, list[str]]:
    """The ChatRequest for a Messages (or count_tokens) body, and the names of the tools
    left out because their type only runs in Anthropic's cloud.  ``notes`` collects the
    media blocks replaced by text notes."""
    limits = services.settings.limits
    check_message_count(len(body.messages), limits)
    choice, parallel = am.tool_choice(body)
    forced = choice["function"]["name"] if isinstance(choice, dict) else None
    sel = am.select_tools(body.tools, forced)
    if sel.unsupported:
        log.warning("tools %s are of types only Anthropic's cloud runs; left out", ", ".join(sel.unsupported))
    tools = build_tools(sel.defs, limits)
    thinking = am.thinking_options(body)
    chat = ChatRequest(
        messages=am.to_openai_messages(body.system, body.messages, signatures.signer,
                                       signatures.dropped if report_drops else None,
                                       notes if notes is not None else MediaNotes(services.settings.image_input)),
        tools=tools,
        tool_choice=normalise_tool_choice(choice, tools, "tool_choice"),
        parallel_tool_calls=parallel,
        reasoning_effort=am.effort(body),
    )
    if thinking.enable is not None:
        chat = replace(chat, enable_thinking=thinking.enable)
    return chat, sel.unsupported


class Messages:
    """The Messages endpoint (see :class:`glmserve.api.runner.Endpoint`)."""

    name = "messages"

    def __init__(self, services: Services, signatures: Signatures) -> None:
        self.services = services
        self.pipeline: ChatPipeline = services.pipeline
        self.signatures = signatures

    async def prepare(self, body: MessagesRequest, request: Request) -> MessagesHandle:
        notes = MediaNotes(self.services.settings.image_input)
        # the tool and output schemas are checked (and compiled) off the event loop
        heavy = body.tools or (body.output_config is not None and body.output_config.format)
        chat, unsupported = await schema_work(heavy, chat_request, body, self.services, self.signatures, notes)
        if unsupported:
            request.state.unsupported_tools = unsupported
        schema = am.output_format_schema(body)
        opts = GenerationOptions(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=list(body.stop_sequences or []),
            thinking_budget=am.thinking_options(body).budget,
            schema_field="input_schema",
            output_constraint=await schema_work(True, response_format_constraint, schema, "output_config.format.schema",
                                                self.services.settings.limits) if schema else None,
        )
        run = await self.pipeline.prepare(chat, opts, "msg_")
        media.remember(request, notes)
        return MessagesHandle(run=run, stream=body.stream, model=self.services.check_model(body.model),
                              omit_thinking=am.thinking_options(body).omit,
                              media_fields=notes.report(run.request_id, self.services.metrics))

    def log_fields(self, h: MessagesHandle) -> tuple[int, dict[str, Any]]:
        return h.log_fields()

    def _message(self, h: MessagesHandle, content: list[dict[str, Any]], end: tuple[str | None, str | None]
                 ) -> dict[str, Any]:
        reason, stop_sequence = end
        return {"id": h.run.request_id, "type": "message", "role": "assistant", "model": h.model,
                "content": content, "stop_reason": reason and stop_reason(reason, stop_sequence),
                "stop_sequence": stop_sequence,
                "usage": usage(h.run.prompt_tokens, h.run.completion_tokens, h.run.cached_tokens)}

    async def _fold(self, h: MessagesHandle, folder: BlockFolder, end: list[str | None]) -> AsyncIterator[list[dict[str, Any]]]:
        """The stream events of each pipeline update, then the closing events; ``end`` gets
        the finish reason and the stop sequence that ended the answer."""
        async with aclosing(self.pipeline.run(h.run)) as updates:
            async for u in updates:
                final = {ev.index: u.builder.calls[ev.index].arguments for ev in u.events if isinstance(ev, ToolCallEnd)}
                if u.finish_reason is not None:
                    end[:] = [u.finish_reason, u.stop_sequence]
                yield folder.add(u.events, final)
        yield folder.finish()

    def _folder(self, h: MessagesHandle) -> BlockFolder:
        # with an argument hook, arguments go out whole once the hook has rewritten them
        return BlockFolder(self.signatures.signer, omit_thinking=h.omit_thinking,
                           whole_arguments=self.pipeline.argument_hook is not None)

    async def complete(self, h: MessagesHandle) -> dict[str, Any]:
        folder = self._folder(h)
        end: list[str | None] = ["stop", None]
        async for _ in self._fold(h, folder, end):
            pass
        return self._message(h, folder.content(), (end[0], end[1]))

    def stream_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> str:
        return sse(error_body(status, message))

    async def stream(self, h: MessagesHandle) -> AsyncIterator[str]:
        folder = self._folder(h)
        end: list[str | None] = ["stop", None]
        started = False
        async for events in self._fold(h, folder, end):
            if not started:  # written once the engine's first output is in, so its usage has the cache hits
                start = self._message(h, [], (None, None))
                start["usage"] = usage(h.run.prompt_tokens, 0, h.run.cached_tokens)
                # message_start leaves with that output (a batch without events sends it too)
                yield Prelude(sse({"type": "message_start", "message": start}) + sse({"type": "ping"}))
                started = True
            yield "".join(sse(e) for e in events)
        yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason(end[0], end[1]), "stop_sequence": end[1]},
                   "usage": usage(h.run.prompt_tokens, h.run.completion_tokens, h.run.cached_tokens)})
        yield sse({"type": "message_stop"})


def router(services: Services) -> APIRouter:
    register_error_shape(PREFIX, ANTHROPIC_ERRORS)
    accept_key_header(PREFIX, "x-api-key")
    signatures = Signatures(services)
    endpoint = Messages(services, signatures)
    r = APIRouter()

    @r.post(PREFIX, responses=STREAM_RESPONSES)
    async def messages(body: MessagesRequest, request: Request) -> Response:
        """Anthropic's Messages API (Claude Code appends ``?beta=true``, which changes nothing)."""
        response = media.add_header(request, await services.serve(endpoint, body, request))
        unsupported = getattr(request.state, "unsupported_tools", None)
        if unsupported:
            response.headers[UNSUPPORTED_TOOLS_HEADER] = header_list(unsupported)
        return response

    @r.post(PREFIX + "/render")
    async def render(body: MessagesRequest, request: Request) -> dict[str, Any]:
        """vLLM's render API for Messages: the prompt's token ids, nothing generated (see
        :meth:`~glmserve.api.runner.Services.render`)."""
        return rendered(await services.render(endpoint, body, request), services.check_model(body.model))

    @r.post(PREFIX + "/count_tokens", response_model=None, responses={200: {"model": TokenCount}})
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        """The prompt tokens a Messages request would take (no generation)."""
        services.check_model(body.model)
        # counting is not serving: a dropped thinking block is logged and counted when the request is sent
        chat, _ = await schema_work(body.tools, chat_request, body, services, signatures, report_drops=False)
        prompt = services.pipeline.render(chat)
        return {"input_tokens": len(await services.pipeline.encode(prompt))}

    return r
