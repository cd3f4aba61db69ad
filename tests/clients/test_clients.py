"""Agent loops through the clients people already use, against the real server.

Each test runs on the embedded default model (SmolLM2, ChatML + Hermes tool calls) and on
the tiny random-weight glm-4-9b-chat model (``--chat-format glm4``).  The tiny model writes
gibberish, so assertions are about structure only: tool names, arguments valid against
the schema, call ids carried from the call to its result, an assistant message on the
second turn.  Tool calls are forced (``required`` or a named tool) and decoding is greedy,
so the calls are deterministic; schemas use enums so a random model's strings end.

Clients: ``openai`` sync and async, the streaming helper ``chat.completions.stream``,
``openai.pydantic_function_tool`` with ``chat.completions.parse`` (strict), and LangChain's
``ChatOpenAI`` with ``bind_tools``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.e2e

SERVERS = {"default_server": "SmolLM2-135M-Instruct", "glm4_server": "tiny-glm4"}

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Beijing", "Shanghai"]},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"tz": {"type": "string", "enum": ["UTC", "Asia/Shanghai"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
                                      "parameters": WEATHER_PARAMS, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a time zone",
                                      "parameters": TIME_PARAMS, "strict": True}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "system", "content": "You are a helpful assistant with tools."},
            {"role": "user", "content": "What is the weather in Beijing right now?"}]
MAX_TOKENS = 96


@pytest.fixture(params=list(SERVERS))
def served(request):
    """(server, model name) for each of the two servers."""
    return request.getfixturevalue(request.param), SERVERS[request.param]


def _check_call(call) -> dict:
    assert call.type == "function"
    assert call.id and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


# --------------------------------------------------------------------------- openai, sync


def test_openai_sync_agent_loop(served):
    server, model = served
    c = server.client()
    messages = list(QUESTION)
    r = c.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.role == "assistant"
    (call,) = msg.tool_calls
    _check_call(call)
    # the usual loop: append the assistant message object as returned, then one result per call
    messages.append(msg)
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 25, "sky": "晴"},
                                                                                     ensure_ascii=False)})
    r2 = c.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                   temperature=0, max_tokens=16)
    m2 = r2.choices[0].message
    assert m2.role == "assistant" and not m2.tool_calls and isinstance(m2.content, str) and m2.content
    assert r2.choices[0].finish_reason in ("stop", "length")
    base = c.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert r2.usage.prompt_tokens > base.usage.prompt_tokens  # the call and its result are in the prompt


def test_openai_named_tool(served):
    server, model = served
    r = server.client().chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=MAX_TOKENS)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    for call in calls:
        _check_call(call)


# --------------------------------------------------------------------------- openai, async


def test_openai_async_agent_loop(served):
    server, model = served

    async def loop() -> None:
        async with server.async_client() as c:
            messages = list(QUESTION)
            r = await c.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
            (call,) = r.choices[0].message.tool_calls
            _check_call(call)
            messages += [r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "25"}]
            # streamed second turn, several in flight at once
            async def answer() -> str:
                stream = await c.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                         tool_choice="none", temperature=0, max_tokens=12, stream=True)
                text = []
                async for chunk in stream:
                    if chunk.choices:
                        assert not chunk.choices[0].delta.tool_calls
                        text.append(chunk.choices[0].delta.content or "")
                return "".join(text)

            answers = await asyncio.gather(*(answer() for _ in range(3)))
            assert all(answers)
            # concurrent forced calls are all valid
            rs = await asyncio.gather(*(c.chat.completions.create(
                model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                temperature=0.8, seed=s, max_tokens=MAX_TOKENS) for s in range(3)))
            for x in rs:
                (call,) = x.choices[0].message.tool_calls
                _check_call(call)

    asyncio.run(loop())


# --------------------------------------------------------------------------- the streaming helper


@pytest.mark.parametrize("parallel", [False, True], ids=["one-call", "parallel"])
def test_stream_helper_accumulates_the_same_calls(served, parallel):
    """``chat.completions.stream``: its final completion's calls equal a non-streamed
    request's (same seed, temperature 0); with parallel calls SmolLM2 makes two."""
    server, model = served
    c = server.client()
    kw = dict(model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
              temperature=0, seed=11, max_tokens=MAX_TOKENS)
    plain = c.chat.completions.create(**kw)
    expected = [(t.function.name, t.function.arguments) for t in plain.choices[0].message.tool_calls]
    assert expected and (parallel or len(expected) == 1)
    deltas: dict[int, str] = {}
    done = []
    with c.chat.completions.stream(**kw) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                deltas[event.index] = deltas.get(event.index, "") + event.arguments_delta
            elif event.type == "tool_calls.function.arguments.done":
                done.append((event.index, event.name, event.arguments, event.parsed_arguments))
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(t.function.name, t.function.arguments) for t in calls] == expected
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason == "tool_calls"
    for i, t in enumerate(calls):
        args = _check_call(t)
        assert t.function.parsed_arguments == args  # strict tools are parsed by the helper
        assert deltas[i] == t.function.arguments
    assert [(i, n, a) for i, n, a, _ in done] == [(i, n, a) for i, (n, a) in enumerate(expected)]


# --------------------------------------------------------------------------- pydantic_function_tool


class Place(BaseModel):
    city: Literal["Beijing", "Shanghai"]


class GetWeather(BaseModel):
    """Get the current weather for a place."""

    place: Place
    unit: Literal["c", "f"] = Field(description="c for Celsius, f for Fahrenheit")


def test_pydantic_function_tool_strict_parse(served):
    server, model = served
    tool = openai.pydantic_function_tool(GetWeather)
    assert tool["function"]["strict"] is True and "$defs" in tool["function"]["parameters"]
    c = server.client()
    r = c.chat.completions.parse(model=model, messages=QUESTION, tools=[tool], tool_choice="required",
                                 parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "GetWeather" and call.id.startswith("call_")
    parsed = call.function.parsed_arguments
    assert isinstance(parsed, GetWeather) and isinstance(parsed.place, Place)
    assert parsed == GetWeather.model_validate_json(call.function.arguments)
    # and the result goes back with the call's id
    messages = list(QUESTION) + [r.choices[0].message,
                                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    # (create, not parse: parse raises LengthFinishReasonError when the random model runs to max_tokens)
    r2 = c.chat.completions.create(model=model, messages=messages, tools=[tool], tool_choice="none",
                                   temperature=0, max_tokens=12)
    assert r2.choices[0].message.role == "assistant" and not r2.choices[0].message.tool_calls


# --------------------------------------------------------------------------- LangChain


class get_weather(BaseModel):  # noqa: N801 - the class name is the tool name
    """Get the current weather for a city."""

    city: Literal["Beijing", "Shanghai"]
    unit: Literal["c", "f"]


def _llm(server, model, **kw):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=server.base_url, api_key="none", model=model, temperature=0,
                                       max_retries=0, timeout=120, **kw)


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "stream"])
@pytest.mark.parametrize("choice", ["get_weather", "any"])
def test_langchain_tool_round_trip(served, streamed, choice):
    from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage

    server, model = served
    llm = _llm(server, model, max_tokens=MAX_TOKENS)
    bound = llm.bind_tools([get_weather], tool_choice=choice, parallel_tool_calls=False)
    history = [SystemMessage(QUESTION[0]["content"]), HumanMessage(QUESTION[1]["content"])]
    if streamed:
        ai = None
        n = 0
        chunk_ids = set()
        for chunk in bound.stream(history):
            assert isinstance(chunk, AIMessageChunk)
            chunk_ids |= {c["id"] for c in chunk.tool_call_chunks if c.get("id")}
            ai = chunk if ai is None else ai + chunk
            n += 1
        assert n > 2  # really streamed
        assert ai.tool_call_chunks and not ai.invalid_tool_calls
        assert chunk_ids == {ai.tool_calls[0]["id"]}  # one id for the call, not a new one per chunk
    else:
        ai = bound.invoke(history)
        assert isinstance(ai, AIMessage)
    (tc,) = ai.tool_calls
    assert tc["name"] == "get_weather" and tc["id"].startswith("call_")
    jsonschema.validate(tc["args"], WEATHER_PARAMS)
    get_weather.model_validate(tc["args"])

    history += [ai, ToolMessage(content=json.dumps({"temp_c": 25}), tool_call_id=tc["id"])]
    answerer = _llm(server, model, max_tokens=12).bind_tools([get_weather], tool_choice="none")
    if streamed:
        final = None
        for chunk in answerer.stream(history):
            final = chunk if final is None else final + chunk
        assert isinstance(final, AIMessageChunk)
    else:
        final = answerer.invoke(history)
        assert isinstance(final, AIMessage)
    assert not final.tool_calls and isinstance(final.content, str) and final.content
    # the server saw the whole loop: the tool result's id matched the call it answers
    assert final.usage_metadata is None or final.usage_metadata["input_tokens"] > 0
