"""Protocol tests over real HTTP with the real ``openai`` client, against a scripted engine.

Fast and deterministic: the scripted engine replays exact model outputs (in chosen
delta sizes), so these tests pin the OpenAI wire shapes.  The same paths run on vLLM
in the ``test_e2e_*`` files.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from servers import ThreadServer
from tool_sets import CHAT_TOOLS as TOOLS

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class Scripted(ThreadServer):
    """A uvicorn server in a thread around a ScriptedEngine."""

    def __init__(self, fmt: str, output: str = "", size: int = 1, settings: Settings | None = None,
                 delay: float = 0.0) -> None:
        self.output = output
        self.size = size
        self.engine = ScriptedEngine(lambda prompt, params: pieces(self.output, self.size), model_name="m",
                                     delay=delay)
        self.app = create_app(self.engine, get_format(fmt), settings or Settings())
        super().__init__(self.app)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def glm4():
    s = Scripted("glm4")
    yield s
    s.stop()


def ask(s: Scripted, output: str, size: int = 1, **kw):
    s.output, s.size = output, size
    body = {"model": "m", "messages": [{"role": "user", "content": "北京天气？"}], "tools": TOOLS, **kw}
    return s.client().chat.completions.create(**body)


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_call_matches_non_streamed(glm4, size):
    out = 'get_weather\n{"city": "北京", "days": 2}'
    full = ask(glm4, out, size)
    assert isinstance(full, ChatCompletion)
    assert full.choices[0].finish_reason == "tool_calls"
    (call,) = full.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "北京", "days": 2}'  # exactly as written, Chinese unescaped
    chunks = list(ask(glm4, out, size, stream=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    tool_deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    first = tool_deltas[0]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == "" and first.index == 0
    assert all(tc.id is None for tc in tool_deltas[1:])  # one stable id, sent once
    assert "".join(tc.function.arguments or "" for tc in tool_deltas) == call.function.arguments
    if size == 1:
        assert len(tool_deltas) > 5  # really token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_raw_sse_chinese_not_escaped(glm4):
    glm4.output, glm4.size = 'get_weather\n{"city": "北京"}', 4
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": True}
    raw = httpx.post(glm4.base_url + "/chat/completions", json=body).text
    assert "北京" in raw and "\\u5317" not in raw
    assert raw.rstrip().endswith("data: [DONE]")


def test_two_calls_and_text(glm4):
    out = 'get_weather\n{"city": "北京"}<|assistant|>search\n{"q": "上海"}'
    r = ask(glm4, out, 2)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "search"]
    assert len({c.id for c in calls}) == 2
    chunks = list(ask(glm4, out, 2, stream=True))
    idx = {tc.index for c in chunks for tc in (c.choices[0].delta.tool_calls or [])}
    assert idx == {0, 1}


def test_text_streams_immediately_with_tools(glm4):
    out = "\n你好，我是一个助手。" * 3
    chunks = list(ask(glm4, out, 1, stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(texts) >= len(out) - 5  # not held back to the end
    assert "".join(texts) == out[1:]
    r = ask(glm4, out, 1)
    assert r.choices[0].message.content == out[1:] and r.choices[0].finish_reason == "stop"


def test_undeclared_tool_is_text(glm4):
    out = 'delete_everything\n{"now": true}'
    r = ask(glm4, out)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == out
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(glm4, out, 3, stream=True))
    assert streamed == out


def test_cut_off_call_is_length_and_the_call_so_far(glm4):
    glm4.engine.max_model_len = 4096
    out = 'get_weather\n{"city": "北京", "da'
    r = ask(glm4, out)
    assert r.choices[0].finish_reason == "length"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "北京", "da'


def test_legacy_functions(glm4):
    glm4.output, glm4.size = 'get_weather\n{"city": "北京"}', 2
    c = glm4.client()
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                  functions=[t["function"] for t in TOOLS], function_call={"name": "get_weather"})
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"
    assert json.loads(r.choices[0].message.function_call.arguments) == {"city": "北京"}


def test_n_choices_and_usage(glm4):
    glm4.output, glm4.size = "\nhello there", 2
    c = glm4.client()
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content == "hello there" for ch in r.choices)
    assert r.usage.completion_tokens == 3 * 6
    # a whole answer is asked of the engine whole (vLLM's FINAL_ONLY): no per-token wake-ups
    assert glm4.engine.last_params.final_only is True
    r = c.completions.create(model="m", prompt="x", n=2)
    assert [ch.text for ch in r.choices] == ["\nhello there"] * 2 and r.usage.completion_tokens == 12
    assert glm4.engine.last_params.final_only is True
    chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2, stream=True,
                                            stream_options={"include_usage": True}))
    per = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            per[choice.index] += choice.delta.content or ""
    assert per == {0: "hello there", 1: "hello there"}
    assert chunks[-1].usage.completion_tokens == 12
    assert glm4.engine.last_params.final_only is False


def test_history_renders_tool_results(glm4):
    glm4.output = "\nok"
    c = glm4.client()
    c.chat.completions.create(model="m", tools=TOOLS, messages=[
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
    ])
    assert glm4.engine.last_prompt.endswith('<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n晴<|assistant|>')


def test_tool_choice_none_hides_tools(glm4):
    glm4.output = "\nok"
    glm4.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                          tool_choice="none")
    assert "get_weather" not in glm4.engine.last_prompt
    assert glm4.engine.last_params.constraint is None


def test_required_sets_a_constraint(glm4):
    glm4.output = 'get_weather\n{"city": "x"}'
    ask(glm4, glm4.output, tool_choice="required")
    c = glm4.engine.last_params.constraint
    assert c is not None and c.grammar
    assert "get_weather" in c.grammar


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ""}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {str(0x110000): 1}}, "logit_bias"),
])
def test_bad_requests(glm4, body, param):
    r = httpx.post(glm4.base_url + "/chat/completions", json={"model": "m", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auth_and_admission():
    s = Scripted("glm4", output="\n" + "x" * 50, size=1, delay=0.02,
                 settings=Settings(api_keys=["k1", "k2"], max_concurrent_requests=2))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert httpx.get(s.base_url + "/models").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{s.port}/health").status_code == 200  # open
        assert [m.id for m in s.client("k2").models.list()] == ["m"]

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as h:
                reqs = [h.post(s.base_url + "/chat/completions", headers={"Authorization": "Bearer k1"},
                               json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) for _ in range(6)]
                rs = await asyncio.gather(*reqs)
                for r in rs:
                    if r.status_code == 429:
                        assert r.headers["retry-after"] == "1"
                        assert r.json()["error"]["type"] == "rate_limit_error"
                return [r.status_code for r in rs]

        codes = asyncio.run(burst())
        assert codes.count(200) >= 2 and set(codes) <= {200, 429} and 429 in codes
    finally:
        s.stop()


def test_disconnect_aborts_engine_request():
    s = Scripted("glm4", output="\n" + "y" * 400, size=1, delay=0.01)
    try:
        with httpx.stream("POST", s.base_url + "/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break
        deadline = time.monotonic() + 5
        while s.engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.engine.running == 0
        assert s.engine.aborted  # the engine request was aborted, not left to run
    finally:
        s.stop()


def test_dead_engine_gives_503():
    s = Scripted("glm4", output="\nhi")
    try:
        s.engine.dead = True
        assert httpx.get(f"http://127.0.0.1:{s.port}/health").status_code == 503
        r = httpx.post(s.base_url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    finally:
        s.stop()


def test_metrics_endpoint(glm4):
    ask(glm4, 'get_weather\n{"city": "北京"}')
    text = httpx.get(glm4.base_url.replace("/v1", "/metrics")).text
    for name in ("glmserve_requests_total", "glmserve_completion_tokens_total", "glmserve_time_to_first_token_seconds",
                 "glmserve_tool_calls_total", "glmserve_requests_running", "glmserve_constraint_build_seconds",
                 "glmserve_tool_call_parse_failures_total"):
        assert name in text
    assert [ln.split()[0] for ln in text.splitlines() if ln.startswith("glmserve_tool_calls_total")] == \
        ["glmserve_tool_calls_total"]  # one series: no tool-name label
    assert 'glmserve_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def _series(url: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))) for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_series_do_not_grow_with_request_values(tmp_path):
    """Ids in paths, unknown paths and tool names come from clients: none becomes a label value,
    so however many distinct ones arrive, the scrape keeps the same series."""
    s = Scripted("glm4", settings=Settings(responses_db=str(tmp_path / "r.sqlite3")))
    root = s.base_url.removesuffix("/v1")

    def burst(start: int, n: int) -> None:
        for i in range(start, start + n):
            assert httpx.get(f"{root}/v1/responses/resp_{i}").status_code == 404
            assert httpx.delete(f"{root}/v1/responses/resp_{i}").status_code == 404
            assert httpx.get(f"{root}/v1/no/such/path/{i}").status_code == 404
            name = f"tool_{i}"
            s.output = f'{name}\n{{"x": {i}}}'
            r = httpx.post(s.base_url + "/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "go"}],
                "tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == name

    try:
        burst(0, 3)
        first = _series(root)
        burst(3, 40)
        after = _series(root)
        assert after == first, sorted(after ^ first)
        labels = {dict(k)["endpoint"] for n, k in after if n == "glmserve_requests_total"}
        assert labels == {"/v1/responses/{response_id}", "other", "/v1/chat/completions"}
        assert not any("tool_" in v for _, k in after for _, v in k)
    finally:
        s.stop()


def test_unusable_schemas_are_client_errors_not_crashes():
    """A dangling $ref or a regex xgrammar cannot compile is the request's fault: 400 or a working fallback."""
    s = Scripted("glm45", output='<tool_call>f<arg_key>a</arg_key><arg_value>x</arg_value></tool_call>')
    try:
        bad = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}]
        r = httpx.post(s.base_url + "/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "tools": bad, "tool_choice": "required"},
            timeout=60)  # the first xgrammar compile may take seconds on a busy machine
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"
        r = httpx.post(s.base_url + "/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    finally:
        s.stop()


UNCOMPILABLE = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}
CALL_OF_F = {
    "chatml": '<tool_call>\n{"name": "f", "arguments": {"a": "x"}}\n</tool_call>',
    "glm4": 'f\n{"a": "x"}',
    "glm4-0414": 'f\n{"a": "x"}',
    "glmz1": 'r</think>f\n{"a": "x"}',
    "glm45": '<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>x</arg_value>\n</tool_call>',
    "glm47": '</think><tool_call>f<arg_key>a</arg_key><arg_value>x</arg_value></tool_call>',
}


@pytest.mark.parametrize("fmt", sorted(CALL_OF_F))
def test_uncompilable_schema_is_400_when_strict_else_any_object(fmt):
    """Every family: a strict tool xgrammar cannot compile is the client's 400 naming the field;
    a non-strict one is answered, its arguments decoded as any JSON object, and counted."""
    s = Scripted(fmt, output=CALL_OF_F[fmt], size=3)
    try:
        url = s.base_url + "/chat/completions"
        base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}
        for strict in (True, False, None):
            fn = {"name": "f", "parameters": UNCOMPILABLE} | ({} if strict is None else {"strict": strict})
            r = httpx.post(url, json=base | {"tools": [TOOLS[1], {"type": "function", "function": fn}]})
            if strict:
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["param"] == "tools[1].function.parameters" and "'f'" in err["message"]
                assert err["type"] == "invalid_request_error"
                continue
            assert r.status_code == 200, r.text
            call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
            assert call["name"] == "f" and json.loads(call["arguments"]) == {"a": "x"}
            assert s.engine.last_params.constraint is not None and s.engine.last_params.constraint.grammar
        r = httpx.post(url, json=base | {"functions": [{"name": "f", "strict": True, "parameters": UNCOMPILABLE}],
                                         "tool_choice": None, "function_call": "auto"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "functions[0].parameters", r.text
        metrics = httpx.get(s.base_url.replace("/v1", "/metrics")).text
        assert "glmserve_tool_schema_fallbacks_total 2.0" in metrics  # strict: false and strict left out
    finally:
        s.stop()


def test_dangling_ref_with_fallback_constraint_does_not_crash(glm4):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}]
    glm4.output, glm4.size = 'f\n{"a": 1}', 3
    r = httpx.post(glm4.base_url + "/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tools": bad})
    assert r.status_code in (200, 400), r.text


def test_ignore_eos_drops_format_stop_tokens_and_thinking_flags(glm4):
    """Benchmarks send ignore_eos: the format's end-of-turn ids must not stop them either."""
    glm4.output = "\nok"
    c = glm4.client()
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert "<|observation|>" in glm4.engine.last_params.stop  # the scripted vocabulary has no ids: strings
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stop=["END"],
                              extra_body={"ignore_eos": True})
    p = glm4.engine.last_params
    assert p.ignore_eos and p.stop_token_ids == [] and p.stop == ["END"]


def test_logit_bias_reaches_the_engine(glm4):
    glm4.output = "\nok"
    glm4.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                          logit_bias={"65": 50, "66": -100})
    assert glm4.engine.last_params.logit_bias == {65: 50.0, 66: -100.0}


def test_thinking_switch_accepts_string_false():
    s = Scripted("glm47", output="</think>ok")
    try:
        s.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                           extra_body={"chat_template_kwargs": {"enable_thinking": "false"}})
        assert s.engine.last_prompt.endswith("<|assistant|></think>")
    finally:
        s.stop()


def test_rejected_requests_give_their_admission_slot_back():
    """Admission is taken before the prompt is built; a 400 must not leak the slot."""
    s = Scripted("glm4", output="\nok", settings=Settings(max_concurrent_requests=1))
    try:
        for _ in range(3):
            r = httpx.post(s.base_url + "/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x" * 5000}]})  # beyond the context
            assert r.status_code == 400
        r = s.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert r.choices[0].message.content == "ok"
        assert s.app.state.admission.in_flight == 0
    finally:
        s.stop()


def test_server_time_is_exported_per_phase_and_excludes_the_engine():
    """``glmserve_server_time_seconds``: glmserve's own time per request (render, tokenize,
    constraint, the output fold), from every endpoint, streamed or not -- and not the engine's."""
    from prometheus_client.parser import text_string_to_metric_families

    delay = 0.02  # the scripted engine sleeps this long before each piece: engine time
    s = Scripted("glm4", output='get_weather\n{"city": "北京"}', size=4, delay=delay)
    try:
        url = s.base_url
        msgs = [{"role": "user", "content": "北京天气？"}]
        anth_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
        resp_tools = [{"type": "function", **t["function"]} for t in TOOLS]
        bodies = [
            ("/chat/completions", {"model": "m", "messages": msgs, "tools": TOOLS}),
            ("/chat/completions", {"model": "m", "messages": msgs, "tools": TOOLS, "stream": True}),
            ("/messages", {"model": "m", "max_tokens": 100, "messages": msgs, "tools": anth_tools}),
            ("/messages", {"model": "m", "max_tokens": 100, "messages": msgs, "tools": anth_tools, "stream": True}),
            ("/responses", {"model": "m", "input": "北京天气？", "tools": resp_tools}),
            ("/responses", {"model": "m", "input": "北京天气？", "tools": resp_tools, "stream": True}),
        ]
        for path, body in bodies:
            r = httpx.post(url + path, json=body, timeout=30)
            assert r.status_code == 200, r.text
        text = httpx.get(url.replace("/v1", "/metrics")).text
    finally:
        s.stop()
    samples = {(m.name, m.labels.get("phase")): m.value
               for f in text_string_to_metric_families(text) for m in f.samples}
    n = len(bodies)
    for phase in ("render", "tokenize", "constraint", "prepare", "output", "total"):
        assert samples[("glmserve_server_time_seconds_count", phase)] == n, phase
        assert samples[("glmserve_server_time_seconds_sum", phase)] > 0, phase
    total = samples[("glmserve_server_time_seconds_sum", "total")]
    prepare = samples[("glmserve_server_time_seconds_sum", "prepare")]
    output = samples[("glmserve_server_time_seconds_sum", "output")]
    assert total == pytest.approx(prepare + output)
    parts = sum(samples[("glmserve_server_time_seconds_sum", p)] for p in ("render", "tokenize", "constraint"))
    assert parts <= prepare
    # each request waited len(pieces) * delay in the engine; none of that is glmserve's time
    pieces_per_request = len(pieces(s.output, s.size))
    e2e = samples[("glmserve_request_latency_seconds_sum", None)]
    assert e2e >= n * pieces_per_request * delay
    assert total < e2e - 0.5 * n * pieces_per_request * delay


def test_strict_schema_error_names_the_clients_own_tool_index():
    """Hosted and deferred tools are set aside before the constraint is built: the 400 still
    names the index the client gave the strict tool (Messages ``tools[2].input_schema``)."""
    s = Scripted("glm51", output="</think>x", size=3)
    try:
        bad = {"name": "f", "strict": True, "input_schema": UNCOMPILABLE}
        r = httpx.post(s.url + "/v1/messages", timeout=60, json={
            "model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}],
            "tool_choice": {"type": "any"},
            "tools": [{"type": "web_search_20250305", "name": "web_search"},
                      {"name": "later", "defer_loading": True, "input_schema": {"type": "object"}}, bad]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith("tools[2].input_schema:"), r.text
        r = httpx.post(s.base_url + "/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "later", "defer_loading": True}},
                      {"type": "function", "function": {"name": "f", "strict": True, "parameters": UNCOMPILABLE}}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].function.parameters", r.text
    finally:
        s.stop()


def test_a_thinking_budget_counts_a_schema_fallback_once():
    """The budget builds the answer's constraint a second time; the fallback metric counts the request once."""
    s = Scripted("glm47", output=CALL_OF_F["glm47"], size=3)
    try:
        r = httpx.post(s.base_url + "/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
            "thinking_budget": 64, "tools": [{"type": "function", "function": {"name": "f", "parameters": UNCOMPILABLE}}]})
        assert r.status_code == 200, r.text
        metrics = httpx.get(s.url + "/metrics").text
        assert "glmserve_tool_schema_fallbacks_total 1.0" in metrics
    finally:
        s.stop()
