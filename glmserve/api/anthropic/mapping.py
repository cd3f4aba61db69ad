"""Anthropic Messages request -> the pieces glmserve's pipeline takes.

Pure functions over :mod:`glmserve.api.anthropic.schemas` models: the conversation becomes
OpenAI-style message dicts (what every format renders), tools become OpenAI tool dicts
(validated by the shared ``build_tools``), and ``tool_choice`` / ``thinking`` /
``output_config`` become the ChatRequest switches.  Nothing here touches HTTP or the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from glmserve.api.anthropic.schemas import (
    Base64ImageSource,
    Base64PDFSource,
    ContentSource,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    MediaBlock,
    PlainTextSource,
    URLSource,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingDisabled,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
    MessagesBase,
)
from glmserve.api.anthropic.shape import ThinkingSigner
from glmserve.api.errors import APIError, validation_message
from glmserve.api.mapping import reference_name, tool_result_fields
from glmserve.api.media import Attachment, MediaNotes

log = logging.getLogger("glmserve.messages")


def system_text(system: str | list[TextBlock] | None) -> str | None:
    """The top-level ``system`` as one string (text blocks joined by newlines)."""
    if system is None:
        return None
    if isinstance(system, str):
        return system
    return "\n".join(b.text for b in system)


_MEDIA_BLOCK: TypeAdapter[ImageBlock | DocumentBlock] = TypeAdapter(MediaBlock)


def media_text(block: ImageBlock | DocumentBlock, param: str, media: MediaNotes) -> str:
    """What the model reads for an ``image`` or ``document`` block (``param`` names it), its
    source already validated as the Messages API defines it: a note for an image or a PDF
    (:mod:`glmserve.api.media`: media type from the block's enum, size, "URL" or "file id"), the
    text itself for a document given as text, or as content blocks (their images as notes)."""
    kind = block.type
    source = block.source
    if isinstance(source, (Base64ImageSource, Base64PDFSource)):
        return media.inline(kind, source.media_type, source.data, f"{param}.source.data", param)
    if isinstance(source, PlainTextSource):
        return source.data
    if isinstance(source, ContentSource):
        if isinstance(source.content, str):
            return source.content
        return "\n".join(b.text if isinstance(b, TextBlock) else media_text(b, f"{param}.source.content[{k}]", media)
                         for k, b in enumerate(source.content))
    return media.replace(Attachment(kind, None, None, "URL" if isinstance(source, URLSource) else "file id"), param)


def _media_dict(part: dict[str, Any], param: str, media: MediaNotes) -> str:
    """An ``image`` / ``document`` block inside a ``tool_result`` (plain JSON there), validated
    as a top-level one is: a 400 naming the field otherwise."""
    try:
        block = _MEDIA_BLOCK.validate_python(part)
    except ValidationError as exc:
        message, where = validation_message(exc, part, prefix=param)
        raise APIError(400, message, param=where) from None
    return media_text(block, param, media)


def _result_fields(block: ToolResultBlock, param: str, media: MediaNotes) -> dict[str, Any]:
    """A ``tool_result``'s message fields: text blocks joined by newlines (``image`` /
    ``document`` blocks as notes), and its ``tool_reference`` blocks (Claude Code's tool
    search: ``{"type": "tool_reference", "tool_name": …}``) as the shared ``tool_references``
    / ``content_parts``."""
    content = block.content
    if content is None:
        return {"content": ""}
    if isinstance(content, str):
        return {"content": content}
    parts: list[tuple[str, str]] = []
    for k, part in enumerate(content):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(("text", part["text"]))
        elif kind == "tool_reference":
            name = reference_name(part)
            if name is None:
                raise APIError(400, f"{param}.content[{k}]: a tool_reference block needs tool_name",
                               param=f"{param}.content")
            parts.append(("tool_reference", name))
        elif kind in ("image", "document"):
            parts.append(("text", _media_dict(part, f"{param}.content[{k}]", media)))
        else:
            raise APIError(400, f"{param}.content[{k}]: unsupported block type {kind!r} in a tool_result",
                           param=f"{param}.content")
    return tool_result_fields(parts, "\n")


DropReasoning = Callable[[str, str], None]
"""``on_drop(param, reason)``: the thinking block at ``param`` was not given to the model
(reason: ``invalid_signature``)."""


def to_openai_messages(system: str | list[TextBlock] | None, messages: list[InputMessage],
                       signer: ThinkingSigner | None = None, on_drop: DropReasoning | None = None,
                       media: MediaNotes | None = None) -> list[dict[str, Any]]:
    """The conversation as OpenAI message dicts (content flattened to strings; ``image`` and
    ``document`` blocks, also inside a ``tool_result``, as notes: :mod:`glmserve.api.media`).

    User turns: text blocks join into one user message; each ``tool_result`` becomes a
    ``tool`` message (named after the call it answers), in block order.  Assistant turns:
    text -> content, ``thinking`` -> ``reasoning_content`` (the family's reasoning history),
    ``tool_use`` -> ``tool_calls``; ``redacted_thinking`` carries nothing a GLM can read.
    A thinking block counts only if ``signer`` verifies its signature (this server, or one
    sharing its secret, wrote it); any other is left out and reported to ``on_drop``, and the
    request goes on (a restart with a new secret does not end an agent's session).  A block
    with empty thinking (``display: "omitted"`` sent back) has nothing to give and is skipped.
    ``system`` messages inside the array stay system turns where they are.
    """
    media = MediaNotes() if media is None else media
    out: list[dict[str, Any]] = []
    top = system_text(system)
    if top:
        out.append({"role": "system", "content": top})
    names: dict[str, str] = {}
    for i, m in enumerate(messages):
        param = f"messages[{i}].content"
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "assistant":
            texts: list[str] = []
            reasoning: list[str] = []
            calls: list[dict[str, Any]] = []
            for j, b in enumerate(blocks):
                if isinstance(b, TextBlock):
                    texts.append(b.text)
                elif isinstance(b, ThinkingBlock):
                    if not b.thinking:
                        continue
                    if signer is not None and signer.verify(b.thinking, b.signature):
                        reasoning.append(b.thinking)
                    elif on_drop is not None:
                        on_drop(f"{param}[{j}]", "invalid_signature")
                elif isinstance(b, RedactedThinkingBlock):
                    continue
                elif isinstance(b, ToolUseBlock):
                    names[b.id] = b.name
                    calls.append({"id": b.id, "type": "function",
                                  "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
                else:
                    raise APIError(400, f"{param}[{j}]: a {b.type} block cannot appear in an assistant message",
                                   param=param)
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        pending: list[str] = []

        def flush() -> None:
            if pending:
                out.append({"role": m.role, "content": "\n".join(pending)})
                pending.clear()

        for j, b in enumerate(blocks):
            if isinstance(b, TextBlock):
                pending.append(b.text)
            elif isinstance(b, (ImageBlock, DocumentBlock)):
                pending.append(media_text(b, f"{param}[{j}]", media))
            elif isinstance(b, ToolResultBlock) and m.role == "user":
                flush()
                tool: dict[str, Any] = {"role": "tool", "tool_call_id": b.tool_use_id,
                                        **_result_fields(b, f"{param}[{j}]", media)}
                if b.tool_use_id in names:
                    tool["name"] = names[b.tool_use_id]
                out.append(tool)
            else:
                raise APIError(400, f"{param}[{j}]: a {b.type} block cannot appear in a {m.role} message",
                               param=param)
        flush()
        if not blocks and m.role == "user":
            out.append({"role": "user", "content": ""})
    return out


@dataclass
class ToolSelection:
    """The tools a request declares, split into what this server can offer the model."""

    defs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """``(param path, OpenAI tool dict)`` for the callable custom tools."""
    unsupported: list[str] = field(default_factory=list)
    """Names of tools of Anthropic-run types (web_search, code_execution...): left out."""
    deferred: list[str] = field(default_factory=list)
    """Names of ``defer_loading`` tools: declared (with ``defer_loading`` in ``defs``) but
    listed nowhere up front, and callable only once a ``tool_reference`` names them; one
    that ``tool_choice`` names is an ordinary tool."""


def select_tools(tools: list[dict[str, Any]] | None, forced: str | None = None) -> ToolSelection:
    sel = ToolSelection()
    for i, t in enumerate(tools or []):
        name = t["name"]
        kind = t.get("type")
        if kind not in (None, "custom"):
            sel.unsupported.append(name)
            continue
        deferred = bool(t.get("defer_loading")) and name != forced
        if deferred:
            sel.deferred.append(name)
        fn: dict[str, Any] = {"name": name}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        fn["parameters"] = t["input_schema"]
        if t.get("strict") is not None:
            fn["strict"] = t["strict"]
        if deferred:
            fn["defer_loading"] = True
        sel.defs.append((f"tools[{i}]", {"type": "function", "function": fn}))
    return sel


def tool_choice(req: MessagesBase) -> tuple[Any, bool]:
    """``(OpenAI-style tool_choice, parallel_tool_calls)``: any -> required, tool -> named,
    none -> none, auto / absent -> auto; ``disable_parallel_tool_use`` -> one call at most."""
    tc = req.tool_choice
    if tc is None:
        return None, True
    parallel = not getattr(tc, "disable_parallel_tool_use", False)
    if isinstance(tc, ToolChoiceNone):
        return "none", True
    if isinstance(tc, ToolChoiceAny):
        return "required", parallel
    if isinstance(tc, ToolChoiceTool):
        return {"type": "function", "function": {"name": tc.name}}, parallel
    return "auto", parallel


@dataclass(frozen=True)
class ThinkingOptions:
    enable: bool | None
    """None: the family's default (thinking on for the reasoning families)."""
    budget: int | None = None
    omit: bool = False
    """``display: "omitted"``: thinking blocks carry a signature but no text."""


def thinking_options(req: MessagesBase) -> ThinkingOptions:
    t = req.thinking
    if t is None:
        return ThinkingOptions(enable=None)
    if isinstance(t, ThinkingDisabled):
        return ThinkingOptions(enable=False)
    omit = t.display == "omitted"
    if isinstance(t, ThinkingEnabled):
        return ThinkingOptions(enable=True, budget=t.budget_tokens, omit=omit)
    assert isinstance(t, ThinkingAdaptive)
    return ThinkingOptions(enable=True, omit=omit)


def effort(req: MessagesBase) -> str | None:
    return req.output_config.effort if req.output_config is not None else None


def output_format_schema(req: MessagesBase) -> dict[str, Any] | None:
    """``output_config.format`` (``{"type": "json_schema", "schema": {...}}``) -> the schema."""
    fmt = req.output_config.format if req.output_config is not None else None
    if not fmt:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}",
                       param="output_config.format")
    return fmt["schema"]
