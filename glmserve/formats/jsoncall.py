"""Shared machinery of the JSON-call formats (glm-4-9b-chat, GLM-4-0414, GLM-Z1).

These models write a tool call as ``{name}\\n{json object}``; several calls follow each
other separated by ``<|assistant|>`` (or run together when special tokens are skipped),
and a plain answer starts with ``\\n`` (the empty metadata line).  This module holds the
incremental scanners, the streaming parser for that layout and the ``ChatFormat`` base
that the three GLM JSON formats share.

Parser decisions (deterministic, independent of how the output is split):

* A *segment* starts at the beginning of the output, after ``<|assistant|>``, and after
  a call's closing ``}``.  At a segment start up to :data:`MAX_LEAD_WS` whitespace
  characters, a declared name, up to :data:`MAX_NAME_SPACES` spaces (GLM-4-0414 history
  writes ``name \\n``), ``\\n``, up to :data:`MAX_LEAD_WS` whitespace and ``{`` make a
  call.  Anything else makes the segment text, with one leading ``\\n`` (the empty
  metadata line) removed.  Whitespace-only text at a segment start that is followed by
  nothing is dropped.
* A call's arguments are the model's own JSON text from ``{`` to the matching ``}``,
  streamed as it arrives (strings, escapes and depth are tracked incrementally).  When the
  object closes, ``ToolCallEnd`` is emitted; if the closed text fails ``json.loads`` the
  call is still reported with the model's text as arguments and its index is listed in
  :attr:`GLMCallParser.invalid_calls` (the API layer decides what to do with it).
* Output that ends inside a call's object: no ``ToolCallEnd``, ``incomplete_call`` is True.
* Built-in tools (``python``, ``simple_browser``, ``cogview``) declared under that name:
  when the body after ``name\\n`` does not start with ``{`` it is raw text up to the next
  ``<|assistant|>`` or the end; the call's arguments are ``{"input": "<raw body>"}``
  (:data:`BUILTIN_ARG_KEY`), streamed as escaped fragments.  A body starting with ``{`` is
  parsed as an ordinary JSON call (so a user function that happens to be called
  ``python`` with a JSON schema still works).
* A ``<|assistant|>`` inside a call's JSON is taken as argument text (the object then
  usually never closes and ``incomplete_call`` reports it).
"""

from __future__ import annotations

import json
import re
from typing import ClassVar, Iterable, Sequence

from glmserve.formats.base import (
    ChatFormat,
    ChatRequest,
    Constraint,
    Event,
    ReasoningEvent,
    StreamParser,
    TextEvent,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)

ASSISTANT = "<|assistant|>"
THINK_END = "</think>"
BUILTIN_TOOLS = frozenset({"python", "simple_browser", "cogview"})
BUILTIN_ARG_KEY = "input"
"""Key of the JSON object that wraps a built-in tool's raw (non-JSON) body."""
MAX_LEAD_WS = 4
MAX_NAME_SPACES = 4
_WS = " \t\r\n"

# --------------------------------------------------------------------------- scanners

_STR_SPECIAL = re.compile(r'["\\]')
_STRUCT = re.compile(r'["{}\[\]]')
_ATOM_END = re.compile(r'[,}\]\s]')


class ValueScanner:
    """Finds where one JSON value ends, fed in pieces, in O(new text).

    Call :meth:`feed` with the first piece positioned at the value's first character.
    It only tracks strings, escapes and nesting; it does not validate.
    """

    __slots__ = ("kind", "depth", "in_str", "esc", "done")

    def __init__(self) -> None:
        self.kind: str | None = None  # "c" container, "s" string, "a" atom
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.done = False

    def feed(self, s: str, pos: int = 0) -> int:
        """Index in ``s`` just past the value's end, or -1 when it has not ended yet."""
        n = len(s)
        i = pos
        if i >= n:
            return -1
        if self.kind is None:
            c = s[i]
            if c in "{[":
                self.kind, self.depth = "c", 1
                i += 1
            elif c == '"':
                self.kind, self.in_str = "s", True
                i += 1
            else:
                self.kind = "a"
        if self.kind == "a":
            m = _ATOM_END.search(s, i)
            if m:
                self.done = True
                return m.start()
            return -1
        while i < n:
            if self.esc:
                self.esc = False
                i += 1
                continue
            if self.in_str:
                m = _STR_SPECIAL.search(s, i)
                if not m:
                    return -1
                i = m.start()
                if s[i] == "\\":
                    self.esc = True
                    i += 1
                    continue
                self.in_str = False
                i += 1
                if self.kind == "s":
                    self.done = True
                    return i
                continue
            m = _STRUCT.search(s, i)
            if not m:
                return -1
            i = m.start()
            c = s[i]
            i += 1
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i
        return -1


def partial_suffix(s: str, marker: str) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(s)), 0, -1):
        if marker.startswith(s[-k:]):
            return k
    return 0


class MarkerScanner:
    """Finds a marker in streamed text, holding back only a possible partial marker."""

    __slots__ = ("marker", "held")

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.held = ""

    def scan(self, s: str, pos: int) -> tuple[str, int, bool]:
        """Returns ``(text before the marker or safe to emit, new position, found)``.

        When found, the position is just past the marker.  When not found, all of ``s``
        from ``pos`` is consumed (part of it may now be held).
        """
        m = self.marker
        L = len(m)
        emitted = ""
        if self.held:
            held = self.held
            t = held + s[pos : pos + L]
            i = t.find(m)
            if 0 <= i < len(held):
                self.held = ""
                return held[:i], pos + i + L - len(held), True
            if len(s) - pos < L:
                k = partial_suffix(t, m)
                self.held = t[len(t) - k :] if k else ""
                return t[: len(t) - k], len(s), False
            self.held = ""
            emitted = held
        i = s.find(m, pos)
        if i >= 0:
            return emitted + s[pos:i], i + L, True
        tail = s[max(pos, len(s) - L + 1) :]
        k = partial_suffix(tail, m)
        end = len(s) - k
        self.held = s[end:]
        return emitted + s[pos:end], len(s), False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# --------------------------------------------------------------------------- GLM parser

_REASONING, _SEG, _TEXT, _CALL, _BUILTIN = range(5)


def _builtin_escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


class GLMCallParser(StreamParser):
    """Streaming parser of ``name\\n{json}`` output (see the module docstring)."""

    def __init__(self, tool_names: Iterable[str], builtins: Iterable[str] = (), reasoning: bool = False) -> None:
        self.names: list[str] = sorted(set(tool_names), key=len, reverse=True)
        self.builtins = frozenset(builtins) & frozenset(self.names)
        self.max_pending = (max((len(n) for n in self.names), default=0) + 2 * MAX_LEAD_WS + MAX_NAME_SPACES + 2)
        self.state = _REASONING if reasoning else _SEG
        self.after_think = False  # at the segment right after </think>
        self.pending = ""
        self.marker = MarkerScanner(THINK_END if reasoning else ASSISTANT)
        self.index = -1
        self.scanner: ValueScanner | None = None
        self.args: list[str] = []
        self.invalid_calls: list[int] = []
        self._incomplete = False

    # -- public
    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        self._process(text, out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self.state == _REASONING:
            self._emit(out, ReasoningEvent(self.marker.flush()))
        elif self.state == _SEG:
            p = self.pending
            self.pending = ""
            if p.strip(_WS):
                self.state = _TEXT
                self._process(p[1:] if p.startswith("\n") else p, out)
                self._emit(out, TextEvent(self.marker.flush()))
        elif self.state == _TEXT:
            self._emit(out, TextEvent(self.marker.flush()))
        elif self.state == _CALL:
            self._incomplete = True
        elif self.state == _BUILTIN:
            self._emit(out, ToolCallArgs(self.index, _builtin_escape(self.marker.flush()) + '"}'))
            out.append(ToolCallEnd(self.index))
        return out

    @property
    def incomplete_call(self) -> bool:
        return self._incomplete

    # -- internals
    @staticmethod
    def _emit(out: list[Event], ev: Event) -> None:
        if isinstance(ev, (TextEvent, ReasoningEvent)) and not ev.text:
            return
        if isinstance(ev, ToolCallArgs) and not ev.delta:
            return
        out.append(ev)

    def _process(self, s: str, out: list[Event]) -> None:
        pos = 0
        n = len(s)
        while pos < n:
            st = self.state
            if st == _REASONING:
                text, pos, found = self.marker.scan(s, pos)
                self._emit(out, ReasoningEvent(text))
                if found:
                    self.state = _SEG
                    self.after_think = True
                    self.marker = MarkerScanner(ASSISTANT)
            elif st == _TEXT:
                text, pos, found = self.marker.scan(s, pos)
                self._emit(out, TextEvent(text))
                if found:
                    self.state = _SEG
            elif st == _BUILTIN:
                text, pos, found = self.marker.scan(s, pos)
                self._emit(out, ToolCallArgs(self.index, _builtin_escape(text)))
                if found:
                    self._emit(out, ToolCallArgs(self.index, '"}'))
                    out.append(ToolCallEnd(self.index))
                    self.state = _SEG
            elif st == _CALL:
                assert self.scanner is not None
                end = self.scanner.feed(s, pos)
                piece = s[pos:] if end < 0 else s[pos:end]
                self.args.append(piece)
                self._emit(out, ToolCallArgs(self.index, piece))
                if end < 0:
                    pos = n
                else:
                    pos = end
                    self._close_call(out)
            else:  # _SEG: classify a bounded amount of text
                if self.after_think:
                    # GLM-Z1: whitespace right after </think> is layout, not content.
                    while pos < n and s[pos] in _WS:
                        pos += 1
                    if pos >= n:
                        break
                    self.after_think = False
                self.pending += s[pos]
                pos += 1
                self._classify(out)

    def _close_call(self, out: list[Event]) -> None:
        text = "".join(self.args)
        try:
            json.loads(text)
        except ValueError:
            self.invalid_calls.append(self.index)
        out.append(ToolCallEnd(self.index))
        self.args = []
        self.scanner = None
        self.state = _SEG

    def _classify(self, out: list[Event]) -> None:
        """Decide what the pending segment start is, once that is certain."""
        p = self.pending
        verdict = self._verdict(p)
        if verdict is None:
            return
        kind, name, start = verdict
        self.pending = ""
        if kind == "text":
            self.state = _TEXT
            self.marker = MarkerScanner(ASSISTANT)
            self._process(p[1:] if p.startswith("\n") else p, out)
            return
        self.index += 1
        out.append(ToolCallStart(self.index, name))
        if kind == "call":
            self.state = _CALL
            self.scanner = ValueScanner()
            self.args = []
            self._process(p[start:], out)  # the "{"
        else:  # builtin raw body
            self.state = _BUILTIN
            self.marker = MarkerScanner(ASSISTANT)
            self._emit(out, ToolCallArgs(self.index, '{"' + BUILTIN_ARG_KEY + '": "'))
            self._process(p[start:], out)

    def _verdict(self, p: str) -> tuple[str, str, int] | None:
        """None: undecided; else (kind, name, offset where the body starts)."""
        lead = 0
        while lead < len(p) and p[lead] in _WS:
            lead += 1
        if lead > MAX_LEAD_WS:
            return ("text", "", 0)
        if lead == len(p):
            return None
        rest = p[lead:]
        undecided = False
        for name in self.names:
            if len(rest) <= len(name):
                if name.startswith(rest):
                    undecided = True
                continue
            if not rest.startswith(name):
                continue
            j = len(name)
            sp = 0
            while j < len(rest) and rest[j] == " ":
                j += 1
                sp += 1
            if sp > MAX_NAME_SPACES:
                continue
            if j == len(rest):
                undecided = True
                continue
            if rest[j] != "\n":
                continue
            j += 1
            body = j
            ws = 0
            while j < len(rest) and rest[j] in _WS:
                j += 1
                ws += 1
            if j == len(rest):
                if ws <= MAX_LEAD_WS:
                    undecided = True
                elif name in self.builtins:
                    return ("builtin", name, lead + body)
                continue
            if rest[j] == "{" and ws <= MAX_LEAD_WS:
                return ("call", name, lead + j)
            if name in self.builtins:
                return ("builtin", name, lead + body)
        if undecided and len(p) <= self.max_pending:
            return None
        return ("text", "", 0)


# --------------------------------------------------------------------------- format base


class GLMJsonFormat(ChatFormat):
    """What glm4 / glm4-0414 / glmz1 share: stops, parser and constraints."""

    stop: ClassVar[tuple[str, ...]] = ("<|endoftext|>", "<|user|>", "<|observation|>")
    skip_special_tokens: ClassVar[bool] = False
    reasoning: ClassVar[bool] = False
    """Whether output starts inside a reasoning block (GLM-Z1)."""

    def parser(self, request: ChatRequest) -> StreamParser:
        tools = request.tools_in_prompt
        names = [t.name for t in tools]
        builtins = [t.name for t in tools if t.name in BUILTIN_TOOLS]
        return GLMCallParser(names, builtins, reasoning=self.reasoning)

    def constraint(self, request: ChatRequest) -> Constraint | None:
        from glmserve.formats.grammar import glm_constraint

        return glm_constraint(request, reasoning=self.reasoning)

    def control_tokens(self) -> tuple[str, ...]:
        return ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")


def history_entries(messages: Sequence[dict], strip_reasoning: bool = False) -> list[tuple[str, str, str]]:
    """OpenAI messages -> GLM ``(role, metadata, content)`` turns.

    An assistant message renders its text (if any, or if it has no calls) and then one
    turn per tool call with the function name as metadata; ``tool`` becomes
    ``observation``.  ``strip_reasoning`` drops ``<think>...</think>`` from past
    assistant text (GLM-Z1 keeps no past reasoning).
    """
    out: list[tuple[str, str, str]] = []
    for m in messages:
        role = m.get("role")
        content = m.get("content")
        content = "" if content is None else str(content)
        if role in ("system", "user", "observation"):
            out.append((role, "", content))
        elif role == "tool":
            out.append(("observation", "", content))
        elif role == "assistant":
            if strip_reasoning and "</think>" in content:
                content = content.split("</think>")[-1].strip()
            calls = m.get("tool_calls") or []
            if content or not calls:
                out.append(("assistant", "", content))
            for call in calls:
                fn = call.get("function", call)
                args = fn.get("arguments", "")
                if not isinstance(args, str):
                    args = json.dumps(args, ensure_ascii=False)
                out.append(("assistant", fn["name"], args))
        else:
            raise ValueError(f"unsupported message role {role!r}")
    return out


TOOL_SENTENCE = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def tool_block_body(request: ChatRequest) -> str:
    """``\\n## name\\n\\n{function JSON, indent 4}\\n<sentence>`` for every prompt tool."""
    parts = []
    for tool in request.tools_in_prompt:
        fn = tool.function
        parts.append(f"\n## {fn.get('name', tool.name)}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n{TOOL_SENTENCE}")
    return "".join(parts)
