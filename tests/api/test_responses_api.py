"""``/v1/responses`` over real HTTP with the real ``openai`` SDK, on the scripted engine.

GLM-4.7's format (reasoning on by default, XML tool calls) so that reasoning items,
encrypted reasoning history and function calls all show.  The same endpoint runs on vLLM
in tests/test_e2e_responses.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "天气", "strict": True,
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                    "additionalProperties": False}},
    {"type": "function", "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    {"type": "namespace", "name": "agents", "description": "sub-agents",
     "tools": [{"type": "function", "name": "spawn", "parameters": {"type": "object",
                                                                    "properties": {"task": {"type": "string"}}}}]},
    {"type": "web_search", "external_web_access": False},
]
CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
CALL2 = "<tool_call>search<arg_key>q</arg_key><arg_value>上海</arg_value></tool_call>"
NS_CALL = "<tool_call>agents__spawn<arg_key>task</arg_key><arg_value>look</arg_value></tool_call>"


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class Served(ThreadServer):
    """The real app in a uvicorn thread around a ScriptedEngine."""

    def __init__(self, db: Path, fmt: str = "glm47", keys: list[str] | None = None, **settings: Any) -> None:
        self.output, self.size = "ok", 3
        self.engine = ScriptedEngine(lambda prompt, params: pieces(self.output, self.size), model_name="m")
        self.app = create_app(self.engine, get_format(fmt),
                              Settings(api_keys=keys or [], responses_db=str(db), **settings))
        super().__init__(self.app)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("responses") / "responses.sqlite3"


@pytest.fixture(scope="module")
def srv(db):
    s = Served(db)
    yield s
    s.stop()


def create(s: Served, output: str, size: int = 3, **kw: Any) -> Response:
    s.output, s.size = output, size
    kw.setdefault("input", "北京天气怎么样？")
    return s.client().responses.create(model="m", **kw)


def _comparable(r: Response) -> dict:
    d = r.model_dump(exclude_none=True)
    for key in ("id", "created_at", "completed_at"):
        d.pop(key, None)
    for item in d["output"]:
        item.pop("id", None)
        item.pop("call_id", None)
        item.pop("encrypted_content", None)  # a fresh nonce each time
        item.pop("parsed_arguments", None)  # the SDK's parse of strict calls (stream helper only)
    return d


OUTPUTS = {
    "text": "Let me think.</think>你好，世界",
    "call": "Need the weather.</think>" + CALL,
    "parallel": "Two lookups.</think>" + CALL + CALL2,
    "namespace": "Delegate.</think>" + NS_CALL,
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
@pytest.mark.parametrize("size", [1, 4])
def test_stream_final_equals_non_streamed(srv, kind, size):
    full = create(srv, OUTPUTS[kind], size, tools=TOOLS)
    assert isinstance(full, Response) and full.status == "completed"
    Response.model_validate(full.model_dump())
    assert full.output[0].type == "reasoning" and full.output[0].content[0].text == OUTPUTS[kind].split("</think>")[0]
    srv.output, srv.size = OUTPUTS[kind], size
    with srv.client().responses.stream(model="m", input="北京天气怎么样？", tools=TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert _comparable(final) == _comparable(full)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    for item in final.output:
        if item.type == "function_call":
            deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"
                      and e.item_id == item.id]
            assert "".join(deltas) == item.arguments
            if size == 1:
                assert len(deltas) > 3  # streamed as generated, not at the end
        if item.type == "message":
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == item.content[0].text
    if kind == "text":
        assert full.output_text == "你好，世界"
    if kind == "parallel":
        calls = [o for o in full.output if o.type == "function_call"]
        assert [c.name for c in calls] == ["get_weather", "search"]
        assert [json.loads(c.arguments) for c in calls] == [{"city": "北京"}, {"q": "上海"}]
        assert len({c.call_id for c in calls}) == 2
    if kind == "namespace":
        call = full.output[1]
        assert (call.name, call.namespace, json.loads(call.arguments)) == ("spawn", "agents", {"task": "look"})
    assert "agents__spawn" in srv.engine.last_prompt and "web_search" not in srv.engine.last_prompt


def test_function_call_loop_with_encrypted_reasoning(srv):
    first = create(srv, OUTPUTS["call"], tools=TOOLS, store=False, include=["reasoning.encrypted_content"])
    reasoning, call = first.output
    assert reasoning.encrypted_content and "weather" not in reasoning.encrypted_content
    history = [{"role": "user", "content": "北京天气怎么样？"}]
    # a stateless client (Codex) sends back only the encrypted reasoning
    history += [{"type": "reasoning", "id": reasoning.id, "summary": [], "encrypted_content": reasoning.encrypted_content},
                call.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": call.call_id, "output": "晴，25°C"}]
    second = create(srv, "Got it.</think>北京晴，25°C。", tools=TOOLS, store=False, input=history)
    prompt = srv.engine.last_prompt
    assert "<think>Need the weather.</think><tool_call>get_weather<arg_key>city</arg_key>" in prompt
    assert "<tool_response>晴，25°C</tool_response>" in prompt
    assert second.output_text == "北京晴，25°C。"
    # an altered seal is not the model's reasoning: left out of the prompt, and the request goes on
    tampered = dict(history[1], encrypted_content=reasoning.encrypted_content[:-6] + "AAAAAA",
                    content=[{"type": "reasoning_text", "text": "Need the weather."}])
    assert create(srv, "x", tools=TOOLS, input=[history[0], tampered, *history[2:]]).status == "completed"
    assert "Need the weather." not in srv.engine.last_prompt


def test_previous_response_id_across_restart_retrieve_delete(tmp_path):
    db = tmp_path / "r.sqlite3"
    a = Served(db)
    try:
        r1 = create(a, "Noted.</think>Hello Ada.", input="My name is Ada.")
        assert r1.store is not False
    finally:
        a.stop()
    b = Served(db)  # a restarted server on the same database
    try:
        r2 = create(b, "Recall.</think>Ada.", input="What is my name?", previous_response_id=r1.id)
        prompt = b.engine.last_prompt
        assert "My name is Ada." in prompt and "Hello Ada." in prompt and prompt.index("Ada.") < prompt.index("What is")
        assert r2.previous_response_id == r1.id
        c = b.client()
        got = c.responses.retrieve(r1.id)
        assert _comparable(got) == _comparable(r1)
        assert c.responses.retrieve(r2.id).output_text == "Ada."
        c.responses.delete(r1.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(r1.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.delete(r1.id)
        with pytest.raises(openai.BadRequestError) as e:
            create(b, "x", input="again", previous_response_id=r2.id)  # its chain lost r1
        assert e.value.body["param"] == "previous_response_id"
    finally:
        b.stop()


def test_responses_belong_to_their_key(tmp_path):
    s = Served(tmp_path / "k.sqlite3", keys=["key-one", "key-two"])
    try:
        one, two = s.client("key-one"), s.client("key-two")
        s.output = "x</think>secret"
        r = one.responses.create(model="m", input="hi")
        assert one.responses.retrieve(r.id).output_text == "secret"
        with pytest.raises(openai.NotFoundError):
            two.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            two.responses.delete(r.id)
        with pytest.raises(openai.BadRequestError):
            two.responses.create(model="m", input="more", previous_response_id=r.id)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").responses.retrieve(r.id)
        unstored = one.responses.create(model="m", input="hi", store=False)
        with pytest.raises(openai.NotFoundError):
            one.responses.retrieve(unstored.id)
        assert one.responses.retrieve(r.id).id == r.id  # still there for its owner
    finally:
        s.stop()


def test_incomplete_on_max_output_tokens(srv):
    r = create(srv, "abc</think>" + "word " * 40, size=1, max_output_tokens=20)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 20
    srv.output = "abc</think>" + "word " * 40
    events = list(srv.client().responses.create(model="m", input="x", max_output_tokens=20, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[-1].status == "incomplete"
    # a call cut off before its name was complete is no call (and no text)
    r = create(srv, "go</think>" + CALL, size=1, tools=TOOLS, max_output_tokens=len("go</think>") + 12)
    assert r.status == "incomplete" and all(o.type != "function_call" for o in r.output)


def test_text_format_and_tool_choice_reach_the_constraint(srv):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    create(srv, '</think>{"n": 1}', text={"format": {"type": "json_schema", "name": "r", "schema": schema}})
    assert srv.engine.last_params.constraint.json == schema
    create(srv, '</think>{"n": 1}', text={"format": {"type": "json_object"}})
    assert srv.engine.last_params.constraint.json == {"type": "object"}
    create(srv, "</think>" + CALL, tools=TOOLS, tool_choice="required")
    required = srv.engine.last_params.constraint
    assert required is not None and "search" in str(required)
    create(srv, "</think>" + CALL, tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"})
    named = srv.engine.last_params.constraint
    assert named is not None and "get_weather" in str(named) and "search" not in str(named)
    create(srv, "</think>" + CALL, tools=TOOLS, tool_choice="none")
    assert srv.engine.last_params.constraint is None and "get_weather" not in srv.engine.last_prompt
    create(srv, "</think>" + CALL, tools=TOOLS, parallel_tool_calls=False, tool_choice="required")
    assert str(srv.engine.last_params.constraint) != str(required)


def test_reasoning_effort_none_turns_thinking_off(srv):
    create(srv, "plain answer", reasoning={"effort": "none"})
    assert srv.engine.last_prompt.endswith("<|assistant|></think>")
    create(srv, "x</think>y", reasoning={"effort": "high"}, instructions="Be brief.")
    assert srv.engine.last_prompt.endswith("<|assistant|><think>")
    assert srv.engine.last_prompt.index("Be brief.") < srv.engine.last_prompt.index("北京")


def test_hosted_tools_are_left_out_and_logged(srv, caplog):
    with caplog.at_level(logging.INFO, logger="glmserve"):
        r = create(srv, "x</think>y", tools=[{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["v"]}])
    assert r.status == "completed"
    assert any("web_search" in rec.getMessage() and "file_search" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0].image_url"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "nope"}}]},
     "tools[0].parameters"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "r"}}}, "text.format.schema"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_client_mistakes_are_400(srv, body, param):
    resp = httpx.post(srv.base_url + "/responses", json={"model": "m", **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_raw_sse_names_events_and_keeps_chinese(srv):
    srv.output, srv.size = "想</think>你好", 2
    raw = httpx.post(srv.base_url + "/responses", json={"model": "m", "input": "x", "stream": True}).text
    blocks = [b for b in raw.strip().split("\n\n") if b]
    for b in blocks:
        name, data = b.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == name[7:]
    assert "你好" in raw and "\\u4f60" not in raw


# --------------------------------------------------------------------------- OpenAI Agents SDK


def agent_program(prompt: str, params: Any) -> list[str]:
    """GLM-4.7 output for an agent with two tools: weather, then add, then an answer that
    quotes what the tools returned (so the tool results must have reached the prompt)."""
    import re

    results = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.S)
    if not results:
        out = "Weather first.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    elif len(results) == 1:
        out = ("Now the sum.</think><tool_call>add<arg_key>a</arg_key><arg_value>2</arg_value>"
               "<arg_key>b</arg_key><arg_value>40</arg_value></tool_call>")
    else:
        out = f"Done.</think>Weather: {results[0].strip()}; sum: {results[1].strip()}."
    return pieces(out, 5)


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agents_sdk_runs_two_tools_to_a_final_answer(tmp_path, api):
    import asyncio

    from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool, \
        set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[tuple] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(("get_weather", city))
        return f"{city}: sunny, 25C"

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append(("add", a, b))
        return a + b

    s = Served(tmp_path / "a.sqlite3")
    s.engine.script = agent_program
    try:
        client = openai.AsyncOpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=30)
        model_cls = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
        agent = Agent(name="helper", instructions="Use the tools.", tools=[get_weather, add],
                      model=model_cls(model="m", openai_client=client))
        result = asyncio.run(Runner.run(agent, "Weather in Paris, and 2+40?"))
    finally:
        s.stop()
    assert calls == [("get_weather", "Paris"), ("add", 2, 40)]
    assert result.final_output == "Weather: Paris: sunny, 25C; sum: 42."


def test_server_wide_output_cap(tmp_path):
    """``Settings.max_output_tokens`` (``--max-output-tokens``) caps every endpoint, whatever
    the request asks, and the answers say they stopped on length."""
    s = Served(tmp_path / "cap.sqlite3", max_output_tokens=5)
    try:
        s.output, s.size = "abc</think>" + "word " * 20, 1
        c = s.client()
        r = c.responses.create(model="m", input="x", max_output_tokens=100)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 5 and s.engine.last_params.max_tokens == 5
        r = c.responses.create(model="m", input="x", max_output_tokens=3)  # asking for less is honoured
        assert r.usage.output_tokens == 3
        chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1000)
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
        chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert chat.usage.completion_tokens == 5
        legacy = c.completions.create(model="m", prompt="x", max_tokens=50)
        assert legacy.choices[0].finish_reason == "length" and legacy.usage.completion_tokens == 5
    finally:
        s.stop()


def test_argument_hook_and_in_band_failure(tmp_path):
    s = Served(tmp_path / "h.sqlite3", argument_hook=lambda name, args: json.dumps({"city": "上海"}, ensure_ascii=False))
    try:
        s.output, s.size = "x</think>" + CALL, 2
        events = list(s.client().responses.create(model="m", input="x", tools=TOOLS, stream=True))
        final = events[-1].response
        call = next(o for o in final.output if o.type == "function_call")
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert call.arguments == "".join(deltas) == '{"city": "上海"}'  # the hook's, sent whole once final

        def broken(prompt: str, params: Any) -> list[str]:
            raise RuntimeError("engine bug")

        s.engine.script = broken
        raw = httpx.post(s.base_url + "/responses", json={"model": "m", "input": "x", "stream": True}).text
        kinds = [json.loads(line[6:])["type"] for line in raw.splitlines() if line.startswith("data: ")]
        assert kinds == ["response.created", "response.in_progress", "error", "response.failed"]
        failed = json.loads([line for line in raw.splitlines() if line.startswith("data: ")][-1][6:])
        Response.model_validate(failed["response"])
        assert failed["response"]["error"]["code"] == "server_error"
    finally:
        s.stop()


def test_codex_captured_request_replays(srv):
    """The request Codex CLI 0.169.0 really sends (tests/data/codex_exec_request.json, captured
    with a custom provider): streamed events valid for the SDK's types, its function tools and
    the flattened namespace shown to the model, the hosted web_search left out."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    captured = json.loads((Path(__file__).parents[1] / "data" / "codex_exec_request.json").read_text())
    body = {**captured["body"], "model": "m"}
    srv.output, srv.size = "Say hi.</think>hi", 2
    srv.engine.max_model_len = 65536  # one scripted "token" per character: ~40K for Codex's prompt
    try:
        resp = httpx.post(srv.base_url + "/responses", json=body, headers={"Authorization": "Bearer x"}, timeout=60)
    finally:
        srv.engine.max_model_len = 4096
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"), resp.text
    adapter = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_json(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "hi"
    reasoning = events[-1].response.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content  # Codex asks for it
    prompt = srv.engine.last_prompt
    assert "exec_command" in prompt and "multi_agent_v1__spawn_agent" in prompt
    assert "web_search" not in prompt and "external_web_access" not in prompt
    assert events[-1].response.store is False
    assert httpx.get(srv.base_url + f"/responses/{events[-1].response.id}").status_code == 404  # store: false


def test_prompt_beyond_the_context_names_input(srv):
    resp = httpx.post(srv.base_url + "/responses", json={"model": "m", "input": "x" * 5000})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_client_going_away_aborts_the_engine_request(srv):
    srv.output, srv.size = "x</think>" + "long answer " * 200, 1
    srv.engine.delay = 0.01
    before = len(srv.engine.aborted)
    try:
        with httpx.stream("POST", srv.base_url + "/responses",
                          json={"model": "m", "input": "x", "stream": True}) as resp:
            for line in resp.iter_lines():
                if "response.output_text.delta" in line:
                    break  # hang up mid-answer
        deadline = time.monotonic() + 10
        while len(srv.engine.aborted) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(srv.engine.aborted) == before + 1 and srv.engine.aborted[-1].startswith("resp_")
        assert srv.engine.running == 0
    finally:
        srv.engine.delay = 0.0
