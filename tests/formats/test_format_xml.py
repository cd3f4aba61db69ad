"""GLM-4.5/4.6 and GLM-4.7 (the XML families): the tests that differ only by family.

Family-specific goldens stay in ``test_format_glm45.py`` / ``test_format_glm47.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xml_family import no_ids, parse_with, request, split

from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Control, Tool
from glmserve.formats.xmlcall import CONTROL_TOKENS

DATA = Path(__file__).parents[1] / "data"
FAMILIES = ["glm45", "glm47"]
GOLDEN_FAMILY = {"glm45": "glm4.5/4.6", "glm47": "glm4.7"}
# What every golden prompt (thinking on, generation prompt added) ends with.
GENERATION_PROMPT = {"glm45": [Control("<|assistant|>")], "glm47": [Control("<|assistant|>"), Control("<think>")]}


def _golden() -> list[tuple[str, dict[str, Any]]]:
    rows = [json.loads(line) for line in (DATA / "glm-prompts.jsonl").read_text().splitlines() if line.strip()]
    return [(fmt, r) for fmt in FAMILIES for r in rows if r["family"] == GOLDEN_FAMILY[fmt]]


@pytest.mark.parametrize("fmt, case", _golden(), ids=lambda v: v if isinstance(v, str) else v["case"])
def test_golden_prompt(fmt: str, case: dict[str, Any]) -> None:
    r = case["request"]
    req = ChatRequest(messages=r["messages"], tools=[Tool.from_openai(t) for t in r.get("tools", [])])
    prompt = get_format(fmt).render(req)
    assert prompt.text == case["expected_prompt"]
    assert all(p.token in CONTROL_TOKENS for p in prompt.parts if isinstance(p, Control))
    tail = GENERATION_PROMPT[fmt]
    assert prompt.parts[-len(tail):] == tail
    # Template text never hides a control token inside a plain part (request content may).
    request_text = json.dumps(r, ensure_ascii=False)
    for part in prompt.parts:
        if isinstance(part, str):
            assert all(tok not in part or tok in request_text for tok in CONTROL_TOKENS)


FRAGMENTS = [
    "\n<tool_call>nope\n", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>", "get_weather", "typed", "now", "nope", "ghost", "city", "days", "n", "s", "o", "b", "123", "true",
    '{"a": 1}', '{"a":1}', "北京", "\n", " ", "<", ">", "/", "x", "text", "\"", "\\",
]


@pytest.mark.parametrize("fmt", FAMILIES)
@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_any_split_same_result(fmt: str, frags: list[str], cuts: list[int], thinking: bool) -> None:
    f = get_format(fmt)
    text = "".join(frags)
    req = request(enable_thinking=thinking)
    whole = parse_with(f, text, req)
    pieces = parse_with(f, text, req, split(text, cuts))
    chars = parse_with(f, text, req, list(text))
    assert whole[0] == pieces[0] == chars[0]
    assert no_ids(whole[1]) == no_ids(pieces[1]) == no_ids(chars[1])
    assert whole[2] == pieces[2] == chars[2]
    # arguments of completed calls are always valid JSON objects
    for call in whole[1].get("tool_calls", []):
        if call["function"]["arguments"].endswith("}"):
            assert isinstance(json.loads(call["function"]["arguments"]), dict)


@pytest.mark.parametrize("fmt", FAMILIES)
def test_constraint_none_without_tools_or_choice_none(fmt: str) -> None:
    f = get_format(fmt)
    assert f.constraint(request(tools=[])) is None
    assert f.constraint(request(tool_choice="none")) is None
    with pytest.raises(ValueError):
        f.constraint(request(tool_choice="ghost"))
