"""Server control: start glmserve or vLLM's own OpenAI server on a free loopback port, wait, stop.

Both servers get the same engine settings; each runs in its own process group so that stopping
it also stops vLLM's engine-core child. vLLM is started as a command line
(``python -m vllm.entrypoints.openai.api_server``), never imported.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """A server subprocess started by the bench (own process group), stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_dir: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_healthy(self, timeout: float) -> float:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during start-up; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not healthy after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # the engine core runs in its own child process: make sure nothing of the group outlives us
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            pass
        else:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
            else:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._logf.close()


def server_command(which: str, args: argparse.Namespace, model: str, port: int) -> list[str]:
    """The command line each server is started with (same engine settings for both)."""
    common = ["--port", str(port), "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
              "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--served-model-name", args.served_name]
    if args.enforce_eager:
        common.append("--enforce-eager")
    # glmserve turns prefix caching on explicitly (engine.vllm_args); vLLM gets the same flag
    common.append("--enable-prefix-caching")
    if which == "glmserve":
        cmd = [sys.executable, "-m", "glmserve", "serve", model, "--host", "127.0.0.1", *common]
        if args.chat_format:
            cmd += ["--chat-format", args.chat_format]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               *common, "--disable-uvicorn-access-log"]
        if args.vllm_tools == "auto":
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", args.vllm_tool_parser]
            if args.vllm_tool_parser.startswith("glmserve-"):
                cmd += glmserve_plugin_args()
    extra = args.glmserve_arg if which == "glmserve" else args.vllm_arg
    return cmd + [x for item in (extra or []) for x in item.split()]


def glmserve_plugin_args() -> list[str]:
    """vLLM flags for glmserve's GLM-4 tool-parser plugin and the template that shows the model the
    request's tools as glmserve's ``glm4`` format does (so both servers prefill the same tokens)."""
    import glmserve

    pkg = Path(glmserve.__file__).parent
    return ["--tool-parser-plugin", str(pkg / "vllm_plugin.py"), "--chat-template", str(pkg / "templates" / "glm4_tools.jinja")]


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.kv_cache_gib is not None:
        # vLLM reads it with int(): "2.0" fails to start, so whole numbers are written without ".0"
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    return env


def served_model_id(url: str, fallback: str) -> str:
    import httpx

    try:
        r = httpx.get(url + "/v1/models", timeout=10, trust_env=False)
        data = r.json().get("data") or []
        if data:
            return data[0]["id"]
    except Exception:
        pass
    return fallback
