"""vllm-router (PyPI ``vllm-router``, a Rust binary; the test extra pins it) in front of
glmserve replicas, started by the tests themselves on loopback.

``VllmRouter(workers, policy, *flags)`` starts it on a free port, waits for its ``/health``
and stops it (its own process only) on ``stop()``.  Its Prometheus port is taken from
:func:`servers.free_port` too, so routers never collide with each other or other servers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from servers import LoopbackURLs, free_port


def router_bin() -> str:
    """The ``vllm-router`` next to this Python (the venv's), else on the PATH."""
    here = Path(sys.executable).parent / "vllm-router"
    found = str(here) if here.exists() else shutil.which("vllm-router")
    assert found, "vllm-router is not installed: run scripts/setup.sh (the test extra installs it)"
    return found


class VllmRouter(LoopbackURLs):
    def __init__(self, workers: list[str], policy: str, *flags: str, start_timeout: float = 60) -> None:
        self.port = free_port()
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        """Its Prometheus exporter."""
        self.workers = workers
        fd, name = tempfile.mkstemp(prefix="vllm-router-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        cmd = [router_bin(), "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *workers,
               "--policy", policy, "--prometheus-host", "127.0.0.1",
               "--prometheus-port", self.metrics_url.rsplit(":", 1)[1].split("/")[0],
               "--worker-startup-check-interval", "1", *flags]
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout
        while True:
            assert self.proc.poll() is None, f"vllm-router exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"vllm-router did not become healthy:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "VllmRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
