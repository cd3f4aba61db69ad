"""Responses API request -> the chat conversation a format renders.

Pure functions (no engine, no HTTP): input items become OpenAI chat messages (the shape
``ChatRequest.messages`` holds), Responses tools become Chat Completions tool definitions,
and ``tool_choice`` / ``reasoning`` / ``text.format`` become their Chat Completions
counterparts, which the shared helpers of :mod:`glmserve.api.mapping` then validate exactly
as for ``/v1/chat/completions``.

* ``namespace`` tools (Codex CLI groups sub-agent tools in one) are flattened to
  ``<namespace>__<name>``, a name the model can write; :class:`ToolNames` maps a call back
  to the namespace and name the client declared.
* ``custom`` (freeform) tools, which the client runs (Codex's ``apply_patch``), are shown to the
  model as a function taking one string (:mod:`glmserve.formats.freeform`); their calls come
  back as ``custom_tool_call`` items, and ``custom_tool_call`` / ``custom_tool_call_output``
  input items are history like function calls and their outputs.
* Tools only OpenAI's cloud runs (``web_search``, ``file_search``, ``tool_search``, ...) are
  left out and reported, so a client that always declares them (Codex does) still works.
* A ``reasoning`` item becomes the next assistant turn's ``reasoning_content`` (the family's
  reasoning history) only when it is verified as this server's: an item of the history that
  ``previous_response_id`` reads from the server's own store (written by this server, under
  the request's API key), or an item whose ``encrypted_content`` opens under the server
  secret (:mod:`glmserve.api.responses.seal`; the sealed text is what the model gets,
  whatever plain text the item also carries).  Any other reasoning -- a seal that does not
  open (altered, forged, sealed under a secret this server no longer has), or plain
  ``reasoning_text`` content without a seal -- is left out and reported to ``on_drop``, as
  Anthropic thinking without a valid signature is; the request goes on (a restart with a new
  secret does not end a running agent session).  Nothing a client writes in a request ever
  reaches the model as its own reasoning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from glmserve.api.errors import APIError
from glmserve.api.mapping import custom_call, reference_name, tool_result_fields
from glmserve.api.media import MediaNotes
from glmserve.api.responses.seal import InvalidSeal, ReasoningSeal
from glmserve.api.responses.schemas import (
    CustomToolCallItem,
    CustomToolCallOutputItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    ItemReference,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)

NAMESPACE_SEP = "__"
CLIENT_TOOL_TYPES = ("function", "custom", "namespace")
_TEXT_PARTS = ("input_text", "output_text", "text")

_items_adapter: TypeAdapter[list[Any]] = TypeAdapter(list[InputItem])


# --------------------------------------------------------------------------- tools


@dataclass
class ToolNames:
    """Names the model calls <-> the (namespace, name) the client declared."""

    to_client: dict[str, tuple[str | None, str]] = field(default_factory=dict)

    @staticmethod
    def flat(name: str, namespace: str | None) -> str:
        return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name

    def client(self, flat: str) -> tuple[str | None, str]:
        return self.to_client.get(flat, (None, flat))


@dataclass
class ToolSet:
    defs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """(param path, Chat Completions tool dict) for each function the model may call."""
    names: ToolNames = field(default_factory=ToolNames)
    left_out: list[str] = field(default_factory=list)
    """Types of the declared tools glmserve cannot run (hosted by OpenAI), for the log."""


def _function_def(param: str, tool: dict[str, Any], namespace: str | None, ns_description: str | None) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"{param}.name: a function tool needs a name", param=f"{param}.name")
    params = tool.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise APIError(400, f"{param}.parameters must be a JSON schema object", param=f"{param}.parameters")
    fn: dict[str, Any] = {"name": ToolNames.flat(name, namespace)}
    description = tool.get("description") or ns_description
    if description is not None:
        fn["description"] = description
    if params is not None:
        fn["parameters"] = params
    if tool.get("strict") is not None:
        fn["strict"] = bool(tool["strict"])
    if tool.get("defer_loading"):  # callable once a tool_reference output names it
        fn["defer_loading"] = True
    return {"type": "function", "function": fn}


def _custom_def(param: str, tool: dict[str, Any], namespace: str | None) -> dict[str, Any]:
    """A custom tool as Chat Completions declares one (its ``format`` is read by ``build_tools``)."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"{param}.name: a custom tool needs a name", param=f"{param}.name")
    custom = {k: tool[k] for k in ("description", "format", "defer_loading") if tool.get(k) is not None}
    return {"type": "custom", "custom": {"name": ToolNames.flat(name, namespace), **custom}}


def collect_tools(tools: Sequence[dict[str, Any]] | None) -> ToolSet:
    """Function and custom tools (namespaces flattened) as Chat Completions definitions."""
    out = ToolSet()
    for i, tool in enumerate(tools or []):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise APIError(400, f"{param} must be an object", param=param)
        kind = tool.get("type")
        if kind == "function":
            out.defs.append((param, _function_def(param, tool, None, None)))
        elif kind == "custom":
            out.defs.append((param, _custom_def(param, tool, None)))
        elif kind == "namespace":
            ns = tool.get("name")
            if not isinstance(ns, str) or not ns:
                raise APIError(400, f"{param}.name: a namespace needs a name", param=f"{param}.name")
            members = tool.get("tools")
            if not isinstance(members, list):
                raise APIError(400, f"{param}.tools must be a list of functions", param=f"{param}.tools")
            for j, member in enumerate(members):
                mparam = f"{param}.tools[{j}]"
                kind = member.get("type", "function") if isinstance(member, dict) else "?"
                if kind not in ("function", "custom"):
                    out.left_out.append(f"{ns}.{kind}")
                    continue
                d = _function_def(mparam, member, ns, None) if kind == "function" else _custom_def(mparam, member, ns)
                out.names.to_client[def_name(d)] = (ns, member["name"])
                out.defs.append((mparam, d))
        elif isinstance(kind, str):
            out.left_out.append(kind)
        else:
            raise APIError(400, f"{param}.type is required", param=f"{param}.type")
    return out


def def_name(d: dict[str, Any]) -> str:
    """The (flat) name of a Chat Completions tool definition, function or custom."""
    return d["custom" if d.get("type") == "custom" else "function"]["name"]


def tool_choice(choice: str | dict[str, Any] | None, tools: ToolSet) -> tuple[str | dict[str, str] | None, ToolSet]:
    """``tool_choice`` in the shape :func:`glmserve.api.mapping.normalise_tool_choice` takes
    (``none`` / ``auto`` / ``required`` / ``{"name": flat name}``), and the tools the model is
    shown (``allowed_tools`` narrows them)."""
    if choice is None:
        return ("auto" if tools.defs else "none"), tools
    if isinstance(choice, str):
        if choice == "auto" and not tools.defs:  # e.g. only hosted tools were declared
            return "none", tools
        return choice, tools
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        if not isinstance(name, str):
            raise APIError(400, f"tool_choice.name is required for a {kind} tool", param="tool_choice.name")
        return {"name": ToolNames.flat(name, choice.get("namespace"))}, tools
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        allowed = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise APIError(400, "tool_choice: allowed_tools needs mode auto/required and a list of tools",
                           param="tool_choice")
        wanted = {ToolNames.flat(t.get("name", ""), t.get("namespace")) for t in allowed
                  if isinstance(t, dict) and t.get("type") in ("function", "custom")}
        narrowed = ToolSet([d for d in tools.defs if def_name(d[1]) in wanted], tools.names, tools.left_out)
        if mode == "required" and not narrowed.defs:
            raise APIError(400, "tool_choice: none of the allowed_tools is a declared function or custom tool",
                           param="tool_choice")
        return (mode if narrowed.defs else "none"), narrowed
    raise APIError(400, f"tool_choice: {kind!r} tools are run by OpenAI's cloud, not by this server; "
                        "choose none, auto, required or a function", param="tool_choice")


# --------------------------------------------------------------------------- input items


def parse_items(items: list[dict[str, Any]]) -> list[Any]:
    """Stored items (dicts) as the same models a request's ``input`` validates to."""
    try:
        return _items_adapter.validate_python(items)
    except ValidationError as exc:  # the store only holds items this server validated or wrote
        raise APIError(400, f"previous_response_id: the stored conversation is unreadable: {exc.errors()[0]['msg']}",
                       param="previous_response_id") from None


def _one_text(part: dict[str, Any], where: str, media: MediaNotes) -> str:
    """The text of one text (or refusal) part, or a media part's note (:mod:`glmserve.api.media`);
    any other part is a 400 naming ``where``."""
    kind = part.get("type")
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return part["refusal"]
    note = media.responses_part(part, where)
    if note is not None:
        return note
    raise APIError(400, f"{where}: unsupported content part {kind!r}", param=where)


def _text_parts(parts: str | list[dict[str, Any]], param: str, media: MediaNotes) -> str:
    if isinstance(parts, str):
        return parts
    return "\n".join(_one_text(part, f"{param}[{j}]", media) for j, part in enumerate(parts))


def _output_fields(output: str | list[dict[str, Any]], param: str, media: MediaNotes) -> dict[str, Any]:
    """A ``function_call_output``'s message fields.  Neither Codex nor the Agents SDK sends a
    tool reference here (the Responses API's own tool search is the hosted ``tool_search`` /
    ``tool_search_output`` items, which this server does not run); a ``{"type":
    "tool_reference", "tool_name" | "name"}`` part is accepted as in Chat Completions tool
    messages, so a client of its own can load a deferred (``defer_loading``) function."""
    if isinstance(output, str) or not any(isinstance(q, dict) and q.get("type") == "tool_reference" for q in output):
        return {"content": _text_parts(output, param, media)}
    parts: list[tuple[str, str]] = []
    for j, part in enumerate(output):
        if part.get("type") == "tool_reference":
            name = reference_name(part)
            if name is None:
                raise APIError(400, f"{param}[{j}]: a tool_reference part needs the tool's name (tool_name or name)",
                               param=f"{param}[{j}]")
            parts.append(("tool_reference", name))
        else:
            parts.append(("text", _one_text(part, f"{param}[{j}]", media)))
    return tool_result_fields(parts, "\n")


DropReasoning = Callable[[str, str], None]
"""``on_drop(param, reason)``: reasoning at ``param`` was not given to the model (reason:
``invalid_seal``, ``unsealed``)."""


def _reasoning_text(item: ReasoningItem, param: str, seal: ReasoningSeal | None, on_drop: DropReasoning | None,
                    stored: bool) -> str:
    """The reasoning the model gets for ``item``: its sealed text if the seal opens, its plain
    text if the server's own store holds it (``stored``), else nothing (reported)."""
    plain = "".join(str(p.get("text", "")) for p in item.content or [] if p.get("type") in ("reasoning_text", "text"))
    if item.encrypted_content:  # the seal wins over any plain text beside it
        if seal is not None:
            try:
                return seal.open(item.encrypted_content)
            except InvalidSeal:
                pass
        if on_drop is not None:
            on_drop(f"{param}.encrypted_content", "invalid_seal")
        return ""
    if stored or not plain:  # a summary alone is not the reasoning: nothing to keep, nothing dropped
        return plain
    if on_drop is not None:
        on_drop(f"{param}.content", "unsealed")
    return ""


class _Turns:
    """Folds items into chat messages; consecutive assistant-side items (reasoning, an
    assistant message, function calls) form one assistant turn."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.call_names: dict[str, str] = {}
        self._open: dict[str, Any] | None = None

    def assistant(self) -> dict[str, Any]:
        if self._open is None:
            self._open = {"role": "assistant", "content": None}
            self.messages.append(self._open)
        return self._open

    def close(self) -> None:
        self._open = None

    def add(self, msg: dict[str, Any]) -> None:
        self.close()
        self.messages.append(msg)


def items_to_messages(items: Sequence[Any], instructions: str | None = None, seal: ReasoningSeal | None = None,
                      params: Sequence[str] | None = None, on_drop: DropReasoning | None = None,
                      media: MediaNotes | None = None, stored: int = 0) -> list[dict[str, Any]]:
    """Chat messages for input items (models from :mod:`glmserve.api.responses.schemas`); ``instructions``
    become the leading system message.  ``params[n]`` names item ``n`` in errors
    (default ``input[n]``); ``media`` collects the media parts replaced by notes.  The first
    ``stored`` items come from the server's own store (``previous_response_id``): their
    reasoning is taken as it is and their media only measured.  Any other reasoning counts
    only if ``seal`` opens it; the rest is dropped and reported to ``on_drop``."""
    media = MediaNotes() if media is None else media
    turns = _Turns()
    if instructions:
        turns.add({"role": "system", "content": instructions})
    for n, item in enumerate(items):
        p = params[n] if params is not None else f"input[{n}]"
        media.trusted = n < stored
        if isinstance(item, MessageItem):
            text = _text_parts(item.content, f"{p}.content", media)
            if item.role == "assistant":
                turn = turns.assistant()
                if turn.get("tool_calls"):  # text after calls starts a new turn
                    turns.close()
                    turn = turns.assistant()
                turn["content"] = text if turn["content"] is None else turn["content"] + text
            else:
                turns.add({"role": "system" if item.role in ("system", "developer") else "user", "content": text})
        elif isinstance(item, ReasoningItem):
            text = _reasoning_text(item, p, seal, on_drop, n < stored)
            turn = turns.assistant()
            if turn["content"] is not None or turn.get("tool_calls"):
                turns.close()  # reasoning after an answer belongs to a new turn
                turn = turns.assistant()
            turn["reasoning_content"] = turn.get("reasoning_content", "") + text
        elif isinstance(item, (FunctionCallItem, CustomToolCallItem)):
            if (item.model_extra or {}).get("status") == "incomplete":
                continue  # cut off by the output limit (a stored cut answer): never run, not history
            name = ToolNames.flat(item.name, item.namespace)
            turns.assistant().setdefault("tool_calls", []).append(
                custom_call(item.call_id, name, item.input) if isinstance(item, CustomToolCallItem) else
                {"id": item.call_id, "type": "function", "function": {"name": name, "arguments": item.arguments}})
            turns.call_names[item.call_id] = name
        elif isinstance(item, (FunctionCallOutputItem, CustomToolCallOutputItem)):
            msg = {"role": "tool", "tool_call_id": item.call_id, **_output_fields(item.output, f"{p}.output", media)}
            if item.call_id in turns.call_names:
                msg["name"] = turns.call_names[item.call_id]
            turns.add(msg)
        elif isinstance(item, ItemReference):
            raise APIError(400, f"{p}: item_reference is not supported; send the item itself or use "
                                "previous_response_id", param=p)
        else:
            raise APIError(400, f"{p}: input items of type {item.type!r} are not supported by this server",
                           param=f"{p}.type")
    media.trusted = False
    return turns.messages


# --------------------------------------------------------------------------- the rest


def thinking(req: ResponsesRequest) -> tuple[bool, str | None]:
    """``reasoning.effort``: ``"none"`` turns thinking off; the effort itself is kept for
    the families that print it."""
    effort = req.reasoning.effort if req.reasoning is not None else None
    if effort is None:
        return True, None
    return effort.strip().lower() not in ("none", "off", "disabled"), effort


def text_format(req: ResponsesRequest) -> tuple[str | dict[str, Any] | None, str]:
    """``text.format`` as what the shared response-format helper takes: None (free text),
    ``"json_object"``, or the JSON schema; and the param path for its errors."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None, "text.format"
    if fmt.type == "json_object":
        return "json_object", "text.format"
    if fmt.schema_ is None:
        raise APIError(400, "text.format.schema is required for json_schema", param="text.format.schema")
    return fmt.schema_, "text.format.schema"
