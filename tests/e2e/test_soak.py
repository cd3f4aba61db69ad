"""A bounded soak: about two minutes of mixed traffic against one real server (the embedded
default model on the real vLLM engine), then the server must be as it was.

The mix, on all three APIs: whole and streamed answers, clients that go away mid-stream,
clients that stop reading a stream (cut at ``--write-timeout``), malformed JSON, oversize
bodies, heads over ``--max-header-bytes``, bodies and headers dribbled slower than
``--read-timeout``, partial heads pipelined behind a live stream, strict tools with
unreadable schemas, hosted tools with non-ASCII and header-unsafe names, and lookups of stored
responses by ids never issued.  Afterwards: no 5xx was answered for a
client's mistake, ``glmserve_requests_running`` is back to 0, the server still answers, its
RSS grew by a bounded amount, and the ``/metrics`` series count did not grow with the
distinct paths and tool names sent (the figures are printed: run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx
import psutil
import pytest

from raw_http import responses as raw_responses
from servers import Server, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

READ_TIMEOUT = 2.0
WRITE_TIMEOUT = 2.0
MAX_BODY = 200_000
SOAK_SECONDS = float(os.environ.get("GLMSERVE_SOAK_SECONDS", "100"))
MAX_ROUNDS = 400  # a bound on the count as well as on the time
WORKERS = 6
USER = [{"role": "user", "content": "Say hello."}]
RSS_GROWTH_LIMIT = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory) -> Server:
    s = start_server(None, "--read-timeout", str(READ_TIMEOUT), "--write-timeout", str(WRITE_TIMEOUT),
                     "--max-body-bytes", str(MAX_BODY),
                     "--max-concurrent-requests", "64",
                     "--responses-db", str(tmp_path_factory.mktemp("soak") / "responses.sqlite3"))
    yield s
    s.stop()


# --------------------------------------------------------------------------- one request of each kind
# Each returns the status it got (0: the client went away on purpose) and checks the answer's shape.


def chat(s: Server, c: httpx.Client) -> int:
    r = c.post(s.base_url + "/chat/completions", json={"model": served_name(s), "messages": USER, "max_tokens": 6})
    assert r.status_code != 200 or r.json()["choices"][0]["message"]["role"] == "assistant"
    return r.status_code


def served_name(s: Server) -> str:
    return s.extra.setdefault("model", httpx.get(s.base_url + "/models", timeout=30).json()["data"][0]["id"])


def chat_stream(s: Server, c: httpx.Client) -> int:
    with c.stream("POST", s.base_url + "/chat/completions",
                  json={"model": served_name(s), "messages": USER, "max_tokens": 6, "stream": True}) as r:
        text = r.read().decode()
    assert r.status_code != 200 or text.rstrip().endswith("data: [DONE]"), text[-300:]
    return r.status_code


def completion_stream(s: Server, c: httpx.Client) -> int:
    r = c.post(s.base_url + "/completions", json={"model": served_name(s), "prompt": "Once upon", "max_tokens": 6,
                                                   "stream": True})
    assert r.status_code != 200 or "[DONE]" in r.text
    return r.status_code


HOSTED = [{"type": "web_search_20250305", "name": "搜索"},
          {"type": "web_search_20250305", "name": 'a,b "c"\r\nX-Evil: 1'}]


def messages(s: Server, c: httpx.Client, stream: bool) -> int:
    tools = HOSTED + [{"name": f"tool_{uuid.uuid4().hex[:8]}", "description": "d",
                       "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    r = c.post(s.url + "/v1/messages", json={"model": served_name(s), "max_tokens": 6, "messages": USER, "stream": stream,
                                              "tools": tools})
    if r.status_code == 200:
        assert r.headers["x-glmserve-unsupported-tools"].startswith("%E6%90%9C%E7%B4%A2,a%2Cb")
        assert "x-evil" not in r.headers
        assert ("message_stop" in r.text) if stream else r.json()["type"] == "message"
    return r.status_code


def responses(s: Server, c: httpx.Client, stream: bool) -> int:
    r = c.post(s.base_url + "/responses", json={"model": served_name(s), "input": "Say hello.",
                                                 "max_output_tokens": 6, "stream": stream, "store": not stream})
    assert r.status_code != 200 or ("response.completed" in r.text or "response.incomplete" in r.text
                                    if stream else r.json()["object"] == "response")
    return r.status_code


def unknown_response(s: Server, c: httpx.Client) -> int:
    return c.get(f"{s.base_url}/responses/resp_{uuid.uuid4().hex}").status_code


def malformed(s: Server, c: httpx.Client) -> int:
    path = random.choice(["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions"])
    return c.post(s.url + path, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
                  ).status_code


def oversize(s: Server, c: httpx.Client) -> int:
    return c.post(s.base_url + "/chat/completions", json={"model": served_name(s), "messages": [
        {"role": "user", "content": "x" * (MAX_BODY + 10)}]}).status_code


def bad_schema(s: Server, c: httpx.Client) -> int:
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}, "required": ["a"]}}}
    return c.post(s.base_url + "/chat/completions", json={"model": served_name(s), "messages": USER, "tools": [tool],
                                                          "tool_choice": "required", "max_tokens": 6}).status_code


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return -1
        data += chunk
    return int(data.split(b" ", 2)[1])


def dribble(s: Server, head: bytes, byte: bytes) -> int:
    """Send ``head``, then ``byte`` every 0.3 s until the server answers (bounded)."""
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(head)
        sock.settimeout(0.3)
        deadline = time.monotonic() + 10 * READ_TIMEOUT
        while time.monotonic() < deadline:
            try:
                sock.send(byte)
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        sock.settimeout(30)
        return status_of(sock)


def slow_body(s: Server, c: httpx.Client) -> int:
    return dribble(s, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{", b" ")


def slow_headers(s: Server, c: httpx.Client) -> int:
    return dribble(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a")


def disconnect_mid_stream(s: Server, c: httpx.Client) -> int:
    path, payload = random.choice([
        ("/v1/chat/completions", {"model": served_name(s), "messages": USER, "max_tokens": 200, "stream": True}),
        ("/v1/messages", {"model": served_name(s), "messages": USER, "max_tokens": 200, "stream": True}),
        ("/v1/responses", {"model": served_name(s), "input": "Tell a story.", "max_output_tokens": 200,
                           "stream": True, "store": False}),
    ])
    data = json.dumps(payload).encode()
    with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status = status_of(sock)
    assert status == 200
    return 0


def post_head(path: str, data: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()


def slow_reader(s: Server, c: httpx.Client) -> int:
    """A stream whose client never reads (its window closed): the server must cut it (0) once its
    writes stall for --write-timeout (segments of 1400 bytes, as over a network: on loopback's
    64 KiB the kernel buffers megabytes first; 4 choices with 20 top logprobs fill it quickly)."""
    data = json.dumps({"model": served_name(s), "messages": USER, "max_tokens": 1500, "ignore_eos": True,
                       "stream": True, "n": 4, "logprobs": True, "top_logprobs": 20}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(post_head("/v1/chat/completions", data) + data)
        poller = select.poll()  # the reset, without reading what is waiting
        poller.register(sock, select.POLLERR | select.POLLHUP | select.POLLRDHUP)
        return 0 if poller.poll(120_000) else -1


def huge_head(s: Server, c: httpx.Client) -> int:
    """1 MiB of headers (over the default --max-header-bytes): 431."""
    with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
        try:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
            for _ in range(128):
                sock.sendall(b"X-Big: " + b"a" * 8192 + b"\r\n")
        except OSError:
            pass
        (status, _, _), = raw_responses(sock, ("POST", "/v1/messages"))
        return status


def pipelined_head(s: Server, c: httpx.Client) -> int:
    """A stream with a partial head pipelined behind it: the stream arrives whole, then the
    head's 408 (its deadline runs from the stream's end)."""
    data = json.dumps({"model": served_name(s), "messages": USER, "max_tokens": 6, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
        sock.sendall(post_head("/v1/chat/completions", data) + data + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-P")
        (first, stream, _), (second, _, _) = raw_responses(sock, ("POST", "/v1/chat/completions"),
                                                           ("GET", "/v1/models"))
    assert first == 200 and stream.rstrip().endswith(b"data: [DONE]"), stream[-300:]
    return second


KINDS: dict[str, tuple[Callable[[Server, httpx.Client], int], set[int]]] = {
    "chat": (chat, {200}),
    "chat_stream": (chat_stream, {200}),
    "completion_stream": (completion_stream, {200}),
    "messages": (lambda s, c: messages(s, c, False), {200}),
    "messages_stream": (lambda s, c: messages(s, c, True), {200}),
    "responses": (lambda s, c: responses(s, c, False), {200}),
    "responses_stream": (lambda s, c: responses(s, c, True), {200}),
    "unknown_response": (unknown_response, {404}),
    "malformed": (malformed, {400}),
    "oversize": (oversize, {413}),
    "bad_schema": (bad_schema, {400}),
    "slow_body": (slow_body, {408}),
    "slow_headers": (slow_headers, {408}),
    "disconnect": (disconnect_mid_stream, {0}),
    "slow_reader": (slow_reader, {0}),
    "huge_head": (huge_head, {431}),
    "pipelined_head": (pipelined_head, {408}),
}


# --------------------------------------------------------------------------- the server's state


def metrics(s: Server) -> list[str]:
    return [line for line in httpx.get(s.url + "/metrics", timeout=30).text.splitlines()
            if line and not line.startswith("#")]


def gauge(s: Server, name: str) -> float:
    return next(float(line.split()[-1]) for line in metrics(s) if line.startswith(name + " "))


def rss(s: Server) -> int:
    return psutil.Process(s.proc.pid).memory_info().rss


def wait_idle(s: Server, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if gauge(s, "glmserve_requests_running") == 0 and httpx.get(s.url + "/health", timeout=30).json()["running"] == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"requests still in flight after {within}s: {gauge(s, 'glmserve_requests_running')}")


def run_round(s: Server, names: list[str]) -> list[tuple[str, int]]:
    with httpx.Client(timeout=120) as c, ThreadPoolExecutor(WORKERS) as pool:
        return list(zip(names, pool.map(lambda name: KINDS[name][0](s, c), names)))


def test_soak_mixed_traffic_leaves_the_server_as_it_was(soak_server):
    s = soak_server
    random.seed(1234)
    run_round(s, list(KINDS))  # warm-up: every kind once, so every series that will exist exists
    wait_idle(s)
    rss0, series0 = rss(s), len(metrics(s))
    seen: Counter[tuple[str, int]] = Counter()
    t0 = time.monotonic()
    rounds = 0
    while time.monotonic() - t0 < SOAK_SECONDS and rounds < MAX_ROUNDS:
        names = list(KINDS) + random.choices(["chat", "chat_stream", "messages_stream", "responses_stream",
                                              "unknown_response", "malformed", "disconnect"], k=6)
        random.shuffle(names)
        for name, status in run_round(s, names):
            seen[(name, status)] += 1
            assert status in KINDS[name][1], (name, status)
        rounds += 1
    elapsed = time.monotonic() - t0
    wait_idle(s)
    rss1, lines = rss(s), metrics(s)
    total = sum(seen.values())
    print(f"\nsoak: {rounds} rounds, {total} requests in {elapsed:.0f}s; "
          f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({(rss1 - rss0) / 2**20:+.1f}); "
          f"/metrics series {series0} -> {len(lines)}")
    print("soak statuses:", dict(sorted(seen.items())))
    assert rounds >= 3 and seen[("unknown_response", 404)] >= 3
    # each client that stopped reading was cut by the write deadline (the warm-up's too), none other
    assert gauge(s, "glmserve_write_timeouts_total") == 1 + seen[("slow_reader", 0)]
    assert not any(status >= 500 for _, status in seen)  # (already asserted per request: named here for the log)
    # the server still answers
    r = httpx.post(s.base_url + "/chat/completions", json={"model": served_name(s), "messages": USER, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text
    # bounded: series do not grow with the distinct ids and tool names sent, nor memory with the requests
    assert not any("resp_" in line or "tool_" in line.split("{", 1)[-1] for line in lines if "{" in line), \
        [line for line in lines if "resp_" in line][:5]
    assert len(lines) <= series0 + 20, [line.rsplit(" ", 1)[0] for line in lines][-40:]
    assert rss1 - rss0 < RSS_GROWTH_LIMIT, (rss0, rss1)
