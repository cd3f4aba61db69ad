"""Auto answers that do not wait for their tool grammar (``glmserve.api.early_start``), on a
scripted engine that says it compiles grammars, as vLLM does.

The scripted "model" continues a text as a deterministic model would: asked again with its own
output appended to the prompt, it writes the rest.  The same path runs on vLLM in
``tests/e2e/test_e2e_glm5.py`` (a call on a brand-new tool set, schema-valid).
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.engine.base import GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Tool

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
             "q": {"type": "string"}}}}}]
CALL = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
ANSWER = "let me check</think>I will look." + CALL
PROBE = "warm-up"


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class Model:
    """``output`` for a new prompt; the rest of it for a prompt that continues one it answered."""

    def __init__(self) -> None:
        self.output = ANSWER
        self.size = 3
        self.base = ""
        self.requests: list[tuple[str, GenerateParams]] = []
        self.warmups: list[GenerateParams] = []

    def __call__(self, prompt: str, params: GenerateParams) -> list[str]:
        if params.max_tokens == 1 and len(prompt) == 1:  # a background compile: one token, one-token prompt
            self.warmups.append(params)
            return [PROBE]
        self.requests.append((prompt, params))
        if not self.base or not prompt.startswith(self.base):
            self.base = prompt
        done = prompt[len(self.base):]
        assert self.output.startswith(done), (done, self.output)
        return pieces(self.output[len(done):], self.size)


class Server(ThreadServer):
    def __init__(self, settings: Settings | None = None, delay: float = 0.0) -> None:
        self.model = Model()
        self.engine = ScriptedEngine(self.model, model_name="m", delay=delay)
        self.engine.compiles_grammars = True
        self.app = create_app(self.engine, get_format("glm47"), settings or Settings())
        super().__init__(self.app)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=30)

    def ask(self, output: str = ANSWER, size: int = 3, **kw: Any) -> Any:
        self.model.output, self.model.size = output, size
        self.model.requests.clear()
        body = {"model": "m", "messages": [{"role": "user", "content": "北京天气？"}], "tools": TOOLS, **kw}
        return self.client().chat.completions.create(**body)


@pytest.fixture(scope="module")
def srv():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def waiting():
    s = Server(Settings(wait_for_grammar=True))
    yield s
    s.stop()


def chat(tools: list[dict[str, Any]] = TOOLS, **kw: Any) -> ChatRequest:
    return ChatRequest(messages=[], tools=[Tool.from_openai(t) for t in tools], **kw)


def message(r: Any) -> tuple[Any, ...]:
    m = r.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []]
    return m.content, m.model_extra.get("reasoning_content"), calls, r.choices[0].finish_reason


def streamed(s: Server, **kw: Any) -> tuple[Any, ...]:
    content, reasoning, args, names, finish = "", "", {}, {}, None
    for ch in s.ask(stream=True, **kw):
        for c in ch.choices:
            d = c.delta
            content += d.content or ""
            reasoning += d.model_extra.get("reasoning_content") or ""
            for t in d.tool_calls or []:
                if t.function.name:
                    names[t.index] = t.function.name
                args[t.index] = args.get(t.index, "") + (t.function.arguments or "")
            finish = c.finish_reason or finish
    calls = [(names[i], json.loads(args[i])) for i in sorted(names)]
    return content or None, reasoning or None, calls, finish


def test_preludes_compile_at_start_up(srv):
    fmt = get_format("glm47")
    preludes = [fmt.call_opener(chat(enable_thinking=on)).prelude for on in (True, False)]
    assert [p.constraint for p in srv.model.warmups[:2]] == preludes
    assert all(p.final_only for p in srv.model.warmups[:2])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_call_continues_under_the_tool_sets_grammar(srv, waiting, size):
    fmt = get_format("glm47")
    r = srv.ask(size=size, max_tokens=200)
    assert message(r) == ("I will look.", "let me check", [("get_weather", {"city": "北京"})], "tool_calls")
    assert message(r) == message(waiting.ask(size=size, max_tokens=200))  # what the whole grammar gives
    (first, p1), (second, p2) = srv.model.requests
    assert p1.constraint == fmt.call_opener(chat()).prelude and "<tool_call>" in p1.stop
    assert p2.constraint == fmt.constraint_after_opener(chat()) and "<tool_call>" not in p2.stop
    # the continuation: the prompt, the output up to the opener, the opener, as written
    at = ANSWER.index("<tool_call>")
    assert second == first + ANSWER[:at] + "<tool_call>"
    before, after = len(pieces(ANSWER[:at], size)), len(pieces(ANSWER[at + len("<tool_call>"):], size))
    assert p1.max_tokens == 200 and p2.max_tokens == 200 - before
    assert r.usage.completion_tokens == before + after
    (_, whole), = waiting.model.requests
    assert whole.constraint == fmt.constraint(chat()) and "<tool_call>" not in whole.stop


def test_streamed_and_whole_answers_agree(srv):
    whole = message(srv.ask())
    assert streamed(srv) == whole
    two_calls = "ok</think>" + CALL + "\n" + CALL.replace("北京", "上海")
    assert streamed(srv, output=two_calls, size=2) == message(srv.ask(output=two_calls, size=2))
    assert len(message(srv.ask(output=two_calls))[2]) == 2
    assert len(srv.model.requests) == 2  # the second call needs no third request: the grammar after the opener allows it


def test_an_answer_without_a_call_is_one_request(srv):
    r = srv.ask(output="hmm</think>晴天。")
    assert message(r) == ("晴天。", "hmm", [], "stop")
    (_, params), = srv.model.requests
    assert params.constraint == get_format("glm47").call_opener(chat()).prelude


def test_a_new_tool_set_compiles_once_in_the_background(srv):
    tools = [{"type": "function", "function": {"name": "fresh_tool", "parameters": SCHEMA}}]
    before = len(srv.model.warmups)
    srv.ask(output="x</think>no call", tools=tools)
    deadline = time.monotonic() + 10
    while len(srv.model.warmups) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [w.constraint for w in srv.model.warmups[before:]] == [get_format("glm47").constraint_after_opener(chat(tools))]
    srv.ask(output="x</think>no call", tools=tools)
    srv.ask(output="x</think>" + CALL.replace("get_weather", "fresh_tool"), tools=tools)
    time.sleep(0.2)
    assert len(srv.model.warmups) == before + 1  # compiled: never again


def test_the_opener_at_the_token_limit_ends_on_length(srv):
    opener_end = len("let me check</think>I will look.")  # the opener is in the last token's ids
    r = srv.ask(size=1, max_tokens=opener_end)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert len(srv.model.requests) == 1 and r.usage.completion_tokens == opener_end


@pytest.mark.parametrize("kw", [
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"n": 2},
    {"extra_body": {"thinking_budget": 100}},
    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA, "strict": True}}]},
])
def test_answers_that_wait_for_their_grammar(srv, kw):
    """Forced calls, several choices, a thinking budget (it splits the answer itself) and strict
    tools (whose schemas must compile before the answer starts) keep the whole grammar."""
    out = "x</think>" + CALL
    srv.ask(output=out, **kw)
    fmt = get_format("glm47")
    for _, params in srv.model.requests:
        assert "<tool_call>" not in params.stop
        assert params.constraint != fmt.call_opener(chat()).prelude


def test_a_client_gone_during_the_call_aborts_it():
    s = Server(delay=0.01)
    try:
        s.model.output, s.model.size = "x</think>" + CALL.replace("北京", "北" * 400), 1
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": TOOLS, "stream": True}
        with s.client().chat.completions.create(**body) as stream:
            for ch in stream:
                if ch.choices and ch.choices[0].delta.tool_calls:
                    break  # in the call's request
        deadline = time.monotonic() + 10
        while not any(r.endswith("-call") for r in s.engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(r.endswith("-call") for r in s.engine.aborted), s.engine.aborted
    finally:
        s.stop()


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "accelerator"])
def test_on_cpu_the_compile_waits_for_the_first_token(on_cpu):
    """On the CPUs the model runs on, the new tool set's grammar is built and compiled once the
    first token is out (it would slow the prefill down); beside an accelerator, at once."""
    import threading

    s = Server()
    try:
        s.engine.computes_on_cpu = on_cpu
        s.engine.gate = threading.Event()  # every engine request holds its first token until set
        warmup = s.app.state.services.pipeline.warmup
        tools = [{"type": "function", "function": {"name": f"cpu_{on_cpu}", "parameters": SCHEMA}}]
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(streamed(s, output="x</think>text", tools=tools)))
        t.start()
        assert s.engine.waiting.wait(20)
        deadline = time.monotonic() + (1.0 if on_cpu else 10.0)
        while warmup.warming == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert warmup.warming == (0 if on_cpu else 1)
        s.engine.gate.set()
        t.join(30)
        assert done == [("text", "x", [], "stop")]
        deadline = time.monotonic() + 10
        want = get_format("glm47").constraint_after_opener(chat(tools))
        while want not in [w.constraint for w in s.model.warmups] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [w.constraint for w in s.model.warmups].count(want) == 1
    finally:
        s.engine.gate = None
        s.stop()
