"""An ``auto`` answer split at its call opener (``CallOpener``): the prelude up to the opener and
the constraint after it allow exactly what the full constraint allows, on every XML family."""

from __future__ import annotations

import pytest
from xgrammar.testing import _is_grammar_accept_string as accepts

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Tool

WEATHER = Tool(name="get_weather", parameters={"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city"]})
SEARCH = Tool(name="search", parameters={"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})
FREE = Tool(name="anything")  # no parameters: any object

CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
CALL2 = "<tool_call>search<arg_key>q</arg_key><arg_value>x</arg_value></tool_call>"
ANSWERS = [
    "text",
    "text" + CALL,
    CALL + CALL2,
    "t" + CALL + " more " + CALL2,
    CALL + "done",
    "<tool_call>anything<arg_key>k</arg_key><arg_value>1</arg_value></tool_call>",
    # refused by the full constraint, and so by the split one
    "t<tool_call>nope<arg_key>q</arg_key><arg_value>x</arg_value></tool_call>",
    "<tool_call>get_weather</tool_call>",  # a required argument missing
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>x</arg_value><arg_key>days</arg_key><arg_value>9</arg_value></tool_call>",
    "text</think>",
    "t<arg_key>",
]


def split_accepts(fmt, request: ChatRequest, answer: str) -> bool:
    opener = fmt.call_opener(request)
    after = fmt.constraint_after_opener(request)
    at = answer.find(opener.opener)
    if at < 0:
        return accepts(opener.prelude.grammar, answer)
    # the prelude's generation stops at the opener: what it allows up to there, whatever follows
    return (accepts(opener.prelude.grammar, answer[:at] + opener.opener + "x</tool_call>")
            and accepts(after.grammar, answer[at + len(opener.opener):]))


@pytest.mark.parametrize("family", ["glm45", "glm47", "glm51", "glm53"])
@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "single"])
def test_prelude_and_after_opener_allow_what_the_full_constraint_allows(family, thinking, parallel):
    fmt = get_format(family)
    request = ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[WEATHER, SEARCH, FREE],
                          enable_thinking=thinking, parallel_tool_calls=parallel)
    full = fmt.constraint(request).grammar
    lead = ""
    if thinking or family == "glm53":  # GLM-5.3 thinks whatever the request says
        lead = "hmm</think>" if fmt.thinking == "open" else "<think>hmm</think>"
    verdicts = []
    for answer in ANSWERS:
        whole = lead + answer
        verdicts.append(accepts(full, whole))
        assert split_accepts(fmt, request, whole) == verdicts[-1], whole
    assert True in verdicts and False in verdicts  # both kinds were checked
    assert verdicts[ANSWERS.index(CALL + CALL2)] == parallel


def test_the_prelude_is_the_same_for_every_tool_set():
    fmt = get_format("glm47")
    one = fmt.call_opener(ChatRequest(messages=[], tools=[WEATHER]))
    other = fmt.call_opener(ChatRequest(messages=[], tools=[SEARCH, FREE], parallel_tool_calls=False))
    assert one == other and one.opener == "<tool_call>" and "get_weather" not in one.prelude.grammar
    assert one != fmt.call_opener(ChatRequest(messages=[], tools=[WEATHER], enable_thinking=False))


@pytest.mark.parametrize("choice", ["none", "required", "get_weather"])
def test_only_auto_answers_are_split(choice):
    for family in ("glm45", "glm47", "glm51", "glm53"):
        assert get_format(family).call_opener(ChatRequest(messages=[], tools=[WEATHER], tool_choice=choice)) is None
    assert get_format("glm47").call_opener(ChatRequest(messages=[], tools=[])) is None


@pytest.mark.parametrize("family", ["chatml", "glm4", "glm4-0414", "glmz1"])
def test_json_families_do_not_split(family):
    assert get_format(family).call_opener(ChatRequest(messages=[], tools=[WEATHER])) is None
