"""The API's building blocks, driven through a scripted engine: the route runner with a
minimal endpoint, the chat pipeline's options, the per-path error shapes and key headers.

These are what a new endpoint (Anthropic Messages, OpenAI Responses) is built from; the
Chat Completions tests (test_api_protocol.py) exercise the same parts through the real
``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from glmserve.api import errors, middleware
from glmserve.api.app import Settings, create_app
from glmserve.api.errors import APIError, ErrorShape, register_error_shape
from glmserve.api.mapping import normalise_tool_choice
from glmserve.api.middleware import accept_key_header, key_id
from glmserve.api.pipeline import GenerationOptions
from glmserve.api.runner import MAX_TOKENS_HEADER, PreparedHandle, Services, serve
from glmserve.engine.base import Delta, EngineUnavailable, GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format
from glmserve.formats.base import ChatRequest, Tool


@pytest.fixture(autouse=True)
def clean_registries(monkeypatch):
    """Registrations made by a test stay in that test."""
    monkeypatch.setattr(errors, "_SHAPES", {})
    monkeypatch.setattr(middleware, "_KEY_HEADERS", {})


# --------------------------------------------------------------------------- a minimal endpoint


class EchoBody(BaseModel):
    model: str | None = None
    text: str
    stream: bool = False
    max_tokens: int | None = None


EchoHandle = PreparedHandle  # a prepared run and whether to stream it


class Echo:
    """An endpoint in a dozen lines: a request mapping and a response shape."""

    name = "echo"

    def __init__(self, services: Services) -> None:
        self.pipeline = services.pipeline

    async def prepare(self, body: EchoBody, request: Request) -> EchoHandle:
        chat = ChatRequest(messages=[{"role": "user", "content": body.text}], tool_choice="none")
        opts = GenerationOptions(max_tokens=body.max_tokens)
        return EchoHandle(await self.pipeline.prepare(chat, opts, "echo_"), body.stream)

    async def complete(self, h: EchoHandle) -> dict[str, Any]:
        (r,) = await self.pipeline.complete(h.run)
        return {"id": h.request_id, "text": r.builder.text, "finish": r.finish_reason,
                "tokens": r.completion_tokens}

    async def stream(self, h: EchoHandle) -> AsyncIterator[str]:
        async for u in self.pipeline.run(h.run):
            text = "".join(getattr(e, "text", "") for e in u.events)
            yield f"event: delta\ndata: {json.dumps({'text': text, 'finish': u.finish_reason})}\n\n"
        yield "event: done\ndata: {}\n\n"

    def stream_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> str:
        return f"event: error\ndata: {json.dumps({'status': status, 'message': message})}\n\n"

    def log_fields(self, h: EchoHandle) -> tuple[int, dict[str, Any]]:
        return h.run.prompt_tokens, {"completion_tokens": h.run.completion_tokens}


def echo_app(output: list[str], settings: Settings | None = None, engine: ScriptedEngine | None = None):
    engine = engine or ScriptedEngine(lambda prompt, params: list(output), model_name="m")
    app = create_app(engine, get_format("chatml"), settings or Settings())
    endpoint = Echo(app.state.services)

    async def route(body: EchoBody, request: Request):
        return await serve(endpoint, body, request)

    app.add_api_route("/v1/echo", route, methods=["POST"])
    return app, engine


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_runner_serves_a_minimal_endpoint_whole_and_streamed(caplog):
    app, engine = echo_app(["Hel", "lo", " 北京"])
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="glmserve.requests"):
        r = client.post("/v1/echo", json={"model": "m", "text": "hi"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == "Hello 北京" and body["finish"] == "stop" and body["tokens"] == 3
        assert body["id"].startswith("echo_")
        assert "<|im_start|>user\nhi<|im_end|>" in engine.last_prompt  # rendered by the app's format

        r = client.post("/v1/echo", json={"text": "hi", "stream": True})
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert [e for e, _ in events] == ["delta"] * 3 + ["done"]
        assert "".join(d["text"] for _, d in events[:-1]) == "Hello 北京"
        assert events[2][1]["finish"] == "stop"
        assert app.state.admission.in_flight == 0
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "glmserve.requests"]
    assert len(lines) == 2 and all(line.startswith("echo echo_") for line in lines)
    assert "stream=True" in lines[1] and "completion_tokens=3" in lines[1]


def test_runner_clamps_or_fills_max_tokens_from_the_room_left():
    app, engine = echo_app(["x"])
    with TestClient(app) as client:
        r = client.post("/v1/echo", json={"text": "hi"})
        room = engine.max_model_len - len(engine.last_prompt)
        assert engine.last_params.max_tokens == room  # None: all the room there is
        assert r.headers[MAX_TOKENS_HEADER] == str(room)
        r = client.post("/v1/echo", json={"text": "hi", "max_tokens": 10**6, "stream": True})
        assert engine.last_params.max_tokens == room  # asking beyond the room: clamped, as vLLM does
        assert r.status_code == 200 and r.headers[MAX_TOKENS_HEADER] == str(room)
        r = client.post("/v1/echo", json={"text": "hi", "max_tokens": 5})
        assert engine.last_params.max_tokens == 5 and r.headers[MAX_TOKENS_HEADER] == "5"


def test_runner_checks_model_health_and_admission_in_order():
    app, engine = echo_app(["x"], settings=Settings(max_concurrent_requests=0))
    with TestClient(app) as client:
        r = client.post("/v1/echo", json={"model": "other", "text": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = client.post("/v1/echo", json={"text": "hi"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        engine.dead = True
        r = client.post("/v1/echo", json={"text": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


def test_an_endpoint_may_say_which_model_it_asks_for():
    """An API whose clients send their own model names (``requested_model`` -> None: no check)."""
    app, _ = echo_app(["x"])
    endpoint = Echo(app.state.services)
    endpoint.requested_model = lambda body: None  # type: ignore[attr-defined]

    async def route(body: EchoBody, request: Request):
        return await serve(endpoint, body, request)

    app.add_api_route("/v1/any-model", route, methods=["POST"])
    with TestClient(app) as client:
        assert client.post("/v1/any-model", json={"model": "claude-x", "text": "hi"}).status_code == 200
        assert client.post("/v1/echo", json={"model": "claude-x", "text": "hi"}).status_code == 404


class DyingEngine(ScriptedEngine):
    """Answers one token, then the engine dies."""

    async def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        self.last_params = params
        yield Delta(index=0, text="par", num_tokens=1)
        raise EngineUnavailable("engine core died")


def test_runner_reports_stream_errors_in_band_and_releases_the_slot():
    app, _ = echo_app([], engine=DyingEngine(lambda p, s: [], model_name="m"))
    with TestClient(app) as client:
        r = client.post("/v1/echo", json={"text": "hi", "stream": True})
        events = sse_events(r.text)
        assert events[0] == ("delta", {"text": "par", "finish": None})
        assert events[-1][0] == "error" and events[-1][1]["status"] == 503
        assert "engine core died" in events[-1][1]["message"]
        assert app.state.admission.in_flight == 0
        r = client.post("/v1/echo", json={"text": "hi"})  # whole answer: a 503 response
        assert r.status_code == 503 and app.state.admission.in_flight == 0


def test_pipeline_run_aborts_when_the_consumer_stops_early():
    engine = ScriptedEngine(lambda p, s: ["a"] * 20, model_name="m")
    app = create_app(engine, get_format("chatml"))
    pipeline = app.state.services.pipeline
    p = asyncio.run(pipeline.prepare(ChatRequest(messages=[{"role": "user", "content": "x"}]), GenerationOptions(), "t-"))

    async def take_two() -> None:
        run = pipeline.run(p)
        async for i, _ in _enumerate(run):
            if i == 1:
                break
        await run.aclose()

    asyncio.run(take_two())
    assert engine.aborted == [p.request_id] and p.completion_tokens == 2


async def _enumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


# --------------------------------------------------------------------------- error shapes


def dummy_shape() -> ErrorShape:
    def body(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
        return {"type": "error", "error": {"type": f"status_{status}", "message": message}}

    schema = {"type": "object", "required": ["type", "error"], "properties": {
        "type": {"const": "error"}, "error": {"type": "object"}}}
    return ErrorShape(body, schema, "DummyError")


def test_error_shape_registry_picks_the_shape_by_path():
    register_error_shape("/v1/echo", dummy_shape())
    app, _ = echo_app(["x"], settings=Settings(api_keys=["k1"], max_body_bytes=1000))
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer k1"}
        r = client.post("/v1/echo", json={"text": "hi"})  # middleware 401
        assert r.status_code == 401 and r.json() == {"type": "error", "error": {
            "type": "status_401", "message": r.json()["error"]["message"]}}
        r = client.post("/v1/echo", headers=auth, json={"text": "x" * 2000})  # middleware 413
        assert r.status_code == 413 and r.json()["type"] == "error"
        r = client.post("/v1/echo", headers=auth, json={"txt": "hi"})  # pydantic validation: 400, not 422
        assert r.status_code == 400 and r.json()["error"]["type"] == "status_400"
        assert "text" in r.json()["error"]["message"]
        r = client.post("/v1/echo", headers=auth, json={"model": "nope", "text": "hi"})  # APIError
        assert r.status_code == 404 and r.json()["type"] == "error"
        # every other path keeps the OpenAI shape
        r = client.post("/v1/chat/completions", headers=auth, json={"messages": []})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        doc = client.get("/openapi.json").json()
        ref = doc["paths"]["/v1/echo"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/DummyError") and "DummyError" in doc["components"]["schemas"]
        chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]
        assert chat["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_longest_registered_prefix_wins():
    register_error_shape("/v1", dummy_shape())
    register_error_shape("/v1/chat", errors.OPENAI_ERRORS)
    assert errors.error_shape("/v1/echo").schema_name == "DummyError"
    assert errors.error_shape("/v1/chat/completions").schema_name == "ErrorResponse"
    assert errors.error_shape("/health").schema_name == "ErrorResponse"


# --------------------------------------------------------------------------- API keys


def key_app(keys: list[str]):
    app = create_app(ScriptedEngine(lambda p, s: ["x"], model_name="m"), get_format("chatml"), Settings(api_keys=keys))

    async def whoami(request: Request) -> dict[str, Any]:
        return {"api_key_id": request.state.api_key_id}

    app.add_api_route("/v1/whoami", whoami, methods=["GET"])
    return app


def test_x_api_key_is_accepted_where_registered_and_identifies_the_key():
    accept_key_header("/v1/whoami", "X-Api-Key")
    with TestClient(key_app(["k1", "k2"])) as client:
        r = client.get("/v1/whoami", headers={"x-api-key": "k2"})
        assert r.status_code == 200 and r.json() == {"api_key_id": key_id("k2")}
        r = client.get("/v1/whoami", headers={"Authorization": "Bearer k1"})
        assert r.json() == {"api_key_id": key_id("k1")}
        assert key_id("k1") != key_id("k2") and "k1" not in key_id("k1")
        r = client.get("/v1/whoami", headers={"x-api-key": "k3"})
        assert r.status_code == 401 and "x-api-key" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        # elsewhere only Authorization: Bearer carries the key
        assert client.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_without_keys_the_identity_is_none():
    accept_key_header("/v1/whoami", "x-api-key")
    with TestClient(key_app([])) as client:
        r = client.get("/v1/whoami", headers={"x-api-key": "anything"})
        assert r.status_code == 200 and r.json() == {"api_key_id": None}


def test_chunked_body_within_the_limit_is_replayed_to_the_route():
    app, _ = echo_app(["ok"], settings=Settings(max_body_bytes=200))
    with TestClient(app) as client:
        def chunks():
            yield b'{"text": '
            yield b'"hi"}'

        r = client.post("/v1/echo", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["text"] == "ok"

        def big():
            for _ in range(50):
                yield b"          "

        r = client.post("/v1/echo", content=big(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# --------------------------------------------------------------------------- tool choice, one place


TOOLS = [Tool(name="a", parameters={"type": "object"}), Tool(name="b")]


@pytest.mark.parametrize("choice, expected", [
    (None, "auto"), ("none", "none"), ("auto", "auto"), ("required", "required"),
    ({"type": "function", "function": {"name": "b"}}, "b"),  # Chat Completions
    ({"type": "function", "name": "a"}, "a"),  # Responses
    ({"name": "a"}, "a"),  # legacy function_call
])
def test_normalise_tool_choice(choice, expected):
    assert normalise_tool_choice(choice, TOOLS) == expected


@pytest.mark.parametrize("choice, tools", [
    ("required", []), ("auto", []), ("sometimes", TOOLS), ({"type": "function", "function": {"name": "c"}}, TOOLS),
    ({"type": "allowed_tools"}, TOOLS),
])
def test_normalise_tool_choice_rejects(choice, tools):
    with pytest.raises(APIError) as exc:
        normalise_tool_choice(choice, tools, "tool_choice")
    assert exc.value.status == 400 and exc.value.param == "tool_choice"
    assert normalise_tool_choice(None, []) == "none"


class PreludeEndpoint:
    """Yields what ``script`` says; raises it when it is an exception."""

    name = "prelude"

    def __init__(self, script: list[Any]) -> None:
        self.script = script

    async def stream(self, h: Any) -> AsyncIterator[str]:
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stream_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> str:
        return f"error {status}"

    def log_fields(self, h: Any) -> tuple[int, dict[str, Any]]:
        return 0, {}


@pytest.mark.parametrize("script, sent", [
    # held until the next text, an empty one included (the engine's first output that shows nothing yet)
    (lambda P: [P("a"), P("b"), "", "c", "d"], ["ab", "c", "d"]),
    (lambda P: [P("a"), "x", "", "y"], ["ax", "y"]),
    # a stream that fails before its first output: the prelude, then the error
    (lambda P: [P("a"), EngineUnavailable("gone")], ["aerror 503"]),
    (lambda P: [P("a"), "x", RuntimeError("bug")], ["ax", "error 500"]),
])
def test_runner_holds_the_prelude_until_the_first_output(script, sent):
    from glmserve.api.admission import Lease
    from glmserve.api.runner import Prelude

    app, _ = echo_app([])
    services: Services = app.state.services

    async def collect() -> list[str]:
        lease = Lease(services.admission.acquire(), services.engine)
        handle = type("H", (), {"request_id": "r", "stream": True})()
        return [x async for x in services._stream(PreludeEndpoint(script(Prelude)), handle, 0.0, lease, {},
                                                  lambda: "disconnected")]

    assert asyncio.run(collect()) == sent
    assert services.admission.in_flight == 0


@pytest.mark.parametrize("why", ["disconnected", "write_timeout"])
def test_a_stream_cut_before_its_end_is_logged_499_with_the_reason(why, caplog):
    from glmserve.api.admission import Lease

    app, _ = echo_app([])
    services: Services = app.state.services

    async def cut_after_one() -> None:
        lease = Lease(services.admission.acquire(), services.engine)
        handle = type("H", (), {"request_id": "r", "stream": True})()
        endpoint = PreludeEndpoint(["a", "b", "c"])
        endpoint.name = "chat"  # a generating endpoint's name: the cut is counted under it
        events = services._stream(endpoint, handle, 0.0, lease, {}, lambda: why)
        assert await anext(events) == "a"
        await events.aclose()  # what LeasedStream does once the client is gone

    with caplog.at_level(logging.INFO, logger="glmserve.requests"):
        asyncio.run(cut_after_one())
        lines = [r.getMessage() for r in caplog.records if r.name == "glmserve.requests"]
        assert len(lines) == 1 and "status=499" in lines[0] and f"{why}=True" in lines[0], lines
        cut = {r: services.metrics.registry.get_sample_value("glmserve_requests_cut_total", {"endpoint": "chat", "reason": r})
               for r in ("disconnected", "write_timeout")}
        assert cut == {r: float(r == why) for r in cut}
        caplog.clear()

        async def whole() -> None:
            lease = Lease(services.admission.acquire(), services.engine)
            handle = type("H", (), {"request_id": "r", "stream": True})()
            assert [x async for x in services._stream(PreludeEndpoint(["a", RuntimeError("bug")]), handle, 0.0,
                                                      lease, {}, lambda: why)] == ["a", "error 500"]

        asyncio.run(whole())  # an error in-band is the stream's end: 200
        lines = [r.getMessage() for r in caplog.records if r.name == "glmserve.requests"]
        assert len(lines) == 1 and "status=200" in lines[0] and why not in lines[0], lines
    assert services.admission.in_flight == 0


def test_an_unhandled_error_is_counted_as_a_500():
    """Starlette answers an unhandled error outside the metrics middleware; it is counted all the same."""
    app, _ = echo_app([])

    async def boom() -> None:
        raise TypeError("a bug")

    app.add_api_route("/v1/boom", boom, methods=["POST"])
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/boom").status_code == 500
        metrics = client.get("/metrics").text
    assert 'glmserve_requests_total{endpoint="/v1/boom",status="500"} 1.0' in metrics, metrics
