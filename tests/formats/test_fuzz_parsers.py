"""Fuzzing every format's parser.

hypothesis feeds every family's parser arbitrary text (fragments of all families'
markers, tool names, JSON punctuation, CJK) split at arbitrary points:

- with tools declared: nothing raises, the merged events do not depend on the split
  (the parser contract), calls name only declared tools, and (XML families) every
  finished call's arguments are a JSON object;
- with no tools declared: no text is lost -- the content and reasoning are exactly the
  input minus that family's own layout, as :func:`expected_without_tools` spells out.

The HTTP surface's fuzzing is ``tests/api/test_fuzz_api.py``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmserve.formats import FORMATS, get_format
from glmserve.formats.base import (
    ChatRequest,
    ReasoningEvent,
    TextEvent,
    Tool,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from glmserve.formats.xmlcall import write_call

from tool_sets import CHAT_TOOLS as TOOLS


# ----------------------------------------------------------------------------- parser fuzzing

PARSER_TOOLS = [Tool.from_openai(t) for t in TOOLS] + [
    Tool(name="python", raw={"type": "function", "function": {"name": "python"}}),
    Tool(name="get_weather_v2", parameters={"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                                                             "n": {"type": "integer"}}}),
]
NAMES = [t.name for t in PARSER_TOOLS]

MARKERS = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<think>",
           "</think>", "<tool_response>", "</tool_response>", "<|assistant|>", "<|observation|>", "<|user|>",
           "<|system|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "[gMASK]", "<sop>"]
FRAGMENTS = (
    MARKERS
    + [m[:k] for m in MARKERS for k in (1, 2, len(m) // 2, len(m) - 1)]  # partial markers
    + NAMES + [n[:3] for n in NAMES] + ["get_weather\n", "python\n", "unknown_tool", "unknown\n"]
    + ['{', '}', '[', ']', '"', ':', ',', '\\', '\\"', '"name"', '"arguments"', ': ', 'null', 'true', '123', '-1.5e3',
       '{"city": "北京"}', '{"name": "get_weather", "arguments": ', '"arguments": "{\\"q\\": 1}"']
    + ["\n", "\n\n", " ", "  ", "\t", "\r\n", "北京", "天气怎么样？", "😀", "é"]
    + [  # whole calls of every family, so the call paths run too
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "days": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}\n</tool_call>',
        'get_weather\n{"city": "上海"}', "search\n{}", "python\nprint(1)",
        write_call("get_weather", {"city": "北京", "days": 3}, newlines=True),
        write_call("get_weather_v2", {"unit": "c", "n": 5}, newlines=False),
        write_call("search", {"q": "a <b> & \"c\""}, newlines=False),
    ]
)

text_strategy = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=24).map("".join)

# (format, enable_thinking): every family, both thinking modes where the format has them
VARIANTS = [("chatml", True), ("glm4", True), ("glm4-0414", True), ("glmz1", True), ("glm45", True),
            ("glm45", False), ("glm47", True), ("glm47", False), ("glm51", True), ("glm53", True)]
assert {f for f, _ in VARIANTS} == set(FORMATS)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def run_parser(fmt_name: str, thinking: bool, tools: list[Tool], pieces: list[str], cut: bool = False):
    req = ChatRequest(messages=[], tools=tools, tool_choice="auto" if tools else "none", enable_thinking=thinking)
    parser = get_format(fmt_name).parser(req)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish(cut=cut)
    return merged(events), parser.incomplete_call


def merged(events: list) -> list:
    """Adjacent text / reasoning / same-call argument events joined; empty ones dropped."""
    out: list = []
    for e in events:
        if isinstance(e, (TextEvent, ReasoningEvent)):
            if not e.text:
                continue
            if out and type(out[-1]) is type(e):
                out[-1] = type(e)(out[-1].text + e.text)
                continue
        elif isinstance(e, ToolCallArgs):
            if not e.delta:
                continue
            if out and isinstance(out[-1], ToolCallArgs) and out[-1].index == e.index:
                out[-1] = ToolCallArgs(e.index, out[-1].delta + e.delta)
                continue
        out.append(e)
    return out


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("fmt_name, thinking", VARIANTS, ids=[f"{f}-think" if t else f"{f}-nothink" for f, t in VARIANTS])
@FUZZ
@given(text=text_strategy, cuts=st.lists(st.integers(0, 400), max_size=12), per_char=st.booleans(),
       cut=st.booleans())
def test_parser_with_tools_is_total_and_split_independent(fmt_name, thinking, text, cuts, per_char, cut):
    pieces = list(text) if per_char else split(text, cuts)
    events, incomplete = run_parser(fmt_name, thinking, PARSER_TOOLS, pieces, cut)
    whole, whole_incomplete = run_parser(fmt_name, thinking, PARSER_TOOLS, [text], cut)
    assert events == whole and incomplete == whole_incomplete
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.name in NAMES and e.index not in args
            args[e.index] = ""
        elif isinstance(e, ToolCallArgs):
            args[e.index] += e.delta
        elif isinstance(e, ToolCallEnd) and fmt_name in ("glm45", "glm47", "glm51", "glm53"):
            assert isinstance(json.loads(args[e.index]), dict), args[e.index]


WS = " \t\r\n"


def _glm_json_segments(rest: str) -> str:
    """GLM JSON families: ``<|assistant|>`` separates segments; one leading ``\\n`` of each
    (the empty metadata line) is dropped; a whitespace-only last segment of at most 4
    characters is dropped (it could still have become a call)."""
    segs = rest.split("<|assistant|>")
    out = []
    for i, seg in enumerate(segs):
        if i == len(segs) - 1 and not seg.strip(WS) and len(seg) <= 4:
            continue
        out.append(seg[1:] if seg.startswith("\n") else seg)
    return "".join(out)


def _drop_nl(s: str) -> str:
    return s[1:] if s.startswith("\n") else s


def expected_without_tools(fmt_name: str, thinking: bool, text: str) -> tuple[str, str]:
    """(content, reasoning) the parser must return for ``text`` when no tools are declared.

    * chatml: the text unchanged, except that whitespace-only output is dropped, and so is
      leading whitespace right before a ``<tool_call>`` (layout before a call).
    * glm4, glm4-0414: :func:`_glm_json_segments` of the text.
    * glmz1: reasoning up to the first ``</think>`` (all of it if none); after it, all
      leading whitespace is dropped, then :func:`_glm_json_segments`.
    * glm45 (thinking on): an opening ``<think>`` after any whitespace starts reasoning up
      to ``</think>``; otherwise all is content.  glm47 (thinking on) starts inside
      reasoning, and an opening ``<think>`` (after any whitespace) is dropped.
      With thinking off both start in content.  One ``\\n`` at the start of content is
      dropped (after ``</think>`` or at the start of the output).  Everything else,
      ``<tool_call>`` of an undeclared name, stray ``<think>``/``</think>`` included, is kept.
    """
    if fmt_name == "chatml":
        s = text.lstrip(WS)
        if not s:
            return "", ""
        return (s if s.startswith("<tool_call>") else text), ""
    if fmt_name in ("glm4", "glm4-0414"):
        return _glm_json_segments(text), ""
    if fmt_name == "glmz1":
        if "</think>" not in text:
            return "", text
        reasoning, rest = text.split("</think>", 1)
        return _glm_json_segments(rest.lstrip(WS)), reasoning
    start = "content"
    if thinking:
        # glm45: whitespace then <think> opens the reasoning; glm47 and the GLM-5 families are
        # already inside it, and drop a <think> (after whitespace) that repeats the prompt's opener.
        opened = text.lstrip(WS).startswith("<think>")
        if opened:
            text = text.lstrip(WS)[len("<think>"):]
        if opened or fmt_name in ("glm47", "glm51", "glm53"):
            start = "reasoning"
    if start == "reasoning":
        if "</think>" not in text:
            return "", text
        reasoning, rest = text.split("</think>", 1)
        return _drop_nl(rest), reasoning
    return _drop_nl(text), ""


@pytest.mark.parametrize("fmt_name, thinking", VARIANTS, ids=[f"{f}-think" if t else f"{f}-nothink" for f, t in VARIANTS])
@FUZZ
@given(text=text_strategy, cuts=st.lists(st.integers(0, 400), max_size=12), per_char=st.booleans())
def test_parser_without_tools_loses_no_text(fmt_name, thinking, text, cuts, per_char):
    pieces = list(text) if per_char else split(text, cuts)
    events, _ = run_parser(fmt_name, thinking, [], pieces)
    assert not any(isinstance(e, (ToolCallStart, ToolCallArgs, ToolCallEnd)) for e in events)
    content = "".join(e.text for e in events if isinstance(e, TextEvent))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningEvent))
    assert (content, reasoning) == expected_without_tools(fmt_name, thinking, text)


@pytest.mark.parametrize("fmt_name", ["glm45", "glm47"])
def test_think_close_ends_a_marker_that_never_became_a_call(fmt_name):
    """Found by the fuzzing above: ``<tool_call>`` in reasoning followed by ``</think>``
    before any name ended swallowed the ``</think>`` and the whole answer into reasoning."""
    text = "<think>plan <tool_call>x</think>\nthe answer" if fmt_name == "glm45" else "plan <tool_call>x</think>\nthe answer"
    for tools in ([], PARSER_TOOLS):
        for pieces in ([text], list(text)):
            events, _ = run_parser(fmt_name, True, tools, pieces)
            assert events == [ReasoningEvent("plan <tool_call>x"), TextEvent("the answer")]
