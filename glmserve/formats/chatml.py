"""ChatML with Hermes/Qwen2.5-style tool calls (default embedded model: SmolLM2-135M-Instruct).

Without tools the prompt is exactly SmolLM2-Instruct's own template (its default system
message when the conversation has none).  With tools the system message gets the
Qwen2.5 ``# Tools`` section (``<tools></tools>``, one JSON per line) and calls are
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; results go back as
``<tool_response>`` blocks inside a user turn.  In SmolLM2 the Hermes markers are plain
text, so only ``<|im_start|>`` / ``<|im_end|>`` are control tokens.

Parser decisions (deterministic, split-independent):

* Text streams immediately; only a partial ``<tool_call>`` is held back.  Whitespace
  between a ``</tool_call>`` (or the start of output) and the next ``<tool_call>`` is
  layout and dropped; whitespace-only text after the last call is dropped.
* Inside ``<tool_call>`` the outer object is parsed incrementally.  ``ToolCallStart``
  comes once a declared ``name`` is read; an object ``arguments`` value is streamed as
  the model's raw JSON text.  ``arguments`` given as a JSON *string* is decoded when it
  holds a JSON object (else kept raw), ``null`` becomes ``{}``; a missing ``arguments``
  gives ``{}``.  ``arguments`` before ``name`` is buffered until the name is known.
* Malformed block before a call started, an undeclared name, or no name: the whole block,
  ``<tool_call>`` included, is text.  Malformed text after the call started: the call is
  closed and the rest is text.  Output ending inside an object whose call started:
  ``incomplete_call``, the arguments being the raw JSON prefix streamed so far.  At a cut
  (``finish(cut=True)``) a block whose name is not read yet and a partial ``<tool_call>``
  are dropped (a natural end keeps them as text).  The closing ``</tool_call>`` may be
  missing at the very end.
"""

from __future__ import annotations

import json
from typing import ClassVar, Iterable

from glmserve.formats import freeform, grammar
from glmserve.formats.base import (
    CALL_CLOSE,
    CALL_OPEN,
    ChatFormat,
    ChatRequest,
    Constraint,
    Control,
    Event,
    Prompt,
    StreamParser,
    TextEvent,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    Tool,
    referenced_definitions,
)
from glmserve.formats.scan import WS, MarkerScanner, ValueScanner

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOOLS_PREAMBLE = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _call_json(name: str, arguments: object) -> str:
    """``{"name": ..., "arguments": ...}`` with the arguments text kept as written."""
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
            args_text = arguments
        except ValueError:
            args_text = json.dumps(arguments, ensure_ascii=False)
    else:
        args_text = json.dumps(arguments, ensure_ascii=False)
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + args_text + "}"


def _tool_json(tool: Tool) -> str:
    """One line of the ``<tools>`` section (``defer_loading`` left out: it means nothing to the
    model).  A ``tool_reference`` result shows the tools it names in the same lines, inside
    ``<tools>``…``</tools>`` in its ``<tool_response>`` (the template has no rule for it)."""
    fn = {k: v for k, v in tool.function.items() if k != "defer_loading"}
    return json.dumps({"type": "function", "function": fn}, ensure_ascii=False)


class ChatMLFormat(ChatFormat):
    name = "chatml"
    stop: ClassVar[tuple[str, ...]] = (IM_END, "<|endoftext|>")
    skip_special_tokens: ClassVar[bool] = True

    def render(self, request: ChatRequest) -> Prompt:
        p = Prompt()
        msgs = request.messages
        tools = request.listed_tools
        start = 0
        if msgs and msgs[0].get("role") == "system":
            system = "" if msgs[0].get("content") is None else str(msgs[0]["content"])
            start = 1
        else:
            system = DEFAULT_SYSTEM
        if tools:
            lines = "".join("\n" + _tool_json(t) for t in tools)
            system = system + TOOLS_PREAMBLE + lines + TOOLS_POSTAMBLE
        p.add(Control(IM_START), "system\n" + system, Control(IM_END), "\n")
        i = start
        while i < len(msgs):
            m = msgs[i]
            role = m.get("role")
            content = "" if m.get("content") is None else str(m["content"])
            if role in ("user", "system"):
                p.add(Control(IM_START), f"{role}\n{content}", Control(IM_END), "\n")
            elif role == "assistant":
                body = content
                calls = m.get("tool_calls") or []
                if calls:
                    body = ("\n" + content if content else "")
                    for c in calls:
                        fn = c.get("function", c)
                        body += f"\n{CALL_OPEN}\n{_call_json(fn['name'], fn.get('arguments', '{}'))}\n{CALL_CLOSE}"
                    p.add(Control(IM_START), "assistant" + body, Control(IM_END), "\n")
                else:
                    p.add(Control(IM_START), "assistant\n" + body, Control(IM_END), "\n")
            elif role in ("tool", "observation"):
                text = "user"
                while i < len(msgs) and msgs[i].get("role") in ("tool", "observation"):
                    c = msgs[i].get("content")
                    refs = referenced_definitions(msgs[i], request.tools_in_prompt, lambda t: _tool_json(t) + "\n",
                                                  joiner="\n")
                    c = refs if refs is not None else c
                    text += f"\n<tool_response>\n{'' if c is None else c}\n</tool_response>"
                    i += 1
                p.add(Control(IM_START), text, Control(IM_END), "\n")
                continue
            else:
                raise ValueError(f"unsupported message role {role!r}")
            i += 1
        if request.add_generation_prompt:
            p.add(Control(IM_START), "assistant\n")
        return p

    def parser(self, request: ChatRequest) -> StreamParser:
        return HermesParser([t.name for t in request.tools_in_prompt])

    def constraint(self, request: ChatRequest) -> Constraint | None:
        return grammar.build(request, "chatml", grammar.json_schema_check, _build_chatml)

    def control_tokens(self) -> tuple[str, ...]:
        return (IM_START, IM_END)


# --------------------------------------------------------------------------- constraint
#
# ``C = "<tool_call>\n{\"name\": \"N\", \"arguments\": " args "}\n</tool_call>"``;
# required: ``C ("\n" C)*`` (``C`` when ``parallel_tool_calls`` is false); named: exactly
# that call; auto: free text with triggered tags on ``<tool_call>``.

CALL_END = "}\n" + CALL_CLOSE


def call_begin(name: str) -> str:
    """What a Hermes call of ``name`` writes before its arguments object."""
    return CALL_OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


@grammar.cached(maxsize=256)
def _build_chatml(key: str) -> str:
    from xgrammar import structural_tag as st

    spec = json.loads(key)
    custom = grammar.custom_grammars(spec)  # custom tools' input held to their grammar (formats.freeform)
    tags = [
        st.TagFormat(
            begin=call_begin(name),
            content=freeform.json_arguments(name, *custom[name]) if name in custom else
            st.GrammarFormat(grammar=grammar.schema_grammar(grammar.canonical(params))),
            end=CALL_END,
        )
        for name, params in spec["tools"]
    ]
    if spec["choice"] == "auto":
        return grammar.compile_format(
            st.TriggeredTagsFormat(triggers=[CALL_OPEN], tags=tags, stop_after_first=not spec["parallel"])
        )
    one = grammar.one_of(tags)
    if spec["choice"] == "named" or not spec["parallel"]:
        return grammar.compile_format(one)
    more = st.StarFormat(content=st.SequenceFormat(elements=[st.ConstStringFormat(value="\n"), one]))
    return grammar.compile_format(st.SequenceFormat(elements=[one, more]))


# --------------------------------------------------------------------------- parser

_TEXT, _LEADWS, _OBJ = range(3)
# object sub-states
(_O_OPEN, _O_KEY_OR_END, _O_KEY_START, _O_KEY, _O_COLON, _O_VALUE_START, _O_VALUE, _O_COMMA_OR_END,
 _O_CLOSE_TAG) = range(9)


class HermesParser(StreamParser):
    """Streaming parser of ``<tool_call>\\n{json}\\n</tool_call>`` blocks in text."""

    def __init__(self, tool_names: Iterable[str]) -> None:
        self.names = frozenset(tool_names)
        self.state = _LEADWS
        self.ws = ""  # held layout whitespace
        self.marker = MarkerScanner(CALL_OPEN)
        self.index = -1
        self._reset_obj()

    def _reset_obj(self) -> None:
        self.o = _O_OPEN
        self.raw: list[str] = []  # block text after <tool_call> (for the text fallback)
        self.key = ""
        self.key_esc = False
        self.name: str | None = None
        self.started = False
        self.args_raw: list[str] | None = None  # buffered arguments text
        self.args_done = False
        self.streaming = False
        self.scanner: ValueScanner | None = None
        self.value_raw: list[str] = []
        self.tag = ""

    def finish(self, cut: bool = False) -> list[Event]:
        out: list[Event] = []
        if self.state == _TEXT:
            held = self.marker.flush()
            if not cut:  # at a cut, a partial <tool_call> was becoming a call
                self._text(out, held)
        elif self.state == _LEADWS:
            self.ws = ""  # trailing layout whitespace
        else:  # inside a block
            if self.o == _O_CLOSE_TAG:
                pass  # call complete; missing closing tag tolerated
            elif self.started:
                self._incomplete = True
            elif cut and self.name is None:
                self._incomplete = True  # a call whose name was still coming: dropped
            else:  # not a call (undeclared name), or the model ended here: text
                self._fail(out, "")  # re-read as text, which may hold or open a block again
                out += self.finish(cut)
        return out

    # -- helpers
    def _text(self, out: list[Event], text: str) -> None:
        if text:
            if self.ws:
                text, self.ws = self.ws + text, ""
            out.append(TextEvent(text))

    def _fail(self, out: list[Event], rest: str) -> None:
        """Block is not a call: it is text (re-scanned for another <tool_call>)."""
        raw = "".join(self.raw)
        self._reset_obj()
        self.state = _TEXT
        self.marker = MarkerScanner(CALL_OPEN)
        self._text(out, CALL_OPEN)
        self._process(raw + rest, out)

    def _start(self, out: list[Event]) -> None:
        self.index += 1
        self.started = True
        out.append(ToolCallStart(self.index, self.name or ""))
        if self.args_raw is not None and self.args_done:
            out.append(ToolCallArgs(self.index, self._final_args("".join(self.args_raw))))

    @staticmethod
    def _final_args(raw: str) -> str:
        s = raw.strip(WS)
        if s.startswith('"'):
            try:
                inner = json.loads(s)
                if isinstance(json.loads(inner), dict):
                    return inner
            except (ValueError, TypeError):
                pass
            return s
        if s == "null":
            return "{}"
        return s

    def _end_call(self, out: list[Event]) -> None:
        if not self.args_done and not self.streaming:
            out.append(ToolCallArgs(self.index, "{}"))
        out.append(ToolCallEnd(self.index))

    # -- main loop
    def _process(self, s: str, out: list[Event]) -> None:
        pos = 0
        n = len(s)
        while pos < n:
            if self.state == _LEADWS:
                while pos < n and s[pos] in WS:
                    self.ws += s[pos]
                    pos += 1
                if pos >= n:
                    break
                self.state = _TEXT
            if self.state == _TEXT:
                text, pos, found = self.marker.scan(s, pos)
                self._text(out, text)
                if found:
                    self.ws = ""  # layout whitespace before a call
                    self.state = _OBJ
                    self._reset_obj()
                continue
            pos = self._obj_step(s, pos, out)

    def _obj_step(self, s: str, pos: int, out: list[Event]) -> int:
        """Advance inside a ``<tool_call>`` block; returns the new position."""
        o = self.o
        c = s[pos]
        if o == _O_VALUE:
            assert self.scanner is not None
            end = self.scanner.feed(s, pos)
            piece = s[pos:] if end < 0 else s[pos:end]
            self.raw.append(piece)
            if self.streaming:
                if piece:
                    out.append(ToolCallArgs(self.index, piece))
            elif self.key in ("arguments", "name"):
                self.value_raw.append(piece)
            if end < 0:
                return len(s)
            self._value_done(out)
            return end
        if o == _O_CLOSE_TAG:
            self.tag += c
            stripped = self.tag.lstrip(WS)
            if CALL_CLOSE.startswith(stripped) or not stripped:
                if stripped == CALL_CLOSE:
                    self._reset_obj()
                    self.state = _LEADWS
                    self.marker = MarkerScanner(CALL_OPEN)
                return pos + 1
            # not a closing tag: the call stands, the rest is text
            rest = self.tag
            self._reset_obj()
            self.state = _TEXT
            self.marker = MarkerScanner(CALL_OPEN)
            self._process(rest, out)
            return pos + 1
        self.raw.append(c)
        if o == _O_KEY:
            if self.key_esc:
                self.key_esc = False
                self.key += c
            elif c == "\\":
                self.key_esc = True
                self.key += c
            elif c == '"':
                try:
                    self.key = json.loads('"' + self.key + '"')
                except ValueError:
                    pass
                self.o = _O_COLON
            else:
                self.key += c
            return pos + 1
        if c in WS:
            return pos + 1
        if o == _O_OPEN:
            if c == "{":
                self.o = _O_KEY_OR_END
                return pos + 1
        elif o in (_O_KEY_OR_END, _O_KEY_START):
            if c == '"':
                self.o = _O_KEY
                self.key = ""
                return pos + 1
            if c == "}" and o == _O_KEY_OR_END:
                return self._obj_done(out, pos + 1)
        elif o == _O_COLON:
            if c == ":":
                self.o = _O_VALUE_START
                return pos + 1
        elif o == _O_VALUE_START:
            self.raw.pop()
            self.o = _O_VALUE
            self.scanner = ValueScanner()
            self.value_raw = []
            if self.key == "arguments" and self.args_raw is None:
                if self.started and c == "{":
                    self.streaming = True
            elif self.key == "arguments" or (self.key == "name" and self.name is not None):
                self.key = ""  # duplicate key: skip its value
            return pos
        elif o == _O_COMMA_OR_END:
            if c == ",":
                self.o = _O_KEY_START
                return pos + 1
            if c == "}":
                return self._obj_done(out, pos + 1)
        # syntax error
        if self.started:
            self.raw.pop()
            self._end_call(out)
            self._reset_obj()
            self.state = _TEXT
            self.marker = MarkerScanner(CALL_OPEN)
            return pos
        self._fail(out, s[pos + 1 :])
        return len(s)

    def _value_done(self, out: list[Event]) -> None:
        self.o = _O_COMMA_OR_END
        if self.key == "name":
            try:
                name = json.loads("".join(self.value_raw))
            except ValueError:
                name = None
            if not isinstance(name, str) or name not in self.names:
                self.name = ""  # marks "not a call"
                return
            self.name = name
            self._start(out)
        elif self.key == "arguments":
            self.args_done = True
            if self.streaming:
                return
            self.args_raw = self.value_raw
            if self.started:
                out.append(ToolCallArgs(self.index, self._final_args("".join(self.args_raw))))

    def _obj_done(self, out: list[Event], pos: int) -> int:
        if not self.started:
            self._fail_at_end(out)
            return pos
        self._end_call(out)
        self.o = _O_CLOSE_TAG
        self.tag = ""
        return pos

    def _fail_at_end(self, out: list[Event]) -> None:
        raw = "".join(self.raw)
        self._reset_obj()
        self.state = _TEXT
        self.marker = MarkerScanner(CALL_OPEN)
        self._text(out, CALL_OPEN)
        self._process(raw, out)
