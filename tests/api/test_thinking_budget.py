"""How formats close their reasoning early (the thinking budget), as pure functions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Tool

TOOL = Tool(name="w", parameters={"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})


def request(**kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], tools=[TOOL], tool_choice="required", **kw)


@pytest.mark.parametrize("name, opener", [("glm45", "\n<think>"), ("glm47", "")])
def test_xml_families_close_reasoning(name: str, opener: str) -> None:
    fmt = get_format(name)
    req = request()
    sw = fmt.reasoning_switch(req)
    assert sw is not None and sw.opener_text == opener and sw.closer == "</think>"
    assert not sw.answer.enable_thinking and sw.answer.tools == req.tools
    assert fmt.constraint(sw.answer) != fmt.constraint(req)  # no reasoning part in the answer's
    assert sw.reasoning is not None and "<tool_call>" in sw.reasoning.grammar
    # what the parser reads: opener, reasoning, closer, then the answer
    call = "\n<tool_call>w\n<arg_key>a</arg_key>\n<arg_value>x</arg_value>\n</tool_call>" if name == "glm45" \
        else "<tool_call>w<arg_key>a</arg_key><arg_value>x</arg_value></tool_call>"
    p = fmt.parser(req)
    events = p.feed(sw.opener_text + "thinking") + p.feed(sw.closer) + p.feed(call) + p.finish()
    assert events[0].text == "thinking" and events[1].name == "w"
    assert fmt.reasoning_switch(replace(req, tools=[], tool_choice="none")).reasoning is None


@pytest.mark.parametrize("name", ["glm4", "glm4-0414", "chatml"])
def test_formats_without_a_think_block(name: str) -> None:
    assert get_format(name).reasoning_switch(request()) is None


def test_thinking_off_has_nothing_to_close() -> None:
    assert get_format("glm45").reasoning_switch(request(enable_thinking=False)) is None
