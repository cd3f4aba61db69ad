"""The embedded default model (SmolLM2-135M-Instruct, ChatML) served for real.

The server is started with no MODEL argument, exactly as the README's quick start does.
"""

from __future__ import annotations

import json

import httpx
import openai
import pydantic_core
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}


def test_models_and_health(default_server):
    c = default_server.client()
    ids = [m.id for m in c.models.list()]
    assert ids == [MODEL]
    assert httpx.get(default_server.url + "/health").json()["status"] == "ok"
    v = httpx.get(default_server.url + "/version").json()
    assert v["chat_format"] == "chatml" and v["vllm"]


def test_chat_non_streaming_chinese(default_server):
    c = default_server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "用中文说你好"}],
                                  max_tokens=12, temperature=0)
    assert isinstance(r, ChatCompletion)
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # deterministic at temperature 0: the same request gives the same text
    r2 = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "用中文说你好"}],
                                   max_tokens=12, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content
    assert r2.id != r.id


def test_chat_streaming_matches_non_streaming(default_server):
    c = default_server.client()
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "北京是哪个国家的首都？"}]
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, seed=1)
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(ch, ChatCompletionChunk) for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # really streamed


def test_sampling_parameters(default_server):
    """``seed`` fixes the sampler's random stream, which is all vLLM promises online: logits are
    not bit-identical across ways of computing a request.  A prompt read from the prefix cache
    computes differently from a cold one, and the ``n`` choices of one request are scheduled
    apart or together as they come, so equal seeded ``n=2`` requests can differ (measured: 1
    in 3 alone, and 1 in 6 even with both cached).  So the seed is checked where requests are
    computed alike: ``n=1``, one at a time, both from the prompt the first request cached."""
    c = default_server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Count: 1, 2, 3,"}], max_completion_tokens=20,
              temperature=0.7, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5, stop=["\n\n"])
    r = c.chat.completions.create(**kw, n=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch in r.choices:
        assert "\n\n" not in (ch.message.content or "")
    one = c.chat.completions.create(**kw)
    again = c.chat.completions.create(**kw)
    assert one.choices[0].message.content == again.choices[0].message.content  # seeded
    assert one.usage.completion_tokens > 0


def test_response_format_json_schema(default_server):
    c = default_server.client()
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a person as JSON."}],
                                  max_tokens=60, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=40,
                                  temperature=0, response_format={"type": "json_object"})
    ch = r.choices[0]
    assert ch.finish_reason in ("stop", "length"), ch
    if ch.finish_reason == "stop":  # a whole object; cut by max_tokens, the start of one
        assert isinstance(json.loads(ch.message.content), dict)
    else:
        assert ch.message.content.lstrip().startswith("{")
        assert isinstance(pydantic_core.from_json(ch.message.content, allow_partial=True), dict)


def test_logprobs(default_server):
    c = default_server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert all(x.logprob <= 0 and len(x.top_logprobs) >= 1 for x in lp)
    assert "".join(x.token for x in lp) == r.choices[0].message.content


def test_completions(default_server):
    c = default_server.client()
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert isinstance(r, Completion) and r.choices[0].text
    s = list(c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  stream=True))
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == r.choices[0].text
    two = c.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert [ch.index for ch in two.choices] == [0, 1]


def test_completions_logprobs(default_server):
    c = default_server.client()
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    s = list(c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=2, stream=True))
    assert [t for ch in s if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == lp.tokens


def test_tools_hermes_required_and_named(default_server):
    """The embedded default gets the same tool features (Hermes style)."""
    c = default_server.client()
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "北京天气？"}],
                                      tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False,
                                      max_tokens=60, temperature=0)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(msg.tool_calls) == 1 and msg.tool_calls[0].function.name == "get_weather"
        args = json.loads(msg.tool_calls[0].function.arguments)
        assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")


def test_tool_choice_none_gives_no_call(default_server):
    c = default_server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER], tool_choice="none", max_tokens=20, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),  # as OpenAI and vLLM answer
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        # (a max_tokens above the room is granted the room, as vLLM does: tests/api/test_output_budget.py)
        ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 3000}]}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, 400,
         "tools[0].function.parameters"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
          "tool_choice": {"type": "function", "function": {"name": "other"}}}, 400, "tool_choice"),
    ],
)
def test_errors_are_openai_shaped(default_server, body, status, param):
    r = httpx.post(default_server.base_url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param, err


def test_malformed_json_is_400(default_server):
    r = httpx.post(default_server.base_url + "/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_client_errors_raise_openai_exceptions(default_server):
    c = default_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 5000}], max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    # the engine is still fine afterwards
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices[0].message.content is not None
