"""Every admitted request gives its slot back, and its engine request ends, on every path.

One real uvicorn server (the real app on a scripted engine, ``--max-concurrent-requests 1``
so a leaked slot shows as a 429 on the very next request) serves all four generating
endpoints; each test injects one failure at one stage (mapping, prepare, response headers,
before the first chunk, mid-stream, client gone), then asserts the admission count is back
at 0, no engine request is left running, and the next request is answered.  Also here: the
header values built from request data, a body dribbled (a real socket against the real
protocol), blank API keys, and the server's own failures answered as 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from servers import dribble_until_answered, free_port

from glmserve.api import errors, middleware
from glmserve.api.anthropic import routes as anthropic_routes
from glmserve.api.app import Settings, create_app
from glmserve.api.http_protocol import server_config
from glmserve.api.openai import chat as chat_module
from glmserve.api.responses import routes as responses_routes
from glmserve.api.runner import header_list
from glmserve.api.schemas import CompletionRequest
from glmserve.cli import api_keys
from glmserve.engine.base import Delta, GenerateParams
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

READ_TIMEOUT = 1.0
WAIT = 20.0  # generous: the machine is shared


class FaultyEngine(ScriptedEngine):
    """A scripted engine that can fail on purpose: ``fault`` is None, ``first_chunk``
    (raise before any output), ``mid_stream`` (one delta, then raise) or ``hang`` (one
    delta, then wait forever: a client that goes away must end it)."""

    def __init__(self) -> None:
        super().__init__(lambda prompt, params: ["Hel", "lo", " there"], model_name="m")
        self.fault: str | None = None
        self.first = Delta(index=0, text="par", num_tokens=1)
        """The one delta a ``mid_stream`` or ``hang`` request gives before it fails or waits."""
        self.hanging = threading.Event()
        """Set once a ``hang`` request is waiting (read from the test's thread)."""

    async def generate(self, prompt_ids: list[int], params: GenerateParams, request_id: str) -> AsyncIterator[Delta]:
        if self.fault is None:
            async for d in super().generate(prompt_ids, params, request_id):
                yield d
            return
        self._running.add(request_id)
        try:
            if self.fault == "first_chunk":
                raise RuntimeError("injected: the engine failed before its first token")
            yield self.first
            if self.fault == "mid_stream":
                raise RuntimeError("injected: the engine failed mid-answer")
            self.hanging.set()
            await asyncio.Event().wait()
        finally:
            self._running.discard(request_id)


class Server:
    """The real app on a :class:`FaultyEngine`, served by uvicorn with glmserve's protocol
    (the header deadline) in a thread on a loopback port."""

    def __init__(self, settings: Settings, http: str = "auto") -> None:
        self.engine = FaultyEngine()
        self.app = create_app(self.engine, get_format("chatml"), settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(self.app, settings, http=http, host="127.0.0.1", port=self.port,
                                                   log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    @property
    def in_flight(self) -> int:
        return self.app.state.admission.in_flight

    def wait_idle(self) -> None:
        """Until no slot is held and no engine request runs (the lease closes just after the
        last byte is sent, so the client may see the end first)."""
        deadline = time.monotonic() + WAIT
        while (self.in_flight or self.engine.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (self.in_flight, self.engine.running) == (0, 0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(Settings(max_concurrent_requests=1, read_timeout=READ_TIMEOUT,
                        responses_db=str(tmp_path_factory.mktemp("lifecycle") / "responses.sqlite3")))
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def healthy(request):
    """Each test starts with a well-behaved engine (and leaves it so)."""
    if "srv" in request.fixturenames:
        s = request.getfixturevalue("srv")
        s.engine.fault = None
        s.engine.first = Delta(index=0, text="par", num_tokens=1)
        s.engine.hanging.clear()
        yield
        s.engine.fault = None
    else:
        yield


# --------------------------------------------------------------------------- the four endpoints

def body(endpoint: str, stream: bool) -> tuple[str, dict[str, Any]]:
    user = [{"role": "user", "content": "hi"}]
    return {
        "chat": ("/v1/chat/completions", {"model": "m", "messages": user, "stream": stream}),
        "completions": ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": stream}),
        "messages": ("/v1/messages", {"model": "m", "max_tokens": 16, "messages": user, "stream": stream}),
        "responses": ("/v1/responses", {"model": "m", "input": "hi", "store": False, "stream": stream}),
    }[endpoint]


ENDPOINTS = ["chat", "completions", "messages", "responses"]


def assert_served(s: Server, endpoint: str) -> None:
    """The next request (whole) is answered: no slot leaked, the engine is fine."""
    s.wait_idle()
    path, payload = body(endpoint, False)
    r = httpx.post(s.url + path, json=payload, timeout=WAIT)
    assert r.status_code == 200, r.text
    s.wait_idle()


def assert_server_error(r: httpx.Response, endpoint: str) -> None:
    assert r.status_code == 500, r.text
    if endpoint == "messages":
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    else:
        assert r.json()["error"]["type"] == "server_error"


def boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected: a bug in the server")


MAPPING = {  # (module or class, attribute) whose failure is a failure while mapping the request
    "chat": (chat_module, "chat_request_from_openai"),
    "completions": (CompletionRequest, "stop_list"),
    "messages": (anthropic_routes, "chat_request"),
    "responses": (responses_routes, "items_to_messages"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("stage", ["mapping", "prepare"])
def test_a_failure_before_the_answer_is_a_500_and_frees_the_slot(srv, monkeypatch, endpoint, stream, stage):
    if stage == "mapping":
        monkeypatch.setattr(*MAPPING[endpoint], boom)
    else:  # tokenizing the prompt
        monkeypatch.setattr(srv.engine, "encode_raw" if endpoint == "completions" else "encode_parts", boom)
    path, payload = body(endpoint, stream)
    assert_server_error(httpx.post(srv.url + path, json=payload, timeout=WAIT), endpoint)
    monkeypatch.undo()
    assert_served(srv, endpoint)


class FailingHeaders:
    """ASGI wrapper: sending a 200's headers fails (the response exists, but is never sent)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.armed = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def failing_send(message: dict[str, Any]) -> None:
            if self.armed and message["type"] == "http.response.start" and message["status"] == 200:
                raise RuntimeError("injected: sending the headers failed")
            await send(message)

        await self.app(scope, receive, failing_send)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_response_that_cannot_be_sent_frees_the_slot(srv, endpoint, stream):
    wrapper = FailingHeaders(srv.app.middleware_stack or srv.app.build_middleware_stack())
    srv.app.middleware_stack, inner = wrapper, wrapper.app  # type: ignore[assignment]
    try:
        wrapper.armed = True
        path, payload = body(endpoint, stream)
        r = httpx.post(srv.url + path, json=payload, timeout=WAIT)
        assert r.status_code == 500  # uvicorn's own: the app raised before any response started
        wrapper.armed = False
        assert_served(srv, endpoint)
    finally:
        srv.app.middleware_stack = inner


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("fault", ["first_chunk", "mid_stream"])
def test_an_engine_failure_is_a_500_or_an_in_band_error_and_frees_the_slot(srv, endpoint, fault):
    srv.engine.fault = fault
    path, payload = body(endpoint, False)
    assert_server_error(httpx.post(srv.url + path, json=payload, timeout=WAIT), endpoint)
    path, payload = body(endpoint, True)
    r = httpx.post(srv.url + path, json=payload, timeout=WAIT)
    assert r.status_code == 200 and "error" in r.text and "injected" not in r.text, r.text  # in-band, no internals
    assert "RuntimeError" in r.text
    srv.engine.fault = None
    assert_served(srv, endpoint)


def raw_post(port: int, path: str, payload: dict[str, Any]) -> socket.socket:
    data = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_client_gone_mid_answer_frees_the_slot_and_aborts_the_engine_request(srv, endpoint, stream):
    srv.engine.fault = "hang"
    before = len(srv.engine.aborted)
    path, payload = body(endpoint, stream)
    sock = raw_post(srv.port, path, payload)
    try:
        assert srv.engine.hanging.wait(WAIT)
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream had begun
        assert srv.in_flight == 1
    finally:
        sock.close()
    srv.wait_idle()
    assert len(srv.engine.aborted) == before + 1, srv.engine.aborted  # aborted, and only once
    srv.engine.fault = None
    assert_served(srv, endpoint)


TOOLS = {"chat": [{"type": "function", "function": {"name": "读取", "parameters": {"type": "object"}}}],
         "messages": [{"name": "读取", "input_schema": {"type": "object"}}],
         "responses": [{"type": "function", "name": "读取", "parameters": {"type": "object"}}]}


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_a_cut_stream_is_logged_as_the_client_saw_it_and_its_tokens_count(srv, endpoint, caplog):
    """A stream the client cut mid-call: the log line says 499 (``disconnected=True``) and names
    the call the model had begun, and the tokens it spent are in the token counters."""
    metrics = srv.app.state.services.metrics
    prompt_before, completion_before = metrics.prompt_tokens._value.get(), metrics.completion_tokens._value.get()
    srv.engine.fault = "hang"
    srv.engine.first = Delta(index=0, text='<tool_call>\n{"name": "读取", "arguments": {"path": "a', num_tokens=7)
    path, payload = body(endpoint, True)
    payload["tools"] = TOOLS[endpoint]
    with caplog.at_level(logging.INFO, logger="glmserve.requests"):
        sock = raw_post(srv.port, path, payload)
        try:
            assert srv.engine.hanging.wait(WAIT)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            sock.close()
        srv.wait_idle()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "glmserve.requests"]
    assert " status=499 " in line and "disconnected=True" in line and "stream=True" in line, line
    assert "tools=['读取']" in line and "completion_tokens=7" in line, line
    prompt_tokens = int(line.split("prompt_tokens=")[1].split()[0])
    assert metrics.completion_tokens._value.get() == completion_before + 7
    assert metrics.prompt_tokens._value.get() == prompt_before + prompt_tokens > prompt_before
    srv.engine.fault = None
    assert_served(srv, endpoint)


def test_the_hosted_tool_with_a_non_latin1_name_no_longer_jams_the_server(srv):
    """The finding: a streamed /v1/messages whose hosted tool is named ``搜索`` got a 500
    and kept its slot for good (the slot was freed only by a stream never started)."""
    payload = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "web_search_20250305", "name": "搜索"},
                         {"type": "web_search_20250305", "name": 'a,b "c"\r\nX-Evil: 1'}]}
    for stream in (True, False, True, True):
        r = httpx.post(srv.url + "/v1/messages", json=payload | {"stream": stream}, timeout=WAIT)
        assert r.status_code == 200, r.text
        assert r.headers["x-glmserve-unsupported-tools"] == "%E6%90%9C%E7%B4%A2,a%2Cb%20%22c%22%0D%0AX-Evil%3A%201"
        assert "x-evil" not in r.headers
        srv.wait_idle()


def test_a_route_that_raises_after_serve_returned_frees_the_slot(srv, monkeypatch):
    """Whatever a route does after ``serve`` handed it the response (here: the pre-fix
    header code, which raised on a non-Latin-1 name), the slot comes back."""
    monkeypatch.setattr(anthropic_routes, "header_list", lambda names: ",".join(names))
    payload = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], "stream": True,
               "tools": [{"type": "web_search_20250305", "name": "搜索"}]}
    for _ in range(3):
        r = httpx.post(srv.url + "/v1/messages", json=payload, timeout=WAIT)
        assert r.status_code == 500
        srv.wait_idle()
    monkeypatch.undo()
    assert_served(srv, "messages")


def test_header_list_is_always_a_valid_header_value():
    for names in (["web_search", "code_execution"], ["搜索"], ["a,b", "\r\n", '"', "%", "é"]):
        value = header_list(names)
        value.encode("ascii")
        assert all(32 < ord(c) < 127 for c in value.replace(",", "")) and value.count(",") == len(names) - 1
        from urllib.parse import unquote

        assert [unquote(v) for v in value.split(",")] == names
    assert header_list(["web_search", "code_execution"]) == "web_search,code_execution"


# --------------------------------------------------------------------------- slow clients


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_body_dribbled_byte_by_byte_is_a_408_and_holds_no_slot(srv, path):
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT)
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100000\r\n\r\n{{\"model\": ".encode())
        assert srv.in_flight == 0
        elapsed = dribble_until_answered(sock, b" ", 10 * READ_TIMEOUT, WAIT)
        assert srv.in_flight == 0  # the body is read before the route (and admission) run
        status, headers, content = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        err = json.loads(content)
        if path == "/v1/messages":
            assert err["type"] == "error" and "did not arrive" in err["error"]["message"]
        else:
            assert err["error"]["code"] == "request_timeout"
        assert READ_TIMEOUT * 0.9 <= elapsed < 8 * READ_TIMEOUT  # the total, not each byte's, deadline
        sock.settimeout(WAIT)
        assert sock.recv(1) == b""  # closed
    finally:
        sock.close()
    assert_served(srv, "chat")


# The head's bounds (time, size), the write deadline and the keep-alive deadline restart are
# tests/api/test_hostile_http.py's, against `glmserve serve` itself on each HTTP parser.


# --------------------------------------------------------------------------- the server's own faults


def raising_hook(name: str, arguments: str) -> str:
    raise KeyError("the hook has a bug")


def non_json_hook(name: str, arguments: str) -> str:
    return "{not json"


def non_string_hook(name: str, arguments: str) -> Any:
    return {"a": 1}


CALL = '<tool_call>\n{"name": "f", "arguments": {"a": "x"}}\n</tool_call>'
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}}}}}


@pytest.mark.parametrize("hook", [raising_hook, non_json_hook, non_string_hook])
def test_a_failing_argument_hook_is_a_500_named_in_the_log(hook, caplog, tmp_path):
    engine = ScriptedEngine(lambda prompt, params: [CALL[i:i + 4] for i in range(0, len(CALL), 4)], model_name="m")
    app = create_app(engine, get_format("chatml"), Settings(argument_hook=hook, responses_db=str(tmp_path / "r.db")))
    from fastapi.testclient import TestClient

    user = [{"role": "user", "content": "hi"}]
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.INFO):
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": user, "tools": [TOOL]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert "not valid JSON" not in r.text and "'f'" in r.json()["error"]["message"]
        r = client.post("/v1/messages", json={"model": "m", "max_tokens": 50, "messages": user, "tools": [
            {"name": "f", "input_schema": TOOL["function"]["parameters"]}]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "api_error", r.text
        assert "request body" not in r.text
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": user, "tools": [TOOL], "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error" and "'f'" in events[-1]["error"]["message"]
        r = client.post("/v1/responses", json={"model": "m", "input": "hi", "store": False, "stream": True,
                                               "tools": [{"type": "function", **TOOL["function"]}]})
        assert '"code": "server_error"' in r.text or '"code":"server_error"' in r.text, r.text[-500:]
        assert app.state.admission.in_flight == 0
    logged = "\n".join(rec.getMessage() for rec in caplog.records if rec.name == "glmserve.chat")
    assert f"{__name__}:{hook.__name__}" in logged and "'f'" in logged


def test_an_unexpected_error_building_a_constraint_is_a_500_but_a_bad_schema_stays_a_400(monkeypatch, caplog):
    engine = ScriptedEngine(lambda prompt, params: ["ok"], model_name="m")
    fmt = get_format("chatml")
    app = create_app(engine, fmt, Settings())
    from fastapi.testclient import TestClient

    user = [{"role": "user", "content": "hi"}]
    with TestClient(app, raise_server_exceptions=False) as client:
        dangling = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": user, "tools": [dangling],
                                                      "tool_choice": "required"})
        assert r.status_code == 400, r.text
        for exc in (ValueError("a bug"), RuntimeError("a bug")):
            def broken(chat: Any, exc: Exception = exc) -> Any:
                raise exc

            monkeypatch.setattr(fmt, "constraint", broken)
            with caplog.at_level(logging.ERROR, logger="glmserve.chat"):
                r = client.post("/v1/chat/completions", json={"model": "m", "messages": user, "tools": [TOOL]})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
            assert "constraint" in caplog.text
            r = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": user, "tools": [
                {"name": "f", "input_schema": TOOL["function"]["parameters"]}]})
            assert r.status_code == 500 and r.json()["error"]["type"] == "api_error", r.text
        assert app.state.admission.in_flight == 0


# --------------------------------------------------------------------------- API keys


@pytest.mark.parametrize("keys", [[""], ["  "], ["good", ""], ["\t"], [" padded "]])
def test_blank_api_keys_are_refused_in_settings_and_create_app(keys):
    with pytest.raises(ValueError, match="key"):
        Settings(api_keys=keys)
    settings = Settings()
    settings.api_keys = keys  # changed after it was made
    with pytest.raises(ValueError, match="key"):
        create_app(ScriptedEngine(lambda p, s: [], model_name="m"), get_format("chatml"), settings)


def test_blank_api_keys_are_refused_by_the_cli():
    assert api_keys(["k1"], "k2,k3") == ["k1", "k2", "k3"]
    assert api_keys(None, None) == []
    for flags, env in (([""], None), (["k"], ""), (None, "a,,b"), (None, " "), (["k", " "], None)):
        with pytest.raises(SystemExit) as exc:
            api_keys(flags, env)
        assert "empty or blank" in str(exc.value.code) or "whitespace" in str(exc.value.code)
    # the real command, before any engine is started
    r = subprocess.run([sys.executable, "-m", "glmserve", "serve", "--api-key", "", "--port", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--api-key: key 1 of 1 is empty or blank" in r.stderr, r.stderr[-2000:]


# --------------------------------------------------------------------------- metric labels


def test_request_counts_are_labelled_by_route_template_not_raw_path(srv):
    for i in range(20):
        assert httpx.get(f"{srv.url}/v1/responses/resp_{i:032x}", timeout=WAIT).status_code == 404
        assert httpx.get(f"{srv.url}/v1/no-such-{i}", timeout=WAIT).status_code == 404
    text = httpx.get(srv.url + "/metrics", timeout=WAIT).text
    series = [line for line in text.splitlines() if line.startswith("glmserve_requests_total{")]
    assert 'glmserve_requests_total{endpoint="/v1/responses/{response_id}",status="404"} 20.0' in series
    others = [line for line in series if line.endswith('status="404"} 20.0') and "response_id" not in line]
    assert len(others) == 1, series  # the unknown paths share one label (whatever its name)
    assert not any("resp_" in line or "no-such" in line for line in series)


@pytest.fixture(autouse=True)
def clean_registries(monkeypatch):
    """Apps made here register their error shapes and key headers; keep them to this file."""
    monkeypatch.setattr(errors, "_SHAPES", dict(errors._SHAPES))
    monkeypatch.setattr(middleware, "_KEY_HEADERS", dict(middleware._KEY_HEADERS))
