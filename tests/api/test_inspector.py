"""The request inspector (``--inspect N``) and the playground's routes, over real HTTP against
the real app on a scripted engine: what an entry holds for each API, errors of every kind,
the API key's scope, the bounds, and that nothing is installed while it is off.  The browser
tests (tests/ui/) drive the same through the page, and on the real model."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import openai
import pytest

from servers import ThreadServer

from glmserve.api.app import Settings, create_app
from glmserve.api.inspector import Inspector, InspectorMiddleware
from glmserve.engine.base import GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

REASONING = "Paris, then."
CALL = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>unit</arg_key><arg_value>celsius</arg_value></tool_call>")


def weather(title: str | None = None) -> dict:
    """The weather tool; a fresh ``title`` makes its schema one no cache has seen."""
    params = {"type": "object", "properties": {"city": {"type": "string"},
                                               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
              "required": ["city"]}
    if title:
        params["title"] = title
    return {"type": "function", "function": {"name": "get_weather", "parameters": params}}


class App(ThreadServer):
    """The real app (GLM-4.7 format) on a scripted engine whose output ``script`` chooses."""

    def __init__(self, script: Callable[[str, GenerateParams], list[str]], **settings) -> None:
        self.engine = ScriptedEngine(script, model_name="m", max_model_len=16384)
        super().__init__(create_app(self.engine, get_format("glm47"), Settings(**settings)))

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)

    def entry(self, ident: str, key: str | None = None) -> dict:
        r = self.http(key).get(f"/v1/inspector/requests/{ident}")
        assert r.status_code == 200, r.text
        return r.json()


def call_script(prompt: str, params: GenerateParams) -> list[str]:
    if "<tool_response>" in prompt.rsplit("<|user|>", 1)[-1]:
        return [REASONING, "</think>", "It is ", "sunny."]
    return [REASONING, "</think>", *[CALL[i:i + 7] for i in range(0, len(CALL), 7)]]


@pytest.fixture(scope="module")
def app():
    s = App(call_script, inspect=50)
    yield s
    s.stop()


def chat(app: App, **kw) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "巴黎天气？"}], "tools": [weather()], **kw}
    return app.http().post("/v1/chat/completions", json=body)


def test_off_by_default_nothing_is_installed():
    s = App(call_script)
    try:
        assert not any(m.cls is InspectorMiddleware for m in s.app.user_middleware)
        r = chat(s)
        assert r.status_code == 200 and "x-request-id" not in r.headers
        off = s.http().get("/v1/inspector/requests")
        assert off.status_code == 404 and off.json()["error"]["code"] == "inspector_off"
        assert "--inspect" in off.json()["error"]["message"]
        assert s.http().get("/ui/info").json()["inspect"] == 0
    finally:
        s.stop()


def test_streamed_call_every_step(app):
    tools = [weather(f"t-{uuid.uuid4().hex}")]  # a schema no grammar cache has seen
    client = openai.OpenAI(base_url=app.base_url, api_key="none", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "巴黎天气？"}], tools=tools, tool_choice="required",
        stream=True, stream_options={"include_usage": True}, max_tokens=300)
    entry_id = raw.headers["x-request-id"]
    assert raw.request_id == entry_id  # the openai SDK reads the header as the request's id
    chunks = list(raw.parse())
    e = app.entry(entry_id)
    assert e["request_id"] == chunks[0].id and app.entry(chunks[0].id)["id"] == entry_id  # either id finds it
    assert (e["api"], e["status"], e["stream"], e["endpoint"]) == ("chat.completions", 200, True, "chat")
    assert e["error"] is None

    parts = e["prompt"]["parts"]
    assert parts[:2] == [{"control": "[gMASK]"}, {"control": "<sop>"}] and parts[-1] == {"control": "<think>"}
    assert {"control": "<|user|>"} in parts and any("巴黎天气？" in p.get("text", "") for p in parts)
    assert e["prompt"]["chars"] == sum(len(p.get("text", p.get("control", ""))) for p in parts)
    usage = chunks[-1].usage
    assert e["tokens"] == {"prompt_tokens": usage.prompt_tokens, "cached_tokens": 0,
                           "completion_tokens": usage.completion_tokens}
    c = e["constraint"]
    assert (c["tool_choice"], c["tools"], c["kind"], c["cache_hit"]) == ("required", ["get_weather"], "grammar", False)
    assert c["grammar_chars"] > 100 and c["build_ms"] > 0
    assert e["params"]["max_tokens"] == 300

    (choice,) = e["choices"]
    assert choice["raw"] == REASONING + "</think>" + CALL
    assert choice["events"] == [
        {"type": "reasoning", "text": REASONING}, {"type": "call_start", "call": 0, "name": "get_weather"},
        {"type": "call_arguments", "call": 0, "arguments": '{"city": "Paris", "unit": "celsius"}'},
        {"type": "call_end", "call": 0}]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["calls"]
    assert (call["name"], call["valid"], call["problem"]) == ("get_weather", True, None)
    assert call["id"] in {tc.id for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])}
    t = e["timings_ms"]
    assert 0 <= t["queued"] <= t["prepared"] <= t["first_token"] <= t["done"]

    again = chat(app, tools=tools, tool_choice="required")  # the same tools: the grammar comes from the cache
    assert app.entry(again.headers["x-request-id"])["constraint"]["cache_hit"] is True


def test_messages_and_responses_show_up(app):
    http = app.http()
    m = http.post("/v1/messages", json={"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}],
                                        "tools": [{"name": "get_weather", "input_schema": weather()["function"]["parameters"]}],
                                        "tool_choice": {"type": "any"}})
    assert m.status_code == 200
    e = app.entry(m.json()["id"])
    assert e["api"] == "messages" and e["id"] == m.headers["x-request-id"] and e["stream"] is False
    assert e["choices"][0]["calls"][0]["valid"] and e["constraint"]["tool_choice"] == "required"

    r = http.post("/v1/responses", json={"model": "m", "input": "hi", "store": False, "stream": True,
                                         "tools": [{"type": "function", "name": "get_weather",
                                                    "parameters": weather()["function"]["parameters"]}]})
    assert r.status_code == 200 and "response.completed" in r.text
    e = app.entry(r.headers["x-request-id"])
    assert e["api"] == "responses" and e["request_id"].startswith("resp_") and e["stream"] is True
    assert e["choices"][0]["raw"] == REASONING + "</think>" + CALL

    listed = http.get("/v1/inspector/requests").json()
    assert listed["max_entries"] == 50
    assert [x["id"] for x in listed["data"][:2]] == [r.headers["x-request-id"], m.headers["x-request-id"]]
    assert listed["data"][1]["calls"] == ["get_weather"] and listed["data"][1]["status"] == 200


def test_completions_show_their_prompts_and_raw_text(app):
    """The legacy API has no template and no parser: its entry shows the prompts as sent and
    the engine's raw text per choice, whole and streamed."""
    http = app.http()
    r = http.post("/v1/completions", json={"model": "m", "prompt": ["北京", "Paris"], "max_tokens": 50})
    assert r.status_code == 200, r.text
    e = app.entry(r.json()["id"])
    assert (e["api"], e["endpoint"], e["stream"], e["status"]) == ("completions", "completion", False, 200)
    assert e["prompt"]["parts"] == [{"text": "[prompt 0]\n北京\n\n[prompt 1]\nParis\n\n"}]
    assert [c["raw"] for c in e["choices"]] == [c["text"] for c in r.json()["choices"]]
    assert [c["finish_reason"] for c in e["choices"]] == [c["finish_reason"] for c in r.json()["choices"]]
    assert e["params"]["max_tokens"] == [50, 50] and e["tokens"]["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert e["timings_ms"]["prepared"] is not None and e["timings_ms"]["first_token"] is not None

    r = http.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 50, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
    e = app.entry(r.headers["x-request-id"])
    assert e["stream"] is True and e["prompt"]["parts"] == [{"text": "[3 token ids]"}]
    assert e["choices"][0]["raw"] == REASONING + "</think>" + CALL and e["choices"][0]["events"] == []


def test_errors_are_kept(app):
    bad_body = app.http().post("/v1/chat/completions", json={"model": "m"})  # no messages: the schema's 400
    assert bad_body.status_code == 400
    e = app.entry(bad_body.headers["x-request-id"])
    assert e["status"] == 400 and e["error"]["status"] == 400 and "messages" in e["error"]["message"]
    assert e["prompt"] is None and e["request"]["body"] == '{"model":"m"}'

    unknown = chat(app, tool_choice={"type": "function", "function": {"name": "nope"}})  # fails while preparing
    assert unknown.status_code == 400
    e = app.entry(unknown.headers["x-request-id"])
    assert e["error"]["message"] == unknown.json()["error"]["message"] and not e["error"]["in_band"]

    counted = app.http().post("/v1/messages/count_tokens", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert counted.status_code == 200  # not a model request: not kept
    assert counted.headers["x-request-id"] not in {x["id"] for x in app.http().get("/v1/inspector/requests").json()["data"]}


def test_an_invalid_call_shows_the_backstops_verdict():
    """No constraint holds a scripted engine: the call breaks the enum, and the entry says so
    in the words of the server's own backstop check."""
    s = App(lambda prompt, params: [CALL.replace("celsius", "kelvin")], inspect=5)
    try:
        r = chat(s)
        assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
        (call,) = s.entry(r.headers["x-request-id"])["choices"][0]["calls"]
        assert call["valid"] is False and call["problem"].startswith("unit: 'kelvin' is not one of")
        assert call["arguments"] == '{"city": "Paris", "unit": "kelvin"}'
    finally:
        s.stop()


def test_an_error_in_the_stream_is_kept():
    def broken(prompt: str, params: GenerateParams) -> list[str]:
        raise RuntimeError("the scripted engine broke")

    s = App(broken, inspect=5)
    try:
        r = chat(s, stream=True)
        assert r.status_code == 200 and "internal error" in r.text
        e = s.entry(r.headers["x-request-id"])
        assert e["error"] == {"status": 500, "message": "internal error: RuntimeError", "in_band": True}
        assert e["status"] == 200 and e["prompt"] is not None
    finally:
        s.stop()


def test_each_key_sees_its_own_requests():
    s = App(call_script, inspect=5, api_keys=["key-a", "key-b"])
    try:
        r = s.http("key-a").post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        ident = r.headers["x-request-id"]
        assert s.entry(ident, "key-a")["status"] == 200
        assert s.http("key-b").get(f"/v1/inspector/requests/{ident}").status_code == 404
        assert s.http("key-b").get("/v1/inspector/requests").json()["data"] == []
        assert s.http().get("/v1/inspector/requests").status_code == 401
        assert s.http().get("/ui/info").json()["auth"] is True  # the page's own info stays open
    finally:
        s.stop()


def test_bounded_in_count_and_bytes():
    s = App(lambda prompt, params: ["ok"], inspect=2)
    try:
        ids = [chat(s).headers["x-request-id"] for _ in range(3)]
        assert [x["id"] for x in s.http().get("/v1/inspector/requests").json()["data"]] == ids[:0:-1]
        assert s.http().get(f"/v1/inspector/requests/{ids[0]}").status_code == 404
    finally:
        s.stop()
    s = App(lambda prompt, params: ["x" * 9000], inspect=100, inspect_max_bytes=32 * 1024)  # texts clipped to 2048
    store: Inspector = s.app.state.inspector
    try:
        for _ in range(12):
            r = chat(s, messages=[{"role": "user", "content": "long " * 3000}], tool_choice="none")
            assert r.status_code == 200
        assert store.bytes <= store.max_bytes and 1 < len(store.entries) < 12
        e = s.entry(r.headers["x-request-id"])
        assert e["prompt"]["left_out_chars"] > 0 and {"left_out": f"[... {e['prompt']['left_out_chars']} characters left out ...]"} \
            in e["prompt"]["parts"]
        assert len(e["choices"][0]["raw"]) < 2100 and e["choices"][0]["raw_left_out_chars"] == 9000 - 2048
        assert len(e["request"]["body"]) < 2100 and e["request"]["left_out_chars"] > 0
    finally:
        s.stop()


def test_ui_files_info_and_argument_check(app):
    http = app.http()
    page = http.get("/ui", follow_redirects=True)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert http.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/ui/../pyproject.toml").status_code == 404 and http.get("/ui/nothing.js").status_code == 404
    info = http.get("/ui/info").json()
    assert info["chat_format"] == "glm47" and info["inspect"] == 50 and info["auth"] is False
    assert info["thinking"] == {"reasoning": True, "switch": True, "budget": True, "effort": False}

    schema = weather()["function"]["parameters"]
    check = lambda args, s=schema: http.post("/v1/ui/validate", json={"schema": s, "arguments": args}).json()  # noqa: E731
    assert check('{"city": "北京"}') == {"valid": True, "errors": []}
    bad = check('{"city": "Paris", "unit": "kelvin"}')
    assert bad["valid"] is False and bad["errors"][0].startswith("unit: 'kelvin' is not one of")
    assert check('{"city": ')["valid"] is False and check("[1]")["errors"] == ["the arguments are not a JSON object"]
    assert check("{}", {"type": 12})["valid"] is None
    assert check("{}", None) == {"valid": True, "errors": []}
    assert http.post("/v1/ui/validate", json={"arguments": 1}).status_code == 400
