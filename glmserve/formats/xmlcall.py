"""The XML tool-call wire format shared by GLM-4.5/4.6 (``glm45``) and GLM-4.7 (``glm47``).

Both families write calls as::

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

GLM-4.5/4.6 put a newline after the name and after every ``</arg_key>`` /
``</arg_value>`` (``newlines=True``); GLM-4.7 writes none.  String values are raw text
(no quotes, no escaping); every other value is JSON.  This module holds what the two
families share: prompt rendering (:class:`XmlRenderer`, whose hooks the GLM-5.x families
``glm51`` / ``glm53`` override), the incremental parser
(:class:`XmlCallParser`) and the decoding constraint (:func:`build_constraint`).

Parser decisions (deliberate, tested):

* **Reasoning.** Text between ``<think>`` and ``</think>`` is :class:`ReasoningEvent`.
  ``start="lead"`` (GLM-4.5 with thinking on: the prompt ends at ``<|assistant|>``)
  accepts the output opening with ``<think>`` after any whitespace (GLM-4.5 writes
  ``\\n<think>``, sometimes more blank lines); anything else there is content.
  ``start="reasoning"`` (GLM-4.7 with thinking on: the prompt ends with ``<think>``)
  starts inside reasoning, and drops a ``<think>`` (after any whitespace) that opens the
  output: the model repeating the prompt's opener.  ``start="content"`` (thinking off)
  starts in content.  ``<think>`` later in content and a stray ``</think>`` in content
  are text.
* **Leading newline.** One ``\\n`` right after ``</think>`` (or at the start of content
  when the prompt already closed the think block / the lead was not ``<think>``) is the
  template's separator and is dropped, as vLLM's/SGLang's GLM parsers do.
* **Separator before a call.** One ``\\n`` immediately before ``<tool_call>`` is the
  template's separator (GLM-4.5 writes ``\\n<tool_call>``) and belongs to the call
  marker.  A lone trailing ``\\n`` is therefore held back until the next character; it is
  emitted as text if no call follows (or at ``finish``).
* **Calls inside unfinished reasoning.** A ``<tool_call>`` of a *declared* tool inside
  ``<think>`` is parsed as a real call (the model forgot ``</think>``, or calls
  mid-thought; GLM does both and other servers then swallow the call into reasoning).
  After its ``</tool_call>`` the parser is back in reasoning.  An undeclared name inside
  reasoning is returned verbatim as reasoning.
* **Undeclared names.** ``<tool_call>unknown...`` is returned verbatim as text (the
  opening marker, the name and everything after it), never as a call.  A name longer
  than :data:`MAX_NAME` characters, or a second ``<tool_call>`` before the name ended,
  also means "not a call", and so does a ``</think>`` before the name ended (inside
  reasoning it then still ends the reasoning).
* **Values** take the type their schema asks for
  (:mod:`glmserve.formats.schema_values`: local ``$ref`` resolved, then the reading that
  validates: JSON, raw text, quoted number...).  A value whose resolved schema is a plain
  string (``{"type": "string"}`` with no enum, pattern, length or format) streams as
  JSON-escaped pieces the moment it arrives, raw and unstripped (the template writes it
  raw, so rendering and parsing round-trip exactly).  Every other value is held until
  ``</arg_value>`` and read whole, so streamed and non-streamed answers agree and a
  streamed ``123`` is never ``"123"``.  A value that no reading makes valid puts its
  call's index in :attr:`XmlCallParser.invalid_calls`.
* **Inside a call**, text between the arguments other than the markers (normally just
  the template's newlines) is not part of any argument and is dropped.  A
  ``<tool_call>`` where the next ``<arg_key>`` or ``</tool_call>`` was due ends the call
  (the model forgot ``</tool_call>``) and opens the next one.  A repeated key
  is written twice into the JSON text (``json.loads`` keeps the last one).
* **Truncation.** Output ending inside a started call (its name closed) sets
  :attr:`incomplete_call`; its arguments stay as far as they were streamed (the JSON the
  arguments so far map to: a plain string value up to its last character, typed values only
  once read whole), never closed.  At a cut (``finish(cut=True)``, the token limit) what was
  held back as a possible marker is dropped, and so is a ``<tool_call>`` whose name is still
  a prefix of a declared tool's name (nothing of it is text); at a natural end both are text.

Every ``feed`` scans only the new text plus a held-back tail shorter than the longest
marker; values and names are accumulated, never re-scanned.

Constraint decisions (:func:`build_constraint`, an xgrammar 0.2.8 structural tag built
like xgrammar's own ``glm_4_7`` tag, compiled to EBNF for ``StructuredOutputsParams(grammar=)``):

* Reasoning stays free text (no control tokens inside, so no calls in reasoning while
  constrained); GLM-4.7 starts inside it, GLM-4.5 may open with ``<think>`` or
  ``\n<think>`` (optional), thinking-disabled requests have no reasoning part.
* Each call is ``TagFormat("<tool_call>" + name, JSONSchemaFormat(style="glm_xml"),
  "</tool_call>")``.  ``glm_xml`` tolerates whitespace between the elements, so the same
  tag serves GLM-4.5's newline layout and GLM-4.7's compact one.  The schema is
  resolved (local ``$ref`` inlined, cycles bounded) exactly as the parser resolves it,
  so grammar and decoder read every property alike.  Arguments follow the
  schema's declared property order (xgrammar's ``any_order=False`` default, which is what
  lets it enforce ``required``); missing parameters leave the arguments unconstrained,
  and so does a schema xgrammar cannot compile unless the tool is ``strict`` (the shared
  rule of :mod:`glmserve.formats.grammar`).
* ``auto``: free text with optional calls; ``required``: calls only, one or more (an
  optional ``\n`` between them, GLM-4.5 also before the first) and then the end: text
  after a forced call once let a weak model write until ``max_tokens``; a named tool:
  exactly one call of it; ``parallel_tool_calls=False``: at most / exactly one call.
* Built tags are cached per canonical JSON key (tools, mode, flags).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterable, Literal

import pydantic_core

from glmserve.formats import freeform, grammar
from glmserve.formats.base import (
    CALL_CLOSE,
    CALL_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    CallOpener,
    ChatFormat,
    ChatRequest,
    Constraint,
    Control,
    Event,
    Prompt,
    ReasoningEvent,
    ReasoningSwitch,
    StreamParser,
    TextEvent,
    Tool,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    content_text,
    dumps,
    referenced_definitions,
)
from glmserve.formats.schema_values import ToolSchemas, is_free_string, read_value, resolve_refs, schemas_for

# --------------------------------------------------------------------------- markers

KEY_OPEN = "<arg_key>"
KEY_CLOSE = "</arg_key>"
VALUE_OPEN = "<arg_value>"
VALUE_CLOSE = "</arg_value>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CONTROL_TOKENS: tuple[str, ...] = (
    "[gMASK]",
    "<sop>",
    *ROLE_TOKENS,
    THINK_OPEN,
    THINK_CLOSE,
    CALL_OPEN,
    CALL_CLOSE,
    KEY_OPEN,
    KEY_CLOSE,
    VALUE_OPEN,
    VALUE_CLOSE,
    RESPONSE_OPEN,
    RESPONSE_CLOSE,
)
STOP = ("<|endoftext|>", "<|user|>", "<|observation|>", "<|assistant|>")

MAX_NAME = 256
"""Characters after ``<tool_call>`` without a name terminator before it is judged text."""

_C = {t: Control(t) for t in CONTROL_TOKENS}


def _ctl(token: str) -> Control:
    return _C[token]


# --------------------------------------------------------------------------- values


def is_string_schema(schema: Any) -> bool:
    """True when a property's schema says its value is a string (written raw in calls)."""
    if not isinstance(schema, dict):
        return False
    t = schema.get("type")
    if t == "string":
        return True
    if isinstance(t, list):
        kinds = [k for k in t if k != "null"]
        return bool(kinds) and all(k == "string" for k in kinds)
    if t is None:
        if "enum" in schema and schema["enum"] and all(isinstance(v, str) for v in schema["enum"]):
            return True
        if "const" in schema and isinstance(schema["const"], str):
            return True
        for key in ("anyOf", "oneOf"):
            alts = schema.get(key)
            if isinstance(alts, list) and alts:
                real = [a for a in alts if not (isinstance(a, dict) and a.get("type") == "null")]
                return bool(real) and all(is_string_schema(a) for a in real)
    return False


def is_free_string_schema(schema: Any) -> bool:
    """A plain string property: the constraint lets its value be any raw text, so it streams
    as it arrives.  Any other string (enum, pattern, length...) is constrained like a typed
    value, with whitespace allowed around it, so it is read whole."""
    return is_free_string(schema)


def property_schema(tool: Tool | None, key: str) -> Any:
    """The schema of one argument of a tool, local ``$ref`` resolved (None when unknown)."""
    if tool is None or not isinstance(tool.parameters, dict):
        return None
    return schemas_for(tool.parameters).schema_of(key)


def decode_value(raw: str, schema: Any) -> Any:
    """An argument's text to the value its (resolved) schema reads it as (see
    :func:`glmserve.formats.schema_values.read_value`)."""
    return read_value(raw, ToolSchemas({"properties": {"v": schema}}).value("v") if schema is not None else None)[0]


def render_value(value: Any) -> str:
    """How the templates write a value in history: strings raw, the rest as JSON."""
    return value if isinstance(value, str) else dumps(value)


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class XmlStyle:
    """What differs between GLM-4.5/4.6 and GLM-4.7 prompts."""

    newlines: bool
    """GLM-4.5/4.6: a newline after role tokens and inside calls / tool responses."""
    nothink_suffix: bool
    """GLM-4.5/4.6: ``/nothink`` is appended to user turns when thinking is disabled."""
    honour_clear_thinking: bool
    """GLM-4.7: ``clear_thinking=False`` keeps reasoning of turns before the last user."""


def _tool_object(tool: Tool) -> dict[str, Any]:
    """The object printed in ``<tools>``: what the client sent, in the OpenAI shape."""
    if tool.raw and "function" in tool.raw:
        return tool.raw
    return {"type": "function", "function": tool.function}


def _reference_line(tool: Tool) -> str:
    """A referenced (usually deferred) tool as the ``<tools>`` block prints tools, without its
    ``defer_loading`` flag (it means nothing to the model)."""
    obj = _tool_object(tool)
    fn = {k: v for k, v in obj["function"].items() if k != "defer_loading"}
    return dumps({**obj, "function": fn}) + "\n"


def _call_example(nl: str) -> list[Any]:
    parts: list[Any] = [_ctl(CALL_OPEN), "{function-name}" + nl]
    for i in (1, 2):
        parts += [
            _ctl(KEY_OPEN), f"{{arg-key-{i}}}", _ctl(KEY_CLOSE), nl,
            _ctl(VALUE_OPEN), f"{{arg-value-{i}}}", _ctl(VALUE_CLOSE), nl,
        ]
    parts += ["..." + nl, _ctl(CALL_CLOSE)]
    return parts


def _tool_arguments(call: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = call.get("function") or call
    name = str(fn.get("name", ""))
    args = fn.get("arguments")
    if args is None or args == "":
        return name, {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            # a call cut by the token limit comes back as it was returned (the JSON prefix its
            # arguments reached): what it holds is rendered, as Anthropic's partial `input` is
            try:
                args = pydantic_core.from_json(args, allow_partial=True)
            except ValueError:
                raise ValueError(f"tool call {name!r}: arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object")
    return name, args


def _split_reasoning(message: dict[str, Any]) -> tuple[str, str]:
    """``(reasoning, content)`` of a history assistant turn, as the templates derive them."""
    content = content_text(message)
    rc = message.get("reasoning_content")
    if isinstance(rc, str):
        return rc, content
    if THINK_CLOSE in content:
        before = content.split(THINK_CLOSE)[0].rstrip("\n")
        reasoning = before.split(THINK_OPEN)[-1].lstrip("\n")
        return reasoning, content.split(THINK_CLOSE)[-1].lstrip("\n")
    return "", content


class XmlRenderer:
    """Renders a request exactly as the official GLM-4.5/4.6/4.7 chat templates do.

    The GLM-5.x families (``glm51``, ``glm53``) subclass it and override the hooks where
    their templates differ: the preamble, how a tool is printed, the think block of a
    history turn, a run of tool results, and the generation prompt.
    """

    def __init__(self, style: XmlStyle) -> None:
        self.style = style
        self.nl = "\n" if style.newlines else ""

    # ------------------------------------------------------------------ hooks

    def preamble(self, p: Prompt, request: ChatRequest) -> None:
        p.add(_ctl("[gMASK]"), _ctl("<sop>"))

    def tool_block_shown(self, request: ChatRequest) -> bool:
        """Whether the prompt has the ``# Tools`` system block: when it lists a tool (these
        templates have no ``defer_loading`` rule: deferred tools are shown where a result
        references them)."""
        return bool(request.listed_tools)

    def tool_line(self, tool: Tool) -> str | None:
        """How one tool is printed in ``<tools>`` (None: left out)."""
        return dumps(_tool_object(tool))

    def assistant_head(self, p: Prompt, request: ChatRequest, messages: list[dict[str, Any]], i: int,
                       last_user: int) -> str:
        """Write a history turn's think block; returns the turn's visible content."""
        nl = self.nl
        reasoning, content = _split_reasoning(messages[i])
        keep = i > last_user or (self.style.honour_clear_thinking and request.clear_thinking is False)
        if keep and reasoning:
            p.add(nl, _ctl(THINK_OPEN), reasoning.strip(), _ctl(THINK_CLOSE))
        elif self.style.newlines:
            p.add(nl, _ctl(THINK_OPEN), _ctl(THINK_CLOSE))
        else:
            p.add(_ctl(THINK_CLOSE))
        return content

    def tool_results(self, p: Prompt, request: ChatRequest, messages: list[dict[str, Any]], start: int,
                     end: int) -> None:
        """A run of tool messages ``messages[start:end]`` (one ``<|observation|>``).

        These templates have no ``tool_reference`` rule; a result naming tools shows their
        definitions as the system block lists tools, ``<tools>\\n{…}\\n</tools>`` (GLM-5.1's
        layout), inside its ``<tool_response>``."""
        nl = self.nl
        p.add(_ctl("<|observation|>"))
        for m in messages[start:end]:
            body = referenced_definitions(m, request.tools_in_prompt, _reference_line)
            p.add(nl, _ctl(RESPONSE_OPEN), nl + (content_text(m) if body is None else body) + nl, _ctl(RESPONSE_CLOSE))

    def generation_prompt(self, p: Prompt, request: ChatRequest) -> None:
        no_think = not request.enable_thinking
        p.add(_ctl("<|assistant|>"))
        if self.style.newlines:
            if no_think:
                p.add("\n", _ctl(THINK_OPEN), _ctl(THINK_CLOSE))
        else:
            p.add(_ctl(THINK_CLOSE) if no_think else _ctl(THINK_OPEN))

    # ------------------------------------------------------------------ whole prompt

    def render(self, request: ChatRequest) -> Prompt:
        nl = self.nl
        style = self.style
        p = Prompt()
        self.preamble(p, request)
        tools = request.listed_tools
        if self.tool_block_shown(request):
            p.add(_ctl("<|system|>"), "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
            for tool in tools:
                line = self.tool_line(tool)
                if line is not None:
                    p.add(line + "\n")
            p.add("</tools>\n\nFor each function call, output the function name and arguments within the following "
                  "XML format:\n")
            p.add(*_call_example(nl))

        messages = request.messages
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        no_think = not request.enable_thinking
        i = 0
        while i < len(messages):
            m = messages[i]
            role = m.get("role")
            if role == "user":
                text = content_text(m)
                p.add(_ctl("<|user|>"), nl + text)
                if style.nothink_suffix and no_think and not text.endswith("/nothink"):
                    p.add("/nothink")
            elif role == "assistant":
                p.add(_ctl("<|assistant|>"))
                content = self.assistant_head(p, request, messages, i, last_user)
                if content.strip():
                    p.add(nl + content.strip())
                for call in m.get("tool_calls") or []:
                    name, args = _tool_arguments(call)
                    p.add(nl, _ctl(CALL_OPEN), name + nl)
                    for k, v in args.items():
                        p.add(_ctl(KEY_OPEN), str(k), _ctl(KEY_CLOSE), nl,
                              _ctl(VALUE_OPEN), render_value(v), _ctl(VALUE_CLOSE), nl)
                    p.add(_ctl(CALL_CLOSE))
            elif role == "tool":
                end = i + 1
                while end < len(messages) and messages[end].get("role") == "tool":
                    end += 1
                self.tool_results(p, request, messages, i, end)
                i = end
                continue
            elif role in ("system", "developer"):
                p.add(_ctl("<|system|>"), nl + content_text(m))
            i += 1
        if request.add_generation_prompt:
            self.generation_prompt(p, request)
        return p


def render_xml_prompt(request: ChatRequest, style: XmlStyle) -> Prompt:
    """Render a request exactly as the official GLM-4.5/4.6/4.7 chat templates do."""
    return XmlRenderer(style).render(request)


def write_call(name: str, arguments: dict[str, Any], *, newlines: bool) -> str:
    """A call as the model writes it (for tests and examples)."""
    nl = "\n" if newlines else ""
    out = [CALL_OPEN, name, nl]
    for k, v in arguments.items():
        out += [KEY_OPEN, k, KEY_CLOSE, nl, VALUE_OPEN, render_value(v), VALUE_CLOSE, nl]
    out.append(CALL_CLOSE)
    return "".join(out)


# --------------------------------------------------------------------------- parser


class _Markers:
    """A set of literal markers searched with one regex; knows which tails to hold back."""

    def __init__(self, *markers: str) -> None:
        self.markers = markers
        self.regex = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))
        self.prefixes = {m[:k] for m in markers for k in range(1, len(m))}
        self.max_hold = max(len(m) for m in markers) - 1

    def held(self, text: str, start: int) -> int:
        """Length of the longest tail of ``text[start:]`` that may still become a marker."""
        for k in range(min(self.max_hold, len(text) - start), 0, -1):
            if text[-k:] in self.prefixes:
                return k
        return 0


_S_LEAD, _S_REASON, _S_TEXT, _S_NAME, _S_ARGS, _S_KEY, _S_AFTER_KEY, _S_STR, _S_RAW = range(9)

_MARKERS = {
    _S_REASON: _Markers(THINK_CLOSE, CALL_OPEN, "\n" + CALL_OPEN),
    _S_TEXT: _Markers(CALL_OPEN, "\n" + CALL_OPEN),
    _S_NAME: _Markers(KEY_OPEN, CALL_CLOSE, "\n", CALL_OPEN, THINK_CLOSE),
    # A <tool_call> here means the model forgot this call's </tool_call>: the next call starts.
    _S_ARGS: _Markers(KEY_OPEN, CALL_CLOSE, CALL_OPEN),
    _S_KEY: _Markers(KEY_CLOSE),
    _S_AFTER_KEY: _Markers(VALUE_OPEN),
    _S_STR: _Markers(VALUE_CLOSE),
    _S_RAW: _Markers(VALUE_CLOSE),
}
_LEAD_WS = " \t\r\n"

Start = Literal["lead", "reasoning", "content"]


class XmlCallParser(StreamParser):
    """Incremental parser for GLM XML calls with ``<think>`` reasoning (see module doc)."""

    def __init__(self, tools: Iterable[Tool], start: Start = "content") -> None:
        self._tools = {t.name: t for t in tools}
        self._state = _S_TEXT if start == "content" else _S_LEAD
        # Where output goes when it does not open with <think>: content (GLM-4.5), or the
        # reasoning the prompt already opened (GLM-4.7, which sometimes repeats <think>).
        self._lead_to = _S_REASON if start == "reasoning" else _S_TEXT
        self._lead_ws = ""  # whitespace seen before a possible <think> (kept, never re-scanned)
        self._strip_nl = start == "content"  # prompt already closed the think block
        self._buf = ""  # held-back tail (shorter than the longest marker)
        self._acc: list[str] = []  # name / key / non-string value being collected
        self._acc_len = 0
        self._open = ""  # the exact marker text that opened the current call
        self._return = _S_TEXT  # state to go back to after a call
        self._index = 0  # index of the next / current call
        self._tool: Tool | None = None
        self._schemas: ToolSchemas | None = None
        self._nargs = 0
        self.invalid_calls: list[int] = []
        """Indices of calls with an argument that no reading made valid against its schema."""
        self._key = ""
        self._incomplete = False
        self._done = False

    # ------------------------------------------------------------------ public

    @property
    def incomplete_call(self) -> bool:
        return self._incomplete

    def feed(self, text: str) -> list[Event]:
        if self._done:
            raise RuntimeError("feed() after finish()")
        out: list[Event] = []
        if text:
            self._run(self._buf + text, out)
        return out

    def finish(self, cut: bool = False) -> list[Event]:
        out: list[Event] = []
        if self._done:
            return out
        self._done = True
        data, self._buf = self._buf, ""
        if cut:
            # What was held back could still have become a marker: at a cut it was one.
            data = ""
        if self._state == _S_LEAD:
            data, self._lead_ws = ("" if cut else self._lead_ws + data), ""
            self._leave_lead()
        if self._state in (_S_TEXT, _S_REASON):
            self._emit_plain(data, out)
        elif self._state == _S_NAME:
            name = "".join(self._acc)
            partial = (name + data).strip()
            self._state = self._return
            if cut and any(tool.startswith(partial) for tool in self._tools):
                # A call being born (its name not yet closed): dropped, marker and all.
                self._incomplete = True
            else:
                # Not a declared name, or the model ended here: the opener was text.
                self._emit_plain(self._open + name + data, out)
        else:
            self._incomplete = True
        return out

    # ------------------------------------------------------------------ helpers

    def _leave_lead(self) -> None:
        self._state = self._lead_to
        if self._state == _S_TEXT:
            self._strip_nl = True

    def _emit_plain(self, text: str, out: list[Event]) -> None:
        """Text or reasoning, depending on where the parser is (or returns to)."""
        if not text:
            return
        if self._state == _S_REASON:
            out.append(ReasoningEvent(text))
            return
        if self._strip_nl:
            self._strip_nl = False
            if text.startswith("\n"):
                text = text[1:]
                if not text:
                    return
        out.append(TextEvent(text))

    def _args(self, delta: str, out: list[Event]) -> None:
        out.append(ToolCallArgs(self._index, delta))

    def _collect(self, piece: str) -> None:
        if piece:
            self._acc.append(piece)
            self._acc_len += len(piece)

    def _take(self) -> str:
        text = "".join(self._acc)
        self._acc.clear()
        self._acc_len = 0
        return text

    def _arg_prefix(self) -> str:
        self._nargs += 1
        return "{" if self._nargs == 1 else ", "

    # ------------------------------------------------------------------ machine

    def _run(self, data: str, out: list[Event]) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _S_LEAD:
                # Any whitespace, then "<think>": the reasoning opens (the opener is dropped).
                start = pos
                while pos < n and data[pos] in _LEAD_WS:
                    pos += 1
                self._lead_ws += data[start:pos]
                rest = data[pos:]
                if rest.startswith(THINK_OPEN):
                    self._lead_ws = ""
                    self._state = _S_REASON
                    pos += len(THINK_OPEN)
                    continue
                if THINK_OPEN.startswith(rest):
                    self._buf = rest  # still may become the think opener ("" when all was whitespace)
                    return
                # Not a think opener: read everything from the first whitespace again where
                # the output goes (GLM-4.5's "\n<tool_call>" must still be a call).
                data, self._lead_ws = self._lead_ws + rest, ""
                pos, n = 0, len(data)
                self._leave_lead()
                continue
            markers = _MARKERS[state]
            m = markers.regex.search(data, pos)
            if m is None:
                hold = markers.held(data, pos)
                end = n - hold
                pos = self._segment(data, pos, end, out)
                if self._state != state:  # a segment may end a state (name too long)
                    continue
                self._buf = data[end:]
                return
            start = m.start()
            new_pos = self._segment(data, pos, start, out)
            if self._state != state or new_pos != start:
                pos = new_pos
                continue
            pos = m.end()
            self._marker(m.group(0), out)
        self._buf = ""

    def _segment(self, data: str, pos: int, end: int, out: list[Event]) -> int:
        """Handle plain text ``data[pos:end]`` in the current state; returns where the
        caller should continue (``end`` unless the state changed part way)."""
        if pos >= end:
            return end
        state = self._state
        piece = data[pos:end]
        if state in (_S_TEXT, _S_REASON):
            self._emit_plain(piece, out)
        elif state == _S_NAME:
            room = MAX_NAME - self._acc_len
            if len(piece) > room:
                # No name is this long: the marker was text after all.
                self._collect(piece[:room])
                self._state = self._return
                self._emit_plain(self._open + self._take(), out)
                return pos + room
            self._collect(piece)
        elif state in (_S_KEY, _S_RAW):
            self._collect(piece)
        elif state == _S_STR:
            self._args(dumps(piece)[1:-1], out)
        # _S_ARGS / _S_AFTER_KEY: separators inside a call are dropped.
        return end

    def _marker(self, marker: str, out: list[Event]) -> None:
        state = self._state
        if state in (_S_TEXT, _S_REASON):
            if marker == THINK_CLOSE:
                self._state = _S_TEXT
                self._strip_nl = True
                return
            # <tool_call> or \n<tool_call>; the leading-newline rule stays armed in case
            # this turns out not to be a call (its text is then the first content).
            self._return = state
            self._open = marker
            self._state = _S_NAME
            return
        if state == _S_NAME:
            name = self._take()
            if marker == THINK_CLOSE:
                # No name holds "</think>": the opener was text, and the "</think>" means
                # what it means where the parser returns (the end of reasoning, or text).
                self._state = self._return
                self._emit_plain(self._open + name, out)
                if self._state == _S_REASON:
                    self._state = _S_TEXT
                    self._strip_nl = True
                else:
                    self._emit_plain(marker, out)
                return
            tool = self._tools.get(name.strip())
            if marker == CALL_OPEN or tool is None:
                self._state = self._return
                if marker == CALL_OPEN:  # a fresh opener: the earlier one was text
                    self._emit_plain(self._open + name, out)
                    self._open = marker
                    self._state = _S_NAME
                else:
                    self._emit_plain(self._open + name + marker, out)
                return
            self._tool = tool
            self._schemas = schemas_for(tool.parameters) if isinstance(tool.parameters, dict) else None
            self._nargs = 0
            self._strip_nl = False
            out.append(ToolCallStart(self._index, tool.name))
            if marker == KEY_OPEN:
                self._state = _S_KEY
            elif marker == CALL_CLOSE:
                self._end_call(out)
            else:
                self._state = _S_ARGS
            return
        if state == _S_ARGS:
            if marker == KEY_OPEN:
                self._state = _S_KEY
            else:
                self._end_call(out)
                if marker == CALL_OPEN:  # </tool_call> was missing: this opens the next call
                    self._open = marker
                    self._state = _S_NAME
            return
        if state == _S_KEY:
            self._key = self._take().strip()
            self._state = _S_AFTER_KEY
            return
        if state == _S_AFTER_KEY:
            schema = self._schemas.value(self._key) if self._schemas is not None else None
            if schema is not None and schema.free_string:
                self._args(self._arg_prefix() + dumps(self._key) + ': "', out)
                self._state = _S_STR
            else:
                self._state = _S_RAW
            return
        if state == _S_STR:
            self._args('"', out)
            self._state = _S_ARGS
            return
        if state == _S_RAW:
            schema = self._schemas.value(self._key) if self._schemas is not None else None
            value, valid = read_value(self._take(), schema)
            if not valid and self._index not in self.invalid_calls:
                self.invalid_calls.append(self._index)
            self._args(self._arg_prefix() + dumps(self._key) + ": " + dumps(value), out)
            self._state = _S_ARGS
            return

    def _end_call(self, out: list[Event]) -> None:
        self._args("}" if self._nargs else "{}", out)
        out.append(ToolCallEnd(self._index))
        self._index += 1
        self._tool = None
        self._schemas = None
        self._state = self._return


# --------------------------------------------------------------------------- constraint

Reasoning = Literal["open", "lead", "none"]
"""Where a generation starts: inside ``<think>`` (GLM-4.7), before an optional
``<think>`` block (GLM-4.5), or after the reasoning (thinking disabled)."""

_REASONING_EXCLUDES = [THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE]
_TEXT_EXCLUDES = [THINK_OPEN, THINK_CLOSE, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE]


def _call_tag(name: str, schema: Any, opener: str = CALL_OPEN) -> Any:
    """``<tool_call>NAME`` + arguments in xgrammar's ``glm_xml`` style + ``</tool_call>``
    (``opener=""``: the same without the opener, for an answer whose call is already open).

    glm_xml content tolerates whitespace between elements, so the same tag accepts
    GLM-4.5's "\\n"-separated layout and GLM-4.7's compact one.  The run is bounded:
    unbounded, a weak model fills max_tokens with "\\r\\n" (seen on vLLM).  The schema is
    resolved exactly as the parser resolves it, so both read each property alike."""
    from xgrammar.structural_tag import JSONSchemaFormat, TagFormat

    return TagFormat(
        begin=opener + name,
        content=JSONSchemaFormat(json_schema=schema if schema is True else resolve_refs(schema), style="glm_xml",
                                 max_whitespace_cnt=1),
        end=CALL_CLOSE,
    )


def _custom_tag(name: str, syntax: str, definition: str, newlines: bool, opener: str = CALL_OPEN) -> Any:
    """A custom tool's call: its one argument, ``input``, written raw in the family's layout and
    held to the tool's grammar, without ``</arg_value>`` inside (:mod:`glmserve.formats.freeform`);
    ``opener`` as :func:`_call_tag`'s."""
    from xgrammar.structural_tag import ConstStringFormat, GrammarFormat, SequenceFormat, TagFormat

    nl = "\n" if newlines else ""
    value = freeform.raw_grammar(syntax, definition, VALUE_CLOSE, name)  # type: ignore[arg-type]
    return TagFormat(begin=opener + name, content=SequenceFormat(elements=[
        ConstStringFormat(value=nl + KEY_OPEN + freeform.INPUT_KEY + KEY_CLOSE + nl + VALUE_OPEN),
        GrammarFormat(grammar=value),
        ConstStringFormat(value=VALUE_CLOSE + nl),
    ]), end=CALL_CLOSE)


@grammar.cached(maxsize=1024)
def xml_schema_check(schema_json: str) -> str | None:
    """Why xgrammar cannot compile one tool's schema in the ``glm_xml`` style (None: it can)."""
    try:
        grammar.compile_format(_call_tag("f", json.loads(schema_json)))
    except (RuntimeError, ValueError) as exc:  # xgrammar's C++ errors arrive as RuntimeError
        return str(exc).strip()
    return None


@grammar.cached(maxsize=256)
def structural_tag_for_key(key: str) -> str:
    """Build (once per canonical key) the xgrammar structural tag JSON for a constraint."""
    from xgrammar.structural_tag import (
        AnyTextFormat,
        ConstStringFormat,
        OptionalFormat,
        OrFormat,
        SequenceFormat,
        StarFormat,
        StructuralTag,
        TagFormat,
        TriggeredTagsFormat,
    )

    spec = json.loads(key)
    part = spec.get("part")
    if part == "prelude":  # any tool set: the generation stops at the opener, before any call
        tags = [TagFormat(begin=CALL_OPEN, content=AnyTextFormat(), end=CALL_CLOSE)]
    else:  # no schema (none given, or one xgrammar cannot compile): any arguments
        custom = grammar.custom_grammars(spec)
        tags = [_custom_tag(name, *custom[name], newlines=spec["newlines"]) if name in custom
                else _call_tag(name, True if schema is None else schema) for name, schema in spec["tools"]]
    single = not spec["parallel"]
    if part == "after_opener":  # auto, the first call opened: its name and arguments, then as auto
        bodies = [_custom_tag(name, *custom[name], newlines=spec["newlines"], opener="") if name in custom
                  else _call_tag(name, True if schema is None else schema, opener="") for name, schema in spec["tools"]]
        first: Any = bodies[0] if len(bodies) == 1 else OrFormat(elements=bodies)
        if not single:
            first = SequenceFormat(elements=[first, TriggeredTagsFormat(triggers=[CALL_OPEN], tags=tags,
                                                                         excludes=_TEXT_EXCLUDES)])
        return StructuralTag(format=first).model_dump_json(by_alias=True)
    if spec["choice"] == "auto":
        suffix: Any = TriggeredTagsFormat(
            triggers=[CALL_OPEN], tags=tags, excludes=_TEXT_EXCLUDES, stop_after_first=single
        )
    elif spec["choice"] == "required":
        # Calls only: one or more (whitespace between them), then the end of the answer.
        one: Any = tags[0] if len(tags) == 1 else OrFormat(elements=tags)
        if single:
            suffix = one
        else:
            gap = OptionalFormat(content=ConstStringFormat(value="\n"))
            suffix = SequenceFormat(elements=[one, StarFormat(content=SequenceFormat(elements=[gap, one]))])
    else:  # named: exactly one call of that tool
        suffix = tags[0]
    if spec["choice"] != "auto" and spec["newlines"]:
        # A forced call must start the answer, but GLM-4.5 writes "\n" before it.
        suffix = SequenceFormat(elements=[OptionalFormat(content=ConstStringFormat(value="\n")), suffix])

    reasoning = spec["reasoning"]
    think_body = AnyTextFormat(excludes=_REASONING_EXCLUDES)
    if reasoning == "open":
        fmt: Any = SequenceFormat(elements=[TagFormat(begin="", content=think_body, end=THINK_CLOSE), suffix])
    elif reasoning == "lead":
        block = OrFormat(elements=[
            TagFormat(begin=THINK_OPEN, content=think_body, end=THINK_CLOSE),
            TagFormat(begin="\n" + THINK_OPEN, content=think_body, end=THINK_CLOSE),
        ])
        fmt = SequenceFormat(elements=[OptionalFormat(content=block), suffix])
    else:
        fmt = suffix
    return StructuralTag(format=fmt).model_dump_json(by_alias=True)


@grammar.cached(maxsize=1)
def reasoning_grammar() -> str:
    """The grammar for reasoning alone (after the opener): text without call or think
    markers, up to ``</think>``, as the constraints above allow inside a think block."""
    from xgrammar.structural_tag import AnyTextFormat, TagFormat

    return grammar.compile_format(TagFormat(begin="", content=AnyTextFormat(excludes=_REASONING_EXCLUDES),
                                            end=THINK_CLOSE))


_ANY_WS = "[ \\n\\r\\t]*"
_BOUNDED_WS = "[ \\n\\r\\t]{0, 2}"


@grammar.cached(maxsize=256)
def grammar_for_key(key: str) -> str:
    """The structural tag as EBNF with whitespace runs bounded.

    ``glm_xml`` allows any run of whitespace between and around elements (it ignores
    ``max_whitespace_cnt``); on vLLM a weak model then wrote ``\\r`` until max_tokens
    inside a forced call.  Two characters cover GLM-4.5's ``\\n`` layout.
    """
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_structural_tag(structural_tag_for_key(key)))
    return ebnf.replace(_ANY_WS, _BOUNDED_WS)


def build_constraint(request: ChatRequest, reasoning: Reasoning, newlines: bool) -> Constraint | None:
    """The constraint for a request's ``tool_choice`` (cached per tool set)."""
    return grammar.build(request, "xml", xml_schema_check, grammar_for_key, reasoning=reasoning, newlines=newlines)


@grammar.cached(maxsize=4)
def prelude_grammar(reasoning: Reasoning) -> str:
    """An ``auto`` answer up to its first call opener, for any tool set (:class:`CallOpener`):
    the full constraint's reasoning and text, with calls of any content (the generation stops at
    the opener, so none is written)."""
    return grammar_for_key(grammar.canonical({"family": "xml", "part": "prelude", "choice": "auto", "parallel": True,
                                              "reasoning": reasoning}))


def build_after_opener(request: ChatRequest, newlines: bool) -> Constraint | None:
    """The rest of an ``auto`` answer whose first call was just opened: one call of a declared
    tool (its name, then its arguments as in :func:`build_constraint`), then what ``auto``
    allows after a call (cached per tool set)."""
    return grammar.build(request, "xml", xml_schema_check, grammar_for_key, part="after_opener", newlines=newlines)


class XmlFormat(ChatFormat):
    """What the XML families share; a family sets its style and where thinking starts."""

    style: ClassVar[XmlStyle]
    thinking: ClassVar[Literal["lead", "open"]]
    """``lead``: output may open with a ``<think>`` block (GLM-4.5); ``open``: the prompt
    ends inside ``<think>``, so output starts as reasoning (GLM-4.7)."""
    stop: ClassVar[tuple[str, ...]] = STOP
    skip_special_tokens: ClassVar[bool] = False
    content_joiner: ClassVar[str] = ""
    renderer: ClassVar[type[XmlRenderer]] = XmlRenderer
    """The prompt renderer; GLM-5.x families plug in their template's differences."""

    def render(self, request: ChatRequest) -> Prompt:
        return self.renderer(self.style).render(request)

    def parser(self, request: ChatRequest) -> StreamParser:
        start: Start = "content"
        if request.enable_thinking:
            start = "lead" if self.thinking == "lead" else "reasoning"
        return XmlCallParser(request.tools_in_prompt, start=start)

    def constraint(self, request: ChatRequest) -> Constraint | None:
        return build_constraint(request, self.thinking if request.enable_thinking else "none",
                                newlines=self.style.newlines)

    def call_opener(self, request: ChatRequest) -> CallOpener | None:
        if request.tool_choice != "auto" or not request.tools_in_prompt:
            return None
        return CallOpener(opener=CALL_OPEN,
                          prelude=Constraint(grammar=prelude_grammar(self.thinking if request.enable_thinking else "none")))

    def constraint_after_opener(self, request: ChatRequest) -> Constraint | None:
        return build_after_opener(request, newlines=self.style.newlines)

    def control_tokens(self) -> tuple[str, ...]:
        return CONTROL_TOKENS

    def reasoning_switch(self, request: ChatRequest) -> ReasoningSwitch | None:
        if not request.enable_thinking:
            return None
        # GLM-4.5 writes "\n<think>" itself (its thinking-off prompt is "\n<think></think>");
        # GLM-4.7's generation prompt already ends inside <think>.
        opener: tuple[Any, ...] = ("\n", _ctl(THINK_OPEN)) if self.thinking == "lead" else ()
        reasoning = Constraint(grammar=reasoning_grammar()) if request.tools_in_prompt else None
        return ReasoningSwitch(opener=opener, closer=THINK_CLOSE, answer=replace(request, enable_thinking=False),
                               reasoning=reasoning)


__all__ = [
    "CONTROL_TOKENS",
    "STOP",
    "XmlCallParser",
    "XmlFormat",
    "XmlRenderer",
    "XmlStyle",
    "build_after_opener",
    "build_constraint",
    "decode_value",
    "is_string_schema",
    "grammar_for_key",
    "prelude_grammar",
    "render_value",
    "render_xml_prompt",
    "structural_tag_for_key",
    "write_call",
]
