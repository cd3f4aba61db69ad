"""Hostile clients against a real ``glmserve serve`` on loopback, on each HTTP/1.1 parser the
server can run with (httptools, what uvicorn picks when it is installed, and h11).

The server is ``tests/scripted_serve.py``: the command's own flags, settings and HTTP server with
a scripted engine in vLLM's place (one start per parser, about a second; the real engine's check
is in tests/e2e/test_robustness.py).  ``--max-concurrent-requests 2`` so that a held slot shows
as a 429, and short deadlines (``--read-timeout 1 --write-timeout 1``) so that each vector costs
about its deadline.  The vectors: a stream never read, a huge head (many headers, and one endless
header), headers dribbled, a partial head pipelined behind a live stream, a client gone
mid-stream, a connection that says nothing, keep-alive across the deadline.  After each: the
server serves others, no slot is held, and its RSS grew by a bounded amount.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from raw_http import responses
from servers import LoopbackURLs, dribble_until_answered, free_port

from glmserve.api.http_protocol import HttpToolsProtocol

KEY = "hostile-key-Q9"
LIMIT = 2  # --max-concurrent-requests
READ_TIMEOUT = 1.0
WRITE_TIMEOUT = 1.0
MAX_HEADER_BYTES = 64 * 1024  # the documented default: no flag given
WAIT = 30.0  # generous: the machine is shared
RSS_GROWTH = 24 * 2**20  # (the finding: 190 MiB for one client's headers)
PIECE = "x" * 2000  # each streamed piece: a client that stops reading fills the buffers quickly
ENTRY = Path(__file__).resolve().parent.parent / "scripted_serve.py"
PARSERS = ["h11"] + (["httptools"] if HttpToolsProtocol is not None else [])


class ScriptedServe(LoopbackURLs):
    def __init__(self, http: str, tmp: Path) -> None:
        self.port = free_port()
        self.log_path = tmp / f"serve-{http}.log"
        cmd = [sys.executable, str(ENTRY), "--port", str(self.port), "--http", http, "--piece", PIECE,
               "--max-concurrent-requests", str(LIMIT), "--read-timeout", str(READ_TIMEOUT),
               "--write-timeout", str(WRITE_TIMEOUT), "--api-key", KEY, "--responses-db", str(tmp / f"r-{http}.sqlite3")]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert_serves(self)
        self.rss0 = self.rss()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=WAIT).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def in_flight(self) -> int:
        return int(self.metric("glmserve_requests_running"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def servers():
    """One server per parser, started together (each in about a second, on an idle machine)."""
    with tempfile.TemporaryDirectory(prefix="glmserve-hostile-") as tmp:
        started = {http: ScriptedServe(http, Path(tmp)) for http in PARSERS}
        try:
            for s in started.values():
                s.wait_ready()
            yield started
        finally:
            for s in started.values():
                s.stop()


@pytest.fixture(params=PARSERS)
def serve(request, servers):
    return servers[request.param]


def chat(stream: bool, max_tokens: int = 4, pace: float = 0.0) -> bytes:
    return json.dumps({"model": "scripted", "max_tokens": max_tokens, "stream": stream,
                       "messages": [{"role": "user", "content": f"hi pace={pace}"}]}).encode()


def head(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()


AUTH = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}


def connect(s: ScriptedServe, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting: the window the client offers, in segments of 1400
        # bytes as over a network (on loopback's 64 KiB ones the kernel would buffer megabytes first)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", s.port))
    return sock


def assert_serves(s: ScriptedServe) -> None:
    r = httpx.post(s.base_url + "/chat/completions", content=chat(False), timeout=WAIT, headers=AUTH)
    assert r.status_code == 200, r.text


def wait_idle(s: ScriptedServe, within: float) -> float:
    """Seconds until no slot is held (fails past ``within``)."""
    t0 = time.monotonic()
    while s.in_flight():
        assert time.monotonic() - t0 < within, f"{s.in_flight()} slots still held after {within} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def assert_unharmed(s: ScriptedServe) -> None:
    """No slot held, others served, memory bounded."""
    wait_idle(s, WAIT)
    assert_serves(s)
    grown = s.rss() - s.rss0
    assert grown < RSS_GROWTH, f"RSS grew by {grown / 2**20:.1f} MiB"


def log_lines(s: ScriptedServe, *words: str) -> list[str]:
    return [line for line in s.log().splitlines() if "glmserve.requests" in line and all(w in line for w in words)]


# --------------------------------------------------------------------------- the write side


def test_a_stream_never_read_is_cut_at_the_write_deadline(serve):
    """The finding: streams whose clients stop reading held their slots for good (every new
    client 429).  Now each is cut once its writes make no progress for --write-timeout: the slot
    freed, the engine request aborted, the request logged 499 write_timeout and counted."""
    s = serve
    counted = s.metric("glmserve_write_timeouts_total")
    counted_cut = s.metric('glmserve_requests_cut_total{endpoint="chat",reason="write_timeout"}')
    cut = len(log_lines(s, "status=499", "write_timeout=True"))
    t0 = time.monotonic()
    socks = [connect(s, rcvbuf=4096) for _ in range(LIMIT)]
    try:
        for sock in socks:
            body = chat(True, max_tokens=1_000_000)
            sock.sendall(head("/v1/chat/completions", body) + body)
        deadline = time.monotonic() + WAIT
        while s.in_flight() < LIMIT:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(s.base_url + "/chat/completions", content=chat(False), timeout=WAIT, headers=AUTH)
        assert r.status_code == 429  # both slots held, by clients reading nothing
        held = time.monotonic() - t0 + wait_idle(s, WAIT)
        print(f"\nslots held by non-reading clients: {held:.2f} s (write deadline {WRITE_TIMEOUT:g} s)")
        assert held >= WRITE_TIMEOUT
        assert s.metric("glmserve_write_timeouts_total") == counted + LIMIT
        deadline = time.monotonic() + WAIT  # the log line follows the slot's release
        while len(log_lines(s, "status=499", "write_timeout=True")) < cut + LIMIT:
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.05)
        assert s.metric('glmserve_requests_cut_total{endpoint="chat",reason="write_timeout"}') == counted_cut + LIMIT
        for sock in socks:  # reset: the client is told, and the kernel keeps none of the unsent bytes
            sock.settimeout(WAIT)
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
    finally:
        for sock in socks:
            sock.close()
    assert_unharmed(s)


def test_a_client_gone_mid_stream_frees_its_slot_and_is_logged_499(serve):
    s = serve
    gone = len(log_lines(s, "status=499", "disconnected=True"))
    counted_cut = s.metric('glmserve_requests_cut_total{endpoint="chat",reason="disconnected"}')
    sock = connect(s)
    body = chat(True, max_tokens=400, pace=0.01)
    sock.sendall(head("/v1/chat/completions", body) + body)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()
    print(f"\nslot freed {wait_idle(s, WAIT):.2f} s after the client closed")
    deadline = time.monotonic() + WAIT
    while len(log_lines(s, "status=499", "disconnected=True")) <= gone:
        assert time.monotonic() < deadline, s.log()[-3000:]
        time.sleep(0.05)
    assert s.metric('glmserve_requests_cut_total{endpoint="chat",reason="disconnected"}') == counted_cut + 1
    assert_unharmed(s)


# --------------------------------------------------------------------------- the head


def test_a_huge_head_is_431_and_never_read_into_memory(serve):
    """The finding: under httptools 210 MB of headers were accepted (RSS +203 MB)."""
    s = serve
    counted = s.metric("glmserve_requests_total")
    for path, line in (("/v1/messages", b"X-Big: " + b"a" * 8000 + b"\r\n"),  # many headers
                       ("/v1/chat/completions", b"b" * 65536)):  # one header that never ends
        sock = connect(s)
        sent = 0
        try:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Endless: ".encode())
            while sent < 64 * 2**20:  # until the server stops taking it
                sock.sendall(line)
                sent += len(line)
        except OSError:
            pass
        try:
            (status, content, _), = responses(sock, ("POST", path))
        finally:
            sock.close()
        assert status == 431, content
        err = json.loads(content)
        if path == "/v1/messages":
            assert err["type"] == "error" and "request head exceeds" in err["error"]["message"]
        else:
            assert err["error"]["code"] == "request_header_fields_too_large"
        grown = s.rss() - s.rss0
        print(f"\n{path}: sent {sent / 2**20:.1f} MiB of head; RSS {grown / 2**20:+.1f} MiB")
        assert grown < RSS_GROWTH
    assert s.metric("glmserve_requests_total") == counted + 2  # both 431s
    # a head just within the limit is served
    big = [("x-pad-%d" % i, "p" * 1000) for i in range(MAX_HEADER_BYTES // 1100)]
    r = httpx.get(s.base_url + "/models", headers=[*AUTH.items(), *big], timeout=WAIT)
    assert r.status_code == 200, r.text
    assert_unharmed(s)


@pytest.mark.parametrize("http, path", list(zip(PARSERS, ["/v1/messages", "/v1/chat/completions"])))
def test_headers_dribbled_are_a_408_in_the_paths_shape(servers, http, path):
    """(One error shape per parser: the shape follows the path, whichever parser read it.)"""
    s = servers[http]
    before = s.metric("glmserve_requests_total")
    sock = connect(s)
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        elapsed = dribble_until_answered(sock, b"a", 10 * READ_TIMEOUT, WAIT)
        (status, content, _), = responses(sock, ("POST", path))
    finally:
        sock.close()
    assert status == 408
    err = json.loads(content)
    if path == "/v1/messages":  # the request line named /v1/messages: Anthropic's shape
        assert err["type"] == "error" and "headers did not arrive" in err["error"]["message"]
    else:
        assert err["error"]["code"] == "request_timeout"
    assert READ_TIMEOUT * 0.9 <= elapsed < 8 * READ_TIMEOUT
    text = httpx.get(s.url + "/metrics", timeout=WAIT).text
    assert 'glmserve_requests_total{endpoint="other",status="408"}' in text
    assert s.metric("glmserve_requests_total") == before + 1
    assert_unharmed(s)


@pytest.mark.parametrize("tail, status, pace", [
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Part", 408, 1.5 * READ_TIMEOUT / 40),  # outlives the deadline
    (b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n", 400, 0.5 / 40),  # refused by the parser at once
], ids=["partial-head", "malformed-head"])
def test_a_head_pipelined_behind_a_live_stream_is_answered_after_it(serve, tail, status, pace):
    """The finding: the deadline of a pipelined head wrote a raw 408 into the middle of the
    chunked stream before it (httptools, which parses ahead; its 400 for a malformed head did
    the same).  Now the stream ends whole, and the head's answer follows it as a response of its
    own; a partial head's deadline runs from the stream's end."""
    s = serve
    sock = connect(s)
    body = chat(True, max_tokens=40, pace=pace)
    try:
        sock.sendall(head("/v1/chat/completions", body) + body + tail)
        (status1, stream, ended), (status2, content, answered) = responses(
            sock, ("POST", "/v1/chat/completions"), ("GET", "/v1/models"))
    finally:
        sock.close()
    assert status1 == 200 and stream.rstrip().endswith(b"data: [DONE]"), stream[-300:]
    assert stream.count(b'"finish_reason": "length"') == 1
    assert status2 == status, content
    if status == 408:
        assert json.loads(content)["error"]["code"] == "request_timeout"
        assert ended >= 1.2 * READ_TIMEOUT  # the stream outlived the deadline ...
        assert 0.9 * READ_TIMEOUT <= answered - ended < 8 * READ_TIMEOUT  # ... which ran from its end
    assert_unharmed(s)


def test_a_connection_that_sends_nothing_is_closed(serve):
    sock = connect(serve)
    try:
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # closed without an answer
        assert time.monotonic() - t0 < 8 * READ_TIMEOUT
    finally:
        sock.close()


def test_the_head_deadline_restarts_with_each_request_of_a_keep_alive_connection(serve):
    """One connection outlives the head deadline: two requests, each head split in two sent 0.6
    deadline apart, 0.6 deadline idle between them: served only if the deadline runs per head,
    from its first byte (a deadline per connection, or one that kept running between requests,
    would cut it)."""
    s = serve
    sock = connect(s)
    gap = 0.6 * READ_TIMEOUT
    t0 = time.monotonic()
    try:
        for i in range(2):
            if i:
                time.sleep(gap)  # idle between requests (under uvicorn's keep-alive of 5 s)
            request = head("/v1/chat/completions", chat(False)) + chat(False)
            sock.sendall(request[:20])
            time.sleep(gap)
            sock.sendall(request[20:])
            data = sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            while not data.endswith(b"}"):  # the whole JSON answer (one small write)
                data += sock.recv(65536)
        assert time.monotonic() - t0 > 1.5 * READ_TIMEOUT
    finally:
        sock.close()
    assert_unharmed(s)


def test_every_answer_is_counted(servers):
    """glmserve_requests_total counts, by route template, what the middleware answers before
    routing: 401 (a wrong key), 413 (a body over the limit), 408 (a body too slow); and 429 (the
    431 and the head's 408, which come before any route, are counted above as endpoint "other").
    (ASGI middleware: the same whichever parser read the request.)"""
    s = servers[PARSERS[-1]]
    url = s.base_url + "/chat/completions"
    assert httpx.post(url, content=chat(False), timeout=WAIT, headers={"authorization": "Bearer nope"}
                      ).status_code == 401
    huge = b'{"model": "scripted", "messages": [], "x": "' + b"a" * (8 * 2**20) + b'"}'
    assert httpx.post(url, content=huge, timeout=WAIT, headers=AUTH).status_code == 413
    sock = connect(s)
    try:
        sock.sendall(head("/v1/chat/completions", b"x" * 100) + b"{")
        (status, _, _), = responses(sock, ("POST", "/v1/chat/completions"))
        assert status == 408
    finally:
        sock.close()
    holders = [connect(s) for _ in range(LIMIT)]
    try:
        for sock in holders:
            body = chat(True, max_tokens=100, pace=0.05)
            sock.sendall(head("/v1/chat/completions", body) + body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert httpx.post(url, content=chat(False), timeout=WAIT, headers=AUTH).status_code == 429
    finally:
        for sock in holders:
            sock.close()
    text = httpx.get(s.url + "/metrics", timeout=WAIT).text
    for status in ("401", "413", "408", "429"):
        assert f'glmserve_requests_total{{endpoint="/v1/chat/completions",status="{status}"}}' in text, text
    assert_unharmed(s)
