"""``/v1/responses`` on the real vLLM engine with tiny GLM models, through real clients.

* the random-weight tiny GLM-4.5 (``glm45_server``): streamed and whole answers agree, a
  required call's arguments are valid against a strict schema, a function-call turn
  continues with ``previous_response_id``;
* ``glm45-eos`` (every turn ends at once, 32K context for Codex's ~40 KB request), started
  with ``--max-output-tokens`` and ``--responses-db``: Codex CLI completes a turn, the OpenAI
  Agents SDK runs a required tool call to a final answer through both of its models, the cap
  and the database path hold.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import jsonschema
import openai
import pytest
from openai.types.responses import Response

from servers import start_server
from codex_cli import run_codex

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "name": "get_weather", "strict": True, "description": "天气",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "enum": ["北京", "上海"]},
                                         "unit": {"type": "string", "enum": ["c", "f"]}}}}


def _final(events: list) -> Response:
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events[-1].response


def _same(a: Response, b: Response) -> None:
    def strip(r: Response) -> list:
        out = r.model_dump(exclude_none=True)["output"]
        for item in out:
            for k in ("id", "call_id", "encrypted_content", "parsed_arguments"):
                item.pop(k, None)
        return out

    assert strip(a) == strip(b)
    assert (a.status, a.usage.output_tokens) == (b.status, b.usage.output_tokens)


def test_stream_equals_whole_answer_on_vllm(glm45_server):
    c = glm45_server.client()
    kw = dict(model="tiny-glm45", input="你好，介绍一下你自己。", temperature=0, max_output_tokens=24)
    whole = c.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and whole.usage.output_tokens <= 24
    _same(_final(list(c.responses.create(stream=True, **kw))), whole)


def test_required_call_is_valid_and_continues(glm45_server):
    c = glm45_server.client()
    # thinking off (a random model's reasoning runs to the limit) and one call, as in test_e2e_glm
    kw = dict(model="tiny-glm45", input="北京天气怎么样？", tools=[WEATHER], tool_choice="required",
              parallel_tool_calls=False, reasoning={"effort": "none"}, temperature=0, max_output_tokens=96)
    r = c.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls, r
    for call in calls:
        assert call.name == "get_weather" and call.call_id
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with c.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    _same(final, r)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                     and e.output_index == r.output.index(calls[0]))
    assert deltas == calls[0].arguments
    nxt = c.responses.create(model="tiny-glm45", previous_response_id=r.id, tools=[WEATHER], max_output_tokens=8,
                             reasoning={"effort": "none"},
                             input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "晴"}])
    assert nxt.previous_response_id == r.id and nxt.status in ("completed", "incomplete")
    assert c.responses.retrieve(nxt.id).id == nxt.id


# --------------------------------------------------------------------------- glm45-eos


def _start_eos(db: Path):
    from tiny_models import build_tiny

    s = start_server(str(build_tiny("glm45-eos")), "--chat-format", "glm45", "--served-model-name", "glm-eos",
                     "--max-output-tokens", "48", "--responses-db", str(db), "--api-key", "other-key",
                     api_key="eos-key", max_model_len=32768)
    s.extra["db"] = db
    return s


@pytest.fixture(scope="module")
def eos_holder(tmp_path_factory):
    """The module's glm45-eos server; the restart test replaces it (same database)."""
    holder = {"server": _start_eos(tmp_path_factory.mktemp("eos") / "responses.sqlite3")}
    yield holder
    holder["server"].stop()


@pytest.fixture
def eos_server(eos_holder):
    return eos_holder["server"]


def test_codex_exec_turn_on_vllm(eos_server, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    r = run_codex(eos_server.base_url, "eos-key", "glm-eos", "say hi", work, 240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out + eos_server.log()[-3000:]
    assert "ERROR" not in out, out


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agents_sdk_on_vllm(eos_server, api):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, \
        function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    called: list[str] = []

    @function_tool
    def local_time() -> str:
        """The local time."""
        called.append("local_time")
        return "12:00"

    @function_tool
    def local_city() -> str:
        """The city we are in."""
        called.append("local_city")
        return "Paris"

    client = openai.AsyncOpenAI(base_url=eos_server.base_url, api_key="eos-key", max_retries=0, timeout=120)
    model_cls = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    # required: the first turn is a (constrained) call; the SDK then resets the choice to auto
    agent = Agent(name="helper", instructions="Use the tools.", tools=[local_time, local_city],
                  model=model_cls(model="glm-eos", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required"))
    result = asyncio.run(Runner.run(agent, "What time is it here?", max_turns=4))
    assert called and set(called) <= {"local_time", "local_city"}
    assert isinstance(result.final_output, str)
    assert any(getattr(i, "type", "") == "tool_call_output_item" for i in result.new_items)


def test_max_output_tokens_flag_caps_every_request(eos_server):
    c = eos_server.client()
    r = c.chat.completions.create(model="glm-eos", messages=[{"role": "user", "content": "x"}], max_tokens=1000,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 48


def test_responses_db_flag(eos_server):
    c = eos_server.client()
    r = c.responses.create(model="glm-eos", input="hello")
    with sqlite3.connect(eos_server.extra["db"]) as db:
        ids = {row[0] for row in db.execute("SELECT id FROM responses")}
    assert r.id in ids
    assert c.responses.retrieve(r.id).id == r.id


def test_stored_responses_across_a_restart_on_vllm(eos_holder):
    """Stored responses survive a restart of the real server, belong to their key, and
    previous_response_id carries the conversation (the prompt grows by the history)."""
    s = eos_holder["server"]
    c = s.client()
    first = c.responses.create(model="glm-eos", input="My name is Ada and I live in Paris.")
    s.stop()
    eos_holder["server"] = s = _start_eos(s.extra["db"])
    c = s.client()
    assert c.responses.retrieve(first.id).model_dump() == first.model_dump()
    alone = c.responses.create(model="glm-eos", input="What is my name?", store=False)
    follow = c.responses.create(model="glm-eos", input="What is my name?", previous_response_id=first.id)
    assert follow.usage.input_tokens >= alone.usage.input_tokens + first.usage.input_tokens - 8
    other = openai.OpenAI(base_url=s.base_url, api_key="other-key", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError):
        other.responses.create(model="glm-eos", input="x", previous_response_id=first.id)
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
