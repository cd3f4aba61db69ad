"""Tool search over real HTTP: Claude Code's ``tool_reference`` results (real ``anthropic``
SDK), the same parts on Chat Completions (real ``openai`` SDK) and Responses, on a scripted
GLM-5.1 engine whose recorded prompts and constraints show where a deferred tool's
definition went and when it became callable.  Plus the request limits that replaced the
fixed tool / message counts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from anthropic_scripted import pieces
from servers import ThreadServer

from glmserve.api.app import create_app
from glmserve.api.settings import Settings
from glmserve.engine.base import GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format
from glmserve.formats.xmlcall import write_call

DATA = Path(__file__).parents[1] / "data" / "claude-code"

WEATHER = {"name": "mcp__demo__get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"type": "string", "enum": ["c", "f"]}},
                            "required": ["city"], "additionalProperties": False}}
SEARCH_USE = {"type": "tool_use", "id": "toolu_search1", "name": "ToolSearch",
              "input": {"query": "select:mcp__demo__get_weather", "max_results": 5}}
REFERENCE_RESULT = {"type": "tool_result", "tool_use_id": "toolu_search1",
                    "content": [{"type": "tool_reference", "tool_name": "mcp__demo__get_weather"}],
                    "cache_control": {"type": "ephemeral"}}
WEATHER_CALL = "I will look it up.</think>" + write_call("mcp__demo__get_weather", {"city": "Paris"}, newlines=False)


class Server(ThreadServer):
    """The real app on a scripted engine with any format; ``output`` is every answer."""

    def __init__(self, fmt: str = "glm51", settings: Settings | None = None, max_model_len: int = 200_000) -> None:
        self.output = ""
        self.calls: list[tuple[str, GenerateParams]] = []
        self.engine = ScriptedEngine(self._script, model_name="glm-test", max_model_len=max_model_len)
        super().__init__(create_app(self.engine, get_format(fmt), settings or Settings()))

    def _script(self, prompt: str, params: GenerateParams) -> list[str]:
        self.calls.append((prompt, params))
        return pieces(self.output)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="none", max_retries=0, timeout=60)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def srv():
    s = Server()
    yield s
    s.stop()


def claude_code_turns() -> tuple[dict[str, Any], dict[str, Any]]:
    """Claude Code's first request (captured: ToolSearch and the DeferredToolPlaceholder) and
    the request after its ToolSearch call: the tool_reference result, and the referenced tool
    added to ``tools`` with ``defer_loading``."""
    first = json.loads((DATA / "request-1.json").read_text())["body"]
    assert any(t["name"] == "ToolSearch" for t in first["tools"])
    assert any(t.get("defer_loading") for t in first["tools"])
    second = copy.deepcopy(first)
    second["messages"] += [{"role": "assistant", "content": [SEARCH_USE]},
                           {"role": "user", "content": [REFERENCE_RESULT]}]
    second["tools"].append({**WEATHER, "defer_loading": True})
    return first, second


def create(s: Server, body: dict[str, Any]) -> tuple[Any, str, GenerateParams]:
    """Stream ``body`` through the SDK as Claude Code does; the final message, prompt, params."""
    kw = {k: v for k, v in body.items() if k not in ("stream", "context_management")}
    n = len(s.calls)
    with s.anthropic().messages.stream(**kw) as st:
        msg = st.get_final_message()
    assert len(s.calls) == n + 1
    prompt, params = s.calls[-1]
    return msg, prompt, params


def test_claude_code_tool_search_turn(srv: Server) -> None:
    first, second = claude_code_turns()
    srv.output = WEATHER_CALL
    # before the reference: the deferred tool is not callable, its call is plain text
    msg, prompt, params = create(srv, {**first, "tools": first["tools"] + [{**WEATHER, "defer_loading": True}]})
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.stop_reason == "end_turn"
    assert "mcp__demo__get_weather" not in prompt
    assert params.constraint is not None and "mcp__demo__get_weather" not in params.constraint.grammar
    # the tool_reference turn: 200, the definition right at the result, then callable
    msg, prompt, params = create(srv, second)
    assert msg.stop_reason == "tool_use"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert use.name == "mcp__demo__get_weather" and use.input == {"city": "Paris"}
    definition = '{"name": "mcp__demo__get_weather", "description": "Current weather for a city", "parameters": ' \
        + json.dumps(WEATHER["input_schema"], ensure_ascii=False) + "}"
    assert prompt.count("mcp__demo__get_weather") == 2  # the ToolSearch call, then the definition
    assert ("<|observation|><tool_response><tools>\n" + definition + "\n</tools></tool_response>") in prompt
    assert prompt.index(definition) > prompt.index("select:mcp__demo__get_weather")
    assert "mcp__demo__get_weather" not in prompt.split("<|user|>")[0]  # not in the system block
    assert params.constraint is not None and "mcp__demo__get_weather" in params.constraint.grammar


def test_claude_code_forced_referenced_tool(srv: Server) -> None:
    _, second = claude_code_turns()
    srv.output = write_call("mcp__demo__get_weather", {"city": "北京", "unit": "c"}, newlines=False)
    for choice in ({"type": "tool", "name": "mcp__demo__get_weather"}, {"type": "any"}):
        msg = srv.anthropic().messages.create(**{**{k: v for k, v in second.items() if k not in ("stream", "context_management")},
                                                 "tool_choice": choice, "thinking": {"type": "disabled"}})
        use = next(b for b in msg.content if b.type == "tool_use")
        assert use.name == "mcp__demo__get_weather" and use.input == {"city": "北京", "unit": "c"}
        grammar = srv.calls[-1][1].constraint.grammar
        assert "mcp__demo__get_weather" in grammar


def test_reference_with_text_and_errors(srv: Server) -> None:
    _, second = claude_code_turns()
    body = copy.deepcopy(second)
    body["messages"][-1]["content"][0]["content"] = [
        {"type": "text", "text": "Loaded 1 tool."}, {"type": "tool_reference", "tool_name": "mcp__demo__get_weather"}]
    srv.output = "ok</think>done"
    _, prompt, _ = create(srv, body)
    assert "<tool_response>Loaded 1 tool.<tools>\n{\"name\": \"mcp__demo__get_weather\"" in prompt
    body["messages"][-1]["content"][0]["content"] = [{"type": "tool_reference"}]
    with pytest.raises(anthropic.BadRequestError) as exc:
        srv.anthropic().messages.create(**{k: v for k, v in body.items() if k not in ("stream", "context_management")})
    assert "tool_reference" in str(exc.value) and "tool_name" in str(exc.value)


def test_count_tokens_takes_references(srv: Server) -> None:
    _, second = claude_code_turns()
    kw = {k: second[k] for k in ("model", "messages", "system", "tools")}
    r = srv.anthropic().messages.count_tokens(**kw)
    assert r.input_tokens > 0


# --------------------------------------------------------------------------- Chat Completions, Responses

OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "ToolSearch", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}}}}},
    {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                      "parameters": WEATHER["input_schema"], "defer_loading": True}},
]


@pytest.mark.parametrize("key", ["tool_name", "name"])
def test_chat_completions_tool_reference(srv: Server, key: str) -> None:
    srv.output = WEATHER_CALL
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "ToolSearch", "arguments": '{"query": "select:mcp__demo__get_weather"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "tool_reference", key: WEATHER["name"]}]},
    ]
    r = srv.openai().chat.completions.create(model="glm-test", messages=messages, tools=OPENAI_TOOLS)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == WEATHER["name"] and json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = srv.calls[-1][0]
    assert '<tool_response><tools>\n{"name": "mcp__demo__get_weather"' in prompt
    # without the reference the same output is text
    r = srv.openai().chat.completions.create(model="glm-test", messages=messages[:1], tools=OPENAI_TOOLS)
    assert r.choices[0].message.tool_calls is None and "mcp__demo__get_weather" in r.choices[0].message.content


def test_responses_function_call_output_reference(srv: Server) -> None:
    srv.output = WEATHER_CALL
    tools = [{"type": "function", "name": "ToolSearch", "parameters": OPENAI_TOOLS[0]["function"]["parameters"]},
             {"type": "function", "name": WEATHER["name"], "description": WEATHER["description"],
              "parameters": WEATHER["input_schema"], "defer_loading": True}]
    items: list[Any] = [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "ToolSearch", "arguments": '{"query": "weather"}'},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "Found:"}, {"type": "tool_reference", "tool_name": WEATHER["name"]}]},
    ]
    r = srv.openai().responses.create(model="glm-test", input=items, tools=tools, store=False)
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == WEATHER["name"] and json.loads(call.arguments) == {"city": "Paris"}
    assert '<tool_response>Found:<tools>\n{"name": "mcp__demo__get_weather"' in srv.calls[-1][0]
    r = srv.openai().responses.create(model="glm-test", input=items[:1], tools=tools, store=False)
    assert not any(o.type == "function_call" for o in r.output)


# --------------------------------------------------------------------------- limits


def many_tools(n: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}} for i in range(n)]


def test_no_fixed_count_limits(srv: Server) -> None:
    """300 tools and 2100 messages: more than the old fixed caps, within the context."""
    srv.output = "ok</think>fine"
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(2101)]
    r = srv.openai().chat.completions.create(model="glm-test", messages=msgs, tools=many_tools(300))
    assert r.choices[0].message.content == "fine"
    r = srv.anthropic().messages.create(model="glm-test", max_tokens=16, messages=msgs,
                                        tools=[{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(300)])
    assert r.stop_reason == "end_turn"


def test_the_context_bounds_tools_and_messages() -> None:
    s = Server(max_model_len=4096)
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            s.openai().chat.completions.create(model="glm-test", messages=[{"role": "user", "content": "x"}],
                                               tools=many_tools(100))
        assert exc.value.code == "context_length_exceeded"
        with pytest.raises(anthropic.BadRequestError) as aexc:
            s.anthropic().messages.create(model="glm-test", max_tokens=16,
                                          messages=[{"role": "user", "content": "hello"}] * 2000)
        assert "context" in str(aexc.value)
    finally:
        s.stop()


def test_operator_caps_name_their_flag() -> None:
    s = Server(settings=Settings(max_tools=3, max_messages=4))
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            s.openai().chat.completions.create(model="glm-test", messages=[{"role": "user", "content": "x"}],
                                               tools=many_tools(4))
        assert "at most 3 tools" in exc.value.message and "--max-tools" in exc.value.message
        assert exc.value.body["param"] == "tools"
        msgs = [{"role": "user", "content": "x"}] * 5
        with pytest.raises(openai.BadRequestError) as exc:
            s.openai().chat.completions.create(model="glm-test", messages=msgs)
        assert "at most 4 messages" in exc.value.message and "--max-messages" in exc.value.message
        with pytest.raises(anthropic.BadRequestError) as aexc:
            s.anthropic().messages.create(model="glm-test", max_tokens=16, messages=msgs)
        assert "--max-messages" in str(aexc.value)
        with pytest.raises(openai.BadRequestError) as exc:
            s.openai().responses.create(model="glm-test", input=msgs, store=False)
        assert "--max-messages" in exc.value.message and exc.value.body["param"] == "input"
        s.output = "ok</think>fine"
        r = s.openai().chat.completions.create(model="glm-test", messages=msgs[:4], tools=many_tools(3))
        assert r.choices[0].message.content == "fine"
    finally:
        s.stop()
