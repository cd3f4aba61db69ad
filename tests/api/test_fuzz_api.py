"""Fuzzing the HTTP surface.

* schemathesis generates requests (valid and invalid ones, 50 per operation) from the
  OpenAPI document -- the one a scripted-engine server answers ``GET /openapi.json`` with --
  sends them to that server over HTTP and checks: no 5xx, and every status code, content
  type, header and body is one the document declares.
* hostile requests (lone surrogates, 64-bit overflows, deep nesting, tool names spelling
  markers...) on every format: 200 or an OpenAI-shaped 400, never a 5xx.

The parsers' own fuzzing is ``tests/formats/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from glmserve.formats import FORMATS, get_format
from test_api_protocol import Scripted


# ----------------------------------------------------------------------------- OpenAPI fuzzing

SCRIPTED_OUTPUT = 'Hello, 北京! <tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


def _document() -> dict:
    """The OpenAPI document of a scripted-engine app, built in-process at collection time
    (schemathesis needs it then; its lazy ``from_fixture`` loader does not run on pytest 9).
    ``test_openapi_document_is_the_servers`` checks it is what the server's
    ``GET /openapi.json`` returns, and the fuzzed requests go to that server over HTTP."""
    from glmserve.api.app import create_app
    from glmserve.engine.scripted import ScriptedEngine

    return create_app(ScriptedEngine(lambda p, s: [], model_name="m"), get_format("chatml")).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def scripted_server():
    s = Scripted("chatml", output=SCRIPTED_OUTPUT, size=5)
    yield s
    s.stop()


def test_openapi_document_is_the_servers(scripted_server):
    import httpx

    assert httpx.get(f"http://127.0.0.1:{scripted_server.port}/openapi.json").json() == json.loads(json.dumps(DOCUMENT))


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_conformance(case, scripted_server):
    case.call_and_validate(base_url=f"http://127.0.0.1:{scripted_server.port}", checks=CHECKS, timeout=30)


def test_openapi_documents_real_errors(scripted_server):
    """What the fuzzing relies on: validation failures are documented as the 400s they are."""
    import httpx

    doc = httpx.get(f"http://127.0.0.1:{scripted_server.port}/openapi.json").json()
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
