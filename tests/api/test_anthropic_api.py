"""``/v1/messages`` over real HTTP with the real ``anthropic`` SDK, against a scripted engine.

The scripted engine replays exact GLM-4.5 outputs, so these tests pin Anthropic's wire
shapes (blocks, stream events, stop reasons, errors as the SDK's exceptions).  The same
paths run on vLLM in ``test_e2e_anthropic.py``.
"""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import pytest

from anthropic_scripted import ScriptedServer, pieces, xml_call

from glmserve.api.anthropic.shape import ThinkingSigner
from glmserve.api.settings import Settings
from glmserve.engine.base import EngineUnavailable, GenerateParams
from glmserve.formats import get_format
from glmserve.server_secret import default_secret

WEATHER = {"name": "get_weather", "description": "天气",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city"]}}
SEARCH = {"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


@pytest.fixture(scope="module")
def srv():
    s = ScriptedServer()
    yield s
    s.stop()


def create(s: ScriptedServer, output, **kw):
    s.output = output
    kw.setdefault("messages", [{"role": "user", "content": "北京天气怎么样？"}])
    return s.client().messages.create(model="glm-test", max_tokens=kw.pop("max_tokens", 256), **kw)


def streamed(s: ScriptedServer, output, **kw):
    s.output = output
    kw.setdefault("messages", [{"role": "user", "content": "北京天气怎么样？"}])
    with s.client().messages.stream(model="glm-test", max_tokens=kw.pop("max_tokens", 256), **kw) as st:
        events = list(st)
        return st.get_final_message(), events


def same(a, b) -> None:
    """Equal apart from ids (each answer gets fresh message and tool_use ids)."""
    da, db = a.model_dump(), b.model_dump()
    for d in (da, db):
        d.pop("id")
        for block in d["content"]:
            if block["type"] == "tool_use":
                assert block["id"].startswith("toolu_")
                block.pop("id")
    assert da == db


OUTPUTS = {
    "text": "\n<think>用户问天气。</think>\n北京今天晴，25°C。",
    "thinking_only_text": "Plain answer without reasoning.",
    "tool_use": "<think>I should call the tool.</think>\n" + xml_call("get_weather", {"city": "北京", "days": 3}),
    "parallel": "<think>two</think>\nLet me check." + xml_call("get_weather", {"city": "北京"})
                + xml_call("search", {"q": "上海 weather"}),
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_stream_final_equals_create(srv: ScriptedServer, kind: str) -> None:
    whole = create(srv, OUTPUTS[kind], tools=[WEATHER, SEARCH])
    final, events = streamed(srv, OUTPUTS[kind], tools=[WEATHER, SEARCH])
    same(whole, final)
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    if kind in ("tool_use", "parallel"):
        assert whole.stop_reason == "tool_use"
        calls = [b for b in whole.content if b.type == "tool_use"]
        assert calls[0].name == "get_weather" and calls[0].input["city"] == "北京"
        if kind == "tool_use":
            assert calls[0].input["days"] == 3
        else:
            assert [c.name for c in calls] == ["get_weather", "search"]
            assert whole.content[1].type == "text" and whole.content[1].text == "Let me check."
        # the streamed partial_json fragments concatenate to the final input
        for i, block in enumerate(final.content):
            if block.type == "tool_use":
                frags = "".join(e.delta.partial_json for e in events
                                if e.type == "content_block_delta" and e.index == i and e.delta.type == "input_json_delta")
                assert json.loads(frags) == block.input
    else:
        assert whole.stop_reason == "end_turn"
    if kind != "thinking_only_text":
        assert whole.content[0].type == "thinking" and whole.content[0].signature
        assert "<think>" not in whole.content[0].thinking
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens == len(pieces(OUTPUTS[kind]))


def test_text_and_thinking_blocks(srv: ScriptedServer) -> None:
    m = create(srv, OUTPUTS["text"])
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "用户问天气。" and m.content[1].text == "北京今天晴，25°C。"
    assert m.id.startswith("msg_") and m.model == "glm-test" and m.role == "assistant"


def test_async_create_and_stream(srv: ScriptedServer) -> None:
    async def go():
        async with srv.async_client() as c:
            return await both(c)

    async def both(c: anthropic.AsyncAnthropic):
        srv.output = OUTPUTS["tool_use"]
        m = await c.messages.create(model="glm-test", max_tokens=100, tools=[WEATHER],
                                    messages=[{"role": "user", "content": "hi"}])
        async with c.messages.stream(model="glm-test", max_tokens=100, tools=[WEATHER],
                                     messages=[{"role": "user", "content": "hi"}]) as st:
            final = await st.get_final_message()
        return m, final

    m, final = asyncio.run(go())
    same(m, final)
    assert m.stop_reason == "tool_use"


def test_tool_use_loop(srv: ScriptedServer) -> None:
    def script(prompt: str) -> str:
        if "<tool_response>" in prompt:
            return "<think>got it</think>\n北京晴。"
        return xml_call("get_weather", {"city": "北京"})

    srv.output = script
    client = srv.client()
    messages = [{"role": "user", "content": "北京天气？"}]
    first = client.messages.create(model="glm-test", max_tokens=200, tools=[WEATHER], messages=messages)
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": [{"type": "text", "text": "sunny, 25°C"}]}]}]
    second = client.messages.create(model="glm-test", max_tokens=200, tools=[WEATHER], messages=messages)
    assert second.stop_reason == "end_turn" and second.content[-1].text == "北京晴。"
    prompt = srv.engine.last_prompt
    assert "<tool_response>\nsunny, 25°C\n</tool_response>" in prompt
    assert "<arg_value>北京</arg_value>" in prompt  # the call is in the history, in the family's format


def test_count_tokens_matches_usage(srv: ScriptedServer) -> None:
    client = srv.client()
    kw = dict(model="glm-test", system="be brief", tools=[WEATHER],
              messages=[{"role": "user", "content": "北京天气？"}])
    n = client.messages.count_tokens(**kw).input_tokens
    srv.output = "ok"
    assert client.messages.create(max_tokens=10, **kw).usage.input_tokens == n


def test_max_tokens_is_clamped_to_the_room(srv: ScriptedServer) -> None:
    m = create(srv, "fine", max_tokens=32000)
    assert m.stop_reason == "end_turn"
    assert srv.engine.last_params.max_tokens == srv.engine.max_model_len - m.usage.input_tokens


def test_max_tokens_stop_reason(srv: ScriptedServer) -> None:
    m = create(srv, "a long answer that will not fit", max_tokens=2)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2
    final, _ = streamed(srv, "a long answer that will not fit", max_tokens=2)
    same(m, final)


@pytest.mark.parametrize("choice, constrained, tools_shown", [
    ({"type": "auto"}, True, True),
    ({"type": "any"}, True, True),
    ({"type": "tool", "name": "search"}, True, True),
    ({"type": "any", "disable_parallel_tool_use": True}, True, True),
    ({"type": "none"}, False, False),
])
def test_tool_choice_reaches_the_constraint(srv: ScriptedServer, choice, constrained, tools_shown) -> None:
    create(srv, "x", tools=[WEATHER, SEARCH], tool_choice=choice)
    c = srv.engine.last_params.constraint
    assert (c is not None) == constrained
    assert ("get_weather" in srv.engine.last_prompt) == tools_shown
    if choice["type"] == "tool":
        assert "search" in c.grammar and "get_weather" not in c.grammar


def test_system_messages_in_the_array_and_thinking_switch(srv: ScriptedServer) -> None:
    create(srv, "x", system=[{"type": "text", "text": "TOP", "cache_control": {"type": "ephemeral"}}],
           messages=[{"role": "user", "content": "q"}, {"role": "system", "content": "MIDDLE"}],
           thinking={"type": "disabled"})
    prompt = srv.engine.last_prompt
    assert prompt.index("<|system|>\nTOP") < prompt.index("<|user|>\nq") < prompt.index("<|system|>\nMIDDLE")
    assert prompt.endswith("<|assistant|>\n<think></think>")
    create(srv, "x", thinking={"type": "adaptive"})
    assert srv.engine.last_prompt.endswith("<|assistant|>")


def test_omitted_thinking_keeps_the_signature(srv: ScriptedServer) -> None:
    m = create(srv, OUTPUTS["text"], thinking={"type": "adaptive", "display": "omitted"})
    assert m.content[0].type == "thinking" and m.content[0].thinking == "" and m.content[0].signature
    final, events = streamed(srv, OUTPUTS["text"], thinking={"type": "adaptive", "display": "omitted"})
    same(m, final)
    assert not any(e.type == "content_block_delta" and e.delta.type == "thinking_delta" for e in events)


def test_thinking_history_is_sent_back(srv: ScriptedServer) -> None:
    sign = ThinkingSigner(default_secret()).sign  # the server's own (generated) secret
    create(srv, "x", messages=[
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "REASONED", "signature": sign("REASONED")},
                                          {"type": "text", "text": "a1"}]},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "LATEST", "signature": sign("LATEST")},
                                          {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]},
    ], tools=[SEARCH])
    # GLM-4.5 keeps the reasoning of the turns after the last user message only
    assert "<think>LATEST</think>" in srv.engine.last_prompt and "REASONED" not in srv.engine.last_prompt


def test_unsupported_tool_types_are_left_out(srv: ScriptedServer) -> None:
    srv.output = "ok"
    r = httpx.post(srv.url + "/v1/messages?beta=true", json={
        "model": "glm-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
                  {"type": "code_execution_20250825", "name": "code_execution"}],
    }, headers={"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"})
    assert r.status_code == 200, r.text
    assert r.headers["x-glmserve-unsupported-tools"] == "web_search,code_execution"
    assert "get_weather" in srv.engine.last_prompt and "web_search" not in srv.engine.last_prompt


def test_claude_code_request_is_served(srv: ScriptedServer) -> None:
    """The body Claude Code 2.1.328 really sends (captured), replayed: a valid event stream."""
    from test_anthropic_mapping import claude_code_request

    cap = claude_code_request(1)
    srv.output = "<think>ok</think>\nHi!"
    big = ScriptedServer(max_model_len=200_000, model=cap["body"]["model"])
    try:
        big.output = srv.output
        with httpx.stream("POST", big.url + cap["path"], json=cap["body"], headers=cap["headers"], timeout=30) as r:
            assert r.status_code == 200
            text = "".join(r.iter_text())
    finally:
        big.stop()
    names = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert '"thinking": ""' in text  # display: omitted
    assert '"stop_reason": "end_turn"' in text


# --------------------------------------------------------------------------- errors


def test_errors_are_sdk_exceptions(srv: ScriptedServer) -> None:
    client = srv.client()
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="glm-test", max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                        "data": "not base64!"}}]}])
    assert exc.value.body["type"] == "error"
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.data" in exc.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="glm-test", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="glm-test", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                               tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="glm-test", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                               tools=[{"name": "bad", "input_schema": {"type": "object", "properties": {"a": {"type": 5}}}}])
    with pytest.raises((anthropic.BadRequestError, anthropic.NotFoundError)) as exc:
        client.messages.create(model="other", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["type"] == "error"
    r = httpx.post(srv.url + "/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_auth_with_x_api_key() -> None:
    s = ScriptedServer(Settings(api_keys=["sekret"], max_body_bytes=20_000))
    try:
        s.output = "ok"
        with pytest.raises(anthropic.AuthenticationError) as exc:
            s.client("wrong").messages.create(model="glm-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["error"]["type"] == "authentication_error"
        m = s.client("sekret").messages.create(model="glm-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert m.content[0].text == "ok"
        # Claude Code with ANTHROPIC_AUTH_TOKEN sends Authorization: Bearer
        bearer = anthropic.Anthropic(base_url=s.url, auth_token="sekret", max_retries=0)
        assert bearer.messages.count_tokens(model="glm-test", messages=[{"role": "user", "content": "x"}]).input_tokens > 0
        with pytest.raises(anthropic.APIStatusError) as exc:
            s.client("sekret").messages.create(model="glm-test", max_tokens=5,
                                               messages=[{"role": "user", "content": "x" * 30_000}])
        assert exc.value.status_code == 413 and exc.value.body["error"]["type"] == "request_too_large"
    finally:
        s.stop()


def test_rate_limit_and_overload() -> None:
    s = ScriptedServer(Settings(max_concurrent_requests=0))
    try:
        with pytest.raises(anthropic.RateLimitError) as exc:
            s.client().messages.create(model="glm-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()
    s = ScriptedServer()
    try:
        s.engine.dead = True
        with pytest.raises(anthropic.InternalServerError) as exc:
            s.client().messages.create(model="glm-test", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert exc.value.status_code == 503 and exc.value.body["error"]["type"] == "overloaded_error"
    finally:
        s.stop()


def test_error_after_the_stream_began_is_in_band(srv: ScriptedServer) -> None:
    def dies(prompt: str) -> str:
        raise EngineUnavailable("engine died")

    srv.output = dies
    with pytest.raises(anthropic.APIStatusError) as exc:
        with srv.client().messages.stream(model="glm-test", max_tokens=10,
                                          messages=[{"role": "user", "content": "x"}]) as st:
            list(st)
    assert "engine died" in str(exc.value)


# --------------------------------------------------------------------------- stop sequences and thinking budget


def test_stop_sequences(srv: ScriptedServer) -> None:
    m = create(srv, "Hello END world", stop_sequences=["END", "QQ"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "END" and m.content[0].text == "Hello "
    final, _ = streamed(srv, "Hello END world", stop_sequences=["END", "QQ"])
    same(m, final)
    m = create(srv, "Hello world", stop_sequences=["END"])
    assert m.stop_reason == "end_turn" and m.stop_sequence is None


class Phases:
    """A script that answers the reasoning request and the answer request of a budgeted
    generation differently; ``params`` / ``prompts`` are those of the requests since install."""

    def __init__(self, reasoning: str, answer: str) -> None:
        self.reasoning, self.answer = reasoning, answer
        self.server: ScriptedServer | None = None

    def install(self, s: ScriptedServer) -> None:
        s.output = self
        s.calls.clear()
        self.server = s

    @property
    def params(self) -> list[GenerateParams]:
        return [c[1] for c in self.server.calls]

    @property
    def prompts(self) -> list[str]:
        return [c[0] for c in self.server.calls]

    def __call__(self, prompt: str) -> str:
        return self.answer if prompt.endswith("</think>") else self.reasoning


def test_thinking_budget_closes_the_reasoning(srv: ScriptedServer) -> None:
    ph = Phases(reasoning="let me think about this for a very long time " * 5, answer="\nThe answer.")
    ph.install(srv)
    m = srv.client().messages.create(model="glm-test", max_tokens=100, thinking={"type": "enabled", "budget_tokens": 5},
                                     messages=[{"role": "user", "content": "q"}])
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == ("let me think about this for a very long time " * 5)[:15]
    assert m.content[1].text == "The answer." and m.stop_reason == "end_turn"
    assert m.usage.output_tokens == 5 + len(pieces("\nThe answer."))
    assert ph.params[0].max_tokens == 5 and "</think>" in ph.params[0].stop
    assert ph.prompts[0].endswith("<|assistant|>\n<think>")
    assert ph.prompts[1] == ph.prompts[0] + m.content[0].thinking + "</think>"
    assert ph.params[1].max_tokens == 95
    final, _ = streamed(srv, ph, thinking={"type": "enabled", "budget_tokens": 5},
                        messages=[{"role": "user", "content": "q"}], max_tokens=100)
    same(m, final)


def test_thinking_budget_keeps_the_tool_constraint(srv: ScriptedServer) -> None:
    ph = Phases(reasoning="short</think>\nignored", answer=xml_call("get_weather", {"city": "北京"}))
    ph.install(srv)
    m = srv.client().messages.create(model="glm-test", max_tokens=100, thinking={"type": "enabled", "budget_tokens": 50},
                                     tools=[WEATHER], tool_choice={"type": "any"},
                                     messages=[{"role": "user", "content": "q"}])
    assert m.content[0].thinking == "short" and m.content[1].input == {"city": "北京"} and m.stop_reason == "tool_use"
    reasoning, answer = ph.params
    # the reasoning: free text without call markers, up to </think> (as inside the full constraint)
    assert reasoning.constraint is not None and "</think>" in reasoning.constraint.grammar
    fmt = get_format("glm45")
    from glmserve.formats.base import ChatRequest, Tool

    answer_only = fmt.constraint(ChatRequest(messages=[], tools=[Tool(name="get_weather", parameters=WEATHER["input_schema"])],
                                             tool_choice="required", enable_thinking=False))
    assert answer.constraint == answer_only  # the answer: required calls, no reasoning part
    assert ph.prompts[1].endswith("<think>short</think>")


def test_thinking_budget_on_chat_completions(srv: ScriptedServer) -> None:
    import openai

    ph = Phases(reasoning="r" * 60, answer="\nok")
    ph.install(srv)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    for extra in ({"thinking_budget": 4}, {"chat_template_kwargs": {"thinking_budget": 4}}):
        srv.calls.clear()
        r = client.chat.completions.create(model="glm-test", messages=[{"role": "user", "content": "q"}],
                                           extra_body=extra)
        msg = r.choices[0].message
        assert msg.content == "ok" and msg.model_extra["reasoning_content"] == "r" * 12
        assert ph.params[0].max_tokens == 4
        assert not any(p.final_only for p in ph.params)  # the budget watches the reasoning token by token
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="glm-test", messages=[{"role": "user", "content": "q"}],
                                       extra_body={"chat_template_kwargs": {"thinking_budget": "lots"}})


def test_disconnect_aborts_the_budgeted_answer() -> None:
    """A client that goes away mid-answer gets its engine request aborted, in either phase."""
    s = ScriptedServer()
    try:
        s.engine.delay = 0.02
        Phases(reasoning="r" * 30, answer="\n" + "a" * 600).install(s)
        with s.client().messages.stream(model="glm-test", max_tokens=1000, messages=[{"role": "user", "content": "q"}],
                                        thinking={"type": "enabled", "budget_tokens": 3}) as st:
            for event in st:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    break  # in the answer phase
        deadline = time.monotonic() + 10
        while not any(r.endswith("-answer") for r in s.engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(r.endswith("-answer") for r in s.engine.aborted), s.engine.aborted
        assert s.engine.running == 0
    finally:
        s.stop()


def test_output_config_format_constrains_the_answer(srv: ScriptedServer) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    m = create(srv, '{"answer": "晴"}', output_config={"format": {"type": "json_schema", "schema": schema},
                                                       "effort": "low"}, thinking={"type": "disabled"})
    assert json.loads(m.content[0].text) == {"answer": "晴"}
    assert srv.engine.last_params.constraint.json == schema
    with pytest.raises(anthropic.BadRequestError):
        create(srv, "x", output_config={"format": {"type": "json_schema", "schema": {"type": 5}}})


@pytest.mark.parametrize("budget, max_tokens, max_model_len", [
    (32000, 32000, None),  # Qwen Code's request: budget and max_tokens both 32000 (clamped to the room)
    (100, 100, None),
    (500, 100, None),      # beyond max_tokens: Anthropic's interleaved-thinking reading, a total for the turn
    (200, 32000, 150),     # below max_tokens, but not below the room the context leaves: cannot bind either
])
def test_thinking_budget_at_least_the_output_is_one_engine_request(srv: ScriptedServer, budget: int,
                                                                   max_tokens: int, max_model_len: int | None) -> None:
    """A budget the reasoning cannot reach before the output limit does is no limit: the
    answer is one engine request (not a reasoning request plus an answer request), the same
    answer a budget-free request gets, and the model closes its reasoning itself."""
    old_len = srv.engine.max_model_len
    if max_model_len is not None:
        srv.engine.max_model_len = max_model_len
    try:
        ph = Phases(reasoning="\n<think>short thought</think>\nThe answer.", answer="never asked for")
        ph.install(srv)
        m = srv.client().messages.create(model="glm-test", max_tokens=max_tokens,
                                         thinking={"type": "enabled", "budget_tokens": budget},
                                         messages=[{"role": "user", "content": "q"}])
        assert len(ph.params) == 1 and "</think>" not in ph.params[0].stop and ph.params[0].max_tokens <= budget
        assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] == \
            [("thinking", "short thought"), ("text", "The answer.")]
        assert m.stop_reason == "end_turn"
        final, _ = streamed(srv, ph, thinking={"type": "enabled", "budget_tokens": budget},
                            messages=[{"role": "user", "content": "q"}], max_tokens=max_tokens)
        same(m, final)
        assert len(ph.params) == 2  # the streamed one: one request too
    finally:
        srv.engine.max_model_len = old_len
