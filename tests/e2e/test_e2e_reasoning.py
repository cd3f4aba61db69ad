"""Reasoning families on the real engine: GLM-Z1 (JSON calls) and GLM-4.7 (XML calls).

The tiny models have random weights, so a reasoning block rarely ends by itself:
with thinking on we check that reasoning lands in ``reasoning_content`` (never in
``content``, markers stripped); with thinking off the constrained call must be valid.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from servers import start_server
from test_e2e_glm import MSGS, SCHEMAS, TOOLS, check_calls, streamed_calls

pytestmark = pytest.mark.e2e

MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "<arg_value>", "<|assistant|>")


@pytest.fixture(scope="module")
def glmz1_server():
    from tiny_models import build_tiny

    s = start_server(str(build_tiny("glm4-0414")), "--chat-format", "glmz1", "--served-model-name", "tiny-z1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def glm47_server():
    from tiny_models import build_tiny

    s = start_server(str(build_tiny("glm45")), "--chat-format", "glm47", "--served-model-name", "tiny-glm47")
    yield s
    s.stop()


def test_glmz1_reasoning_goes_to_reasoning_content(glmz1_server):
    c = glmz1_server.client()
    kw = dict(model="tiny-z1", messages=MSGS, max_tokens=24, temperature=0)
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content") or ""
    assert reasoning, msg  # the prompt ends inside <think>: everything until </think> is reasoning
    for m in MARKERS:
        assert m not in (msg.content or "") and m not in reasoning
    chunks = list(c.chat.completions.create(**kw, stream=True))
    streamed = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks
                       if ch.choices)
    assert streamed == reasoning
    assert not any(ch.choices and ch.choices[0].delta.content for ch in chunks) or msg.content
    # vLLM's name too, in the message and in every delta that carries reasoning
    assert msg.model_extra.get("reasoning") == reasoning
    assert all((ch.choices[0].delta.model_extra or {}).get("reasoning")
               == (ch.choices[0].delta.model_extra or {}).get("reasoning_content") for ch in chunks if ch.choices)


@pytest.fixture(scope="module")
def glmz1_closing_server():
    """GLM-Z1 on a tiny model disposed to close its reasoning (``tiny_models`` kind ``glmz1``):
    a random model never writes ``</think>`` by itself, so no call would ever follow."""
    from tiny_models import build_tiny

    s = start_server(str(build_tiny("glmz1")), "--chat-format", "glmz1", "--served-model-name", "tiny-z1")
    yield s
    s.stop()


def test_glmz1_required_returns_a_valid_call(glmz1_closing_server):
    c = glmz1_closing_server.client()
    kw = dict(model="tiny-z1", messages=MSGS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=120, temperature=0)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", r
    check_calls(ch.message.tool_calls)
    assert len(ch.message.tool_calls) == 1 and not ch.message.content
    got, finish, _ = streamed_calls(c.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(v["name"], v["args"]) for v in got.values()] == [(x.function.name, x.function.arguments)
                                                              for x in ch.message.tool_calls]


def test_glm47_thinking_off_constrained_calls(glm47_server):
    c = glm47_server.client()
    kw = dict(model="tiny-glm47", messages=MSGS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=100, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    r = c.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls", r
    calls = r.choices[0].message.tool_calls
    check_calls(calls)
    got, finish, _ = streamed_calls(c.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(v["name"], v["args"]) for v in got.values()] == [(x.function.name, x.function.arguments) for x in calls]
    prompt = httpx.post(glm47_server.url + "/tokenize", json={"messages": MSGS, "tools": TOOLS,
                                                             "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert prompt["prompt"].endswith("<|assistant|></think>")


def test_glm47_reasoning_effort_switch(glm47_server):
    """``reasoning_effort: "none"`` turns thinking off like chat_template_kwargs does."""
    c = glm47_server.client()
    r = c.chat.completions.create(model="tiny-glm47", messages=MSGS, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  max_tokens=100, temperature=0, reasoning_effort="none")
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def test_glm47_thinking_on_keeps_reasoning_separate(glm47_server):
    """A random model never closes its reasoning, so a thinking budget closes it after 6 tokens;
    the forced call then follows, and neither part leaks into the other."""
    c = glm47_server.client()
    r = c.chat.completions.create(model="tiny-glm47", messages=MSGS, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=150, temperature=0,
                                  extra_body={"thinking_budget": 6})
    ch = r.choices[0]
    reasoning = ch.message.model_extra.get("reasoning_content") or ""
    assert reasoning
    for m in MARKERS:
        assert m not in (ch.message.content or "") and m not in reasoning
    assert ch.finish_reason == "tool_calls", r
    check_calls(ch.message.tool_calls)


def test_glm47_cut_calls_are_the_same_streamed_and_whole(glm47_server):
    """Cut after every token of a forced call's opener, name and first argument: the opener or a
    partial name is never text (under ``required`` the model may spell ``<tool_call>`` out of
    plain tokens, since the grammar matches text), a call whose name closed comes back as the
    call so far, and streamed and whole answers agree."""
    c = glm47_server.client()
    kw = dict(model="tiny-glm47", messages=MSGS, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    full = c.chat.completions.create(**kw, max_tokens=100, logprobs=True)
    assert full.choices[0].finish_reason == "tool_calls", full
    (call,) = full.choices[0].message.tool_calls
    tokens = [t.token for t in full.choices[0].logprobs.content]
    text = "".join(tokens)
    first_value = text.index("<arg_value>") + len("<arg_value>")
    at_value = next(k for k in range(len(tokens) + 1) if len("".join(tokens[:k])) >= first_value)
    ends = range(1, min(at_value + 2, len(tokens)))  # up to the first value's first token
    seen_named, seen_unnamed = False, False
    for k in ends:
        r = c.chat.completions.create(**kw, max_tokens=k)
        ch = r.choices[0]
        assert ch.finish_reason == "length" and not ch.message.content, (k, r)
        calls = [(x.function.name, x.function.arguments) for x in ch.message.tool_calls or []]
        assert len(calls) <= 1 and all(n == call.function.name and call.function.arguments.startswith(a)
                                       for n, a in calls), (k, calls)
        seen_named, seen_unnamed = seen_named or bool(calls), seen_unnamed or not calls
        got, finish, chunks = streamed_calls(c.chat.completions.create(**kw, max_tokens=k, stream=True))
        assert finish == "length"
        assert not any(ch.choices and ch.choices[0].delta.content for ch in chunks), k
        assert [(v["name"], v["args"]) for v in got.values()] == calls, k
    assert seen_named and seen_unnamed, tokens
