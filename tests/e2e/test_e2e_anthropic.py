"""``/v1/messages`` on the real vLLM engine (tiny random-weight GLM-4.5), with the real
``anthropic`` SDK.

Random weights make the text gibberish; what must hold anyway: tool_use blocks whose input
is valid against the tool's schema for ``any`` / ``tool`` (constrained decoding), at most one
with ``disable_parallel_tool_use``, the stream helper's final message equal to the
non-streamed one, ``max_tokens`` clamped to the room, and a thinking budget that closes the
reasoning and still yields a valid call.  Uses the session's ``glm45_server``.
"""

from __future__ import annotations

import anthropic
import jsonschema
import pytest

pytestmark = pytest.mark.e2e

WEATHER = {"name": "get_weather", "description": "查询城市天气", "input_schema": {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["北京", "上海", "深圳"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
SEARCH = {"name": "search", "input_schema": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 12}, "top": {"type": "boolean"}},
    "required": ["q", "top"], "additionalProperties": False}}
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
MSGS = [{"role": "user", "content": "北京明天天气怎么样？"}]
MODEL = "tiny-glm45"


@pytest.fixture(scope="module")
def client(glm45_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=glm45_server.url, api_key="none", max_retries=0, timeout=120)


def tool_uses(message, names=None) -> list:
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls, f"no tool_use in {message.content}"
    for c in calls:
        assert c.id.startswith("toolu_") and c.name in (names or SCHEMAS)
        jsonschema.validate(c.input, SCHEMAS[c.name])
    assert message.stop_reason == "tool_use"
    return calls


def no_ids(message) -> dict:
    """The message less what differs between two sends of one request: its ids, and the prompt's
    split into fresh and cached tokens (the second send reads the prompt from the prefix cache)."""
    d = message.model_dump()
    d.pop("id")
    for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        d["usage"].pop(k, None)
    for b in d["content"]:
        b.pop("id", None)
    return d


# (with parallel calls allowed, the random model runs on after its calls until max_tokens)
@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "search"}])
def test_constrained_tool_use_streamed_and_not(client, choice) -> None:
    kw = dict(model=MODEL, max_tokens=200, extra_body={"temperature": 0}, tools=TOOLS, tool_choice=choice, messages=MSGS,
              thinking={"type": "disabled"})
    whole = client.messages.create(**kw)
    tool_uses(whole, ["search"] if choice["type"] == "tool" else None)
    with client.messages.stream(**kw) as st:
        final = st.get_final_message()
    assert no_ids(final) == no_ids(whole)


def test_disable_parallel_tool_use_gives_one_call(client) -> None:
    m = client.messages.create(model=MODEL, max_tokens=300, extra_body={"temperature": 0.8}, tools=TOOLS,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True}, messages=MSGS,
                               thinking={"type": "disabled"})
    assert len(tool_uses(m)) == 1


def test_tool_choice_none_and_tool_loop(client) -> None:
    first = client.messages.create(model=MODEL, max_tokens=200, extra_body={"temperature": 0}, tools=TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather"}, messages=MSGS,
                                   thinking={"type": "disabled"})
    call = tool_uses(first, ["get_weather"])[0]
    history = MSGS + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "晴，25°C"}]},
    ]
    second = client.messages.create(model=MODEL, max_tokens=16, extra_body={"temperature": 0}, tools=TOOLS,
                                    tool_choice={"type": "none"}, messages=history)
    assert not [b for b in second.content if b.type == "tool_use"]
    assert second.stop_reason in ("end_turn", "max_tokens")
    # tool_choice none leaves the tools out of the prompt; the call and its result are in it
    alone = client.messages.count_tokens(model=MODEL, tools=TOOLS, tool_choice={"type": "none"}, messages=MSGS)
    assert second.usage.input_tokens > alone.input_tokens + 10


def test_max_tokens_clamped_and_count_tokens(client, glm45_server) -> None:
    messages = [{"role": "user", "content": "word " * 1900}]
    n = client.messages.count_tokens(model=MODEL, messages=messages, thinking={"type": "disabled"}).input_tokens
    m = client.messages.create(model=MODEL, max_tokens=32000, messages=messages, thinking={"type": "disabled"})
    assert m.usage.input_tokens == n
    assert m.usage.output_tokens <= 2048 - n
    assert m.stop_reason in ("end_turn", "max_tokens")


def test_thinking_budget_then_valid_call(client) -> None:
    # Without the budget the random model never closes its reasoning: max_tokens, no call.
    kw = dict(model=MODEL, max_tokens=300, extra_body={"temperature": 0}, tools=TOOLS, messages=MSGS,
              tool_choice={"type": "any", "disable_parallel_tool_use": True},
              thinking={"type": "enabled", "budget_tokens": 8})
    m = client.messages.create(**kw)
    thinking = [b for b in m.content if b.type == "thinking"]
    assert len(thinking) == 1 and thinking[0].signature
    assert len(tool_uses(m)) == 1
    assert 8 < m.usage.output_tokens < 300
    with client.messages.stream(**kw) as st:
        final = st.get_final_message()
    assert no_ids(final) == no_ids(m)


def test_image_becomes_a_note_and_bad_image_data_a_400(client) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert raw.headers["X-Glmserve-Media-Replaced"] == "1" and raw.parse().usage.output_tokens > 0
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64"}}]}])
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.data" in exc.value.body["error"]["message"]


def test_thinking_budget_on_chat_completions(glm45_server) -> None:
    """The same switch on Chat Completions: the reasoning stops at the budget, the call follows."""
    r = glm45_server.client().chat.completions.create(
        model=MODEL, max_tokens=300, temperature=0, messages=MSGS, parallel_tool_calls=False, tool_choice="required",
        tools=[{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}} for t in TOOLS],
        extra_body={"thinking_budget": 8})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    import json

    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert choice.message.model_extra.get("reasoning_content")
    assert 8 < r.usage.completion_tokens < 300


def test_async_client(glm45_server) -> None:
    import asyncio

    kw = dict(model=MODEL, max_tokens=200, extra_body={"temperature": 0}, tools=TOOLS, messages=MSGS,
              tool_choice={"type": "tool", "name": "get_weather"}, thinking={"type": "disabled"})

    async def go():
        async with anthropic.AsyncAnthropic(base_url=glm45_server.url, api_key="none", max_retries=0, timeout=120) as c:
            whole = await c.messages.create(**kw)
            async with c.messages.stream(**kw) as st:
                return whole, await st.get_final_message()

    whole, final = asyncio.run(go())
    tool_uses(whole, ["get_weather"])
    assert no_ids(final) == no_ids(whole)
