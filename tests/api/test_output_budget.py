"""The output budget on every API: asking for more than the prompt leaves in the context is
clamped to the room left, as vLLM's server does (``get_max_tokens``), and the answer says so
(``finish_reason`` ``length`` / ``incomplete`` / ``max_tokens`` when the budget runs out, the
``X-Glmserve-Max-Tokens`` header, the request log).  Only a prompt that does not fit at all is
a 400.  Agents depend on it: OpenCode, Kilo and Qwen Code ask for a fixed 32000 whatever the
served context (their sessions: tests/clients/test_agent_clis.py).

The scripted engine's tokens are characters, so the room left is ``max_model_len`` minus the
prompt's length in characters."""

from __future__ import annotations

import logging

import anthropic
import httpx
import openai
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.api.runner import MAX_TOKENS_HEADER
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

CONTEXT = 1500
ASKED = 32000  # what OpenCode, Kilo and Qwen Code ask for
LONG = "</think>" + "y" * (CONTEXT + 100)  # more than any room this context leaves


class Budgeted(ThreadServer):
    def __init__(self, settings: Settings | None = None) -> None:
        self.engine = ScriptedEngine(lambda prompt, params: list(LONG), model_name="m", max_model_len=CONTEXT)
        super().__init__(create_app(self.engine, get_format("glm45"), settings or Settings()))

    def room(self) -> int:
        """The room the last request's prompt left."""
        return CONTEXT - len(self.engine.last_prompt)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=30)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="none", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def srv():
    s = Budgeted()
    yield s
    s.stop()


@pytest.fixture
def logged(caplog):
    with caplog.at_level(logging.INFO, logger="glmserve.requests"):
        yield lambda: [r.getMessage() for r in caplog.records if r.name == "glmserve.requests"]


MSGS = [{"role": "user", "content": "写一首诗"}]


def test_chat_budget_beyond_the_room_is_clamped_and_says_so(srv, logged):
    raw = srv.openai().chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=ASKED)
    r, room = raw.parse(), srv.room()
    assert 0 < room < ASKED and srv.engine.last_params.max_tokens == room
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == room
    assert raw.headers[MAX_TOKENS_HEADER] == str(room)
    assert f"max_tokens={room} max_tokens_asked={ASKED}" in logged()[-1]


def test_chat_stream_carries_the_granted_budget(srv, logged):
    with srv.openai().chat.completions.with_streaming_response.create(
            model="m", messages=MSGS, max_completion_tokens=ASKED, stream=True,
            stream_options={"include_usage": True}) as raw:
        assert raw.headers[MAX_TOKENS_HEADER] == str(srv.room())
        chunks = list(raw.parse())
    room = srv.room()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == room
    assert f"max_tokens={room} max_tokens_asked={ASKED}" in logged()[-1]


def test_a_budget_within_the_room_is_granted_as_asked(srv, logged):
    raw = srv.openai().chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=7)
    assert raw.headers[MAX_TOKENS_HEADER] == "7" and raw.parse().usage.completion_tokens == 7
    assert "max_tokens=7" in logged()[-1] and "max_tokens_asked" not in logged()[-1]
    raw = srv.openai().chat.completions.with_raw_response.create(model="m", messages=MSGS)  # none asked: all the room
    assert raw.headers[MAX_TOKENS_HEADER] == str(srv.room()) and "max_tokens_asked" not in logged()[-1]


def test_responses_budget_is_clamped_and_the_response_incomplete(srv, logged):
    raw = srv.openai().responses.with_raw_response.create(model="m", input="写一首诗", max_output_tokens=ASKED,
                                                          store=False)
    r, room = raw.parse(), srv.room()
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == room and raw.headers[MAX_TOKENS_HEADER] == str(room)
    assert f"max_tokens={room} max_tokens_asked={ASKED}" in logged()[-1]


def test_messages_budget_is_clamped_and_stops_on_max_tokens(srv, logged):
    raw = srv.anthropic().messages.with_raw_response.create(model="m", max_tokens=ASKED, messages=MSGS)
    r, room = raw.parse(), srv.room()
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == room
    assert raw.headers[MAX_TOKENS_HEADER] == str(room)
    assert f"max_tokens={room} max_tokens_asked={ASKED}" in logged()[-1]


def test_completions_clamp_each_prompt_to_its_own_room(srv, logged):
    prompts = ["a" * 100, "b" * 1000]
    raw = srv.openai().completions.with_raw_response.create(model="m", prompt=prompts, max_tokens=ASKED)
    r = raw.parse()
    rooms = [CONTEXT - len(p) for p in prompts]
    assert raw.headers[MAX_TOKENS_HEADER] == ",".join(map(str, rooms))
    assert [len(c.text) for c in r.choices] == rooms and {c.finish_reason for c in r.choices} == {"length"}
    assert f"max_tokens={min(rooms)} max_tokens_asked={ASKED}" in logged()[-1]


def test_the_server_cap_still_wins_over_the_room():
    s = Budgeted(Settings(max_output_tokens=9))
    try:
        raw = s.openai().chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=ASKED)
        assert raw.headers[MAX_TOKENS_HEADER] == "9" and raw.parse().usage.completion_tokens == 9
    finally:
        s.stop()


def test_a_prompt_that_does_not_fit_is_still_a_400_on_every_api(srv):
    big = "长" * (CONTEXT + 10)
    with pytest.raises(openai.BadRequestError) as e:
        srv.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": big}], max_tokens=5)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        srv.openai().responses.create(model="m", input=big, max_output_tokens=5)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "input"
    with pytest.raises(anthropic.BadRequestError) as ae:
        srv.anthropic().messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": big}])
    assert "does not fit" in str(ae.value)
    with pytest.raises(openai.BadRequestError) as e:
        srv.openai().completions.create(model="m", prompt=big, max_tokens=5)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"
    # a prompt that leaves exactly nothing is refused too: there is no room for a single token
    r = httpx.post(srv.base_url + "/completions", json={"model": "m", "prompt": "c" * CONTEXT})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
