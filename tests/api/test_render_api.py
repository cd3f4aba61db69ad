"""vLLM's render API (``POST /v1/chat/completions/render``, ``/v1/messages/render``,
``/v1/responses/render``, ``/v1/completions/render``) and the other figures a router reads
(``GET /get_load``), on the scripted engine (its token ids are the prompt's code points).

vllm-router's ``kv_aware`` policy asks every replica to render each request and matches the
ids against the replicas' KV-cache events, so the ids must be exactly those the request's
own generation gives the engine: each test compares a render with the prompt the engine
then got for the same body.  A render generates nothing, stores nothing and counts nothing a
generated request counts.  The same paths run on vLLM in ``tests/e2e/test_replicas.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from glmserve.api.app import Settings, create_app
from glmserve.engine.scripted import ScriptedEngine
from glmserve.formats import get_format

KEY, OTHER = "render-key", "other-key"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]


@pytest.fixture
def served(tmp_path: Path):
    engine = ScriptedEngine(lambda prompt, params: ["Sunny", " today."], model_name="scripted", max_model_len=8192)
    app = create_app(engine, get_format("glm47"), Settings(api_keys=[KEY, OTHER], responses_db=str(tmp_path / "r.sqlite3"),
                                                           max_concurrent_requests=2))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, engine


def engine_ids(engine: ScriptedEngine) -> list[int]:
    return [ord(c) for c in engine.last_prompt]


def series(client: TestClient, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_chat_render_is_the_prompt_the_engine_gets(served) -> None:
    client, engine = served
    body = {"model": "scripted", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS, "max_tokens": 7, "temperature": 0.2}
    prepared_before = series(client, 'glmserve_server_time_seconds_count{phase="prepare"}')
    r = client.post("/v1/chat/completions/render", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "scripted" and out["request_id"].startswith("chatcmpl-") and out["stream"] is False
    assert out["sampling_params"]["max_tokens"] == 7 and out["sampling_params"]["temperature"] == 0.2
    assert engine.last_params is None  # nothing was generated
    # a render counts nothing a generated request counts (the router renders on every replica)
    assert series(client, 'glmserve_server_time_seconds_count{phase="prepare"}') == prepared_before
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert out["token_ids"] == engine_ids(engine)
    assert series(client, 'glmserve_server_time_seconds_count{phase="prepare"}') == prepared_before + 1


def test_reasoning_is_a_name_of_reasoning_content(served) -> None:
    """vllm-router re-sends Chat Completions with an assistant's ``reasoning_content`` renamed
    ``reasoning`` (vLLM's newer name): the history, and so the prompt, is the same."""
    client, _ = served

    def render(field: str) -> list[int]:
        history = [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", field: "I should call the tool.",
                    "tool_calls": [{"id": "c1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        r = client.post("/v1/chat/completions/render", json={"model": "scripted", "messages": history, "tools": TOOLS})
        assert r.status_code == 200, r.text
        return r.json()["token_ids"]

    with_reasoning = render("reasoning")
    assert with_reasoning == render("reasoning_content")
    assert "I should call the tool." in "".join(map(chr, with_reasoning))


def test_messages_render_is_the_prompt_the_engine_gets(served) -> None:
    client, engine = served
    body = {"model": "scripted", "max_tokens": 9, "system": [{"type": "text", "text": "You are Claude Code."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "List the files."}]}],
            "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}],
            "metadata": {"user_id": "user_x_account__session_1"}}
    # as Claude Code sends it: the key in x-api-key
    headers = {"x-api-key": KEY, "Authorization": "", "anthropic-version": "2023-06-01"}
    r = client.post("/v1/messages/render", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["request_id"].startswith("msg_") and r.json()["sampling_params"]["max_tokens"] == 9
    assert client.post("/v1/messages", json=body, headers=headers).status_code == 200
    assert r.json()["token_ids"] == engine_ids(engine)
    assert client.post("/v1/messages/render", json=body, headers={"Authorization": ""}).status_code == 401


def test_responses_render_includes_the_stored_chain_and_stores_nothing(served) -> None:
    client, engine = served
    first = client.post("/v1/responses", json={"model": "scripted", "input": "My name is Ada."}).json()
    body = {"model": "scripted", "input": "What is my name?", "previous_response_id": first["id"]}
    r = client.post("/v1/responses/render", json=body)
    assert r.status_code == 200, r.text
    rendered = r.json()
    assert "My name is Ada." in "".join(map(chr, rendered["token_ids"]))  # the history came from the store
    assert client.get(f"/v1/responses/{rendered['request_id']}").status_code == 404  # nothing stored
    second = client.post("/v1/responses", json=body)
    assert second.status_code == 200 and rendered["token_ids"] == engine_ids(engine)
    # the chain is the caller's: another key cannot render it
    other = client.post("/v1/responses/render", json=body, headers={"Authorization": f"Bearer {OTHER}"})
    assert other.status_code == 400 and other.json()["error"]["param"] == "previous_response_id"


def test_completions_render_one_input_per_prompt(served) -> None:
    client, _ = served
    r = client.post("/v1/completions/render", json={"model": "scripted", "prompt": ["ab", "cde"], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert [x["token_ids"] for x in r.json()] == [[97, 98], [99, 100, 101]]
    assert r.json()[0]["request_id"].endswith("-0") and r.json()[1]["sampling_params"]["max_tokens"] == 3


def test_render_errors_are_the_requests_own(served) -> None:
    client, engine = served
    r = client.post("/v1/chat/completions/render", json={"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions/render", json={"model": "scripted", "messages": [
        {"role": "user", "content": "x" * 9000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    engine.dead = True
    r = client.post("/v1/chat/completions/render", json={"model": "scripted", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503


def test_render_takes_an_admission_slot_and_gives_it_back(served) -> None:
    client, _ = served
    admission = client.app.state.admission
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    slots = [admission.acquire(), admission.acquire()]  # the server's limit is 2
    try:
        r = client.post("/v1/chat/completions/render", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        for s in slots:
            s.release()
    assert client.post("/v1/chat/completions/render", json=body).status_code == 200
    assert admission.in_flight == 0


def test_get_load(served) -> None:
    client, _ = served
    r = client.get("/get_load", headers={"Authorization": ""})  # open, like /health: the router polls it keyless
    assert r.status_code == 200 and r.json() == {"load": 0, "running": 0, "waiting": 0}
