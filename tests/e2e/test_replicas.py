"""Two real glmserve replicas (real vLLM, the tiny GLM model) sharing one PostgreSQL store
and one ``--secret-file``, each with a cache directory of its own (as on two machines);
requests alternate between them, as a load balancer would send them.

* ``previous_response_id`` chains, ``GET`` and ``DELETE`` answer the same on either replica,
  per API key;
* a stateless Codex-style turn (``store: false``, reasoning sent back as
  ``encrypted_content``) sealed on one replica is opened by the other (the reasoning is in
  the second replica's prompt: its input tokens grow by it);
* the database stopped and restarted mid-run: clear 503s in the Responses shape and an
  unready ``/health`` on both, stateless requests still served, then recovery without a
  restart and nothing acknowledged lost;
* one replica killed mid-stream while the other keeps serving the conversation (the
  killed stream's response was never reported stored, and is not).

The tiny model is ``glm45`` served as GLM-4.7 (thinking on, the prompt ends inside
``<think>``): a random model never closes its reasoning, so every answer is reasoning.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from postgres import PASSWORD
from servers import start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY, OTHER = "replica-key", "other-key"
MODEL = "tiny"
DB_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def replicas(postgres, tmp_path_factory):
    from tiny_models import build_tiny

    model = str(build_tiny("glm45"))
    url = postgres.fresh_database("replicas")
    root = tmp_path_factory.mktemp("replicas")
    secret = root / "server.key"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    started: dict[int, object] = {}
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            started[i] = start_server(
                model, "--chat-format", "glm47", "--served-model-name", MODEL, "--responses-db", url,
                "--secret-file", str(secret), "--responses-db-timeout", str(DB_TIMEOUT), "--api-key", OTHER,
                api_key=KEY, env={"GLMSERVE_CACHE": str(root / f"cache{i}")})
        except BaseException as exc:  # reported below, after both attempts
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    servers = [started[i] for i in sorted(started)]
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for s in servers:
            s.stop()


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def ask(server, text: str, **kw):
    kw.setdefault("max_output_tokens", 8)
    return client(server).responses.create(model=MODEL, input=text, temperature=0, **kw)


def test_chain_get_and_delete_alternate_replicas(replicas):
    a, b = replicas
    r1 = ask(a, "My name is Ada and I live in Paris.")
    r2 = ask(b, "What is my name?", previous_response_id=r1.id)
    alone = ask(b, "What is my name?", store=False)
    # B's prompt holds A's turn: the conversation crossed replicas
    assert r2.usage.input_tokens >= alone.usage.input_tokens + r1.usage.input_tokens - 8
    r3 = ask(a, "And where do I live?", previous_response_id=r2.id)
    assert r3.usage.input_tokens > r2.usage.input_tokens + r2.usage.output_tokens
    assert client(b).responses.retrieve(r3.id).model_dump() == r3.model_dump()
    assert client(a).responses.retrieve(r2.id).model_dump() == r2.model_dump()
    for s in (a, b):
        with pytest.raises(openai.NotFoundError):
            client(s, OTHER).responses.retrieve(r1.id)
        with pytest.raises(openai.BadRequestError):
            client(s, OTHER).responses.create(model=MODEL, input="x", previous_response_id=r3.id)
    client(b).responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client(a).responses.retrieve(r1.id)
    with pytest.raises(openai.BadRequestError, match="deleted or expired"):
        ask(a, "again", previous_response_id=r3.id)


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object",
                                                                    "properties": {"city": {"type": "string"}}}}]


def test_sealed_reasoning_opens_on_the_other_replica(replicas):
    a, b = replicas
    user = {"type": "message", "role": "user", "content": "What is the weather in Paris?"}
    first = client(a).responses.create(model=MODEL, input=[user], tools=TOOLS, store=False, temperature=0,
                                       max_output_tokens=12, include=["reasoning.encrypted_content"])
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content, first.output
    sealed = {"type": "reasoning", "id": reasoning.id, "summary": [], "encrypted_content": reasoning.encrypted_content}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}

    def turn(items: list) -> int:
        r = client(b).responses.create(model=MODEL, input=items, tools=TOOLS, store=False, temperature=0,
                                       max_output_tokens=4)
        return r.usage.input_tokens

    with_reasoning, without = turn([user, sealed, CALL, output]), turn([user, CALL, output])
    # the reasoning (12 tokens) is in B's prompt: B opened A's seal with the shared secret
    assert with_reasoning >= without + 8, (with_reasoning, without)
    assert "reasoning left out" not in b.log()


def test_database_stopped_and_restarted(replicas, postgres):
    a, b = replicas
    kept = [ask(a, "one"), ask(b, "two")]
    postgres.stop()
    try:
        for s in (a, b):
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                ask(s, "while the database is down")
            assert e.value.status_code == 503 and e.value.code == "store_unavailable"
            assert time.monotonic() - t0 < 3 * DB_TIMEOUT + 10
            with pytest.raises(openai.APIStatusError) as e:
                client(s).responses.retrieve(kept[0].id)
            assert e.value.status_code == 503
            with client(s).responses.create(model=MODEL, input="streamed", stream=True, max_output_tokens=4) as st:
                events = list(st)
            assert events[-1].type == "response.failed" and events[-1].response.error.code == "store_unavailable"
            h = httpx.get(s.url + "/health", timeout=60)
            assert h.status_code == 503 and h.json()["error"]["code"] == "store_unavailable"
            assert ask(s, "stateless", store=False).status in ("completed", "incomplete")  # no database needed
    finally:
        postgres.start()
    for s in (a, b):
        assert httpx.get(s.url + "/health", timeout=60).json()["store"] == "ok"
    for r, s in zip(kept, (b, a)):  # nothing acknowledged was lost, and each replica reads the other's
        assert client(s).responses.retrieve(r.id).model_dump() == r.model_dump()
    nxt = ask(b, "three", previous_response_id=kept[0].id)
    assert client(a).responses.retrieve(nxt.id).previous_response_id == kept[0].id
    for s in (a, b):  # the failures were logged, naming the database but not its password
        assert "the response store (PostgreSQL 127.0.0.1:" in s.log() and PASSWORD not in s.log()


def test_replica_killed_mid_stream(replicas):
    """Last in the module: replica A does not come back."""
    a, b = replicas
    before = ask(a, "Remember the number 7.")
    stream = client(a).responses.create(model=MODEL, input="Count slowly to a thousand.", stream=True,
                                        max_output_tokens=1500, previous_response_id=before.id)
    events = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for ev in stream:
            events.append(ev)
            if sum(e.type.endswith(".delta") for e in events) == 3:
                os.killpg(a.proc.pid, signal.SIGKILL)  # the server and its engine process
    assert events[0].type == "response.created" and not any(e.type == "response.completed" for e in events)
    killed_id = events[0].response.id
    # B keeps serving the conversation A had stored
    nxt = ask(b, "Which number?", previous_response_id=before.id)
    assert nxt.usage.input_tokens > before.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client(b).responses.retrieve(killed_id)  # never reported stored, and not stored
    assert httpx.get(b.url + "/health", timeout=60).status_code == 200
    a.proc.wait(30)
