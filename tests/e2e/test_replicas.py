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

Then the same two replicas behind vllm-router (:mod:`router`; the policy the README
recommends, ``sticky_least_loaded``, with ``--api-key`` and health checks every second):

* agent conversations on all three APIs, streamed and whole, each answer complete (the
  SDKs' stream accumulators, a forced call's arguments valid against the tool's schema),
  each turn of a session on the replica that served its first (``X-Session-ID``) with the
  prefix cache serving turn 2; Messages as Claude Code sends them (``x-api-key`` or a
  Bearer token, ``anthropic-beta``, ``metadata.user_id``), which a router without
  ``--api-key`` answers 401 (its transparent proxy drops the client's credentials);
* Responses as Codex sends them (stateless, reasoning sealed) and ``previous_response_id``
  chains; ``GET`` of a stored response through the router, ``DELETE`` on any replica (the
  router answers 501 for it);
* glmserve's KV-cache events (``--kv-events-config``) carry the very token ids its render
  API gives the router;
* one replica killed mid-stream: the in-flight stream fails (no ``response.completed``),
  the router's health check takes the replica out and the session's next turn succeeds
  on the other replica (last in the module: that replica does not come back).

The tiny model is ``glm45`` served as GLM-4.7 (thinking on, the prompt ends inside
``<think>``): a random model never closes its reasoning, so every answer is reasoning
(the forced calls turn thinking off).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from postgres import PASSWORD
from router import VllmRouter
from servers import free_port, start_server

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
    events = [free_port(), free_port()]  # each replica's KV-cache event publisher (vLLM's ZMQ PUB)

    def start(i: int) -> None:
        try:
            # no "topic": vllm-router 0.1.17's --kv-event-source subscribes to the empty topic only
            kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events[i]}"}
            started[i] = start_server(
                model, "--chat-format", "glm47", "--served-model-name", MODEL, "--responses-db", url,
                "--secret-file", str(secret), "--responses-db-timeout", str(DB_TIMEOUT), "--api-key", OTHER,
                "--kv-events-config", json.dumps(kv_events),
                api_key=KEY, env={"GLMSERVE_CACHE": str(root / f"cache{i}")})
            started[i].extra["kv_events"] = f"tcp://127.0.0.1:{events[i]}"
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


# --------------------------------------------------------------------------- behind vllm-router

ROUTER_FLAGS = ("--api-key", KEY, "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                "--health-check-timeout-secs", "5")
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def router(replicas):
    with VllmRouter([s.url for s in replicas], "sticky_least_loaded", *ROUTER_FLAGS) as r:
        yield r


def answered(replicas, route: str) -> list[float]:
    """Each replica's count of requests answered 200 at ``route`` (its /metrics)."""
    from glmserve.bench.router import answered as answered_at

    return answered_at([s.url for s in replicas], route)


def served_by(replicas, route: str, call):
    """``(index of the replica that answered, call's result)`` for one request through the router."""
    before = answered(replicas, route)
    result = call()
    grew = [i for i, (x, y) in enumerate(zip(before, answered(replicas, route))) if y > x]
    assert len(grew) == 1, grew
    return grew[0], result


def session() -> str:
    """A session id, also written into the tool's description so each conversation's prompt
    differs from the first block on: a cache hit can only be its own earlier turn."""
    return f"s-{uuid.uuid4().hex[:12]}"


def chat_turn(c: openai.OpenAI, stream: bool, **kw) -> tuple[str, dict[str, str], str, object]:
    """``(content, {call id: arguments}, finish_reason, usage)``, folded from the stream's chunks."""
    if not stream:
        r = c.chat.completions.create(**kw)
        m = r.choices[0].message
        return m.content or "", {t.id: t.function.arguments for t in m.tool_calls or []}, r.choices[0].finish_reason, r.usage
    text, calls, ids, finish, usage = "", {}, {}, None, None
    for chunk in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for t in ch.delta.tool_calls or []:
                ids[t.index] = t.id or ids.get(t.index)
                calls[ids[t.index]] = calls.get(ids[t.index], "") + (t.function.arguments or "")
            finish = ch.finish_reason or finish
    return text, calls, finish, usage


@pytest.mark.parametrize("stream", [False, True])
def test_router_chat_agent_session_stays_on_its_replica(replicas, router, stream):
    sid = session()
    c = openai.OpenAI(base_url=router.base_url, api_key=KEY, max_retries=0, timeout=120,
                      default_headers={"X-Session-ID": sid})
    tools = [{"type": "function", "function": {"name": "get_weather", "description": f"Weather ({sid})", "parameters": CITY}}]
    msgs: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, tools=tools, temperature=0, reasoning_effort="none")
    home, (_, calls, finish, usage1) = served_by(replicas, "/v1/chat/completions", lambda: chat_turn(
        c, stream, messages=msgs, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=100, **kw))
    assert finish == "tool_calls" and len(calls) == 1, (finish, calls)
    (cid, args), = calls.items()
    jsonschema.validate(json.loads(args), CITY)  # the whole call came through
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
             {"role": "tool", "tool_call_id": cid, "content": "sunny, 24 C"}]
    again, (text, calls, finish, usage2) = served_by(replicas, "/v1/chat/completions", lambda: chat_turn(
        c, stream, messages=msgs, tool_choice="auto", max_tokens=6, **kw))
    assert again == home  # the session's turns stay on the replica holding its cache
    assert finish in ("length", "stop", "tool_calls") and (text or calls) and usage2.completion_tokens <= 6
    assert usage2.prompt_tokens > usage1.prompt_tokens
    assert usage2.prompt_tokens_details.cached_tokens >= 128  # turn 1's prefix, from the prefix cache


CC_HEADERS = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14", "x-app": "cli"}


@pytest.mark.parametrize("auth", ["x-api-key", "bearer"])
def test_router_messages_as_claude_code_sends_them(replicas, router, auth):
    sid = session()
    creds = {"api_key": KEY} if auth == "x-api-key" else {"auth_token": KEY}
    c = anthropic.Anthropic(base_url=router.url, max_retries=0, timeout=120,
                            default_headers={**CC_HEADERS, "X-Session-ID": sid}, **creds)
    tools = [{"name": "get_weather", "description": f"Weather ({sid})", "input_schema": CITY}]
    system = [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
               "cache_control": {"type": "ephemeral"}}]
    msgs: list[dict] = [{"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]}]
    kw = dict(model=MODEL, system=system, tools=tools, thinking={"type": "disabled"},
              metadata={"user_id": f"user_0_account__session_{sid}"})

    def streamed(**more):
        with c.beta.messages.stream(**kw, **more) as st:  # Claude Code's path: /v1/messages?beta=true
            return st.get_final_message()

    home, first = served_by(replicas, "/v1/messages", lambda: streamed(
        messages=msgs, tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=100))
    assert first.stop_reason == "tool_use", first
    call = next(b for b in first.content if b.type == "tool_use")
    jsonschema.validate(call.input, CITY)
    msgs += [{"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    again, second = served_by(replicas, "/v1/messages", lambda: c.beta.messages.create(
        messages=msgs, max_tokens=6, **kw))
    assert again == home and second.stop_reason in ("max_tokens", "end_turn", "tool_use") and second.content
    assert 0 < second.usage.output_tokens <= 6 and second.usage.input_tokens + second.usage.cache_read_input_tokens > \
        first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= 128


def test_router_without_api_key_drops_messages_credentials(replicas):
    """Why the router needs ``--api-key``: vllm-router 0.1.17 forwards ``/v1/messages`` and
    ``/v1/responses`` through its transparent proxy, which sends none of the client's headers
    (with ``--api-key`` it sends ``Authorization: Bearer <that key>``); Chat Completions keeps them."""
    with VllmRouter([s.url for s in replicas], "round_robin") as bare:
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(bare.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
        assert r.status_code == 401 and r.json()["type"] == "error", r.text
        r = httpx.post(bare.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_router_responses_as_codex_sends_them(replicas, router, stream):
    sid = session()
    c = openai.OpenAI(base_url=router.base_url, api_key=KEY, max_retries=0, timeout=120,
                      default_headers={"X-Session-ID": sid})
    tools = [{"type": "function", "name": "get_weather", "description": f"Weather ({sid})", "parameters": CITY}]
    user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}
    kw = dict(model=MODEL, tools=tools, store=False, include=["reasoning.encrypted_content"], temperature=0)

    def turn(items: list, n: int):
        if not stream:
            return c.responses.create(input=items, max_output_tokens=n, **kw)
        events = list(c.responses.create(input=items, max_output_tokens=n, stream=True, **kw))
        final = events[-1]
        assert final.type == "response.incomplete", [e.type for e in events]  # cut at max_output_tokens
        deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert deltas == "".join(p.text for o in final.response.output if o.type == "reasoning" for p in o.content or [])
        return final.response

    home, first = served_by(replicas, "/v1/responses", lambda: turn([user], 12))
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content and first.usage.output_tokens == 12
    sealed = {"type": "reasoning", "id": reasoning.id, "summary": [], "encrypted_content": reasoning.encrypted_content}
    history = [user, sealed, {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    again, second = served_by(replicas, "/v1/responses", lambda: turn(history, 4))
    assert again == home and second.usage.output_tokens == 4
    # the sealed reasoning was opened (its 12 tokens are in the prompt) and turn 1 came from the cache
    assert second.usage.input_tokens >= first.usage.input_tokens + 12
    assert second.usage.input_tokens_details.cached_tokens >= 128


def test_router_previous_response_id_get_and_delete(replicas, router):
    sid = session()
    c = openai.OpenAI(base_url=router.base_url, api_key=KEY, max_retries=0, timeout=120,
                      default_headers={"X-Session-ID": sid})
    instructions = f"Session {sid}. " + "Answer briefly and in English. " * 40  # over two KV blocks
    home, r1 = served_by(replicas, "/v1/responses", lambda: c.responses.create(
        model=MODEL, instructions=instructions, input="My name is Ada.", max_output_tokens=8, temperature=0))
    again, r2 = served_by(replicas, "/v1/responses", lambda: c.responses.create(
        model=MODEL, instructions=instructions, input="What is my name?", previous_response_id=r1.id,
        max_output_tokens=8, temperature=0))
    assert again == home and r2.usage.input_tokens > r1.usage.input_tokens  # the chain came from the store
    assert r2.usage.input_tokens_details.cached_tokens >= 128
    assert c.responses.retrieve(r1.id).model_dump() == r1.model_dump()  # the router asks every replica
    # vllm-router 0.1.17 answers DELETE /v1/responses/{id} itself (501); any replica deletes it
    assert httpx.delete(f"{router.base_url}/responses/{r1.id}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 501
    client(replicas[1 - home]).responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client(replicas[home]).responses.retrieve(r1.id)


def test_kv_events_carry_the_rendered_token_ids(replicas):
    """``--kv-events-config`` passes through ``glmserve serve`` to vLLM: a request's blocks are
    published (ZMQ, vLLM's msgpack batches) with the token ids glmserve's render API gives a router.
    Then vllm-router's ``kv_aware`` policy, subscribed to both replicas, asks each replica to render
    a request and credits the replica that cached it: a prompt it sent to one replica comes back to
    that replica with every full block credited (its decision log), which serves them from cache."""
    import msgspec
    import zmq

    a = replicas[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(a.extra["kv_events"])
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        time.sleep(1.0)  # a subscriber misses what is published before it has connected
        body = {"model": MODEL, "max_tokens": 2, "reasoning_effort": "none",
                "messages": [{"role": "user", "content": f"{session()} " + "the quick brown fox jumps " * 60}]}
        ids = httpx.post(a.url + "/v1/chat/completions/render", json=body, headers=auth, timeout=60).json()["token_ids"]
        assert httpx.post(a.url + "/v1/chat/completions", json=body, headers=auth, timeout=120).status_code == 200
        stored: list[dict] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e["parent_block_hash"] is None and len(e["token_ids"]) >= 256
                                                      and e["token_ids"] == ids[:len(e["token_ids"])] for e in stored):
            if sub.poll(500):
                frames = sub.recv_multipart()
                assert len(frames) == 3 and frames[0] == b"", frames[:2]  # topic, sequence number, batch
                stored += [e for e in msgspec.msgpack.decode(frames[2])[1] if e["type"] == "BlockStored"]
        ours = [e for e in stored if e["token_ids"] == ids[:len(e["token_ids"])] and e["parent_block_hash"] is None]
        assert ours, [len(e["token_ids"]) for e in stored]
        block = ours[0]["block_size"]
        assert len(ours[0]["token_ids"]) == len(ids) // block * block  # every full block of the prompt
    finally:
        sub.close(0)
        ctx.term()
    sources = [f"{s.url}={s.extra['kv_events']}" for s in replicas]
    # a prompt neither replica has seen; the router must see its blocks stored, so it starts first
    body = {**body, "messages": [{"role": "user", "content": f"{session()} " + "pack my box with five dozen jugs " * 50}]}
    ids = httpx.post(a.url + "/v1/chat/completions/render", json=body, headers=auth, timeout=60).json()["token_ids"]
    with VllmRouter([s.url for s in replicas], "kv_aware", "--api-key", KEY, "--log-level", "debug",
                    "--kv-event-block-size", str(block), "--kv-event-model", MODEL,
                    *[x for src in sources for x in ("--kv-event-source", src)]) as kv:
        time.sleep(1.0)  # its subscribers connect once it has started; a PUB drops what it sends before
        first = httpx.post(kv.base_url + "/chat/completions", json=body, headers=auth, timeout=120)
        assert first.status_code == 200, first.text
        # until the first request's event batches have reached the router's index (none new for 1 s)
        deadline, seen = time.monotonic() + 30, -1
        while True:
            applied = kv.log_path.read_text(errors="replace").count("kv_index live sequence advanced")
            if applied and applied == seen:
                break
            assert time.monotonic() < deadline, kv.log()
            seen = applied
            time.sleep(1.0)
        second = httpx.post(kv.base_url + "/chat/completions", json=body, headers=auth, timeout=120)
        assert second.status_code == 200, second.text
        metrics = httpx.get(kv.metrics_url, timeout=10).text
        log = re.sub(r"\x1b\[[0-9;]*m", "", kv.log_path.read_text(errors="replace"))  # its colours
    renders = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("vllm_router_kv_routing_inputs_total") and 'result="render"' in line)
    assert renders == 4, metrics  # it asked both replicas for the token ids, for each request
    decisions = re.findall(r'KV prefix decision .*?worker="([^"]+)" input_tokens=(\d+) new_prefill_tokens=\d+ '
                           r'credited_prefix_tokens=(\d+)', log)
    full = len(ids) // block * block
    assert [(n, c) for _, n, c in decisions] == [(str(len(ids)), "0"), (str(len(ids)), str(full))], log[-6000:]
    assert decisions[0][0] == decisions[1][0]  # back to the replica that cached it
    # the replica served them from its prefix cache (vLLM computes the last prompt token anyway)
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= full - block


def test_replica_killed_mid_stream_through_the_router(replicas, router):
    """Last in the module: the killed replica does not come back."""
    sid = session()
    c = openai.OpenAI(base_url=router.base_url, api_key=KEY, max_retries=0, timeout=120,
                      default_headers={"X-Session-ID": sid})
    home, before = served_by(replicas, "/v1/responses", lambda: c.responses.create(
        model=MODEL, input="Remember the number 7.", max_output_tokens=8, temperature=0))
    victim, survivor = replicas[home], replicas[1 - home]
    stream = c.responses.create(model=MODEL, input="Count slowly to a thousand.", stream=True,
                                max_output_tokens=1500, previous_response_id=before.id)
    events = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for ev in stream:
            events.append(ev)
            if sum(e.type.endswith(".delta") for e in events) == 3:
                os.killpg(victim.proc.pid, signal.SIGKILL)  # the server and its engine process
    assert events[0].type == "response.created" and not any(e.type == "response.completed" for e in events)
    killed_id = events[0].response.id
    # the router's health check (every second) takes the replica out of the rotation
    deadline = time.monotonic() + 30
    while httpx.get(router.url + "/health", timeout=10).status_code == 200:
        assert time.monotonic() < deadline, router.log()
        time.sleep(0.2)
    # the session's next turn, on the survivor, which reads the conversation the victim stored
    was = answered([survivor], "/v1/responses")[0]
    nxt = c.responses.create(model=MODEL, input="Which number?", previous_response_id=before.id, max_output_tokens=8,
                             temperature=0)
    assert answered([survivor], "/v1/responses")[0] == was + 1
    assert nxt.usage.input_tokens > before.usage.input_tokens
    assert c.responses.retrieve(before.id).model_dump() == before.model_dump()
    with pytest.raises(openai.NotFoundError):
        client(survivor).responses.retrieve(killed_id)  # never reported stored, and not stored
    assert httpx.get(survivor.url + "/health", timeout=60).status_code == 200
    victim.proc.wait(30)
