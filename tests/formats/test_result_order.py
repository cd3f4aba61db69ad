"""Tool results in call order, on every family and every API.

Clients send a parallel turn's results in the order the tools finished (Claude Code does),
and no family's prompt carries the ids that pair a result with its call, so glmserve puts
each turn's results in its calls' order (``results_in_call_order``, applied by
``ChatRequest``).  The witnesses: each family's golden prompt of the in-order turn (made
with the official templates, ``tests/data/glm-prompts.jsonl``) is what glmserve renders for
the out-of-order one; GLM-4.7 / 5 / 5.1 / 5.3 are also checked against their official
templates by the differential property test in ``test_format_glm5.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from glmserve.api.app import create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import FORMATS, get_format
from glmserve.formats.base import ChatRequest, Tool, results_in_call_order

DATA = Path(__file__).parents[1] / "data"
GOLDEN = {(c["family"], c["case"]): c for c in map(json.loads, (DATA / "glm-prompts.jsonl").read_text("utf-8").splitlines())}
GOLDEN_FORMAT = {"glm4-9b-chat": "glm4", "glm4-0414": "glm4-0414", "glm4.5/4.6": "glm45", "glm4.7": "glm47"}


def call(cid: str, city: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def result(cid: str | None, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": cid, "content": text}


def turn(calls: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls}, *results]


def contents(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool"]


# --------------------------------------------------------------------------- the rule


def test_matched_results_take_their_calls_order() -> None:
    calls = [call("a", "北京"), call("b", "上海"), call("c", "广州")]
    assert contents(results_in_call_order(turn(calls, [result("c", "C"), result("a", "A"), result("b", "B")]))) == \
        ["A", "B", "C"]
    # unmatched (unknown, missing, repeated) results keep their places; the matched fill theirs
    assert contents(results_in_call_order(turn(calls, [result("c", "C"), result("x", "X"), result("a", "A")]))) == \
        ["A", "X", "C"]
    assert contents(results_in_call_order(turn(calls, [result("c", "C"), result(None, "N"), result("a", "A")]))) == \
        ["A", "N", "C"]
    assert contents(results_in_call_order(turn(calls, [result("c", "C"), result("b", "B1"), result("b", "B2"),
                                                        result("a", "A")]))) == ["A", "B1", "B2", "C"]
    # a call id used twice matches nothing
    twice = [call("a", "北京"), call("a", "上海"), call("b", "广州")]
    assert contents(results_in_call_order(turn(twice, [result("b", "B"), result("a", "A")]))) == ["B", "A"]


def test_only_the_run_after_the_calls_moves() -> None:
    calls = [call("a", "北京"), call("b", "上海")]
    msgs = [*turn(calls, [result("b", "B")]), {"role": "user", "content": "and?"}, result("a", "A")]
    assert results_in_call_order(msgs) is msgs
    in_order = turn(calls, [result("a", "A"), result("b", "B")])
    assert results_in_call_order(in_order) is in_order  # nothing moved: the caller's list, not a copy
    # each turn's run by its own calls; the input is not changed
    two = [*turn(calls, [result("b", "B"), result("a", "A")]),
           {"role": "assistant", "content": None, "tool_calls": [call("c", "x"), call("d", "y")]},
           result("d", "D"), result("c", "C")]
    before = json.dumps(two)
    assert contents(results_in_call_order(two)) == ["A", "B", "C", "D"]
    assert json.dumps(two) == before
    assert contents(ChatRequest(messages=two).messages) == ["A", "B", "C", "D"]


def test_a_wide_parallel_turn() -> None:
    """2,000 results of one turn, sent in reverse (ids counted once each, not searched per result)."""
    n = 2_000
    calls = [call(f"c{k}", "x") for k in range(n)]
    out = results_in_call_order(turn(calls, [result(f"c{k}", str(k)) for k in reversed(range(n))]))
    assert contents(out) == [str(k) for k in range(n)]


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", sorted(GOLDEN_FORMAT))
def test_out_of_order_results_render_as_the_golden_in_order_turn(family: str) -> None:
    """The official template's prompt of the in-order turn (the golden) is glmserve's prompt of
    the turn sent out of order."""
    case = GOLDEN[(family, "two_calls_turn")]
    r = case["request"]
    sent = [*r["messages"][:-2], r["messages"][-1], r["messages"][-2]]
    assert contents(sent) == ["雨", "晴"]
    tools = [Tool.from_openai(t) for t in r.get("tools", [])]
    fmt = get_format(GOLDEN_FORMAT[family])
    assert fmt.render(ChatRequest(messages=sent, tools=tools)).text == case["expected_prompt"]
    assert fmt.render(ChatRequest(messages=r["messages"], tools=tools)).text == case["expected_prompt"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_family_renders_results_in_call_order(name: str) -> None:
    """Every family (the golden-less ones too: chatml, glmz1, glm51, glm53) renders an
    out-of-order turn exactly as the in-order one."""
    calls = [call("call_1", "北京"), call("call_2", "上海"), call("call_3", "广州")]
    tools = [Tool.from_openai({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}})]
    ordered = turn(calls, [result("call_1", "晴"), result("call_2", "雨"), result("call_3", "阴")])
    sent = turn(calls, [result("call_3", "阴"), result("call_1", "晴"), result("call_2", "雨")])
    fmt = get_format(name)
    prompt = fmt.render(ChatRequest(messages=sent, tools=tools)).text
    assert prompt == fmt.render(ChatRequest(messages=ordered, tools=tools)).text
    assert prompt.index("晴") < prompt.index("雨") < prompt.index("阴")


# --------------------------------------------------------------------------- every API

@pytest.fixture(scope="module")
def app() -> tuple[TestClient, ScriptedEngine]:
    engine = ScriptedEngine(lambda p, s: ["ok"], model_name="m")
    return TestClient(create_app(engine, get_format("glm47"))), engine


def results_part(prompt: str) -> str:
    """The last turn's results as ``A|B``."""
    tail = prompt.rsplit("<|observation|>", 1)[1].split("<|assistant|>", 1)[0]
    return "|".join(part.split("</tool_response>")[0] for part in tail.split("<tool_response>")[1:])


def test_chat_completions_pairs_by_tool_call_id(app: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = app
    body = {"model": "m", "max_tokens": 4,  # no tools declared: nothing to compile, the history is what counts
            "messages": turn([call("call_1", "北京"), call("call_2", "上海")],
                             [result("call_2", "RAIN"), result("call_1", "SUN")])}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert results_part(engine.last_prompt) == "SUN|RAIN"


def test_messages_pairs_by_tool_use_id(app: tuple[TestClient, ScriptedEngine]) -> None:
    """Claude Code's habit: the ``tool_result`` blocks of a parallel turn in the order the
    tools finished, then a text block."""
    client, engine = app
    body = {"model": "m", "max_tokens": 4,
            "messages": [{"role": "user", "content": "look"},
                         {"role": "assistant", "content": [
                             {"type": "tool_use", "id": "toolu_bash", "name": "Bash", "input": {"command": "sleep 1; ls"}},
                             {"type": "tool_use", "id": "toolu_read", "name": "Read", "input": {"path": "a.txt"}}]},
                         {"role": "user", "content": [
                             {"type": "tool_result", "tool_use_id": "toolu_read", "content": "READ-RESULT"},
                             {"type": "tool_result", "tool_use_id": "toolu_bash", "content": "BASH-RESULT"},
                             {"type": "text", "text": "reminder"}]}]}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    assert results_part(engine.last_prompt.rsplit("<|user|>", 1)[0] + "<|assistant|>") == "BASH-RESULT|READ-RESULT"
    assert engine.last_prompt.rsplit("<|user|>", 1)[1].startswith("reminder")


def test_responses_pairs_by_call_id(app: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = app
    body = {"model": "m", "max_output_tokens": 4, "store": False,
            "input": [{"role": "user", "content": "q"},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "北京"}'},
                      {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "上海"}'},
                      {"type": "function_call_output", "call_id": "c2", "output": "RAIN"},
                      {"type": "function_call_output", "call_id": "c1", "output": "SUN"}]}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    assert results_part(engine.last_prompt) == "SUN|RAIN"
