"""Fuzzing the HTTP surface.

* schemathesis generates requests (valid and invalid ones) for every operation of the OpenAPI
  document -- the one the live app answers ``GET /openapi.json`` with: ``tests/scripted_server.py``,
  the real app on the scripted engine in its own process -- sends them to it over HTTP and
  checks: no 5xx, and every status code, content type, header and body is one the document
  declares (the 200 bodies have real schemas: ``ChatCompletion`` and ``Completion`` from the
  ``openai`` package, the server's own models for Messages, Responses and the rest).  A fixed
  number of examples per operation, derandomized: the same cases every run.  Afterwards
  nothing is left in flight.
* hostile requests (lone surrogates, 64-bit overflows, deep nesting, tool names spelling
  markers...) on every format: 200 or an OpenAI-shaped 400, never a 5xx.

The parsers' own fuzzing is ``tests/formats/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from glmserve.formats import FORMATS, get_format
from servers import free_port, wait_healthy


# ----------------------------------------------------------------------------- OpenAPI fuzzing

EXAMPLES = 25
"""Generated cases per operation (valid and invalid ones together)."""


def _document() -> dict:
    """The OpenAPI document of the app, built in-process at collection time (schemathesis needs
    it then); ``test_openapi_document_is_the_servers`` checks it is what the live server's
    ``GET /openapi.json`` returns, and the fuzzed requests go to that server over HTTP."""
    from glmserve.api.app import create_app
    from glmserve.engine.scripted import ScriptedEngine

    return create_app(ScriptedEngine(lambda p, s: [], model_name="m"), get_format("glm47")).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """``tests/scripted_server.py`` in its own process: GLM-4.7 output with reasoning, text and a
    call for every request, any model name served (so valid requests reach the engine rather
    than a 404), a store of its own."""
    port = free_port()
    db = tmp_path_factory.mktemp("fuzz") / "responses.sqlite3"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "scripted_server.py"), "--port", str(port),
                             "--chat-format", "glm47", "--program", "fuzz", "--responses-db", str(db),
                             "--model-alias", "*"])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 60)
    yield url
    proc.terminate()
    proc.wait(30)


def test_openapi_document_is_the_servers(live):
    assert httpx.get(live + "/openapi.json").json() == json.loads(json.dumps(DOCUMENT))


def test_every_route_is_fuzzed():
    """Every route the app serves is in the document, so the fuzzing below covers it."""
    from glmserve.api.app import create_app
    from glmserve.engine.scripted import ScriptedEngine

    app = create_app(ScriptedEngine(lambda p, s: [], model_name="m"), get_format("glm47"))
    served = {(m.lower(), r.path.replace(":path", "")) for r in app.routes if getattr(r, "include_in_schema", False)
              for m in r.methods - {"HEAD"}}
    documented = {(m, path) for path, ops in DOCUMENT["paths"].items() for m in ops}
    assert served == documented and len(documented) >= 13
    for path, ops in DOCUMENT["paths"].items():  # and every answer has a real schema to be checked against
        for m, op in ops.items():
            ok = op["responses"]["200"]["content"]
            body = ok.get("application/json", ok.get("text/plain", {})).get("schema")
            assert body, (m, path)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_conformance(case, live):
    case.call_and_validate(base_url=live, checks=CHECKS, timeout=30)


def test_nothing_is_left_in_flight(live):
    """After every fuzzed request (streams cut, errors, disconnects): no admission slot held,
    no engine request running."""
    deadline = time.monotonic() + 10
    while True:
        metrics = {s.name: s.value for fam in text_string_to_metric_families(httpx.get(live + "/metrics").text)
                   for s in fam.samples}
        held, running = metrics["glmserve_requests_running"], httpx.get(live + "/health").json()["running"]
        if (held, running) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (held, running) == (0, 0)


def test_openapi_documents_real_errors(live):
    """What the fuzzing relies on: validation failures are documented as the 400s they are."""
    doc = httpx.get(live + "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"400", "401", "413", "429", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


# ----------------------------------------------------------------------------- hostile requests, every format

_M = [{"role": "user", "content": "x"}]
_DEEP = json.loads('{"type": "array", "items": ' * 200 + "{}" + "}" * 200)
HOSTILE = [  # (path, body as JSON text); each must get 200 or an OpenAI-shaped 4xx on every format
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a", "\\udc00": 1}]}'),
    ("/v1/completions", '{"prompt": "\\udfff"}'),
    ("/v1/completions", '{"prompt": [-1, 5]}'),
    ("/v1/chat/completions", json.dumps({"messages": _M, "seed": 2**70})),
    ("/v1/chat/completions", json.dumps({"messages": _M, "top_logprobs": 2})),
    ("/v1/chat/completions", json.dumps({"messages": _M, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": _DEEP}}}}]})),
    ("/v1/chat/completions", json.dumps({"messages": _M, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": _DEEP}}})),
    ("/v1/chat/completions", json.dumps({"messages": _M, "tools": [
        {"type": "function", "function": {"name": "f", "x": json.loads("[" * 900 + "]" * 900)}}]})),
    ("/tokenize", json.dumps({"messages": _M + [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]})),
    ("/v1/chat/completions", json.dumps({"messages": _M + [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "r"}]})),
] + [
    ("/v1/chat/completions", json.dumps({"messages": _M, "tool_choice": choice, "tools": [
        {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {name: {"type": "string"}}, "required": [name]}}}]}))
    for name in ("a<arg_key>b", "</tool_call>", "<|assistant|>", "x\ny", 'q"t', "北京", "\\", "::=", "<think>")
    for choice in ("auto", "required")
]


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_hostile_requests_never_5xx_on_any_format(fmt_name):
    from fastapi.testclient import TestClient

    from glmserve.api.app import create_app
    from glmserve.engine.scripted import ScriptedEngine

    app = create_app(ScriptedEngine(lambda p, s: ["\nhi"], model_name="m"), get_format(fmt_name))
    with TestClient(app, raise_server_exceptions=False) as client:
        for path, body in HOSTILE:
            r = client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
            assert r.status_code in (200, 400), (path, body[:200], r.status_code, r.text[:300])
            if r.status_code == 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
