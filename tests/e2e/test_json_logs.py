"""``serve --json-logs``: one JSON object per request in the server log.

One tiny GLM-4 server started here with ``--json-logs``; requests force a tool call so the
record has tool names to show.
"""

from __future__ import annotations

import json
import time

import pytest

from servers import start_server

pytestmark = pytest.mark.e2e

MODEL = "tiny-glm4-jsonlogs"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["北京", "上海"]}},
                       "required": ["city"]},
    },
}
MSGS = [{"role": "user", "content": "北京天气？"}]


@pytest.fixture(scope="module")
def server():
    from tiny_models import build_tiny

    s = start_server(str(build_tiny("glm4")), "--chat-format", "glm4", "--served-model-name", MODEL, "--json-logs")
    yield s
    s.stop()


def _records(log: str) -> list[dict]:
    """Request records: whole log lines that are a JSON object with an ``id``."""
    out = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "id" in obj:
            out.append(obj)
    return out


def _record_for(server, rid: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in _records(server.log()) if r["id"] == rid]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} records for {rid}:\n{server.log()[-3000:]}"
            return found[0]
        time.sleep(0.2)


def test_one_json_record_per_request(server):
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=MSGS, tools=[TOOL], tool_choice="required",
                                  temperature=0, max_tokens=32)
    assert r.choices[0].message.tool_calls
    rec = _record_for(server, r.id)
    assert rec["model"] == MODEL
    assert rec["status"] == 200
    assert rec["prompt_tokens"] == r.usage.prompt_tokens
    assert rec["completion_tokens"] == r.usage.completion_tokens
    assert isinstance(rec["latency_s"], (int, float)) and 0 < rec["latency_s"] < 120
    assert rec["tools"] == [tc.function.name for tc in r.choices[0].message.tool_calls]

    # a plain answer: a record too, with no tools
    r2 = c.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=4)
    rec2 = _record_for(server, r2.id)
    assert rec2["tools"] == [] and rec2["completion_tokens"] == r2.usage.completion_tokens


def test_streamed_request_is_logged(server):
    c = server.client()
    chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, tools=[TOOL], tool_choice="required",
                                            temperature=0, max_tokens=32, stream=True))
    rid = chunks[0].id
    rec = _record_for(server, rid)
    assert rec["model"] == MODEL and rec["status"] == 200
    assert isinstance(rec["latency_s"], (int, float)) and rec["latency_s"] > 0
    assert rec["prompt_tokens"] > 0


def test_streamed_record_has_tokens_and_tools(server):
    c = server.client()
    chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, tools=[TOOL], tool_choice="required",
                                            temperature=0, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True}))
    rec = _record_for(server, chunks[0].id)
    names = [tc.function.name for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []
             if tc.function and tc.function.name]
    assert rec["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert rec["tools"] == names
