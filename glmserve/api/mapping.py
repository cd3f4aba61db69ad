"""From an API request to a :class:`ChatRequest`: the one place request fields are mapped.

Every endpoint (Chat Completions here, Anthropic Messages and OpenAI Responses on top of
the same helpers), ``glmserve render`` and the vLLM tool-parser plugin go through these
functions, so a tool list, a ``tool_choice`` or a thinking switch means the same thing
everywhere.  Nothing here needs an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import jsonschema
import jsonschema_rs

from glmserve.api.errors import APIError
from glmserve.api.media import MediaNotes
from glmserve.api.schemas import ChatCompletionRequest, ChatMessage, ToolCallParam
from glmserve.formats import freeform, grammar
from glmserve.formats.base import ChatRequest, Constraint, Tool, ToolChoice


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may declare (``Settings`` carries the server's).

    Tools and messages have no fixed count by default: what bounds them is the context (the
    rendered prompt must fit ``--max-model-len``) and the body size (``--max-body-bytes``).
    ``max_tools`` / ``max_messages`` are the operator's lower caps (``--max-tools``,
    ``--max-messages``)."""

    max_messages: int | None = None
    max_tools: int | None = None
    max_schema_bytes: int = 256 * 1024
    max_schema_depth: int = 64
    """Nesting (objects and arrays) allowed in a tool or response-format schema."""


DEFAULT_LIMITS = Limits()


def check_message_count(count: int, limits: Limits, param: str = "messages", what: str = "messages") -> None:
    """400 naming the cap and its flag when a request has more messages than ``--max-messages``."""
    if limits.max_messages is not None and count > limits.max_messages:
        raise APIError(400, f"{count} {what}, but this server allows at most {limits.max_messages} messages per "
                            "request (--max-messages)", param=param)


# --------------------------------------------------------------------------- schemas and tools


def schema_depth(obj: Any) -> int:
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


def check_schema_size(schema: Any, param: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """A schema nested or sized beyond the limits is refused before anyone compiles it."""
    depth = schema_depth(schema)
    if depth > limits.max_schema_depth:
        raise APIError(400, f"{param} is nested {depth} levels deep; at most {limits.max_schema_depth} are allowed",
                       param=param)
    if len(json.dumps(schema)) > limits.max_schema_bytes:
        raise APIError(400, f"{param} is larger than {limits.max_schema_bytes} bytes", param=param)


@grammar.cached(maxsize=4096)
def _schema_error(schema_json: str) -> str | None:
    """Why a schema (JSON text) is not a valid JSON schema, or None.  Cached: an agent sends the
    same tools on every turn, and checking 1,000 of them costs seconds.

    jsonschema-rs checks a schema against its draft's metaschema in microseconds, where
    jsonschema takes milliseconds (2020-12's dynamic references): a new tool set's 25 schemas
    cost ~50 ms before its first token.  Only a schema it refuses (or whose ``$schema`` it does
    not know) is checked again by jsonschema, whose verdict and message the 400 gives."""
    schema = json.loads(schema_json)
    try:
        if jsonschema_rs.meta.is_valid(schema):
            return None
    except jsonschema_rs.ReferencingError:  # a metaschema it does not hold: jsonschema decides
        pass
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return exc.message
    return None


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """400 naming ``param`` unless ``schema`` is a valid JSON schema."""
    error = _schema_error(json.dumps(schema, ensure_ascii=False))
    if error is not None:
        raise APIError(400, f"{param} is not a valid JSON schema: {error}", param=param)


def _tool(param: str, raw: dict[str, Any], limits: Limits) -> Tool:
    """A tool from its OpenAI dict; a custom tool's ``format`` is read and its grammar checked
    here (400s name ``<param>.format``).  Whether the family can carry the grammar is known when
    its constraint is built (``ChatPipeline.constraint``: the same 400)."""
    if raw.get("type") != "custom":
        return Tool.from_openai(raw)
    custom = raw.get("custom", raw)
    where = f"{param}.format"
    try:
        syntax, definition = freeform.read_format(custom.get("format"))
    except ValueError as exc:
        raise APIError(400, f"{where}: {exc}", param=where) from None
    if len(definition.encode()) > limits.max_schema_bytes:
        raise APIError(400, f"{where}: the grammar is larger than {limits.max_schema_bytes} bytes", param=where)
    try:
        freeform.check(syntax, definition)
    except freeform.GrammarError as exc:
        raise APIError(400, f"{where}: {exc}", param=where) from None
    return Tool.from_openai(raw)


def custom_call(call_id: str, name: str, input_text: str) -> dict[str, Any]:
    """A custom tool's call as a chat message holds it: a call with one argument, ``input``."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps({freeform.INPUT_KEY: input_text}, ensure_ascii=False)}}


def build_tools(defs: list[tuple[str, dict[str, Any]]], limits: Limits = DEFAULT_LIMITS,
                count_param: str = "tools") -> list[Tool]:
    """Validated tools from ``(param path, OpenAI tool dict)`` pairs.

    The path names the function object (``tools[0].function``, ``functions[0]``); a bad
    schema is a 400 for ``<path>.parameters``, a repeated name one for ``<path>.name``.
    """
    if limits.max_tools is not None and len(defs) > limits.max_tools:
        raise APIError(400, f"{len(defs)} tools, but this server allows at most {limits.max_tools} tools per request "
                            "(--max-tools)", param=count_param)
    tools = [(param, replace(_tool(param, raw, limits), param=param)) for param, raw in defs]
    for param, tool in tools:  # sizes first: nothing oversized reaches the schema checker
        if tool.parameters is not None and tool.freeform is None:
            check_schema_size(tool.parameters, f"{param}.parameters", limits)
    seen: set[str] = set()
    for param, tool in tools:
        if tool.name in seen:
            raise APIError(400, f"{param}.name: duplicate tool name {tool.name!r}", param=f"{param}.name")
        seen.add(tool.name)
        if tool.parameters is not None:
            check_json_schema(tool.parameters, f"{param}.parameters")
            if tool.parameters.get("type", "object") != "object":
                raise APIError(400, f"{param}.parameters must describe an object", param=f"{param}.parameters")
    return [t for _, t in tools]


def _named(choice: Any) -> str | None:
    """The tool name in a named choice, in any of the shapes clients send: Chat Completions
    ``{"type": "function", "function": {"name"}}`` / ``{"type": "custom", "custom": {"name"}}``,
    Responses / legacy ``{"name"}``, or the request models' objects of the same shape."""
    if isinstance(choice, dict):
        fn = choice.get("function", choice.get("custom"))
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
    else:
        fn = getattr(choice, "function", None) or getattr(choice, "custom", None)
        name = getattr(fn, "name", None) if fn is not None else getattr(choice, "name", None)
    return name if isinstance(name, str) else None


def normalise_tool_choice(choice: Any, tools: list[Tool], param: str = "tool_choice") -> ToolChoice:
    """``none`` / ``auto`` / ``required`` / the one tool's name: the only place a tool choice
    is validated.  ``None`` means the default (``auto`` with tools, else ``none``)."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, f"{param}: unknown value {choice!r} (none, auto, required or a named tool)",
                           param=param)
        if choice in ("auto", "required") and not tools:
            raise APIError(400, f"{param}={choice!r} needs tools", param=param)
        return choice
    name = _named(choice)
    if name is None:
        raise APIError(400, f"{param}: a named choice needs the tool's name", param=param)
    if name not in {t.name for t in tools}:
        raise APIError(400, f"{param} names {name!r}, which is not among the declared tools", param=param)
    return name


# --------------------------------------------------------------------------- switches and formats


def flag(value: Any) -> bool:
    """Template switches as clients send them: true/false, or strings like "false"."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def thinking_flags(template_kwargs: dict[str, Any] | None = None,
                   reasoning_effort: str | None = None) -> tuple[bool, bool | None]:
    """``(enable_thinking, clear_thinking)`` from ``chat_template_kwargs`` and ``reasoning_effort``.

    Either switch turns thinking off (an effort of ``none`` / ``off`` / ``disabled``);
    ``clear_thinking`` is None when not sent, meaning the family's default."""
    kw = template_kwargs or {}
    enable = flag(kw.get("enable_thinking", kw.get("thinking", True)))
    if reasoning_effort is not None and reasoning_effort.lower() in ("none", "off", "disabled"):
        enable = False
    clear = kw.get("clear_thinking")
    return enable, None if clear is None else flag(clear)


def reasoning_effort_of(effort: Any, template_kwargs: dict[str, Any] | None = None) -> str | None:
    """The reasoning effort as sent (top level, else ``chat_template_kwargs``); GLM-5.3
    writes it into the prompt."""
    if effort is None:
        effort = (template_kwargs or {}).get("reasoning_effort")
    return effort if isinstance(effort, str) else None


def response_format_constraint(schema_or_type: str | dict[str, Any] | None, param: str,
                               limits: Limits = DEFAULT_LIMITS) -> Constraint | None:
    """The output constraint for ``text`` / ``json_object`` / a JSON schema; a schema that is
    invalid or that xgrammar cannot compile is a 400 naming ``param``."""
    if schema_or_type is None or schema_or_type == "text":
        return None
    if schema_or_type == "json_object":
        return Constraint(json={"type": "object"})
    if not isinstance(schema_or_type, dict):
        raise APIError(400, f"{param}: unknown response format {schema_or_type!r}", param=param)
    schema = schema_or_type
    check_schema_size(schema, param, limits)
    check_json_schema(schema, param)
    try:
        import xgrammar

        xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (ValueError, RuntimeError) as exc:
        raise APIError(400, f"{param} cannot be used for decoding: {exc}", param=param) from None
    return Constraint(json=schema)


# --------------------------------------------------------------------------- messages


def reference_name(part: dict[str, Any]) -> str | None:
    """The tool a ``tool_reference`` part names: ``tool_name`` (Claude Code's Messages
    blocks) or ``name`` (the GLM-5.1 template's chat-message form); None when neither is a
    non-empty string."""
    name = part.get("tool_name", part.get("name"))
    return name if isinstance(name, str) and name else None


def tool_result_fields(parts: list[tuple[str, str]], joiner: str) -> dict[str, Any]:
    """A tool result's message fields from its ``("text" | "tool_reference", text or name)``
    parts: ``content`` (the text parts joined), and where there are references
    ``tool_references`` and ``content_parts`` (see :class:`~glmserve.formats.base.ChatRequest`)."""
    out: dict[str, Any] = {"content": joiner.join(v for k, v in parts if k == "text")}
    refs = [v for k, v in parts if k == "tool_reference"]
    if refs:
        out["tool_references"] = refs
        out["content_parts"] = [{"type": "text", "text": v} if k == "text" else {"type": "tool_reference", "name": v}
                                for k, v in parts]
    return out


def _content_parts(msg: ChatMessage, i: int, media: MediaNotes) -> list[tuple[str, str]] | None:
    """A message's content as ``("text" | "tool_reference", text or name)`` parts (None for
    no content); media parts are text notes (:mod:`glmserve.api.media`); a part this server
    cannot show is a 400 naming the message's content."""
    content = msg.content
    if content is None:
        return None
    if isinstance(content, str):
        return [("text", content)]
    out: list[tuple[str, str]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            out.append(("text", part["text"]))
        elif kind == "tool_reference" and msg.role == "tool":
            name = reference_name(part)
            if name is None:
                raise APIError(400, f"messages[{i}].content[{j}]: a tool_reference part needs the tool's name "
                                    "(tool_name or name)", param=f"messages[{i}].content")
            out.append(("tool_reference", name))
        elif kind == "tool_reference":
            raise APIError(400, f"messages[{i}].content[{j}]: tool_reference parts belong in tool messages",
                           param=f"messages[{i}].content")
        elif (note := media.openai_part(part, f"messages[{i}].content[{j}]")) is not None:
            out.append(("text", note))
        else:
            raise APIError(400, f"messages[{i}].content[{j}]: unsupported content part {kind!r}", param=f"messages[{i}].content")
    return out


def normalise_messages(messages: list[ChatMessage], joiner: str = "\n",
                       media: MediaNotes | None = None) -> list[dict[str, Any]]:
    """OpenAI messages as formats read them: text content (parts joined by the family's
    ``joiner``; media parts as notes, :mod:`glmserve.api.media`), ``developer`` as ``system``,
    an assistant's ``reasoning`` (vLLM's name) or ``reasoning_content`` as ``reasoning_content``,
    legacy ``function`` results as ``tool``, legacy ``function_call`` as a tool call,
    ``tool_reference`` parts of tool results as ``tool_references`` / ``content_parts`` (text
    before and after them kept)."""
    media = MediaNotes() if media is None else media
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.role
        parts = _content_parts(m, i, media)
        fields = tool_result_fields(parts, joiner) if parts is not None else {"content": None}
        content = fields["content"] if isinstance(m.content, list) or m.content is None else m.content
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
                    custom_call(c.id, c.custom.name, c.custom.input) if c.custom is not None and c.type == "custom" else
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for c in calls
                ]
            reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
            if reasoning is not None:
                d["reasoning_content"] = reasoning
        if role == "tool":
            if content is None:
                raise APIError(400, f"messages[{i}].content: a tool message needs content", param=f"messages[{i}].content")
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            if "tool_references" in fields:
                d["tool_references"] = fields["tool_references"]
                d["content_parts"] = fields["content_parts"]
        out.append(d)
    return out


# --------------------------------------------------------------------------- Chat Completions


def is_legacy_functions(req: ChatCompletionRequest) -> bool:
    """Whether the request uses the legacy ``functions`` / ``function_call`` fields (the answer
    then carries ``function_call`` too)."""
    return bool(req.functions) or (req.function_call is not None and req.tool_choice is None)


def chat_request_from_openai(req: ChatCompletionRequest, limits: Limits = DEFAULT_LIMITS,
                             content_joiner: str = "\n", media: MediaNotes | None = None) -> ChatRequest:
    """A Chat Completions request as a format sees it, validated (400s name the field).
    ``content_joiner`` is the family's ``ChatFormat.content_joiner``; ``media`` collects the
    media parts replaced by notes (default: notes, uncounted)."""
    check_message_count(len(req.messages), limits)
    if req.tools:
        defs = [(f"tools[{i}].{t.type if t.type == 'custom' else 'function'}", t.model_dump(exclude_none=True, by_alias=True))
                for i, t in enumerate(req.tools)]
    elif req.functions:
        defs = [(f"functions[{i}]", {"type": "function", "function": f.model_dump(exclude_none=True)})
                for i, f in enumerate(req.functions)]
    else:
        defs = []
    tools = build_tools(defs, limits)
    legacy = is_legacy_functions(req)
    choice = normalise_tool_choice(req.function_call if legacy else req.tool_choice, tools,
                                   "function_call" if legacy else "tool_choice")
    effort = reasoning_effort_of(req.reasoning_effort, req.chat_template_kwargs)
    enable, clear = thinking_flags(req.chat_template_kwargs, effort)
    return ChatRequest(
        messages=normalise_messages(req.messages, content_joiner, media),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        enable_thinking=enable,
        clear_thinking=clear,
        reasoning_effort=effort,
    )


def openai_output_constraint(req: ChatCompletionRequest, limits: Limits = DEFAULT_LIMITS) -> Constraint | None:
    """The ``response_format`` of a Chat Completions request as a constraint."""
    rf = req.response_format
    if rf is None or rf.type != "json_schema":
        return response_format_constraint(None if rf is None else rf.type, "response_format", limits)
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required", param="response_format.json_schema")
    return response_format_constraint(rf.json_schema.schema_, "response_format.json_schema.schema", limits)
