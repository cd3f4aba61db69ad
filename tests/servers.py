"""Starting real glmserve servers for the end-to-end tests.

Each server is the real CLI (``python -m glmserve serve``) in a subprocess on a free
loopback port, talking to a real vLLM engine; tests reach it over HTTP with the
``openai`` client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

START_TIMEOUT = float(os.environ.get("GLMSERVE_TEST_START_TIMEOUT", "420"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackURLs:
    """The addresses of a server listening on ``self.port`` on loopback."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@dataclass
class Server(LoopbackURLs):
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    extra: dict = field(default_factory=dict)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, timeout=120, **kw)

    def async_client(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, timeout=120, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class ThreadServer(LoopbackURLs):
    """An ASGI app served by uvicorn in a thread on a free loopback port: the protocol tests'
    real HTTP stack without a subprocess (subclasses build the app, then call ``__init__``)."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def dribble_until_answered(sock: socket.socket, byte: bytes, within: float, then_timeout: float) -> float:
    """Send ``byte`` every 0.2 s until the server answers (or closes), at most ``within``
    seconds; the seconds that took.  The socket's timeout is ``then_timeout`` afterwards."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < within:
        try:
            sock.send(byte)
        except OSError:  # the server already closed: it has answered
            break
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except TimeoutError:
            continue
    sock.settimeout(then_timeout)
    return time.monotonic() - t0


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Until ``url``'s ``/health`` answers 200; a RuntimeError (with the log's tail) when the
    process exits first or ``timeout`` seconds pass, after killing it."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    code = proc.poll()
    proc.kill()
    tail = log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"the server at {url} did not become healthy "
                       f"({'exited ' + str(code) if code is not None else f'{timeout:.0f}s passed'}):\n{tail}")


def start_server(model: str | None, *args: str, api_key: str | None = None, env: dict | None = None,
                 max_model_len: int = 2048) -> Server:
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="glmserve-test-", suffix=".log")
    os.close(fd)
    cmd = [sys.executable, "-m", "glmserve", "serve"]
    if model:
        cmd.append(model)
    cmd += ["--port", str(port), "--max-model-len", str(max_model_len), "--enforce-eager", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    logf = open(log_name, "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(proc=proc, port=port, log_path=Path(log_name), api_key=api_key)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up:\n{server.log()[-6000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become healthy in {START_TIMEOUT:.0f}s:\n{server.log()[-6000:]}")


class LazyServer:
    """Starts its server on first use (so a filtered test run starts only what it needs)."""

    def __init__(self, factory) -> None:
        self._factory = factory
        self._server: Server | None = None
        self._lock = threading.Lock()

    def get(self) -> Server:
        with self._lock:
            if self._server is None:
                self._server = self._factory()
            return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
