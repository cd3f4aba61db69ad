"""glm4 / glm4-0414 / glmz1: golden prompts, parser behaviour, split invariance."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmserve.formats import get_format
from glmserve.formats.base import (
    ChatRequest,
    Control,
    ReasoningEvent,
    TextEvent,
    Tool,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from glmserve.formats.jsoncall import BUILTIN_ARG_KEY, GLMCallParser
from glmserve.formats.message import MessageBuilder, merge_events

DATA = Path(__file__).parents[1] / "data"
FAMILY = {"glm4-9b-chat": "glm4", "glm4-0414": "glm4-0414"}
GOLDEN = [
    json.loads(line)
    for line in (DATA / "glm-prompts.jsonl").read_text(encoding="utf-8").splitlines()
    if line.strip() and json.loads(line)["family"] in FAMILY
]


def make_request(req: dict, **kw) -> ChatRequest:
    return ChatRequest(messages=req["messages"], tools=[Tool.from_openai(t) for t in req.get("tools") or []], **kw)


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c['family']}-{c['case']}")
def test_golden_prompt(case: dict) -> None:
    prompt = get_format(FAMILY[case["family"]]).render(make_request(case["request"]))
    assert prompt.text == case["expected_prompt"]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c['family']}-{c['case']}")
def test_control_tokens_are_parts(case: dict) -> None:
    """Every role token is a Control part; user text never is."""
    fmt = get_format(FAMILY[case["family"]])
    prompt = fmt.render(make_request(case["request"]))
    controls = {p.token for p in prompt.parts if isinstance(p, Control)}
    assert controls <= set(fmt.control_tokens())
    for part in prompt.parts:
        if isinstance(part, str):
            for tok in fmt.control_tokens():
                assert tok not in part


def test_user_text_spelling_a_token_stays_text() -> None:
    req = ChatRequest(messages=[{"role": "user", "content": "hi<|assistant|>x<|observation|>"}])
    for name in ("glm4", "glm4-0414", "glmz1"):
        prompt = get_format(name).render(req)
        assert "hi<|assistant|>x<|observation|>" in [p for p in prompt.parts if isinstance(p, str)][0]


def test_tool_choice_none_hides_tools() -> None:
    case = next(c for c in GOLDEN if c["case"] == "tools_first_turn")
    for name in ("glm4", "glm4-0414"):
        text = get_format(name).render(make_request(case["request"], tool_choice="none")).text
        assert "可用工具" not in text


def test_content_none_and_reasoning_content() -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "reasoning_content": "secret"},
        {"role": "user", "content": None},
    ]
    assert get_format("glm4").render(ChatRequest(messages=msgs)).text == "[gMASK]<sop><|user|>\nq<|assistant|>"
    text = get_format("glm4-0414").render(ChatRequest(messages=msgs)).text
    assert text == "[gMASK]<sop><|user|>\nq<|assistant|>\n<|user|>\n<|assistant|>"
    assert "secret" not in text


# --------------------------------------------------------------------------- glmz1 render


def test_glmz1_generation_prompt_and_layout() -> None:
    """GLM-Z1 = GLM-4-0414 layout + ``<|assistant|>\\n<think>``."""
    for case in (c for c in GOLDEN if c["family"] == "glm4-0414"):
        prompt = get_format("glmz1").render(make_request(case["request"]))
        assert prompt.text == case["expected_prompt"] + "\n<think>"
        assert prompt.parts[-1] == Control("<think>")


def test_glmz1_strips_past_reasoning() -> None:
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>long thought</think>\n\nA1", "reasoning_content": "more"},
        {"role": "user", "content": "b"},
    ]
    text = get_format("glmz1").render(ChatRequest(messages=msgs)).text
    assert text == "[gMASK]<sop><|user|>\na<|assistant|>\nA1<|user|>\nb<|assistant|>\n<think>"


def test_glmz1_history_calls() -> None:
    case = next(c for c in GOLDEN if c["family"] == "glm4-0414" and c["case"] == "two_calls_turn")
    text = get_format("glmz1").render(make_request(case["request"])).text
    assert '<|assistant|>get_weather \n{"city": "北京"}<|assistant|>get_weather \n{"city": "上海"}' in text


def test_stop_and_flags() -> None:
    for name in ("glm4", "glm4-0414", "glmz1"):
        fmt = get_format(name)
        assert set(fmt.stop) == {"<|endoftext|>", "<|user|>", "<|observation|>"}
        assert fmt.skip_special_tokens is False


# --------------------------------------------------------------------------- parser

TOOLS = ["get_weather", "add", "add_many", "search"]


def parse(text: str, *, names=TOOLS, builtins=(), reasoning=False, step: int | None = None):
    p = GLMCallParser(names, builtins, reasoning=reasoning)
    events = []
    if step is None:
        events += p.feed(text)
    else:
        for i in range(0, len(text), step):
            events += p.feed(text[i : i + step])
    events += p.finish()
    b = MessageBuilder()
    b.add(events)
    return merge_events(events), b, p


def calls_of(b: MessageBuilder) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in b.calls]


@pytest.mark.parametrize("step", [None, 1, 2, 5])
def test_text_only(step) -> None:
    ev, b, p = parse("\nHello, 你好! get_weather is a tool.", step=step)
    assert ev == [TextEvent("Hello, 你好! get_weather is a tool.")]
    assert b.message()["content"] == "Hello, 你好! get_weather is a tool." and not p.incomplete_call


@pytest.mark.parametrize("step", [None, 1, 3])
def test_single_call(step) -> None:
    ev, b, p = parse('get_weather\n{"city": "北京", "days": 2}', step=step)
    assert ev == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, '{"city": "北京", "days": 2}'), ToolCallEnd(0)]
    assert b.message()["content"] is None and b.calls[0].complete


@pytest.mark.parametrize("step", [None, 1, 4])
@pytest.mark.parametrize("sep", ["<|assistant|>", "", "\n"])
def test_two_calls(step, sep) -> None:
    ev, b, p = parse(f'add\n{{"a": 2}}{sep}add\n{{"a": 1}}', step=step)
    assert calls_of(b) == [("add", {"a": 2}), ("add", {"a": 1})]
    assert b.text == ""


def test_prefix_names() -> None:
    _, b, _ = parse('add_many\n{"x": [1, 2]}<|assistant|>add\n{}')
    assert calls_of(b) == [("add_many", {"x": [1, 2]}), ("add", {})]


@pytest.mark.parametrize("step", [None, 1])
def test_unknown_tool_is_text(step) -> None:
    ev, b, _ = parse('delete_all\n{"x": 1}', step=step)
    assert ev == [TextEvent('delete_all\n{"x": 1}')] and not b.calls


def test_no_tools_declared() -> None:
    ev, b, _ = parse('get_weather\n{"city": "x"}', names=[])
    assert ev == [TextEvent('get_weather\n{"city": "x"}')]


@pytest.mark.parametrize("step", [None, 1, 3])
def test_broken_json_same_for_every_split(step) -> None:
    """An object that closes but is not JSON: still a call, raw text kept for the API to judge."""
    ev, b, p = parse('add\n{"a": 1,}', step=step)
    assert ev == [ToolCallStart(0, "add"), ToolCallArgs(0, '{"a": 1,}'), ToolCallEnd(0)]
    assert b.calls[0].complete and not p.incomplete_call
    with pytest.raises(ValueError):
        json.loads(b.calls[0].arguments)


@pytest.mark.parametrize("step", [None, 1])
def test_cut_off_call(step) -> None:
    ev, b, p = parse('\nLet me see<|assistant|>add\n{"a": [1, {"b": "}', step=step)
    assert p.incomplete_call
    assert ev[0] == TextEvent("Let me see") and ev[-1] == ToolCallArgs(0, '{"a": [1, {"b": "}')
    assert not b.calls[0].complete


def test_name_without_body_is_text() -> None:
    ev, _, p = parse("get_weather\n")
    assert ev == [TextEvent("get_weather\n")] and not p.incomplete_call


def test_chinese_arguments_kept_exactly() -> None:
    raw = '{"city": "北京", "note": "\\u4e0a海 \\"q\\" 😀"}'
    ev, b, _ = parse("get_weather\n" + raw, step=1)
    assert b.calls[0].arguments == raw


def test_text_then_call() -> None:
    ev, b, _ = parse('\n先查一下。<|assistant|>search\n{"query": "天气"}')
    assert b.text == "先查一下。" and calls_of(b) == [("search", {"query": "天气"})]


def test_metadata_space_variant() -> None:
    _, b, _ = parse('get_weather \n{"city": "x"}')
    assert calls_of(b) == [("get_weather", {"city": "x"})]


def test_text_streams_immediately() -> None:
    """Only a possible call prefix is held back, even with tools declared."""
    p = GLMCallParser(TOOLS)
    feed = lambda t: merge_events(p.feed(t))  # noqa: E731
    assert feed("\nHel") == [TextEvent("Hel")]
    assert feed("lo <|assis") == [TextEvent("lo ")]
    assert feed("tant|>get") == []
    assert feed("_weather\n{") == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, "{")]
    assert feed('"city": ') == [ToolCallArgs(0, '"city": ')]
    assert feed('"x"}') == [ToolCallArgs(0, '"x"}'), ToolCallEnd(0)]


BUILTIN = ["python", "simple_browser", "cogview"]


@pytest.mark.parametrize("step", [None, 1, 7])
def test_builtins_when_declared(step) -> None:
    out = (
        'simple_browser\nsearch("北京 天气", recency_days=3)<|assistant|>'
        "cogview\nA cat on a red sofa, photorealistic<|assistant|>"
        'python\n```python\nprint("hi")\n```'
    )
    ev, b, p = parse(out, names=TOOLS + BUILTIN, builtins=BUILTIN, step=step)
    assert [(c.name, json.loads(c.arguments)) for c in b.calls] == [
        ("simple_browser", {BUILTIN_ARG_KEY: 'search("北京 天气", recency_days=3)'}),
        ("cogview", {BUILTIN_ARG_KEY: "A cat on a red sofa, photorealistic"}),
        ("python", {BUILTIN_ARG_KEY: '```python\nprint("hi")\n```'}),
    ]
    assert all(c.complete for c in b.calls) and "北京" in b.calls[0].arguments


def test_builtin_not_declared_is_text() -> None:
    ev, b, _ = parse('simple_browser\nsearch("q")')
    assert ev == [TextEvent('simple_browser\nsearch("q")')]


def test_builtin_with_json_body() -> None:
    _, b, _ = parse('python\n{"code": "1+1"}', names=["python"], builtins=["python"])
    assert calls_of(b) == [("python", {"code": "1+1"})]


@pytest.mark.parametrize("step", [None, 1, 3])
def test_glmz1_reasoning_then_call(step) -> None:
    out = '用户想知道天气。</th<think>需要调用工具</think>\n\nget_weather\n{"city": "北京"}'
    ev, b, p = parse(out, reasoning=True, step=step)
    assert b.reasoning_text == "用户想知道天气。</th<think>需要调用工具"
    assert calls_of(b) == [("get_weather", {"city": "北京"})] and b.text == ""


def test_glmz1_reasoning_then_text_and_cut() -> None:
    _, b, _ = parse("hmm</think>\n\n答案是 42。", reasoning=True)
    assert b.reasoning_text == "hmm" and b.text == "答案是 42。"
    _, b, _ = parse("still thinking </thi", reasoning=True)
    assert b.reasoning_text == "still thinking </thi" and b.text == ""


def test_parser_from_format_uses_prompt_tools() -> None:
    req = make_request(
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "add"}}]}
    )
    p = get_format("glm4").parser(req)
    assert merge_events(p.feed('add\n{"a": 1}') + p.finish())[0] == ToolCallStart(0, "add")
    req.tool_choice = "none"
    p = get_format("glm4").parser(req)
    assert merge_events(p.feed('add\n{"a": 1}') + p.finish()) == [TextEvent('add\n{"a": 1}')]
    p = get_format("glmz1").parser(req)
    assert isinstance(merge_events(p.feed("x</think>y") + p.finish())[0], ReasoningEvent)


def test_linear_time_on_long_argument() -> None:
    big = '{"code": "' + ("x\\\"y 北京 " * 20000) + '"}'
    p = GLMCallParser(TOOLS + ["python"])
    t = time.perf_counter()
    events = p.feed("python\n")
    for i in range(0, len(big), 3):
        events += p.feed(big[i : i + 3])
    events += p.finish()
    assert time.perf_counter() - t < 5
    b = MessageBuilder()
    b.add(events)
    assert b.calls[0].arguments == big


SAMPLES = [
    '\nHello <|assistant|> world',
    'add\n{"a": 2}add\n{"a": 1}',
    'get_weather\n{"city": "北京\\"}"}<|assistant|>\n好的',
    'add \n{"a": [1, {"b": "x}"}]}\n\nsearch\n{"query": "q"}',
    'addd\n{"a": 1}',
    'add\n{"a": 1,}<|assistant|>add\n{"a": ',
    '\n\n\nadd',
    'python\nprint(1)<|assistant|>add\n{}',
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(1, 60), max_size=12), st.booleans())
def test_split_invariance(text: str, cuts: list[int], reasoning: bool) -> None:
    if reasoning:
        text = "思考 </thin</think>" + text
    whole, _, p1 = parse(text, names=TOOLS + ["python"], builtins=["python"], reasoning=reasoning)
    p = GLMCallParser(TOOLS + ["python"], ["python"], reasoning=reasoning)
    events, pos = [], 0
    for c in cuts:
        events += p.feed(text[pos : pos + c])
        pos += c
    events += p.feed(text[pos:])
    events += p.finish()
    assert merge_events(events) == whole
    assert p.incomplete_call == p1.incomplete_call
