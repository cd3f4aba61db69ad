"""Shared machinery of the JSON-call formats (glm-4-9b-chat, GLM-4-0414, GLM-Z1).

These models write a tool call as ``{name}\\n{json object}``; several calls follow each
other separated by ``<|assistant|>`` (or run together when special tokens are skipped),
and a plain answer starts with ``\\n`` (the empty metadata line).  This module holds the
streaming parser for that layout, its decoding constraint and the ``ChatFormat`` base
that the three GLM JSON formats share.

Parser decisions (deterministic, independent of how the output is split):

* A *segment* starts at the beginning of the output, after ``<|assistant|>``, and after
  a call's closing ``}``.  At a segment start up to :data:`MAX_LEADWS` whitespace
  characters, a declared name, up to :data:`MAX_NAME_SPACES` spaces (GLM-4-0414 history
  writes ``name \\n``), ``\\n``, up to :data:`MAX_LEADWS` whitespace and ``{`` make a
  call.  Anything else makes the segment text, with one leading ``\\n`` (the empty
  metadata line) removed.  Whitespace-only text at a segment start that is followed by
  nothing is dropped.
* A call's arguments are the model's own JSON text from ``{`` to the matching ``}``,
  streamed as it arrives (strings, escapes and depth are tracked incrementally).  When the
  object closes, ``ToolCallEnd`` is emitted; if the closed text fails ``json.loads`` the
  call is still reported with the model's text as arguments (the API layer checks it).
* Output that ends inside a call's object: no ``ToolCallEnd``, ``incomplete_call`` is True;
  its arguments are the raw JSON prefix streamed so far.  At a cut (``finish(cut=True)``) a
  built-in call's raw body is cut too (not closed), and what is still undecided (a segment
  start that could become a call, a partial ``<|assistant|>`` / ``</think>``) is dropped;
  at a natural end it is text.
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
from typing import Any, ClassVar, Iterable, Sequence

from glmserve.formats import freeform, grammar
from glmserve.formats.base import (
    THINK_CLOSE,
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
    Tool,
    referenced_definitions,
)
from glmserve.formats.scan import WS, MarkerScanner, ValueScanner

ASSISTANT = "<|assistant|>"
BUILTIN_TOOLS = frozenset({"python", "simple_browser", "cogview"})
BUILTIN_ARG_KEY = "input"
"""Key of the JSON object that wraps a built-in tool's raw (non-JSON) body."""
MAX_LEADWS = 4
MAX_NAME_SPACES = 4

# --------------------------------------------------------------------------- GLM parser

_REASONING, _SEG, _TEXT, _CALL, _BUILTIN = range(5)


def _builtin_escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


class GLMCallParser(StreamParser):
    """Streaming parser of ``name\\n{json}`` output (see the module docstring)."""

    def __init__(self, tool_names: Iterable[str], builtins: Iterable[str] = (), reasoning: bool = False) -> None:
        self.names: list[str] = sorted(set(tool_names), key=len, reverse=True)
        self.builtins = frozenset(builtins) & frozenset(self.names)
        self.max_pending = (max((len(n) for n in self.names), default=0) + 2 * MAX_LEADWS + MAX_NAME_SPACES + 2)
        self.state = _REASONING if reasoning else _SEG
        self.after_think = False  # at the segment right after </think>
        self.pending = ""
        self.marker = MarkerScanner(THINK_CLOSE if reasoning else ASSISTANT)
        self.index = -1
        self.scanner: ValueScanner | None = None

    # -- public
    def finish(self, cut: bool = False) -> list[Event]:
        out: list[Event] = []
        held = "" if cut else self.marker.flush()  # a possible marker prefix: at a cut, a marker
        if self.state == _REASONING:
            self._emit(out, ReasoningEvent(held))
        elif self.state == _SEG:
            p = self.pending
            self.pending = ""
            if p.strip(WS) and cut:  # the undecided start could still have been a call
                self._incomplete = True
            elif p.strip(WS):
                self.state = _TEXT
                self._process(p[1:] if p.startswith("\n") else p, out)
                self._emit(out, TextEvent(self.marker.flush()))
        elif self.state == _TEXT:
            self._emit(out, TextEvent(held))
        elif self.state == _CALL:
            self._incomplete = True
        elif self.state == _BUILTIN:
            if cut:
                self._incomplete = True
            else:
                self._emit(out, ToolCallArgs(self.index, _builtin_escape(held) + '"}'))
                out.append(ToolCallEnd(self.index))
        return out

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
                self._emit(out, ToolCallArgs(self.index, piece))
                if end < 0:
                    pos = n
                else:
                    pos = end
                    self._close_call(out)
            else:  # _SEG: classify a bounded amount of text
                if self.after_think:
                    # GLM-Z1: whitespace right after </think> is layout, not content.
                    while pos < n and s[pos] in WS:
                        pos += 1
                    if pos >= n:
                        break
                    self.after_think = False
                self.pending += s[pos]
                pos += 1
                self._classify(out)

    def _close_call(self, out: list[Event]) -> None:
        out.append(ToolCallEnd(self.index))
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
            self._process(p[start:], out)  # the "{"
        else:  # builtin raw body
            self.state = _BUILTIN
            self.marker = MarkerScanner(ASSISTANT)
            self._emit(out, ToolCallArgs(self.index, '{"' + BUILTIN_ARG_KEY + '": "'))
            self._process(p[start:], out)

    def _verdict(self, p: str) -> tuple[str, str, int] | None:
        """None: undecided; else (kind, name, offset where the body starts)."""
        lead = 0
        while lead < len(p) and p[lead] in WS:
            lead += 1
        if lead > MAX_LEADWS:
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
            while j < len(rest) and rest[j] in WS:
                j += 1
                ws += 1
            if j == len(rest):
                if ws <= MAX_LEADWS:
                    undecided = True
                elif name in self.builtins:
                    return ("builtin", name, lead + body)
                continue
            if rest[j] == "{" and ws <= MAX_LEADWS:
                return ("call", name, lead + j)
            if name in self.builtins:
                return ("builtin", name, lead + body)
        if undecided and len(p) <= self.max_pending:
            return None
        return ("text", "", 0)


# --------------------------------------------------------------------------- constraint
#
# ``C`` = one call of any allowed tool: ``name "\n" args`` (args: the tool's schema as a
# grammar with no free whitespace).  required: ``C+`` (``C`` when ``parallel_tool_calls``
# is false); named: exactly that call; auto: ``"\n" any-text | C+``.  Calls run together
# without ``<|assistant|>`` (special tokens are never generated under a grammar); the
# parser accepts that.  A declared built-in with no ``parameters`` may also take a raw text
# body, as the last call only.  GLM-Z1: ``any-text-without-</think> "</think>"``, up to two
# ``\n``, then the same shape (the auto text branch without the leading ``\n``).


@grammar.cached(maxsize=256)
def _build_glm(key: str) -> str:
    from xgrammar import structural_tag as st

    spec = json.loads(key)
    reasoning = spec["family"] == "glmz1"
    custom = grammar.custom_grammars(spec)
    json_calls = []
    raw_calls = []
    for name, params in spec["tools"]:
        # a custom tool's input held to its grammar inside the JSON string (glmserve.formats.freeform)
        args = freeform.json_arguments(name, *custom[name]) if name in custom else \
            st.GrammarFormat(grammar=grammar.schema_grammar(grammar.canonical(params)))
        json_calls.append(st.SequenceFormat(elements=[st.ConstStringFormat(value=name + "\n"), args]))
        if name in BUILTIN_TOOLS and not params:
            raw_calls.append(
                st.SequenceFormat(elements=[st.ConstStringFormat(value=name + "\n"), st.AnyTextFormat()])
            )
    one = grammar.one_of(json_calls + raw_calls)
    calls: Any
    if spec["choice"] == "named" or not spec["parallel"]:
        calls = one
    elif raw_calls:
        calls = st.SequenceFormat(elements=[st.StarFormat(content=grammar.one_of(json_calls)), one])
    else:
        calls = st.PlusFormat(content=grammar.one_of(json_calls))
    if spec["choice"] == "auto":
        text = st.AnyTextFormat() if reasoning else st.SequenceFormat(
            elements=[st.ConstStringFormat(value="\n"), st.AnyTextFormat()]
        )
        body: Any = st.OrFormat(elements=[text, calls])
    else:
        body = calls
    if reasoning:
        body = st.SequenceFormat(
            elements=[
                st.AnyTextFormat(excludes=[THINK_CLOSE]),
                st.ConstStringFormat(value=THINK_CLOSE),
                # up to two newlines of layout, which the parser drops
                st.OptionalFormat(content=st.ConstStringFormat(value="\n")),
                st.OptionalFormat(content=st.ConstStringFormat(value="\n")),
                body,
            ]
        )
    return grammar.compile_format(body)


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
        return grammar.build(request, "glmz1" if self.reasoning else "glm", grammar.json_schema_check, _build_glm)

    def control_tokens(self) -> tuple[str, ...]:
        return ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")


def history_entries(messages: Sequence[dict], strip_reasoning: bool = False,
                    tools: Sequence[Tool] = ()) -> list[tuple[str, str, str]]:
    """OpenAI messages -> GLM ``(role, metadata, content)`` turns.

    An assistant message renders its text (if any, or if it has no calls) and then one
    turn per tool call with the function name as metadata; ``tool`` becomes
    ``observation``.  ``strip_reasoning`` drops ``<think>...</think>`` from past
    assistant text (GLM-Z1 keeps no past reasoning).  A result with ``tool_reference``
    parts shows the named ``tools`` (the callable ones) as the system block does, under
    the same ``# 可用工具`` heading (these templates have no rule of their own for it).
    """
    out: list[tuple[str, str, str]] = []
    for m in messages:
        role = m.get("role")
        content = m.get("content")
        content = "" if content is None else str(content)
        if role in ("system", "user", "observation"):
            out.append((role, "", content))
        elif role == "tool":
            body = referenced_definitions(dict(m), list(tools), tool_entry, open_="# 可用工具", close="", joiner="\n")
            out.append(("observation", "", content if body is None else body))
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


def tool_entry(tool: Tool) -> str:
    """``\\n## name\\n\\n{function JSON, indent 4}\\n<sentence>``: how these templates list a tool
    (``defer_loading`` left out: it means nothing to the model)."""
    fn = {k: v for k, v in tool.function.items() if k != "defer_loading"}
    return f"\n## {fn.get('name', tool.name)}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n{TOOL_SENTENCE}"


def tool_block_body(request: ChatRequest) -> str:
    """:func:`tool_entry` for every tool listed up front (deferred ones are shown where a
    ``tool_reference`` result names them)."""
    return "".join(tool_entry(t) for t in request.listed_tools)
