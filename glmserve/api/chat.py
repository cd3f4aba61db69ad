"""``/v1/chat/completions``: maps an OpenAI request onto a format and the engine.

The same parser events drive the streamed chunks and the non-streamed message, so
the two cannot disagree.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from referencing.exceptions import Unresolvable

from glmserve.api.errors import APIError
from glmserve.api.schemas import ChatCompletionRequest, ChatMessage, ToolCallParam
from glmserve.engine.base import Engine, GenerateParams
from glmserve.formats.base import (
    ChatFormat,
    ChatRequest,
    Constraint,
    Event,
    Prompt,
    ReasoningEvent,
    StreamParser,
    TextEvent,
    Tool,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from glmserve.formats.grammar import UncompilableSchema
from glmserve.formats.message import MessageBuilder
from glmserve.metrics import Metrics

log = logging.getLogger("glmserve.chat")

ArgumentHook = Callable[[str, str], str]
"""``hook(tool_name, arguments_json) -> arguments_json``: sees each finished call."""


# --------------------------------------------------------------------------- request mapping


_MEDIA_PARTS = ("image", "image_url", "input_image", "video", "video_url", "audio", "audio_url", "input_audio", "file")


def _flatten_content(msg: ChatMessage, i: int, joiner: str = "\n") -> str | None:
    content = msg.content
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in _MEDIA_PARTS:
            raise APIError(400, f"messages[{i}].content[{j}]: a {kind!r} part, but this model accepts text only",
                           param=f"messages[{i}].content")
        elif kind == "tool_reference" and msg.role == "tool" and isinstance(part.get("name", part.get("tool_name")), str):
            continue  # see _tool_references
        else:
            raise APIError(400, f"messages[{i}].content[{j}]: unsupported content part {kind!r}", param=f"messages[{i}].content")
    return joiner.join(texts)


def _tool_references(msg: ChatMessage) -> list[str] | None:
    """The tool names of a tool result made of ``tool_reference`` parts (GLM-5.1+), or None."""
    if not isinstance(msg.content, list) or not msg.content or msg.content[0].get("type") != "tool_reference":
        return None
    return [p.get("name", p.get("tool_name")) for p in msg.content if p.get("type") == "tool_reference"]


def _normalise_messages(req: ChatCompletionRequest, joiner: str = "\n") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        role = m.role
        content = _flatten_content(m, i, joiner)
        d: dict[str, Any] = {"role": role, "content": content}
        if role == "developer":
            d["role"] = "system"
        elif role == "function":  # legacy function result
            d["role"] = "tool"
            d["name"] = m.name
        if role in ("system", "developer", "user") and content is None:
            raise APIError(400, f"messages[{i}].content: a {role} message needs content", param=f"messages[{i}].content")
        if role == "assistant":
            calls = list(m.tool_calls or [])
            if m.function_call is not None:
                calls.append(ToolCallParam(id="", function=m.function_call))
            if calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for c in calls
                ]
            if m.reasoning_content is not None:
                d["reasoning_content"] = m.reasoning_content
        if role == "tool":
            if content is None:
                raise APIError(400, f"messages[{i}].content: a tool message needs content", param=f"messages[{i}].content")
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            refs = _tool_references(m)  # glm5: tool_reference results
            if refs is not None:
                d["tool_references"] = refs
        out.append(d)
    return out


def _tools(req: ChatCompletionRequest) -> list[Tool]:
    tools: list[Tool] = []
    seen: set[str] = set()
    if req.tools:
        defs = [(f"tools[{i}].function", t.model_dump(exclude_none=True, by_alias=True)) for i, t in enumerate(req.tools)]
    elif req.functions:
        defs = [(f"functions[{i}]", {"type": "function", "function": f.model_dump(exclude_none=True)}) for i, f in enumerate(req.functions)]
    else:
        defs = []
    for param, raw in defs:
        tool = Tool.from_openai(raw)
        if tool.name in seen:
            raise APIError(400, f"{param}.name: duplicate tool name {tool.name!r}", param=f"{param}.name")
        seen.add(tool.name)
        if tool.parameters is not None:
            try:
                jsonschema.validators.validator_for(tool.parameters).check_schema(tool.parameters)
            except jsonschema.SchemaError as exc:
                raise APIError(400, f"{param}.parameters is not a valid JSON schema: {exc.message}",
                               param=f"{param}.parameters") from None
            if tool.parameters.get("type", "object") != "object":
                raise APIError(400, f"{param}.parameters must describe an object", param=f"{param}.parameters")
        tools.append(tool)
    return tools


def _tool_choice(req: ChatCompletionRequest, tools: list[Tool]) -> str:
    legacy = bool(req.functions) or (req.function_call is not None and req.tool_choice is None)
    choice: Any = req.function_call if legacy else req.tool_choice
    param = "function_call" if legacy else "tool_choice"
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice in ("auto", "required") and not tools:
            raise APIError(400, f"{param}={choice!r} needs tools", param=param)
        return choice
    name = choice.function.name if hasattr(choice, "function") else choice.name
    if name not in {t.name for t in tools}:
        raise APIError(400, f"{param} names {name!r}, which is not among the declared tools", param=param)
    return name


def _thinking(req: ChatCompletionRequest) -> tuple[bool, bool | None]:
    kw = req.chat_template_kwargs or {}
    enable = _flag(kw.get("enable_thinking", kw.get("thinking", True)))
    # either switch turns thinking off; GLM-5.3 writes the effort itself (see to_chat_request)
    effort = _reasoning_effort(req)
    if effort is not None and effort.lower() in ("none", "off", "disabled"):
        enable = False
    clear = kw.get("clear_thinking")  # glm5: None = the family's default
    return enable, None if clear is None else _flag(clear)


def _reasoning_effort(req: ChatCompletionRequest) -> str | None:
    """``reasoning_effort`` as sent (top level, else ``chat_template_kwargs``)."""
    effort = req.reasoning_effort
    if effort is None:
        effort = (req.chat_template_kwargs or {}).get("reasoning_effort")
    return effort if isinstance(effort, str) else None


def _flag(value: Any) -> bool:
    """Template switches as clients send them: true/false, or strings like "false"."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def _response_format_constraint(req: ChatCompletionRequest) -> Constraint | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint(json={"type": "object"})
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required", param="response_format.json_schema")
    schema = rf.json_schema.schema_
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"response_format.json_schema.schema is not a valid JSON schema: {exc.message}",
                       param="response_format.json_schema.schema") from None
    try:
        import xgrammar

        xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (ValueError, RuntimeError) as exc:
        raise APIError(400, f"response_format.json_schema.schema cannot be used for decoding: {exc}",
                       param="response_format.json_schema.schema") from None
    return Constraint(json=schema)


@dataclass
class PreparedChat:
    request_id: str
    model: str
    created: int
    chat: ChatRequest
    prompt_ids: list[int]
    params: GenerateParams
    stream: bool
    include_usage: bool
    legacy_functions: bool
    logprobs: bool
    validators: dict[str, Any] = field(default_factory=dict)
    completion_tokens: int = 0
    """Filled in as a stream runs, for the request log."""
    tool_names: list[str] = field(default_factory=list)


class ChatService:
    def __init__(self, engine: Engine, fmt: ChatFormat, metrics: Metrics, argument_hook: ArgumentHook | None = None) -> None:
        self.engine = engine
        self.fmt = fmt
        self.metrics = metrics
        self.argument_hook = argument_hook
        self._stop_ids: list[int] = []
        self._stop_strs: list[str] = []
        for s in fmt.stop:
            tid = engine.token_id(s)
            if tid is not None:
                self._stop_ids.append(tid)
            else:
                self._stop_strs.append(s)

    def to_chat_request(self, req: ChatCompletionRequest) -> ChatRequest:
        tools = _tools(req)
        enable, clear = _thinking(req)
        return ChatRequest(
            messages=_normalise_messages(req, self.fmt.content_joiner),
            tools=tools,
            tool_choice=_tool_choice(req, tools),
            parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            enable_thinking=enable,
            clear_thinking=clear,
            reasoning_effort=_reasoning_effort(req),  # glm5
        )

    def render(self, chat: ChatRequest) -> Prompt:
        """The format's prompt; a history the format cannot write (an XML family's tool call
        whose arguments are not a JSON object...) is the client's error."""
        try:
            return self.fmt.render(chat)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None

    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        chat = self.to_chat_request(req)
        prompt = self.render(chat)
        prompt_ids = self.engine.encode_parts(prompt.parts)
        room = self.engine.max_model_len - len(prompt_ids)
        if room <= 0:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens, which does not fit this model's context of "
                f"{self.engine.max_model_len} tokens",
                param="messages", code="context_length_exceeded",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(
                400,
                f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds this model's context of "
                f"{self.engine.max_model_len} tokens (at most {room} can be generated)",
                param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                code="context_length_exceeded",
            )
        t0 = time.perf_counter()
        try:
            constraint = self.fmt.constraint(chat) if chat.tools and chat.tool_choice != "none" else None
        except UncompilableSchema as exc:  # a strict tool whose schema xgrammar cannot enforce
            param = exc.param if req.tools else f"functions[{exc.index}].parameters"
            raise APIError(400, f"{param}: {exc.reason}", param=param) from None
        except (ValueError, RuntimeError) as exc:  # xgrammar refuses a schema it cannot compile
            raise APIError(400, f"tools: cannot build a decoding constraint for these schemas: {exc}",
                           param="tools") from None
        self.metrics.constraint_seconds.observe(time.perf_counter() - t0)
        if constraint is not None and constraint.relaxed:  # non-strict tools decoded as any JSON object
            self.metrics.schema_fallbacks.inc(len(constraint.relaxed))
        if constraint is None:
            constraint = _response_format_constraint(req)
        top = req.top_logprobs if req.top_logprobs is not None else 0
        params = GenerateParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=([] if req.ignore_eos else self._stop_strs) + req.stop_list(),
            # ignore_eos (benchmarks) must also run past the format's end-of-turn tokens
            stop_token_ids=[] if req.ignore_eos else list(self._stop_ids),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            n=req.n,
            logprobs=top if req.logprobs else None,
            ignore_eos=req.ignore_eos,
            skip_special_tokens=self.fmt.skip_special_tokens,
            constraint=constraint,
        )
        validators = {}
        for t in chat.tools:
            if t.parameters is not None:
                validators[t.name] = jsonschema.validators.validator_for(t.parameters)(t.parameters)
        return PreparedChat(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            model=self.engine.model_name,
            created=int(time.time()),
            chat=chat,
            prompt_ids=prompt_ids,
            params=params,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            legacy_functions=bool(req.functions) and not req.tools,
            logprobs=req.logprobs,
            validators=validators,
        )

    # ------------------------------------------------------------------- results

    def _check_call(self, p: PreparedChat, name: str, arguments: str) -> bool:
        """Backstop: the constraint should make every call valid; count those that are not."""
        try:
            args = json.loads(arguments)
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            v = p.validators.get(name)
            if v is not None:
                v.validate(args)
            return True
        except (ValueError, jsonschema.ValidationError, Unresolvable) as exc:  # a dangling $ref is the schema's fault, not a crash
            self.metrics.tool_call_failures.inc()
            log.warning("request %s: call to %s has invalid arguments: %s", p.request_id, name, exc)
            return False

    @staticmethod
    def _finish_reason(engine_reason: str | None, parser: StreamParser, builder: MessageBuilder, legacy: bool) -> str:
        if engine_reason == "length" or parser.incomplete_call:
            return "length"
        if any(c.complete for c in builder.calls):
            return "function_call" if legacy else "tool_calls"
        return "stop"

    def _apply_hook(self, name: str, arguments: str) -> str:
        if self.argument_hook is None:
            return arguments
        return self.argument_hook(name, arguments)

    async def complete(self, p: PreparedChat) -> dict[str, Any]:
        parsers = [self.fmt.parser(p.chat) for _ in range(p.params.n)]
        builders = [MessageBuilder() for _ in range(p.params.n)]
        reasons: list[str | None] = [None] * p.params.n
        logprobs: list[list[Any]] = [[] for _ in range(p.params.n)]
        raws = [""] * p.params.n if log.isEnabledFor(logging.DEBUG) else []
        completion_tokens = 0
        t0 = time.perf_counter()
        first = True
        async for d in self.engine.generate(p.prompt_ids, p.params, p.request_id):
            if first and d.num_tokens:
                self.metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            completion_tokens += d.num_tokens
            if raws:
                raws[d.index] += d.text
            builders[d.index].add(parsers[d.index].feed(d.text))
            if d.logprobs:
                logprobs[d.index].extend(d.logprobs)
            if d.finish_reason is not None:
                builders[d.index].add(parsers[d.index].finish())
                reasons[d.index] = d.finish_reason
        if log.isEnabledFor(logging.DEBUG):
            for i, raw in enumerate(raws):
                log.debug("request %s choice %d raw output: %r", p.request_id, i, raw)
        choices = []
        for i, (parser, builder) in enumerate(zip(parsers, builders)):
            reason = self._finish_reason(reasons[i], parser, builder, p.legacy_functions)
            builder.calls = [c for c in builder.calls if c.complete]  # a cut-off call is not a call
            for c in builder.calls:
                c.arguments = self._apply_hook(c.name, c.arguments)
                self._check_call(p, c.name, c.arguments)
                self.metrics.tool_calls.labels(c.name).inc()
            message = builder.message()
            if p.legacy_functions and builder.calls:
                call = message.pop("tool_calls")[0]
                message["function_call"] = call["function"]
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": reason, "logprobs": None}
            if p.logprobs:
                choice["logprobs"] = {"content": [_lp(x) for x in logprobs[i]], "refusal": None}
            choices.append(choice)
        self._count(p, completion_tokens, t0)
        return {
            "id": p.request_id,
            "object": "chat.completion",
            "created": p.created,
            "model": p.model,
            "choices": choices,
            "usage": _usage(len(p.prompt_ids), completion_tokens),
            "system_fingerprint": None,
        }

    def _count(self, p: PreparedChat, completion_tokens: int, t0: float) -> None:
        self.metrics.prompt_tokens.inc(len(p.prompt_ids))
        self.metrics.completion_tokens.inc(completion_tokens)
        self.metrics.e2e.observe(time.perf_counter() - t0)

    async def stream(self, p: PreparedChat) -> AsyncIterator[str]:
        """SSE lines.  Aborts the engine request if the client goes away."""
        n = p.params.n
        parsers = [self.fmt.parser(p.chat) for _ in range(n)]
        builders = [MessageBuilder() for _ in range(n)]
        started = [False] * n
        completion_tokens = 0
        finished = 0
        t0 = time.perf_counter()
        first = True
        usage_null = {"usage": None} if p.include_usage else {}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
            body = {
                "id": p.request_id,
                "object": "chat.completion.chunk",
                "created": p.created,
                "model": p.model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                **usage_null,
            }
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

        try:
            for i in range(n):
                started[i] = True
                yield chunk(i, {"role": "assistant", "content": ""})
            async for d in self.engine.generate(p.prompt_ids, p.params, p.request_id):
                if first and d.num_tokens:
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                    first = False
                completion_tokens += d.num_tokens
                p.completion_tokens = completion_tokens
                events = parsers[d.index].feed(d.text)
                if d.finish_reason is not None:
                    events += parsers[d.index].finish()
                builders[d.index].add(events)
                lp = None
                if p.logprobs and d.logprobs:
                    lp = {"content": [_lp(x) for x in d.logprobs], "refusal": None}
                for delta in self._deltas(p, builders[d.index], events):
                    yield chunk(d.index, delta, logprobs=lp)
                    lp = None
                if lp is not None:
                    yield chunk(d.index, {}, logprobs=lp)
                if d.finish_reason is not None:
                    finished += 1
                    reason = self._finish_reason(d.finish_reason, parsers[d.index], builders[d.index], p.legacy_functions)
                    for c in builders[d.index].calls:
                        if c.complete:
                            self._check_call(p, c.name, c.arguments)
                            self.metrics.tool_calls.labels(c.name).inc()
                            p.tool_names.append(c.name)
                    yield chunk(d.index, {}, finish=reason)
            if p.include_usage:
                body = {
                    "id": p.request_id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
                    "system_fingerprint": None, "choices": [], "usage": _usage(len(p.prompt_ids), completion_tokens),
                }
                yield "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"
            yield "data: [DONE]\n\n"
            self._count(p, completion_tokens, t0)
        finally:
            if finished < n:
                await self.engine.abort(p.request_id)

    def _deltas(self, p: PreparedChat, builder: MessageBuilder, events: list[Event]) -> list[dict[str, Any]]:
        """Chunk deltas for a batch of events; adjacent text is merged into one delta.

        With an argument hook installed, arguments are sent whole at the end of each
        call, since the hook may rewrite them.
        """
        out: list[dict[str, Any]] = []
        hooked = self.argument_hook is not None
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
                if prev is not None and set(prev) == {"reasoning_content"}:
                    prev["reasoning_content"] += ev.text
                else:
                    out.append({"reasoning_content": ev.text})
            elif isinstance(ev, ToolCallStart):
                call = builder.calls[ev.index]
                if p.legacy_functions:
                    out.append({"function_call": {"name": call.name, "arguments": ""}})
                else:
                    out.append({"tool_calls": [{"index": ev.index, "id": call.id, "type": "function",
                                                "function": {"name": call.name, "arguments": ""}}]})
            elif isinstance(ev, ToolCallArgs):
                if hooked or not ev.delta:
                    continue
                if p.legacy_functions:
                    out.append({"function_call": {"arguments": ev.delta}})
                elif prev is not None and "tool_calls" in prev and prev["tool_calls"][0]["index"] == ev.index \
                        and "id" not in prev["tool_calls"][0]:
                    prev["tool_calls"][0]["function"]["arguments"] += ev.delta
                else:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.delta}}]})
            elif isinstance(ev, ToolCallEnd) and hooked:
                call = builder.calls[ev.index]
                call.arguments = self._apply_hook(call.name, call.arguments)
                out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": call.arguments}}]})
        return out


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _lp(x: Any) -> dict[str, Any]:
    b = list(x.token.encode("utf-8"))
    return {
        "token": x.token,
        "logprob": x.logprob,
        "bytes": b,
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in x.top],
    }

