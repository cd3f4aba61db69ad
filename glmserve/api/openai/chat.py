"""``/v1/chat/completions`` (and ``/tokenize``): the OpenAI Chat Completions shape on the
chat pipeline.

The request mapping is :mod:`glmserve.api.mapping`; generation and the per-choice fold are
:class:`~glmserve.api.pipeline.ChatPipeline`'s.  This module only writes its answers: the
``chat.completion`` object and the ``chat.completion.chunk`` events, both from the same
pipeline updates, so the streamed and the whole answer cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from starlette.responses import Response

from glmserve.api.errors import APIError, openai_stream_error
from glmserve.api import media
from glmserve.api.mapping import chat_request_from_openai, is_legacy_functions, openai_output_constraint
from glmserve.api.media import MediaNotes
from glmserve.api.pipeline import ChatPipeline, ChoiceUpdate, GenerationOptions, schema_work
from glmserve.api.runner import Prelude, PreparedHandle, Services, chunk_encoder, rendered, streams
from glmserve.api.schemas import ChatCompletionRequest
from glmserve.api.settings import ArgumentHook
from glmserve.formats.base import Event, ReasoningEvent, TextEvent, ToolCallArgs, ToolCallEnd, ToolCallStart
from glmserve.formats.freeform import InputDecoder, input_of
from glmserve.formats.message import MessageBuilder

__all__ = ["ArgumentHook", "ChatCompletions", "ChatHandle", "router", "usage", "logprob_json"]


def generation_options(req: ChatCompletionRequest, services: Services) -> GenerationOptions:
    """Sampling and length settings of a Chat Completions request."""
    return GenerationOptions(
        max_tokens=req.max_completion_tokens or req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop_list(),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        n=req.n,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        ignore_eos=req.ignore_eos,
        logit_bias=logit_bias(req, services),
        output_constraint=openai_output_constraint(req, services.settings.limits),
        schema_field="parameters",
        thinking_budget=thinking_budget(req),
    )


def logit_bias(req: ChatCompletionRequest, services: Services) -> dict[int, float] | None:
    """``logit_bias`` with int keys; a token id beyond the model's vocabulary is a 400."""
    if not req.logit_bias:
        return None
    bias = {int(k): float(v) for k, v in req.logit_bias.items()}
    vocab = getattr(services.engine, "vocab_size", None)
    bad = [t for t in bias if vocab is not None and t >= vocab]
    if bad:
        raise APIError(400, f"logit_bias: token id {bad[0]} is out of vocabulary (0 to {vocab - 1})",
                       param="logit_bias")
    return bias


def thinking_budget(req: ChatCompletionRequest) -> int | None:
    """``thinking_budget``, or ``chat_template_kwargs.thinking_budget`` (how vLLM users pass
    template switches); a positive integer."""
    if req.thinking_budget is not None:
        return req.thinking_budget
    value = (req.chat_template_kwargs or {}).get("thinking_budget")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, "chat_template_kwargs.thinking_budget must be a positive integer",
                       param="chat_template_kwargs.thinking_budget")
    return value


@dataclass
class ChatHandle(PreparedHandle):
    """A prepared Chat Completions request."""

    include_usage: bool
    legacy_functions: bool
    """Answer with ``function_call`` (the request used the legacy ``functions``)."""
    logprobs: bool
    custom: frozenset[str] = frozenset()
    """The custom tools' names: their calls are answered as ``{"type": "custom", "custom": {name, input}}``."""
    inputs: dict[tuple[int, int], InputDecoder] = field(default_factory=dict)
    """(choice, call) -> the streamed custom call's input so far."""


class ChatCompletions:
    """The Chat Completions endpoint (see :class:`glmserve.api.runner.Endpoint`)."""

    name = "chat"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.pipeline: ChatPipeline = services.pipeline

    async def prepare(self, body: ChatCompletionRequest, request: Request | None = None) -> ChatHandle:
        limits = self.services.settings.limits
        notes = MediaNotes(self.services.settings.image_input)
        # the tool and response-format schemas are checked (and compiled) off the event loop
        heavy = body.tools or body.functions or body.response_format is not None
        chat = await schema_work(heavy, chat_request_from_openai, body, limits, self.pipeline.fmt.content_joiner, notes)
        opts = await schema_work(heavy, generation_options, body, self.services)
        run = await self.pipeline.prepare(chat, opts, "chatcmpl-")
        run.model = self.services.check_model(body.model)  # the name asked for when served, as the other APIs answer
        media.remember(request, notes)
        return ChatHandle(run=run, stream=body.stream,
                          include_usage=bool(body.stream_options and body.stream_options.include_usage),
                          legacy_functions=is_legacy_functions(body), logprobs=body.logprobs,
                          media_fields=notes.report(run.request_id, self.services.metrics),
                          custom=frozenset(t.name for t in chat.tools if t.freeform is not None))

    def log_fields(self, h: ChatHandle) -> tuple[int, dict[str, Any]]:
        return h.log_fields()

    @staticmethod
    def _reason(h: ChatHandle, reason: str) -> str:
        return "function_call" if reason == "tool_calls" and h.legacy_functions else reason

    # ------------------------------------------------------------------- whole answer

    async def complete(self, h: ChatHandle) -> dict[str, Any]:
        p = h.run
        choices = []
        for r in await self.pipeline.complete(p):
            message = custom_calls(r.builder.message(), h.custom)
            if h.legacy_functions and r.builder.calls:
                call = message.pop("tool_calls")[0]
                message["function_call"] = call["function"]
            choice: dict[str, Any] = {"index": r.index, "message": message,
                                      "finish_reason": self._reason(h, r.finish_reason), "logprobs": None}
            if h.logprobs:
                choice["logprobs"] = {"content": [logprob_json(x) for x in r.logprobs], "refusal": None}
            choices.append(choice)
        return {"id": p.request_id, "object": "chat.completion", "created": p.created, "model": p.model,
                "choices": choices, "usage": usage(p.prompt_tokens, p.completion_tokens, p.cached_tokens),
                "system_fingerprint": None}

    # ------------------------------------------------------------------- streamed answer

    stream_error = staticmethod(openai_stream_error)

    async def stream(self, h: ChatHandle) -> AsyncIterator[str]:
        p = h.run
        encode = chunk_encoder({"id": p.request_id, "object": "chat.completion.chunk", "created": p.created,
                                "model": p.model, "system_fingerprint": None}, h.include_usage)

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
            return encode({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

        yield Prelude("".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(p.params.n)))
        first = True
        async with aclosing(self.pipeline.run(p)) as updates:
            async for u in updates:
                if first:  # the engine's first output: the role chunks go now, even if it shows nothing yet
                    yield ""
                    first = False
                lp = None
                if h.logprobs and u.logprobs:
                    lp = {"content": [logprob_json(x) for x in u.logprobs], "refusal": None}
                for delta in self._deltas(h, u):
                    yield chunk(u.index, delta, logprobs=lp)
                    lp = None
                if lp is not None:
                    yield chunk(u.index, {}, logprobs=lp)
                if u.finish_reason is not None:
                    yield chunk(u.index, {}, finish=self._reason(h, u.finish_reason))
        if h.include_usage:
            body = {"id": p.request_id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
                    "system_fingerprint": None, "choices": [],
                    "usage": usage(p.prompt_tokens, p.completion_tokens, p.cached_tokens)}
            yield "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"
        yield "data: [DONE]\n\n"

    def _deltas(self, h: ChatHandle, u: ChoiceUpdate) -> list[dict[str, Any]]:
        """Chunk deltas for one update's events; adjacent text is merged into one delta.

        With an argument hook installed, arguments are sent whole at the end of each
        call (the pipeline has applied the hook by then), since the hook may rewrite them.
        """
        out: list[dict[str, Any]] = []
        hooked = self.pipeline.argument_hook is not None
        builder: MessageBuilder = u.builder
        events: list[Event] = u.events
        for ev in events:
            prev = out[-1] if out else None
            if isinstance(ev, TextEvent):
                if not ev.text:
                    continue
                if prev is not None and set(prev) == {"content"}:
                    prev["content"] += ev.text
                else:
                    out.append({"content": ev.text})
            elif isinstance(ev, ReasoningEvent):
                if not ev.text:
                    continue
                if prev is not None and "reasoning" in prev:
                    prev["reasoning"] = prev["reasoning_content"] = prev["reasoning"] + ev.text
                else:  # both names, as the whole message has them (MessageBuilder.message)
                    out.append({"reasoning": ev.text, "reasoning_content": ev.text})
            elif isinstance(ev, ToolCallStart) and builder.calls[ev.index].name in h.custom:
                call = builder.calls[ev.index]
                h.inputs[(u.index, ev.index)] = InputDecoder()
                out.append({"tool_calls": [{"index": ev.index, "id": call.id, "type": "custom",
                                            "custom": {"name": call.name, "input": ""}}]})
            elif isinstance(ev, ToolCallArgs) and (u.index, ev.index) in h.inputs:
                text = "" if hooked else h.inputs[(u.index, ev.index)].feed(ev.delta)
                if not text:
                    continue
                if prev is not None and "tool_calls" in prev and prev["tool_calls"][0]["index"] == ev.index \
                        and "id" not in prev["tool_calls"][0]:
                    prev["tool_calls"][0]["custom"]["input"] += text
                else:
                    out.append({"tool_calls": [{"index": ev.index, "custom": {"input": text}}]})
            elif isinstance(ev, ToolCallEnd) and hooked and (u.index, ev.index) in h.inputs:
                call = builder.calls[ev.index]
                out.append({"tool_calls": [{"index": ev.index, "custom": {"input": input_of(call.arguments)}}]})
            elif isinstance(ev, ToolCallStart):
                call = builder.calls[ev.index]
                if h.legacy_functions:
                    out.append({"function_call": {"name": call.name, "arguments": ""}})
                else:
                    out.append({"tool_calls": [{"index": ev.index, "id": call.id, "type": "function",
                                                "function": {"name": call.name, "arguments": ""}}]})
            elif isinstance(ev, ToolCallArgs):
                if hooked or not ev.delta:
                    continue
                if h.legacy_functions:
                    out.append({"function_call": {"arguments": ev.delta}})
                elif prev is not None and "tool_calls" in prev and prev["tool_calls"][0]["index"] == ev.index \
                        and "id" not in prev["tool_calls"][0]:
                    prev["tool_calls"][0]["function"]["arguments"] += ev.delta
                else:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.delta}}]})
            elif isinstance(ev, ToolCallEnd) and hooked:
                call = builder.calls[ev.index]
                out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": call.arguments}}]})
        return out


def custom_calls(message: dict[str, Any], custom: frozenset[str]) -> dict[str, Any]:
    """``message`` with its calls of custom tools in their own shape: ``{"id", "type": "custom",
    "custom": {"name", "input"}}`` (a call cut short keeps the input as far as it got)."""
    calls = message.get("tool_calls")
    if calls and custom:
        message["tool_calls"] = [
            {"id": c["id"], "type": "custom",
             "custom": {"name": c["function"]["name"], "input": input_of(c["function"]["arguments"])}}
            if c["function"]["name"] in custom else c for c in calls]
    return message


def usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """``prompt_tokens_details.cached_tokens``: the prompt tokens the engine's prefix cache served."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached or 0}}


def logprob_json(x: Any) -> dict[str, Any]:
    """One token's logprobs in the Chat Completions shape."""
    b = list(x.token.encode("utf-8"))
    return {
        "token": x.token,
        "logprob": x.logprob,
        "bytes": b,
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in x.top],
    }


class TokenizeOut(BaseModel):
    """``POST /tokenize``'s answer (for the OpenAPI document)."""

    prompt: str
    tokens: list[int]
    count: int
    max_model_len: int


def router(services: Services) -> APIRouter:
    endpoint = ChatCompletions(services)
    r = APIRouter()

    @r.post("/v1/chat/completions", responses=streams(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return media.add_header(request, await services.serve(endpoint, body, request))

    @r.post("/v1/chat/completions/render")
    async def render(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        """vLLM's render API: the prompt's token ids, nothing generated (see
        :meth:`~glmserve.api.runner.Services.render`)."""
        return rendered(await services.render(endpoint, body, request), services.check_model(body.model))

    @r.post("/tokenize", response_model=None, responses={200: {"model": TokenizeOut}})
    async def tokenize(body: ChatCompletionRequest) -> dict[str, Any]:
        """The prompt and token ids a chat request becomes (a debugging aid, like ``glmserve render``)."""
        services.check_model(body.model)
        chat = await schema_work(body.tools or body.functions, chat_request_from_openai, body,
                                 services.settings.limits, services.pipeline.fmt.content_joiner,
                                 MediaNotes(services.settings.image_input))
        prompt = services.pipeline.render(chat)
        ids = await services.pipeline.encode(prompt)
        return {"prompt": prompt.text, "tokens": ids, "count": len(ids), "max_model_len": services.engine.max_model_len}

    return r
